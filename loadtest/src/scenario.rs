//! Running a workload: connect the users, drive an open-loop send schedule, collect.
//!
//! Every user is an *agent* task that owns its connection (and reconnects when asked to).
//! The scheduler decides, from a fixed schedule of intended send times, who sends what to
//! whom; it never waits for answers (open loop), so a slow server shows up as latency
//! measured from the intended time instead of as a lower offered rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{self, ClientFrame, ServerFrame, Target, Tokens};
use crate::e2ee::E2eeDevice;
use crate::ledger::{key, Body, Key, Ledger};
use crate::stats::Stats;

/// Who connects where.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// Gateway URLs; users are spread over them round-robin.
    pub urls: Vec<String>,
    pub tokens: Tokens,
    /// Users in the whole run (all processes).
    pub users: u32,
    /// The users this process hosts: `first_user .. first_user + local_users`.
    pub first_user: u32,
    pub local_users: u32,
    /// User ids are `<prefix><index>`; a fresh prefix per run keeps runs apart.
    pub prefix: String,
    /// Source addresses to connect from, round-robin (empty: the OS chooses).
    pub source_ips: Vec<IpAddr>,
    /// Connections opened at once while connecting.
    pub concurrency: usize,
}

impl Fleet {
    pub fn user(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    fn target(&self, index: u32, token: String) -> Target {
        let i = index as usize;
        Target {
            url: self.urls[i % self.urls.len()].clone(),
            token,
            user: self.user(index),
            device: "lt".into(),
            source_ip: (!self.source_ips.is_empty())
                .then(|| self.source_ips[i % self.source_ips.len()]),
        }
    }
}

/// What the users do once connected.
#[derive(Clone, Debug)]
pub enum Workload {
    /// Hold the connections.
    Idle { hold: Duration },
    /// Each message goes from a random user to another random user. `rates` are msgs/s
    /// for consecutive steps of `step` each (one rate: constant).
    Direct { rates: Vec<f64>, step: Duration },
    /// Users form groups of `size`; each message goes from a random user to its group.
    Group {
        size: u32,
        rates: Vec<f64>,
        step: Duration,
    },
    /// Direct traffic while, every `every`, a `fraction` of users drop their connection
    /// and come back after `offline`; what was sent to them meanwhile must arrive.
    Reconnect {
        rates: Vec<f64>,
        step: Duration,
        fraction: f64,
        every: Duration,
        offline: Duration,
    },
    /// Open `per_second` new connections per second until every user is connected, then
    /// hold them for `hold`.
    Ramp { per_second: f64, hold: Duration },
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Idle { .. } => "idle",
            Workload::Direct { .. } => "direct",
            Workload::Group { .. } => "group",
            Workload::Reconnect { .. } => "reconnect",
            Workload::Ramp { .. } => "ramp",
        }
    }

    fn schedule(&self) -> Option<(&[f64], Duration)> {
        match self {
            Workload::Direct { rates, step }
            | Workload::Group { rates, step, .. }
            | Workload::Reconnect { rates, step, .. } => Some((rates, *step)),
            Workload::Idle { .. } | Workload::Ramp { .. } => None,
        }
    }
}

/// Knobs of a run that are not the workload.
#[derive(Clone, Debug)]
pub struct Options {
    pub body_bytes: usize,
    /// After the last send, how long to wait for outstanding deliveries.
    pub drain: Duration,
    /// This process is one of several: it cannot see other processes' recipients, so it
    /// drains until arrivals go quiet instead of until nothing is outstanding.
    pub partial: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// How long connecting every user may take; the run goes on with those connected.
    pub connect_timeout: Duration,
    /// Send end-to-end encrypted messages (Olm for direct ones, Megolm in groups); the
    /// checker decrypts what arrives.
    pub e2ee: bool,
    /// The fraction of (server-encrypted) messages that carry an attachment: each user
    /// uploads one file of `attachment_bytes` before the run, and recipients download
    /// every attachment they get and check its bytes.
    pub attachments: f64,
    pub attachment_bytes: usize,
}

/// A quiet run of plain 100-byte messages: no progress bar, no attachments, one process.
impl Default for Options {
    fn default() -> Self {
        Options {
            body_bytes: 100,
            drain: Duration::from_secs(10),
            partial: false,
            progress: false,
            connect_timeout: Duration::from_secs(60),
            e2ee: false,
            attachments: 0.0,
            attachment_bytes: 0,
        }
    }
}

/// What a run measured, before reporting.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stats: Stats,
    pub ledger: Ledger,
    /// Seconds from the first intended send to the end of the schedule.
    pub send_secs: f64,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

#[derive(Default)]
struct Collector {
    stats: Stats,
    ledger: Ledger,
    /// Offered, waiting for `sent` or `error`: recipients and intended time.
    in_flight: HashMap<Key, (Vec<u32>, u64)>,
    /// Wall-clock µs of the start of the send phase (the timeline's zero).
    origin_us: u64,
    /// Wall-clock µs of the end of the send schedule, once it ended.
    schedule_end_us: Option<u64>,
}

impl Collector {
    fn second_of(&self, at_us: u64) -> u64 {
        at_us.saturating_sub(self.origin_us) / 1_000_000
    }
}

/// State shared by the scheduler and every agent.
struct Shared {
    collector: Mutex<Collector>,
    /// Users hosted here, by local index.
    agents: Vec<Arc<Agent>>,
    stop: CancellationToken,
    /// Attachment downloads under way (awaited before the run reports).
    downloads: tokio_util::task::TaskTracker,
    http: reqwest::Client,
}

impl Shared {
    fn collector(&self) -> MutexGuard<'_, Collector> {
        self.collector.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Agent {
    index: u32,
    outbox: mpsc::Sender<String>,
    online: AtomicBool,
    /// Connected at least once (for the connect phase).
    ready: Notify,
    seq: AtomicU32,
    /// Drop the connection now and come back after this long.
    drop_for: Mutex<Option<Duration>>,
    dropped: Notify,
    /// With `--e2ee`: the device's keys and sessions, and what it decrypted (a message that
    /// comes again cannot be decrypted twice).
    e2ee: Option<Mutex<Decrypting>>,
    /// With `--attachments`: the media id of this user's uploaded file.
    media: std::sync::OnceLock<String>,
}

/// A device's end-to-end encryption state in a run.
struct Decrypting {
    device: E2eeDevice,
    /// Message id → what it carried.
    seen: HashMap<String, Body>,
}

impl Agent {
    fn e2ee(&self) -> Option<MutexGuard<'_, Decrypting>> {
        self.e2ee
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The users an `--e2ee` direct sender writes to: the next few local users (each pair
/// needs an Olm session, set up before the run).
const E2EE_CONTACTS: u32 = 8;

fn contacts(fleet: &Fleet, sender: u32) -> Vec<u32> {
    let local = fleet.local_users.max(1);
    let count = E2EE_CONTACTS.min(local.saturating_sub(1));
    (1..=count)
        .map(|k| fleet.first_user + (sender - fleet.first_user + k) % local)
        .collect()
}

/// Runs a workload with the users of `fleet` hosted in this process.
pub async fn run(
    fleet: &Fleet,
    workload: &Workload,
    options: &Options,
    start_gate: Option<StartGate>,
) -> anyhow::Result<Outcome> {
    let stop = CancellationToken::new();
    let mut agents = Vec::new();
    let mut inboxes = Vec::new();
    for i in 0..fleet.local_users {
        let (outbox, inbox) = mpsc::channel(4096);
        agents.push(Arc::new(Agent {
            index: fleet.first_user + i,
            outbox,
            online: AtomicBool::new(false),
            ready: Notify::new(),
            seq: AtomicU32::new(0),
            drop_for: Mutex::new(None),
            dropped: Notify::new(),
            e2ee: options.e2ee.then(|| {
                Mutex::new(Decrypting {
                    device: E2eeDevice::new(&fleet.user(fleet.first_user + i), DEVICE),
                    seen: HashMap::new(),
                })
            }),
            media: std::sync::OnceLock::new(),
        }));
        inboxes.push(inbox);
    }
    let shared = Arc::new(Shared {
        collector: Mutex::new(Collector::default()),
        agents,
        stop: stop.clone(),
        downloads: tokio_util::task::TaskTracker::new(),
        http: reqwest::Client::new(),
    });

    // Groups are created before anyone connects, over short setup connections.
    let groups = match workload {
        Workload::Group { size, .. } => Some(create_groups(fleet, *size).await?),
        _ => None,
    };
    if options.e2ee {
        e2ee_setup(fleet, &shared, &groups).await?;
    }
    if options.attachments > 0.0 {
        media_setup(fleet, &shared, options.attachment_bytes).await?;
    }

    // Connect: all at once (bounded), or at the ramp's rate.
    let progress =
        crate::report::progress(options.progress, fleet.local_users as u64, "connecting");
    let connect_interval = match workload {
        Workload::Ramp { per_second, .. } => {
            Some(Duration::from_secs_f64(1.0 / per_second.max(0.001)))
        }
        _ => None,
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(fleet.concurrency.max(1)));
    let mut tasks = Vec::new();
    for (agent, inbox) in shared.agents.iter().cloned().zip(inboxes) {
        if let Some(interval) = connect_interval {
            tokio::time::sleep(interval).await;
        }
        let token = fleet
            .tokens
            .token(
                &fleet.urls[agent.index as usize % fleet.urls.len()],
                &fleet.user(agent.index),
            )
            .await?;
        let target = fleet.target(agent.index, token);
        tasks.push(tokio::spawn(agent_loop(
            agent,
            target,
            inbox,
            shared.clone(),
            limit.clone(),
        )));
    }
    // Bounded: a run whose server is down must end by itself, with the reason.
    let deadline = Instant::now() + options.connect_timeout;
    for agent in &shared.agents {
        tokio::select! {
            _ = agent.ready.notified() => progress.inc(1),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    progress.finish_and_clear();
    let connected = shared.collector().stats.connected;
    tracing::info!(connected, users = fleet.local_users, "connected");
    if connected == 0 && fleet.local_users > 0 {
        stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        let errors = shared.collector().stats.errors.clone();
        anyhow::bail!(
            "no user could connect within {:?} to {:?} (failures: {errors:?})",
            options.connect_timeout,
            fleet.urls
        );
    }

    if let Some(gate) = start_gate {
        gate.wait().await;
    }

    let origin = Instant::now();
    let origin_us = now_us();
    shared.collector().origin_us = origin_us;
    let mut send_secs = 0.0;
    match workload {
        Workload::Idle { hold } | Workload::Ramp { hold, .. } => {
            tokio::time::sleep(*hold).await;
        }
        _ => {
            if let Some((rates, step)) = workload.schedule() {
                let reconnect = match workload {
                    Workload::Reconnect {
                        fraction,
                        every,
                        offline,
                        ..
                    } => Some((*fraction, *every, *offline)),
                    _ => None,
                };
                let churn = reconnect.map(|(fraction, every, offline)| {
                    tokio::spawn(churn(shared.clone(), fraction, every, offline))
                });
                schedule(
                    fleet, &shared, &groups, rates, step, options, origin, origin_us,
                )
                .await;
                send_secs = origin.elapsed().as_secs_f64();
                shared.collector().schedule_end_us = Some(now_us());
                if let Some(churn) = churn {
                    churn.abort();
                }
                drain(&shared, options).await;
            }
        }
    }
    shared.downloads.close();
    if tokio::time::timeout(
        options.drain.max(Duration::from_secs(5)),
        shared.downloads.wait(),
    )
    .await
    .is_err()
    {
        shared
            .collector()
            .stats
            .error("attachment_download_timeout");
    }

    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let collector = std::mem::take(&mut *shared.collector());
    let mut stats = collector.stats;
    if !collector.in_flight.is_empty() {
        *stats.errors.entry("no_answer".into()).or_default() += collector.in_flight.len() as u64;
    }
    Ok(Outcome {
        stats,
        ledger: collector.ledger,
        send_secs,
    })
}

/// Lets several processes start their send phase together.
pub struct StartGate(
    pub Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>,
);

impl std::fmt::Debug for StartGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartGate")
    }
}

impl StartGate {
    async fn wait(self) {
        (self.0)().await;
    }
}

/// The groups of the group workload: user `i` belongs to group `i / size`.
#[derive(Debug)]
struct Groups {
    size: u32,
    /// Group number → (conversation, members).
    by_number: HashMap<u32, (String, Vec<u32>)>,
}

/// Creates the groups of the group workload over short setup connections.
async fn create_groups(fleet: &Fleet, size: u32) -> anyhow::Result<Groups> {
    let size = size.max(2);
    let mut groups = HashMap::new();
    let mut first = (fleet.first_user / size) * size;
    while first < fleet.first_user + fleet.local_users {
        let members: Vec<u32> = (first..(first + size).min(fleet.users)).collect();
        let creator = members[0];
        let token = fleet
            .tokens
            .token(
                &fleet.urls[creator as usize % fleet.urls.len()],
                &fleet.user(creator),
            )
            .await?;
        let mut target = fleet.target(creator, token);
        target.device = "setup".into();
        let (mut writer, mut reader, _) = client::connect(&target).await?;
        let others: Vec<String> = members[1..].iter().map(|m| fleet.user(*m)).collect();
        writer
            .send(&ClientFrame::CreateGroup {
                reference: json!(first),
                name: format!("lt group {first}"),
                members: others,
            })
            .await?;
        let conversation = loop {
            match reader.next().await? {
                Some(ServerFrame::Group { conversation, .. }) => break conversation,
                Some(ServerFrame::Error { code, message, .. }) => {
                    anyhow::bail!("creating a group: {code}: {message}")
                }
                Some(_) => continue,
                None => anyhow::bail!("the connection closed while creating a group"),
            }
        };
        writer.close().await;
        groups.insert(first / size, (conversation, members));
        first += size;
    }
    Ok(Groups {
        size,
        by_number: groups,
    })
}

#[allow(clippy::too_many_arguments)]
async fn schedule(
    fleet: &Fleet,
    shared: &Arc<Shared>,
    groups: &Option<Groups>,
    rates: &[f64],
    step: Duration,
    options: &Options,
    origin: Instant,
    origin_us: u64,
) {
    let total: u64 = rates.iter().map(|r| (r * step.as_secs_f64()) as u64).sum();
    let progress = crate::report::progress(options.progress, total, "sending");
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut step_start = origin;
    for rate in rates {
        let count = (rate * step.as_secs_f64()) as u64;
        for j in 0..count {
            let intended = step_start + Duration::from_secs_f64(j as f64 / rate);
            if intended > Instant::now() {
                tokio::time::sleep_until(intended).await;
            }
            let intended_us = origin_us + intended.duration_since(origin).as_micros() as u64;
            // An online sender, chosen at random (a few tries while users reconnect).
            let mut sender = None;
            for _ in 0..8 {
                let agent = &shared.agents[rng.gen_range(0..shared.agents.len())];
                if agent.online.load(Ordering::Acquire) {
                    sender = Some(agent.clone());
                    break;
                }
            }
            let Some(sender) = sender else {
                shared.collector().stats.error("sender_offline");
                continue;
            };
            let group = groups
                .as_ref()
                .and_then(|g| g.by_number.get(&(sender.index / g.size)));
            let (to, conversation, recipients) = match group {
                _ if options.e2ee && group.is_none() => {
                    let contacts = contacts(fleet, sender.index);
                    if contacts.is_empty() {
                        shared.collector().stats.error("no_contacts");
                        continue;
                    }
                    let recipient = contacts[rng.gen_range(0..contacts.len())];
                    (Some(fleet.user(recipient)), None, vec![recipient])
                }
                Some((conversation, members)) => {
                    let recipients = members
                        .iter()
                        .copied()
                        .filter(|m| *m != sender.index)
                        .collect();
                    (None, Some(conversation.clone()), recipients)
                }
                _ => {
                    let mut recipient = rng.gen_range(0..fleet.users.max(2) - 1);
                    if recipient >= sender.index {
                        recipient += 1;
                    }
                    (Some(fleet.user(recipient)), None, vec![recipient])
                }
            };
            let seq = sender.seq.fetch_add(1, Ordering::Relaxed);
            let k = key(sender.index, seq);
            let body = Body {
                sender: sender.index,
                seq,
                intended_us,
            }
            .encode(options.body_bytes);
            let client_msg_id = format!("s{}.{seq}", sender.index);
            let frame = match sender.e2ee() {
                // Encrypted here, in send order: each session's messages go out in the
                // order they were encrypted.
                Some(mut e2ee) => {
                    let encrypted = match (&to, &conversation) {
                        (Some(to), _) => e2ee
                            .device
                            .encrypt_direct(&[(to.clone(), DEVICE.to_owned())], &body),
                        (None, Some(conversation)) => {
                            e2ee.device.encrypt_group(conversation, &body)
                        }
                        (None, None) => Err(anyhow::anyhow!("no recipient")),
                    };
                    match encrypted {
                        Ok(e2ee) => json!({
                            "type": "send",
                            "client_msg_id": client_msg_id,
                            "to": to,
                            "conversation": conversation,
                            "e2ee": e2ee,
                        })
                        .to_string(),
                        Err(e) => {
                            tracing::warn!(error = %e, "encrypting failed");
                            drop(e2ee);
                            shared.collector().stats.error("encrypt_failed");
                            continue;
                        }
                    }
                }
                None => ClientFrame::Send {
                    client_msg_id,
                    to,
                    conversation,
                    body,
                    attachments: match sender.media.get() {
                        Some(media) if rng.gen_bool(options.attachments.clamp(0.0, 1.0)) => {
                            vec![json!({ "media_id": media })]
                        }
                        _ => Vec::new(),
                    },
                }
                .to_json(),
            };
            {
                let mut c = shared.collector();
                c.in_flight.insert(k, (recipients, intended_us));
                c.stats.offered += 1;
                let second = c.second_of(intended_us);
                c.stats.second(second).offered += 1;
            }
            if sender.outbox.send(frame).await.is_err() {
                shared.collector().stats.error("client_closed");
            }
            progress.inc(1);
        }
        step_start += step;
    }
    progress.finish_and_clear();
}

/// Drops a fraction of the users every `every`, each coming back after `offline`.
async fn churn(shared: Arc<Shared>, fraction: f64, every: Duration, offline: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        tick.tick().await;
        let count = ((shared.agents.len() as f64) * fraction).ceil() as usize;
        for _ in 0..count {
            let agent = &shared.agents[rng.gen_range(0..shared.agents.len())];
            *agent.drop_for.lock().unwrap_or_else(|e| e.into_inner()) = Some(offline);
            agent.dropped.notify_one();
        }
        shared.collector().stats.error("reconnects_forced");
    }
}

/// Waits for the answers and deliveries still owed, at most `options.drain`.
async fn drain(shared: &Arc<Shared>, options: &Options) {
    let deadline = Instant::now() + options.drain;
    let mut last_deliveries = u64::MAX;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let (in_flight, outstanding, deliveries) = {
            let c = shared.collector();
            let outstanding = if options.partial {
                0
            } else {
                c.ledger.outstanding()
            };
            (c.in_flight.len(), outstanding, c.stats.deliveries)
        };
        if deliveries != last_deliveries {
            last_deliveries = deliveries;
            quiet_since = Instant::now();
        }
        let quiet = options.partial && quiet_since.elapsed() > Duration::from_secs(2);
        if in_flight == 0 && (outstanding == 0 && !options.partial || quiet) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One user: connect, serve the connection, reconnect when told to, until the run stops.
async fn agent_loop(
    agent: Arc<Agent>,
    target: Target,
    mut inbox: mpsc::Receiver<String>,
    shared: Arc<Shared>,
    limit: Arc<tokio::sync::Semaphore>,
) {
    let mut announced = false;
    let mut backoff = Duration::from_millis(100);
    while !shared.stop.is_cancelled() {
        let started = Instant::now();
        let connected = {
            let _permit = limit.acquire().await;
            client::connect(&target).await
        };
        let (mut writer, reader) = match connected {
            Ok((writer, reader, _welcome)) => (writer, reader),
            Err(e) => {
                tracing::debug!(user = %target.user, error = %e, "connect failed");
                shared.collector().stats.error(connect_error_kind(&e));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        {
            let mut c = shared.collector();
            let _ = c.stats.connect.record(started.elapsed().as_micros() as u64);
            if !announced {
                c.stats.connected += 1;
            }
        }
        agent.online.store(true, Ordering::Release);
        if !announced {
            announced = true;
            agent.ready.notify_one();
        }

        let (acks, mut ack_inbox) = mpsc::unbounded_channel::<Confirm>();
        let reading = tokio::spawn(read_loop(agent.clone(), reader, acks, shared.clone()));
        let mut dropped = false;
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => break,
                _ = agent.dropped.notified() => { dropped = true; break; }
                frame = inbox.recv() => {
                    let Some(frame) = frame else { break };
                    let mut batch = vec![frame];
                    while batch.len() < 64 {
                        match inbox.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    if write_all(&mut writer, batch).await.is_err() { break; }
                }
                frame = recv_acks(&mut ack_inbox) => {
                    let Some(frame) = frame else { break };
                    if writer.send(&frame).await.is_err() { break; }
                }
            }
        }
        agent.online.store(false, Ordering::Release);
        if dropped {
            // Vanish without a close handshake, as a phone losing its network does.
            reading.abort();
            drop(writer);
        } else {
            writer.close().await;
            reading.abort();
        }
        if shared.stop.is_cancelled() {
            break;
        }
        let offline = agent
            .drop_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(offline) = offline {
            tokio::select! {
                _ = tokio::time::sleep(offline) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
    }
}

async fn write_all(writer: &mut client::Writer, batch: Vec<String>) -> client::Result<()> {
    for frame in batch {
        writer.feed_text(frame).await?;
    }
    writer.flush().await
}

/// What a connection confirms to the server.
enum Confirm {
    Message(String),
    Receipt(String),
    Notice(String),
}

/// The next `ack` frame: what is waiting, up to 100 ids of each kind.
async fn recv_acks(inbox: &mut mpsc::UnboundedReceiver<Confirm>) -> Option<ClientFrame> {
    let mut waiting = Vec::new();
    if inbox.recv_many(&mut waiting, 100).await == 0 {
        return None;
    }
    let (mut message_ids, mut receipt_ids, mut notice_ids) = (Vec::new(), Vec::new(), Vec::new());
    for confirm in waiting {
        match confirm {
            Confirm::Message(id) => message_ids.push(id),
            Confirm::Receipt(id) => receipt_ids.push(id),
            Confirm::Notice(id) => notice_ids.push(id),
        }
    }
    Some(ClientFrame::Ack {
        message_ids,
        receipt_ids,
        notice_ids,
    })
}

fn connect_error_kind(e: &client::Error) -> String {
    match e {
        client::Error::Connect { .. } => "connect_failed".into(),
        client::Error::Handshake { error, .. } if error.contains("401") => "http_401".into(),
        client::Error::Handshake { .. } => "handshake_failed".into(),
        _ => "connect_other".into(),
    }
}

/// Reads one connection's frames into the collector; acks messages through `acks`.
async fn read_loop(
    agent: Arc<Agent>,
    mut reader: client::Reader,
    acks: mpsc::UnboundedSender<Confirm>,
    shared: Arc<Shared>,
) {
    let me = agent.index;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(user = me, error = %e, "read failed");
                return;
            }
        };
        let now = now_us();
        match frame {
            ServerFrame::Sent { client_msg_id, .. } => {
                let Some(k) = parse_client_msg_id(&client_msg_id) else {
                    continue;
                };
                let mut c = shared.collector();
                if let Some((recipients, intended)) = c.in_flight.remove(&k) {
                    let _ = c.stats.sent.record(now.saturating_sub(intended).max(1));
                    c.stats.accepted += 1;
                    c.ledger.accept(k, recipients);
                }
            }
            ServerFrame::Message(m) => {
                let body = match agent.e2ee() {
                    Some(mut e2ee) => match e2ee.open(&m) {
                        Ok(body) => body,
                        Err(e) => {
                            tracing::warn!(user = me, error = %e, "decrypting failed");
                            drop(e2ee);
                            shared.collector().stats.error("undecryptable");
                            continue;
                        }
                    },
                    None => Body::decode(&m.body),
                };
                if let Some(body) = body {
                    let k = key(body.sender, body.seq);
                    let mut c = shared.collector();
                    if c.ledger.arrive(me, k) {
                        let latency = now.saturating_sub(body.intended_us).max(1);
                        let _ = c.stats.delivered.record(latency);
                        c.stats.deliveries += 1;
                        match c.schedule_end_us {
                            None => c.stats.delivered_in_window += 1,
                            Some(end) => {
                                let after = now.saturating_sub(end) / 1000;
                                c.stats.drain_ms = c.stats.drain_ms.max(after);
                            }
                        }
                        let second = c.second_of(now);
                        let s = c.stats.second(second);
                        s.delivered += 1;
                        let _ = s.latency.record(latency);
                    }
                }
                for a in &m.attachments {
                    // The expected hash travels in `ref`, back with the answer.
                    let ask = json!({"type": "media_url", "ref": a.sha256, "media_id": a.media_id,
                        "conversation": m.conversation, "message_id": m.message_id});
                    if agent.outbox.try_send(ask.to_string()).is_err() {
                        shared.collector().stats.error("attachment_not_asked");
                    }
                }
                let _ = acks.send(Confirm::Message(m.message_id));
            }
            ServerFrame::MediaUrl { reference, url, .. } => {
                let expected = reference.as_str().unwrap_or_default().to_owned();
                let shared2 = shared.clone();
                shared.downloads.spawn(async move {
                    let outcome = download_sha256(&shared2.http, &url).await;
                    let mut c = shared2.collector();
                    match outcome {
                        Ok(got) if got == expected => c.stats.attachments_verified += 1,
                        Ok(_) => c.stats.error("attachment_bytes_differ"),
                        Err(e) => {
                            tracing::warn!(error = %e, "downloading an attachment failed");
                            c.stats.error("attachment_download_failed");
                        }
                    }
                });
            }
            ServerFrame::Receipt { receipt_id, .. } => {
                // Shown: no longer kept for this user's next connect.
                let _ = acks.send(Confirm::Receipt(receipt_id));
            }
            ServerFrame::ToDevice {
                notice_id,
                from,
                e2ee,
            } => {
                if let Some(mut state) = agent.e2ee() {
                    let frame = json!({"from": from, "e2ee": e2ee});
                    if let Err(e) = state.device.receive_to_device(&frame) {
                        tracing::warn!(user = me, error = %e, "a to-device message failed");
                        drop(state);
                        shared.collector().stats.error("undecryptable");
                    }
                }
                let _ = acks.send(Confirm::Notice(notice_id));
            }
            ServerFrame::KeysLow { notice_id, .. } => {
                // Replenished, as a client does: more one-time keys (the writer sends them).
                let upload = agent.e2ee().map(|mut state| {
                    state
                        .device
                        .keys_upload("more-keys", crate::e2ee::KEYS_PER_UPLOAD)
                });
                if let Some(upload) = upload {
                    if agent.outbox.try_send(upload.to_string()).is_err() {
                        shared.collector().stats.error("keys_not_replenished");
                    }
                }
                let _ = acks.send(Confirm::Notice(notice_id));
            }
            ServerFrame::Error {
                code,
                client_msg_id,
                ..
            } => {
                let mut c = shared.collector();
                if let Some(k) = client_msg_id.as_deref().and_then(parse_client_msg_id) {
                    c.in_flight.remove(&k);
                }
                c.stats.error(code);
            }
            _ => {}
        }
    }
}

impl Decrypting {
    /// The body a message carried: decrypted the first time, remembered after (an Olm
    /// message cannot be decrypted twice, and a message can come again).
    fn open(&mut self, m: &client::MessageFrame) -> anyhow::Result<Option<Body>> {
        if let Some(body) = self.seen.get(&m.message_id) {
            return Ok(Some(*body));
        }
        let frame = json!({"from": m.from, "e2ee": m.e2ee});
        let plaintext = self.device.decrypt(&frame)?;
        let body = Body::decode(&plaintext);
        if let Some(body) = body {
            self.seen.insert(m.message_id.clone(), body);
        }
        Ok(body)
    }
}

/// The device every user of a run connects as.
const DEVICE: &str = "lt";

/// Sets up end-to-end encryption before anyone connects, over a setup connection per
/// user as the device the run uses: every device publishes its keys; then each claims a
/// key of every device it will write to and starts an Olm session with it, and in the
/// group workload shares a Megolm session with its group's other devices (to-device
/// messages, which reach them on connect).
async fn e2ee_setup(
    fleet: &Fleet,
    shared: &Arc<Shared>,
    groups: &Option<Groups>,
) -> anyhow::Result<()> {
    use futures_util::{StreamExt, TryStreamExt};
    let limit = fleet.concurrency.max(1);
    // 1. Keys, on connections kept for step 2.
    let connections: Vec<(client::Writer, client::Reader)> =
        futures_util::stream::iter(shared.agents.iter().cloned())
            .map(|agent| async move {
                let (mut writer, mut reader) = setup_connection(fleet, agent.index).await?;
                let upload = match agent.e2ee() {
                    Some(mut e2ee) => e2ee
                        .device
                        .keys_upload("keys", crate::e2ee::KEYS_PER_UPLOAD),
                    None => anyhow::bail!("no E2EE state"),
                };
                writer.send_text(upload.to_string()).await?;
                expect(&mut reader, |f| matches!(f, ServerFrame::Keys { .. })).await?;
                Ok::<_, anyhow::Error>((writer, reader))
            })
            .buffered(limit)
            .try_collect()
            .await?;
    // 2. Sessions (and group keys), once every device's keys are there.
    futures_util::stream::iter(shared.agents.iter().cloned().zip(connections))
        .map(|(agent, (mut writer, mut reader))| async move {
            let peers: Vec<u32> = match groups
                .as_ref()
                .and_then(|g| g.by_number.get(&(agent.index / g.size)))
            {
                Some((_, members)) => members
                    .iter()
                    .copied()
                    .filter(|m| *m != agent.index)
                    .collect(),
                None => contacts(fleet, agent.index),
            };
            if peers.is_empty() {
                writer.close().await;
                return Ok(());
            }
            let devices: Vec<Value> = peers
                .iter()
                .map(|p| json!({"user": fleet.user(*p), "device": DEVICE}))
                .collect();
            writer
                .send_text(json!({"type":"keys_claim","ref":"claim","devices":devices}).to_string())
                .await?;
            let keys = match expect(&mut reader, |f| {
                matches!(f, ServerFrame::KeysClaimed { .. })
            })
            .await?
            {
                ServerFrame::KeysClaimed { keys, .. } => keys,
                _ => unreachable!("matched above"),
            };
            anyhow::ensure!(
                keys.len() == peers.len(),
                "{} of {} devices had keys",
                keys.len(),
                peers.len()
            );
            let share = {
                let Some(mut e2ee) = agent.e2ee() else {
                    anyhow::bail!("no E2EE state")
                };
                e2ee.device.start_sessions(&json!({ "keys": keys }))?;
                match groups
                    .as_ref()
                    .and_then(|g| g.by_number.get(&(agent.index / g.size)))
                {
                    Some((conversation, members)) => {
                        let devices: Vec<_> = members
                            .iter()
                            .map(|m| (fleet.user(*m), DEVICE.to_owned()))
                            .collect();
                        e2ee.device.share_group_key(conversation, &devices)?
                    }
                    None => None,
                }
            };
            if let Some(mut share) = share {
                share["ref"] = json!("share");
                writer.send_text(share.to_string()).await?;
                expect(&mut reader, |f| {
                    matches!(f, ServerFrame::ToDeviceSent { .. })
                })
                .await?;
            }
            writer.close().await;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A connection of user `index` for set-up before the run (the agent's own comes later).
async fn setup_connection(
    fleet: &Fleet,
    index: u32,
) -> anyhow::Result<(client::Writer, client::Reader)> {
    let url = &fleet.urls[index as usize % fleet.urls.len()];
    let token = fleet.tokens.token(url, &fleet.user(index)).await?;
    let (writer, reader, _) = client::connect(&fleet.target(index, token)).await?;
    Ok((writer, reader))
}

/// Downloads a file and returns its SHA-256 (hex).
async fn download_sha256(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(hex::encode(sha2::Sha256::digest(&response.bytes().await?)))
}

/// Each user uploads one file of `bytes` random bytes, as a client does: an upload slot,
/// a PUT to its URL, `media_complete`. Its messages with an attachment carry it.
async fn media_setup(fleet: &Fleet, shared: &Arc<Shared>, bytes: usize) -> anyhow::Result<()> {
    use futures_util::{StreamExt, TryStreamExt};
    use sha2::Digest;
    futures_util::stream::iter(shared.agents.iter().cloned())
        .map(|agent| async move {
            let (mut writer, mut reader) = setup_connection(fleet, agent.index).await?;
            let file: Vec<u8> = (0..bytes.max(1)).map(|_| rand::random::<u8>()).collect();
            let sha256 = hex::encode(sha2::Sha256::digest(&file));
            let ask = json!({"type": "media_upload", "ref": "upload",
                "content_type": "application/octet-stream", "size": file.len(), "sha256": sha256});
            writer.send_text(ask.to_string()).await?;
            let (media_id, put_url, headers) = match expect(&mut reader, |f| {
                matches!(f, ServerFrame::MediaUpload { .. })
            })
            .await?
            {
                ServerFrame::MediaUpload {
                    media_id,
                    url,
                    headers,
                    ..
                } => (media_id, url, headers),
                _ => unreachable!("matched above"),
            };
            let mut put = shared.http.put(&put_url).body(file);
            for (name, value) in headers {
                put = put.header(name, value);
            }
            put.send().await?.error_for_status()?;
            let complete =
                json!({"type": "media_complete", "ref": "complete", "media_id": media_id});
            writer.send_text(complete.to_string()).await?;
            expect(&mut reader, |f| {
                matches!(f, ServerFrame::MediaComplete { .. })
            })
            .await?;
            writer.close().await;
            let _ = agent.media.set(media_id);
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(fleet.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The next frame that `wanted` accepts; an `error` ends the setup.
async fn expect(
    reader: &mut client::Reader,
    wanted: impl Fn(&ServerFrame) -> bool,
) -> anyhow::Result<ServerFrame> {
    loop {
        match reader.next().await? {
            Some(frame) if wanted(&frame) => return Ok(frame),
            Some(ServerFrame::Error { code, message, .. }) => {
                anyhow::bail!("setting up end-to-end encryption: {code}: {message}")
            }
            Some(_) => continue,
            None => anyhow::bail!("the connection closed while setting up end-to-end encryption"),
        }
    }
}

fn parse_client_msg_id(id: &str) -> Option<Key> {
    let (sender, seq) = id.strip_prefix('s')?.split_once('.')?;
    Some(key(sender.parse().ok()?, seq.parse().ok()?))
}
