//! Running a workload: connect the users, drive an open-loop send schedule, collect.
//!
//! Every user is an *agent* task that owns its connection (and reconnects when asked to).
//! The scheduler decides, from a fixed schedule of intended send times, who sends what to
//! whom; it never waits for answers (open loop), so a slow server shows up as latency
//! measured from the intended time instead of as a lower offered rate.

use std::collections::{BTreeMap, HashMap, HashSet};
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

mod agent;
mod schedule;

use agent::*;
use schedule::*;

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
    /// Mark every message read as it arrives.
    pub read: bool,
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
            read: false,
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
    /// Mark every message read as it arrives ([`Options::read`]).
    read: bool,
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
    /// With `--read`: the read receipts that came, as (message id, reader), so that one
    /// that comes again (not yet confirmed when the connection dropped) counts once.
    read_receipts: Mutex<HashSet<(String, String)>>,
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
            read_receipts: Mutex::new(HashSet::new()),
        }));
        inboxes.push(inbox);
    }
    let shared = Arc::new(Shared {
        collector: Mutex::new(Collector::default()),
        agents,
        stop: stop.clone(),
        downloads: tokio_util::task::TaskTracker::new(),
        http: reqwest::Client::new(),
        read: options.read,
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
    // Bounded: a run whose server is down must end by itself, with the reason; one whose
    // server refuses every user (a wrong token or path) ends as soon as that is clear.
    let deadline = Instant::now() + options.connect_timeout;
    let mut look = tokio::time::interval(Duration::from_millis(100));
    let mut refused = None;
    'wait: for agent in &shared.agents {
        loop {
            tokio::select! {
                _ = agent.ready.notified() => {
                    progress.inc(1);
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => break 'wait,
                _ = look.tick() => {
                    let c = shared.collector();
                    refused = refusal(c.stats.connected, &c.stats.errors, fleet.local_users);
                    if refused.is_some() {
                        break 'wait;
                    }
                }
            }
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
        if let Some(why) = refused {
            anyhow::bail!(
                "{} refused every user: {why} (failures: {errors:?})",
                fleet.urls.join(", ")
            );
        }
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

/// Why connecting cannot succeed, once it is clear: no user connected and every attempt so
/// far (at least one per user) was refused with an HTTP status that retrying does not
/// change (4xx, but for 408 and 429).
fn refusal(connected: u64, errors: &BTreeMap<String, u64>, users: u32) -> Option<String> {
    let status = |kind: &str| kind.strip_prefix("http_")?.parse::<u16>().ok();
    let lasting =
        |kind: &str| status(kind).is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429);
    let attempts: u64 = errors.values().sum();
    if connected > 0 || attempts < u64::from(users.max(1)) || !errors.keys().all(|k| lasting(k)) {
        return None;
    }
    let (kind, _) = errors.iter().max_by_key(|(_, n)| **n)?;
    Some(match status(kind)? {
        401 => "HTTP 401, the token was not accepted: --jwt-secret must be the gateway's own \
                (or leave it out for a dev-mode gateway)"
            .to_string(),
        404 => "HTTP 404, nothing is served at that path (a gateway serves /ws)".into(),
        code => format!("HTTP {code}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(kinds: &[(&str, u64)]) -> BTreeMap<String, u64> {
        kinds.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn only_lasting_refusals_of_every_user_end_connecting() {
        let refused = errors(&[("http_401", 5)]);
        assert!(refusal(0, &refused, 5).is_some_and(|why| why.contains("--jwt-secret")));
        // Not yet every user, or one of them got in.
        assert_eq!(refusal(0, &refused, 6), None);
        assert_eq!(refusal(1, &refused, 5), None);
        // What may pass: a full accept queue, a connection cap, a server still starting.
        for kind in ["http_429", "http_408", "http_503", "connect_failed"] {
            assert_eq!(refusal(0, &errors(&[(kind, 50)]), 5), None, "{kind}");
        }
        assert_eq!(
            refusal(0, &errors(&[("http_401", 5), ("connect_failed", 1)]), 5),
            None
        );
    }
}
