//! Hostile clients beside real traffic (`loadtest hostile`): half-finished handshakes that
//! never complete, slow readers that take one frame a second while messages are sent to
//! them, and a probe that keeps connecting a fresh client to time its `welcome`.
//!
//! - **Half-open**: each slot opens a TCP connection, writes part of an HTTP request head
//!   and stops; when the server drops it (its handshake timeout) the slot opens another,
//!   so `half_open` of them are pending at any time.
//! - **Slow readers**: authenticated WebSocket clients that read one frame per
//!   `slow_read_every`; `slow_rate` messages a second are sent to them, round-robin, by
//!   senders of their own (ten messages a second each, under the default per-user rate
//!   limit), who read their answers.
//! - **Probe**: every 250 ms a new user connects; the time from TCP connect to `welcome`
//!   is what a newcomer waits while the attack goes on.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, ClientFrame, ServerFrame, Target, Tokens};
use crate::report::Percentiles;

/// What to attack with.
#[derive(Clone, Debug)]
pub struct HostileConfig {
    pub url: String,
    pub tokens: Tokens,
    /// User ids of the attack's clients start with this.
    pub prefix: String,
    pub half_open: u32,
    pub slow_readers: u32,
    /// Messages a second sent to the slow readers, in all.
    pub slow_rate: f64,
    pub slow_read_every: Duration,
    pub source_ips: Vec<IpAddr>,
}

/// Messages a second one sender sends to the slow readers.
const PER_SENDER: f64 = 10.0;
/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counters {
    half_open_opened: AtomicU64,
    half_open_dropped: AtomicU64,
    half_open_failed: AtomicU64,
    slow_connected: AtomicU64,
    slow_frames_read: AtomicU64,
    slow_closed_by_server: AtomicU64,
    spam_sent: AtomicU64,
    spam_accepted: AtomicU64,
    spam_refused: AtomicU64,
    probe_failures: AtomicU64,
}

/// What the attack did and what a newcomer saw meanwhile.
#[derive(Debug, Default, Serialize)]
pub struct AttackReport {
    /// Half-open connections made, and how many of them the server dropped.
    pub half_open_opened: u64,
    pub half_open_dropped_by_server: u64,
    pub half_open_connect_failures: u64,
    pub slow_readers_connected: u64,
    pub slow_reader_frames_read: u64,
    pub slow_readers_closed_by_server: u64,
    /// Messages sent to the slow readers, and their answers.
    pub spam_sent: u64,
    pub spam_accepted: u64,
    pub spam_refused: u64,
    /// A fresh client's TCP connect → `welcome` while the attack runs.
    pub newcomer_connect: Percentiles,
    pub newcomer_failures: u64,
}

/// A running attack; [`Attack::stop`] ends it and says what happened.
pub struct Attack {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    counters: Arc<Counters>,
    probes: Arc<std::sync::Mutex<Histogram<u64>>>,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Attack {
    /// Connects the slow readers and their senders, then starts the half-open slots and
    /// the probe; returns once every slow reader is connected (or failed to).
    pub async fn start(config: HostileConfig) -> anyhow::Result<Attack> {
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let source = |i: u32| source_of(&config, i);
        let target = |user: String, i: u32| target_for(&config, user, i);

        // Slow readers, 64 at a time.
        let mut readers = Vec::new();
        let slow_users: Vec<String> = (0..config.slow_readers)
            .map(|i| format!("{}slow{i}", config.prefix))
            .collect();
        for chunk in (0..config.slow_readers).collect::<Vec<_>>().chunks(64) {
            let mut connecting = JoinSet::new();
            for &i in chunk {
                let target = target(slow_users[i as usize].clone(), i).await?;
                connecting.spawn(async move { client::connect(&target).await });
            }
            while let Some(joined) = connecting.join_next().await {
                match joined? {
                    Ok((writer, reader, _)) => {
                        add(&counters.slow_connected);
                        readers.push((writer, reader));
                    }
                    Err(e) => tracing::warn!(error = %e, "a slow reader did not connect"),
                }
            }
        }
        for (writer, mut reader) in readers {
            let (stop, counters, every) = (stop.clone(), counters.clone(), config.slow_read_every);
            tasks.spawn(async move {
                let _writer = writer;
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match tokio::time::timeout(every, reader.next()).await {
                        Err(_) => {}
                        Ok(Ok(Some(_))) => add(&counters.slow_frames_read),
                        Ok(Ok(None)) | Ok(Err(_)) => {
                            add(&counters.slow_closed_by_server);
                            return;
                        }
                    }
                }
            });
        }

        // Their senders.
        let senders = if config.slow_readers == 0 || config.slow_rate <= 0.0 {
            0
        } else {
            (config.slow_rate / PER_SENDER).ceil() as u32
        };
        for s in 0..senders {
            let target = target(format!("{}spam{s}", config.prefix), s).await?;
            let (mut writer, mut reader, _) = client::connect(&target).await?;
            let (stop, counters) = (stop.clone(), counters.clone());
            let slow_users = slow_users.clone();
            let every = Duration::from_secs_f64(f64::from(senders) / config.slow_rate);
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                let mut n = s as usize;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            writer.close().await;
                            return;
                        }
                        _ = tick.tick() => {
                            let to = slow_users[n % slow_users.len()].clone();
                            n += senders as usize;
                            let frame = ClientFrame::Send {
                                client_msg_id: format!("s{n}"),
                                to: Some(to),
                                conversation: None,
                                body: "x".repeat(100),
                                attachments: Vec::new(),
                            };
                            if writer.send(&frame).await.is_err() {
                                return;
                            }
                            add(&counters.spam_sent);
                        }
                        frame = reader.next() => match frame {
                            Ok(Some(ServerFrame::Sent { .. })) => add(&counters.spam_accepted),
                            Ok(Some(ServerFrame::Error { .. })) => add(&counters.spam_refused),
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return,
                        },
                    }
                }
            });
        }

        // Half-open handshakes.
        let (addr, path) = client::parse_url(&config.url)?;
        for i in 0..config.half_open {
            let (stop, counters, source_ip) = (stop.clone(), counters.clone(), source(i));
            let path = path.clone();
            tasks.spawn(async move {
                let head = format!("GET {path}?device=h{i} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n");
                while !stop.is_cancelled() {
                    let opened = tokio::select! {
                        _ = stop.cancelled() => return,
                        opened = half_open(addr, source_ip, &head) => opened,
                    };
                    let Ok(mut tcp) = opened else {
                        add(&counters.half_open_failed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    add(&counters.half_open_opened);
                    let mut byte = [0u8; 512];
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = async { while matches!(tcp.read(&mut byte).await, Ok(n) if n > 0) {} } => {
                            add(&counters.half_open_dropped);
                        }
                    }
                }
            });
        }

        // The probe.
        let probes = Arc::new(std::sync::Mutex::new(Histogram::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        {
            let (stop, counters, probes) = (stop.clone(), counters.clone(), probes.clone());
            let config = config.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(PROBE_EVERY);
                for i in 0u64.. {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let user = format!("{}probe{i}", config.prefix);
                    let Ok(token) = config.tokens.token(&config.url, &user).await else {
                        add(&counters.probe_failures);
                        continue;
                    };
                    let target = Target {
                        url: config.url.clone(),
                        token,
                        user,
                        device: "d".into(),
                        source_ip: config.source_ips.first().copied(),
                    };
                    let started = Instant::now();
                    match client::connect(&target).await {
                        Ok((mut writer, _, _)) => {
                            let us = started.elapsed().as_micros() as u64;
                            let _ = probes
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .record(us.max(1));
                            writer.close().await;
                        }
                        Err(_) => add(&counters.probe_failures),
                    }
                }
            });
        }
        Ok(Attack {
            stop,
            tasks,
            counters,
            probes,
        })
    }

    /// Ends the attack and reports on it.
    pub async fn stop(mut self) -> AttackReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let c = &self.counters;
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        AttackReport {
            half_open_opened: n(&c.half_open_opened),
            half_open_dropped_by_server: n(&c.half_open_dropped),
            half_open_connect_failures: n(&c.half_open_failed),
            slow_readers_connected: n(&c.slow_connected),
            slow_reader_frames_read: n(&c.slow_frames_read),
            slow_readers_closed_by_server: n(&c.slow_closed_by_server),
            spam_sent: n(&c.spam_sent),
            spam_accepted: n(&c.spam_accepted),
            spam_refused: n(&c.spam_refused),
            newcomer_connect: Percentiles::of(&probes),
            newcomer_failures: n(&c.probe_failures),
        }
    }
}

fn source_of(config: &HostileConfig, i: u32) -> Option<IpAddr> {
    (!config.source_ips.is_empty()).then(|| config.source_ips[i as usize % config.source_ips.len()])
}

async fn target_for(config: &HostileConfig, user: String, i: u32) -> anyhow::Result<Target> {
    let token = config.tokens.token(&config.url, &user).await?;
    Ok(Target {
        url: config.url.clone(),
        token,
        user,
        device: "d".into(),
        source_ip: source_of(config, i),
    })
}

/// A TCP connection with part of a request head written, and no more.
async fn half_open(
    addr: std::net::SocketAddr,
    source_ip: Option<IpAddr>,
    head: &str,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source_ip {
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    let mut tcp = socket.connect(addr).await?;
    tcp.write_all(head.as_bytes()).await?;
    Ok(tcp)
}
