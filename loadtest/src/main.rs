use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use loadtest::bench::{self, BenchConfig};
use loadtest::client::Tokens;
use loadtest::ledger::Ledger;
use loadtest::report::Report;
use loadtest::scenario::{self, Fleet, Options, StartGate, Workload};
use loadtest::stats::Stats;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Load generator for the chat gateway: measures speed and proves that nothing was lost,
/// duplicated or reordered. Exits 2 when anything accepted was lost or reordered.
#[derive(Parser, Debug)]
#[command(name = "loadtest", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hold N authenticated connections; report the server's RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold the connections.
        #[arg(long, default_value_t = 5.0, value_parser = non_negative)]
        hold_secs: f64,
    },
    /// Users send to random other users at an open-loop total rate.
    Direct {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
    },
    /// Users send to their group (fan-out to groups of --group-size).
    Group {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
        group_size: u32,
    },
    /// Direct traffic while a fraction of users drops and reconnects; their pending
    /// messages must arrive.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// Fraction of users dropped each time.
        #[arg(long, default_value_t = 0.1, value_parser = fraction)]
        fraction: f64,
        /// Seconds between drops.
        #[arg(long, default_value_t = 3.0, value_parser = positive)]
        every_secs: f64,
        /// How long a dropped user stays away, ms.
        #[arg(long, default_value_t = 1000)]
        offline_ms: u64,
    },
    /// Open new connections at a rate; report connect latency and failures.
    Ramp {
        #[command(flatten)]
        common: Common,
        /// New connections per second.
        #[arg(long, default_value_t = 500.0, value_parser = positive)]
        per_second: f64,
        /// Seconds to hold them once all are open.
        #[arg(long, default_value_t = 2.0, value_parser = non_negative)]
        hold_secs: f64,
    },
    /// A minimal in-memory WebSocket relay speaking the same frames: the ceiling.
    Relay {
        #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Drop every n-th delivery (for testing the checker).
        #[arg(long, default_value_t = 0)]
        drop_every: u64,
        /// Deliver every n-th message twice.
        #[arg(long, default_value_t = 0)]
        duplicate_every: u64,
        /// Deliver every n-th message after the next one.
        #[arg(long, default_value_t = 0)]
        reorder_every: u64,
        /// Deliver every message this many milliseconds late.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Direct traffic at one rate twice: alone, then beside hostile clients (half-finished
    /// handshakes, slow readers with messages sent to them) while a probe times a
    /// newcomer's connect; reports both latencies and their ratio. Exits 3 when the p99
    /// under attack is over twice the baseline's or a newcomer waited a second or more.
    Hostile {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// Half-finished handshakes held open at any time.
        #[arg(long, default_value_t = 1000)]
        half_open: u32,
        /// Clients that read one frame per --slow-read-every-ms.
        #[arg(long, default_value_t = 1000)]
        slow_readers: u32,
        /// Messages a second sent to the slow readers, in all.
        #[arg(long, default_value_t = 100.0, value_parser = non_negative)]
        slow_rate: f64,
        #[arg(long, default_value_t = 1000)]
        slow_read_every_ms: u64,
    },
    /// Embedded gateway against the relay, interleaved: max rates, ratio, memory, p99.
    Bench {
        /// Where to write the results.
        #[arg(long)]
        json: PathBuf,
        /// The gateway binary (default: next to this one).
        #[arg(long)]
        gateway_bin: Option<PathBuf>,
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(2..))]
        users: u32,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Seconds per rate step.
        #[arg(long, default_value_t = 3.0, value_parser = positive)]
        step_secs: f64,
        /// The rates tried, in order, until one fails (then bisected).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "500,1000,2000,4000,8000,16000,32000,64000",
            value_parser = positive
        )]
        ladder: Vec<f64>,
        #[arg(long, default_value_t = 50.0, value_parser = positive)]
        max_p99_ms: f64,
        /// Idle connections for the memory measurement (per-connection figures include
        /// fixed costs that only amortize over many connections).
        #[arg(long, default_value_t = 10000)]
        idle_conns: u32,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long)]
        quiet: bool,
        /// Also measure the distributed mode: start the real servers with the servers
        /// script, one distributed gateway and one dispatcher (release builds next to
        /// this binary), and put them through the same ladder.
        #[arg(long)]
        cluster: bool,
        /// The dispatcher binary (default: next to this one).
        #[arg(long)]
        dispatcher_bin: Option<PathBuf>,
        /// The script that starts and stops the real servers (`up <dir>` / `down <dir>`).
        #[arg(long, default_value = "infra/servers.sh")]
        servers_script: PathBuf,
        /// The cluster's light rate, for plain latency (msgs/s).
        #[arg(long, default_value_t = 100.0, value_parser = positive)]
        light_rate: f64,
        /// The rate at which the cluster's CPU per message is reported (msgs/s).
        #[arg(long, default_value_t = 1000.0, value_parser = positive)]
        cpu_rate: f64,
        /// Seconds of the light and CPU runs.
        #[arg(long, default_value_t = 10.0, value_parser = positive)]
        measure_secs: f64,
        /// Seconds of traffic the cluster gets at least before anything is measured; it
        /// goes on, 10 s at a time and up to 240 s, until the servers' JIT compilers use
        /// less than 0.15 cores.
        #[arg(long, default_value_t = 30.0, value_parser = non_negative)]
        warm_up_secs: f64,
    },
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Gateway WebSocket URL(s); users are spread over them.
    #[arg(
        long = "url",
        env = "LOADTEST_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    urls: Vec<String>,
    /// Mint tokens with this HS256 secret; without it, tokens come from /dev/token.
    #[arg(long, env = "LOADTEST_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Users (one connection each).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    users: u32,
    /// Connect from 127.0.0.1 … 127.0.0.N (each source has ~28k ports). 0: let the OS pick.
    #[arg(long, default_value_t = 0)]
    source_ips: u8,
    /// Processes to spread users over (one process can hold ~19,000 connections here).
    /// Default: as many as the users need.
    #[arg(long)]
    processes: Option<u32>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// User ids are <prefix><n>; default: a fresh random prefix per run.
    #[arg(long)]
    prefix: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of throughput and latency over time here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The server's pid, to report its RSS per connection (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seconds connecting may take; users not connected by then are left out (none
    /// connected: the run fails).
    #[arg(long, default_value_t = 60.0, value_parser = positive)]
    connect_timeout_secs: f64,
    #[arg(long, hide = true)]
    first_user: Option<u32>,
    #[arg(long, hide = true)]
    local_users: Option<u32>,
    #[arg(long, hide = true)]
    child_report: Option<PathBuf>,
    /// A child runs its share of the total rate: the rate divided by this.
    #[arg(long, hide = true, default_value_t = 1)]
    rate_divisor: u32,
}

impl Common {
    /// Where tokens come from: minted with `--jwt-secret`, or a dev gateway's `/dev/token`.
    fn tokens(&self) -> Tokens {
        match &self.jwt_secret {
            Some(secret) => Tokens::Secret(secret.clone()),
            None => Tokens::Dev,
        }
    }

    /// `--prefix`, or a fresh random one for this run.
    fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("lt{:06x}-", rand::random::<u32>() & 0xff_ffff))
    }

    /// 127.0.0.1 … 127.0.0.N for `--source-ips N`.
    fn source_addresses(&self) -> Vec<IpAddr> {
        (1..=self.source_ips)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    }
}

#[derive(Args, Debug, Clone)]
struct Traffic {
    /// Total msgs/s; several comma-separated rates run as consecutive steps.
    #[arg(long, value_delimiter = ',', default_value = "100", value_parser = positive)]
    rate: Vec<f64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    step_secs: f64,
    /// Bytes per message body.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Seconds to wait for outstanding deliveries after the last send.
    #[arg(long, default_value_t = 10.0, value_parser = non_negative)]
    drain_secs: f64,
    /// End-to-end encrypted messages (Olm and Megolm, docs/protocol.md): every device
    /// publishes keys and sets up its sessions before the run; direct senders write to 8
    /// fixed contacts (a session each); receivers decrypt what they check. One process.
    #[arg(long)]
    e2ee: bool,
    /// Fraction (0-1) of messages that carry an attachment: each user uploads one file
    /// before the run (upload slot, PUT, `media_complete`), and recipients download every
    /// attachment they get and check its SHA-256 (server-encrypted messages only).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    attachments: f64,
    /// Bytes of each user's attachment.
    #[arg(long, default_value_t = 32 * 1024)]
    attachment_bytes: usize,
    /// Recipients mark each message read as it arrives (a `read` frame), as a client with
    /// the conversation open does; senders get a `read` receipt for each (counted).
    #[arg(long)]
    read: bool,
}

/// Traffic needs someone to send to.
fn with_others(common: &Common) -> anyhow::Result<()> {
    if common.users < 2 {
        bail!(
            "--users {}: traffic needs at least 2 users (each sends to others)",
            common.users
        );
    }
    Ok(())
}

/// A rate, or a number of seconds or milliseconds that must pass: a finite number above 0.
fn positive(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        Ok(_) => Err(format!("{text} is not above 0")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// Seconds (or a rate) that may be 0.
fn non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        Ok(_) => Err(format!("{text} is below 0")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// A fraction, 0 to 1.
fn fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        Ok(_) => Err(format!("{text} is not between 0 and 1")),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// What a child process hands back to its parent.
#[derive(Serialize, Deserialize)]
struct ChildReport {
    stats: Stats,
    ledger: Ledger,
    send_secs: f64,
}

/// Connections one process opens at most (the open-file limit here is 20,000).
const PER_PROCESS: u32 = 18_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Relay {
            listen,
            drop_every,
            duplicate_every,
            reorder_every,
            delay_ms,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("relay listening on ws://{}/ws", listener.local_addr()?);
            let stop = CancellationToken::new();
            let faults = loadtest::relay::Faults {
                drop_every,
                duplicate_every,
                reorder_every,
                delay: Duration::from_millis(delay_ms),
            };
            let serving = tokio::spawn(loadtest::relay::serve(listener, faults, stop.clone()));
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
            let _ = serving.await;
            0
        }
        Command::Bench {
            json,
            gateway_bin,
            users,
            rounds,
            step_secs,
            ladder,
            max_p99_ms,
            idle_conns,
            body_bytes,
            quiet,
            cluster,
            dispatcher_bin,
            servers_script,
            light_rate,
            cpu_rate,
            measure_secs,
            warm_up_secs,
        } => {
            let cluster = cluster.then(|| bench::ClusterConfig {
                dispatcher_bin: dispatcher_bin.unwrap_or_else(|| bench::sibling_bin("dispatcher")),
                servers_script,
                light_rate,
                cpu_rate,
                measure: Duration::from_secs_f64(measure_secs),
                warm_up: Duration::from_secs_f64(warm_up_secs),
            });
            let config = BenchConfig {
                gateway_bin: gateway_bin.unwrap_or_else(|| bench::sibling_bin("gateway")),
                users,
                rounds,
                step: Duration::from_secs_f64(step_secs),
                ladder,
                max_p99_ms,
                idle_conns,
                body_bytes,
                progress: !quiet,
                cluster,
            };
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            let result = bench::run(&config, &command_line).await?;
            std::fs::write(&json, serde_json::to_string_pretty(&result)?)
                .with_context(|| format!("writing {}", json.display()))?;
            print!("{}", bench::summary(&result));
            if result["lost"].as_u64().unwrap_or(0) > 0
                || result["reordered"].as_u64().unwrap_or(0) > 0
            {
                2
            } else {
                0
            }
        }
        Command::Hostile {
            common,
            traffic,
            half_open,
            slow_readers,
            slow_rate,
            slow_read_every_ms,
        } => {
            let attack = |url: String, tokens: Tokens, prefix: String, source_ips| {
                loadtest::hostile::HostileConfig {
                    url,
                    tokens,
                    prefix,
                    half_open,
                    slow_readers,
                    slow_rate,
                    slow_read_every: Duration::from_millis(slow_read_every_ms.max(1)),
                    source_ips,
                }
            };
            with_others(&common)?;
            hostile(common, traffic, attack).await?
        }
        Command::Idle { common, hold_secs } => {
            drive(
                common,
                Workload::Idle {
                    hold: Duration::from_secs_f64(hold_secs),
                },
                None,
            )
            .await?
        }
        Command::Ramp {
            common,
            per_second,
            hold_secs,
        } => {
            drive(
                common,
                Workload::Ramp {
                    per_second,
                    hold: Duration::from_secs_f64(hold_secs),
                },
                None,
            )
            .await?
        }
        Command::Direct { common, traffic } => {
            with_others(&common)?;
            let workload = Workload::Direct {
                rates: share(&traffic, &common),
                step: Duration::from_secs_f64(traffic.step_secs),
            };
            drive(common, workload, Some(traffic)).await?
        }
        Command::Group {
            common,
            traffic,
            group_size,
        } => {
            with_others(&common)?;
            let workload = Workload::Group {
                size: group_size,
                rates: share(&traffic, &common),
                step: Duration::from_secs_f64(traffic.step_secs),
            };
            drive(common, workload, Some(traffic)).await?
        }
        Command::Reconnect {
            common,
            traffic,
            fraction,
            every_secs,
            offline_ms,
        } => {
            with_others(&common)?;
            let workload = Workload::Reconnect {
                rates: share(&traffic, &common),
                step: Duration::from_secs_f64(traffic.step_secs),
                fraction,
                every: Duration::from_secs_f64(every_secs),
                offline: Duration::from_millis(offline_ms),
            };
            drive(common, workload, Some(traffic)).await?
        }
    };
    std::process::exit(code);
}

/// This process's share of the total rate (children of a fan-out divide it).
fn share(traffic: &Traffic, common: &Common) -> Vec<f64> {
    traffic
        .rate
        .iter()
        .map(|r| r / f64::from(common.rate_divisor.max(1)))
        .collect()
}

/// Runs a workload here, or over child processes when one process cannot hold the users.
async fn drive(
    common: Common,
    workload: Workload,
    traffic: Option<Traffic>,
) -> anyhow::Result<i32> {
    if common.urls.is_empty() {
        bail!("give at least one --url");
    }
    let (tokens, prefix) = (common.tokens(), common.prefix());
    let source_ips = common.source_addresses();
    let traffic = traffic.unwrap_or(Traffic {
        rate: vec![],
        step_secs: 0.0,
        body_bytes: 100,
        drain_secs: 0.0,
        e2ee: false,
        attachments: 0.0,
        attachment_bytes: 0,
        read: false,
    });
    let is_child = common.child_report.is_some();
    let processes = common
        .processes
        .unwrap_or_else(|| common.users.div_ceil(PER_PROCESS))
        .max(1);
    let options = Options {
        body_bytes: traffic.body_bytes,
        drain: Duration::from_secs_f64(traffic.drain_secs),
        partial: is_child || processes > 1,
        progress: !common.quiet && !is_child && std::io::stderr().is_terminal(),
        connect_timeout: Duration::from_secs_f64(common.connect_timeout_secs),
        e2ee: traffic.e2ee,
        attachments: traffic.attachments,
        attachment_bytes: traffic.attachment_bytes,
        read: traffic.read,
    };
    if !(0.0..=1.0).contains(&traffic.attachments) {
        bail!("--attachments is a fraction of the messages, from 0 to 1");
    }
    if traffic.e2ee && traffic.attachments > 0.0 {
        bail!("--attachments goes with server-encrypted messages: leave out --e2ee");
    }
    if traffic.e2ee && processes > 1 {
        bail!(
            "--e2ee runs in one process (each device's sessions live there): use at most \
             {PER_PROCESS} --users and no --processes"
        );
    }
    let fleet = Fleet {
        urls: common.urls.clone(),
        tokens,
        users: common.users,
        first_user: common.first_user.unwrap_or(0),
        local_users: common.local_users.unwrap_or(common.users),
        prefix: prefix.clone(),
        source_ips,
        concurrency: common.concurrency,
    };

    if let Some(path) = &common.child_report {
        // A child: connect, say so, wait for the parent's go, run, hand back the ledger.
        let gate = StartGate(Box::new(|| {
            Box::pin(async {
                println!("READY");
                let mut line = String::new();
                let _ = BufReader::new(tokio::io::stdin())
                    .read_line(&mut line)
                    .await;
            })
        }));
        let outcome = scenario::run(&fleet, &workload, &options, Some(gate)).await?;
        let report = ChildReport {
            stats: outcome.stats,
            ledger: outcome.ledger,
            send_secs: outcome.send_secs,
        };
        std::fs::write(path, serde_json::to_vec(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(0);
    }

    let rss_before = common.server_pid.map(bench::rss_kib).transpose()?;
    let rss_after = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (stats, ledger, send_secs) = if processes == 1 {
        let gate = common.server_pid.map(|pid| {
            let rss_after = rss_after.clone();
            StartGate(Box::new(move || {
                Box::pin(async move {
                    *rss_after.lock().unwrap_or_else(|e| e.into_inner()) = bench::rss_kib(pid).ok();
                })
            }))
        });
        let outcome = scenario::run(&fleet, &workload, &options, gate).await?;
        (outcome.stats, outcome.ledger, outcome.send_secs)
    } else {
        let (stats, ledger, secs, rss) =
            fan_out(&common, &prefix, processes, common.server_pid).await?;
        *rss_after.lock().unwrap_or_else(|e| e.into_inner()) = rss;
        (stats, ledger, secs)
    };

    let verdict = ledger.verdict();
    let mut report = Report::new(
        workload.name(),
        common.urls.clone(),
        common.users,
        processes,
        &stats,
        verdict,
        send_secs,
    );
    let after = *rss_after.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(before), Some(after)) = (rss_before, after) {
        report.server_rss_kib_per_conn =
            Some(after.saturating_sub(before) as f64 / stats.connected.max(1) as f64);
    }
    print!("{}", report.table());
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.plot {
        report
            .plot(path)
            .with_context(|| format!("writing the plot {}", path.display()))?;
    }
    Ok(if verdict.clean() { 0 } else { 2 })
}

/// `loadtest hostile`: the baseline, the attack, the same workload under it, the verdict.
async fn hostile(
    common: Common,
    traffic: Traffic,
    attack: impl FnOnce(String, Tokens, String, Vec<IpAddr>) -> loadtest::hostile::HostileConfig,
) -> anyhow::Result<i32> {
    let Some(url) = common.urls.first().cloned() else {
        bail!("give a --url");
    };
    if common.users > PER_PROCESS || common.processes.is_some_and(|p| p > 1) {
        bail!("hostile runs in one process: at most {PER_PROCESS} --users and no --processes");
    }
    if traffic.rate.len() != 1 {
        bail!("hostile compares one --rate with itself under attack: give one rate");
    }
    let (tokens, prefix) = (common.tokens(), common.prefix());
    let source_ips = common.source_addresses();
    let options = Options {
        body_bytes: traffic.body_bytes,
        drain: Duration::from_secs_f64(traffic.drain_secs),
        partial: false,
        progress: false,
        connect_timeout: Duration::from_secs_f64(common.connect_timeout_secs),
        e2ee: false,
        attachments: 0.0,
        attachment_bytes: 0,
        read: false,
    };
    let workload = Workload::Direct {
        rates: traffic.rate.clone(),
        step: Duration::from_secs_f64(traffic.step_secs),
    };
    let run = |phase: &str| {
        let fleet = Fleet {
            urls: common.urls.clone(),
            tokens: tokens.clone(),
            users: common.users,
            first_user: 0,
            local_users: common.users,
            prefix: format!("{prefix}{phase}-"),
            source_ips: source_ips.clone(),
            concurrency: common.concurrency,
        };
        let (workload, options) = (&workload, &options);
        async move {
            let outcome = scenario::run(&fleet, workload, options, None).await?;
            let verdict = outcome.ledger.verdict();
            Ok::<_, anyhow::Error>(Report::new(
                "direct",
                fleet.urls.clone(),
                fleet.users,
                1,
                &outcome.stats,
                verdict,
                outcome.send_secs,
            ))
        }
    };

    eprintln!(
        "hostile: baseline, {} msgs/s for {} s",
        traffic.rate[0], traffic.step_secs
    );
    let baseline = run("base").await?;
    let config = attack(
        url,
        tokens.clone(),
        format!("{prefix}bad-"),
        source_ips.clone(),
    );
    eprintln!(
        "hostile: starting {} half-open handshakes and {} slow readers ({} msgs/s to them)",
        config.half_open, config.slow_readers, config.slow_rate
    );
    let attack = loadtest::hostile::Attack::start(config).await?;
    eprintln!("hostile: the same traffic under attack");
    let under = run("under").await;
    let attack = attack.stop().await;
    let under = under?;

    let ratio = under.delivery_latency.p99_ms / baseline.delivery_latency.p99_ms.max(0.001);
    let newcomer = &attack.newcomer_connect;
    let ratio_ok = ratio <= 2.0;
    let connect_ok =
        newcomer.count > 0 && newcomer.max_ms < 1000.0 && attack.newcomer_failures == 0;
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let phase = |name: &str, r: &Report| {
        println!(
            "{name:<13} delivered {:>8.1} msgs/s of {:>8.1} offered; send→delivered p50 {:.1} ms, p99 {:.1} ms; lost {}, reordered {}",
            r.delivered_per_sec,
            r.offered_per_sec,
            r.delivery_latency.p50_ms,
            r.delivery_latency.p99_ms,
            r.verdict.lost,
            r.verdict.reordered
        )
    };
    phase("baseline", &baseline);
    phase("under attack", &under);
    println!("p99 ratio     {ratio:.2} (bound ≤ 2: {})", met(ratio_ok));
    println!(
        "newcomers     {} connects, p50 {:.1} ms, max {:.1} ms, {} failed (bound < 1 s: {})",
        newcomer.count,
        newcomer.p50_ms,
        newcomer.max_ms,
        attack.newcomer_failures,
        met(connect_ok)
    );
    println!(
        "half-open     {} opened, {} dropped by the server, {} connect failures",
        attack.half_open_opened,
        attack.half_open_dropped_by_server,
        attack.half_open_connect_failures
    );
    println!(
        "slow readers  {} connected, {} frames read, {} closed by the server; {} messages sent to them, {} accepted, {} refused",
        attack.slow_readers_connected,
        attack.slow_reader_frames_read,
        attack.slow_readers_closed_by_server,
        attack.spam_sent,
        attack.spam_accepted,
        attack.spam_refused
    );
    if let Some(path) = &common.json {
        let json = serde_json::json!({
            "baseline": baseline,
            "under_attack": under,
            "attack": attack,
            "p99_ratio": ratio,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if !baseline.verdict.clean() || !under.verdict.clean() {
        2
    } else if !(ratio_ok && connect_ok) {
        3
    } else {
        0
    })
}

/// Runs the same command in `processes` children, each with a share of the users, starts
/// them together, and merges what they measured.
async fn fan_out(
    common: &Common,
    prefix: &str,
    processes: u32,
    server_pid: Option<u32>,
) -> anyhow::Result<(Stats, Ledger, f64, Option<u64>)> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::env::temp_dir().join(format!("loadtest-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let share = common.users.div_ceil(processes);
    let mut children = Vec::new();
    for p in 0..processes {
        let first = p * share;
        let count = share.min(common.users.saturating_sub(first));
        if count == 0 {
            break;
        }
        let report = dir.join(format!("child-{p}.json"));
        let mut child = tokio::process::Command::new(&exe)
            .args(&args)
            .args([
                "--prefix",
                prefix,
                "--first-user",
                &first.to_string(),
                "--local-users",
                &count.to_string(),
                "--quiet",
                "--rate-divisor",
                &processes.to_string(),
            ])
            .arg("--child-report")
            .arg(&report)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a child loadtest process")?;
        let stdout = child.stdout.take().context("child stdout")?;
        children.push((child, BufReader::new(stdout).lines(), report));
    }
    for (_, lines, _) in children.iter_mut() {
        loop {
            match lines.next_line().await? {
                Some(line) if line.trim() == "READY" => break,
                Some(_) => continue,
                None => bail!("a child process exited before it was ready"),
            }
        }
    }
    let rss = server_pid.and_then(|pid| bench::rss_kib(pid).ok());
    for (child, _, _) in children.iter_mut() {
        if let Some(stdin) = child.stdin.as_mut() {
            stdin.write_all(b"GO\n").await?;
        }
    }
    let mut stats = Stats::default();
    let mut ledger = Ledger::default();
    let mut secs: f64 = 0.0;
    for (mut child, _, report) in children {
        let status = child.wait().await?;
        if !status.success() {
            bail!("a child process failed: {status}");
        }
        let part: ChildReport = serde_json::from_slice(&std::fs::read(&report)?)?;
        stats.merge(part.stats);
        ledger.merge(part.ledger);
        secs = secs.max(part.send_secs);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((stats, ledger, secs, rss))
}
