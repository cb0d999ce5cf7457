//! `loadtest bench`: the system against the relay, on loopback, in one run.
//!
//! Starts the relay and the embedded gateway (fresh data dir) as separate processes and,
//! with `--cluster`, the real servers (`infra/servers.sh`) with one distributed gateway and
//! one dispatcher; runs the same `direct` workload against each, interleaved, `rounds`
//! times, stepping the rate to find the highest rate delivered in full with p99
//! send→delivered within the bound; then measures p99 at half of each system's rate, the
//! server's RSS per idle connection, and for the cluster the latency at a light rate and
//! the CPU each process spends per delivered message. Every step records the CPU of every
//! process involved, the load generator included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::Tokens;
use crate::report::Report;
use crate::scenario::{self, Fleet, Options, StartGate, Workload};

const SECRET: &str = "loadtest-bench-secret";
/// The cluster's at-rest key ring (a bench keyspace holds nothing worth protecting).
const BENCH_KEYS: &str = "1:0101010101010101010101010101010101010101010101010101010101010101";

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub gateway_bin: PathBuf,
    pub users: u32,
    pub rounds: u32,
    pub step: Duration,
    pub ladder: Vec<f64>,
    pub max_p99_ms: f64,
    pub idle_conns: u32,
    pub body_bytes: usize,
    pub progress: bool,
    /// Also measure the distributed mode.
    pub cluster: Option<ClusterConfig>,
}

/// How to run the distributed mode for the benchmark.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub dispatcher_bin: PathBuf,
    /// `infra/servers.sh`: started (`up`) into a temporary directory and stopped after.
    pub servers_script: PathBuf,
    /// The light rate at which plain latency is reported, msgs/s.
    pub light_rate: f64,
    /// The rate at which CPU per delivered message is reported, msgs/s.
    pub cpu_rate: f64,
    /// How long the light and CPU runs last.
    pub measure: Duration,
    /// How long the cluster runs at least before anything is measured (JIT compilation;
    /// see [`warm_up`]).
    pub warm_up: Duration,
}

/// One rate tried against one target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub rate: f64,
    /// Sustained: deliveries within the send window, per second of it.
    pub delivered_per_sec: f64,
    /// Delivered after the send window (a backlog drained).
    pub delivered_after_window: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub errors: u64,
    pub ok: bool,
    /// Cores each process used during the step (send window and drain).
    pub cpu_cores: BTreeMap<String, f64>,
    /// CPU per delivered message, µs, per process.
    pub cpu_us_per_msg: BTreeMap<String, f64>,
}

struct Server {
    child: Child,
    /// What followed the marker's field on the line that announced it.
    value: String,
    pid: u32,
}

/// What a workload runs against: where to connect, and the processes it loads.
struct Target {
    name: &'static str,
    url: String,
    /// Process name → pid, for CPU accounting.
    pids: Vec<(String, u32)>,
}

/// Where the benchmark's server processes write their logs.
fn log_dir() -> PathBuf {
    std::env::temp_dir().join("loadtest-bench-logs")
}

/// Starts a process and waits for the log line that carries `field`; everything it prints
/// goes on to `<temp>/loadtest-bench-logs/<name>.log`.
async fn spawn(
    mut command: Command,
    name: &str,
    marker: &str,
    field: &str,
) -> anyhow::Result<Server> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().context("starting a server process")?;
    let pid = child.id().context("the server exited at once")?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut errs = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let line = tokio::select! {
                l = lines.next_line() => l,
                l = errs.next_line() => l,
            };
            match line {
                Ok(Some(line)) if line.contains(marker) => {
                    let value = line
                        .split(field)
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .map(str::to_owned);
                    seen.push(line);
                    return value;
                }
                Ok(Some(line)) => seen.push(line),
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    let Some(value) = found else {
        let tail = seen
            .iter()
            .rev()
            .take(10)
            .rev()
            .cloned()
            .collect::<Vec<_>>();
        anyhow::bail!("the server never printed {marker:?}; its last lines: {tail:#?}");
    };
    // Keep draining both pipes so the server never blocks on a full one, into its log.
    let _ = std::fs::create_dir_all(log_dir());
    let mut log = std::fs::File::create(log_dir().join(format!("{name}.log"))).ok();
    if let Some(file) = log.as_mut() {
        use std::io::Write;
        for line in &seen {
            let _ = writeln!(file, "{line}");
        }
    }
    tokio::spawn(async move {
        use std::io::Write;
        loop {
            let line = tokio::select! {
                l = lines.next_line() => l,
                l = errs.next_line() => l,
            };
            let Ok(Some(line)) = line else { break };
            if let Some(file) = log.as_mut() {
                let _ = writeln!(file, "{line}");
            }
        }
    });
    Ok(Server { child, value, pid })
}

fn ws_url(addr: &str) -> String {
    if addr.starts_with("ws://") {
        addr.to_owned()
    } else {
        format!("ws://{addr}/ws")
    }
}

/// Resident memory of a process, KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS line")
}

/// CPU time a process has used (all its threads, user and system), seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User and system CPU, seconds, from the text of a `/proc/…/stat` file.
fn stat_cpu_secs(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: count from after it.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU of several processes over an interval.
struct CpuMeter {
    pids: Vec<(String, u32)>,
    start: Vec<Option<f64>>,
    at: Instant,
}

impl CpuMeter {
    fn start(pids: &[(String, u32)]) -> Self {
        let mut pids = pids.to_vec();
        pids.push(("loadtest".into(), std::process::id()));
        let start = pids.iter().map(|(_, pid)| cpu_secs(*pid)).collect();
        CpuMeter {
            pids,
            start,
            at: Instant::now(),
        }
    }

    /// Cores used per process since the start, and CPU µs per message for `messages`.
    fn stop(&self, messages: u64) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
        let secs = self.at.elapsed().as_secs_f64().max(0.001);
        let mut cores = BTreeMap::new();
        let mut per_msg = BTreeMap::new();
        for ((name, pid), start) in self.pids.iter().zip(&self.start) {
            if let (Some(start), Some(end)) = (start, cpu_secs(*pid)) {
                let used = (end - start).max(0.0);
                cores.insert(name.clone(), round2(used / secs));
                if messages > 0 {
                    per_msg.insert(name.clone(), round2(used * 1e6 / messages as f64));
                }
            }
        }
        (cores, per_msg)
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn fleet(url: &str, users: u32) -> Fleet {
    Fleet {
        urls: vec![url.to_owned()],
        tokens: Tokens::Secret(SECRET.into()),
        users,
        first_user: 0,
        local_users: users,
        prefix: format!("b{:06x}-", rand::random::<u32>() & 0xff_ffff),
        source_ips: Vec::new(),
        concurrency: 256,
    }
}

async fn direct(
    config: &BenchConfig,
    target: &Target,
    rate: f64,
    secs: Duration,
) -> anyhow::Result<Step> {
    direct_with(config, target, rate, secs, false).await
}

/// A `direct` run, end-to-end encrypted or not.
async fn direct_with(
    config: &BenchConfig,
    target: &Target,
    rate: f64,
    secs: Duration,
    e2ee: bool,
) -> anyhow::Result<Step> {
    let f = fleet(&target.url, config.users);
    let workload = Workload::Direct {
        rates: vec![rate],
        step: secs,
    };
    let options = Options {
        body_bytes: config.body_bytes,
        // Ends as soon as nothing is owed; an overloaded system gets time to work off its
        // backlog, so that what is reported lost is lost, not late.
        drain: Duration::from_secs(30),
        e2ee,
        ..Options::default()
    };
    // CPU is counted from the start of the send phase, once every user is connected.
    let meter = Arc::new(Mutex::new(None));
    let gate = {
        let (meter, pids) = (meter.clone(), target.pids.clone());
        StartGate(Box::new(move || {
            Box::pin(async move {
                *meter.lock().unwrap_or_else(|e| e.into_inner()) = Some(CpuMeter::start(&pids));
            })
        }))
    };
    let outcome = scenario::run(&f, &workload, &options, Some(gate)).await?;
    let verdict = outcome.ledger.verdict();
    let (cpu_cores, cpu_us_per_msg) = meter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|m| m.stop(verdict.delivered))
        .unwrap_or_default();
    let report = Report::new(
        "direct",
        f.urls.clone(),
        f.users,
        1,
        &outcome.stats,
        verdict,
        outcome.send_secs,
    );
    let errors: u64 = report.errors.values().sum();
    let p99 = report.delivery_latency.p99_ms;
    let complete = verdict.delivered as f64 >= 0.999 * report.offered as f64;
    Ok(Step {
        rate,
        delivered_per_sec: report.delivered_per_sec.round(),
        delivered_after_window: report.delivered_after_window,
        p50_ms: report.delivery_latency.p50_ms,
        p99_ms: p99,
        lost: verdict.lost,
        duplicated: verdict.duplicated,
        reordered: verdict.reordered,
        errors,
        ok: complete && errors == 0 && verdict.clean() && p99 <= config.max_p99_ms,
        cpu_cores,
        cpu_us_per_msg,
    })
}

/// The highest rate of the ladder (refined by bisection) that passes.
async fn find_max(
    config: &BenchConfig,
    target: &Target,
    steps: &mut Vec<Value>,
) -> anyhow::Result<f64> {
    let mut best = 0.0;
    let mut failed = None;
    for &rate in &config.ladder {
        let step = direct(config, target, rate, config.step).await?;
        log_step(target.name, &step, config.progress);
        steps.push(json!({"target": target.name, "step": step}));
        if step.ok {
            best = rate;
        } else {
            failed = Some(rate);
            break;
        }
    }
    if let Some(mut high) = failed {
        let mut low = best;
        for _ in 0..2 {
            let mid = ((low + high) / 2.0).round();
            if mid <= low || mid >= high {
                break;
            }
            let step = direct(config, target, mid, config.step).await?;
            log_step(target.name, &step, config.progress);
            steps.push(json!({"target": target.name, "step": step}));
            if step.ok {
                low = mid;
                best = mid;
            } else {
                high = mid;
            }
        }
    }
    Ok(best)
}

fn log_step(name: &str, step: &Step, show: bool) {
    if show {
        eprintln!(
            "  {name:<7} {:>7.0} msgs/s → sustained {:>8.0}/s p99 {:>7.2} ms lost {} dup {} reord {} err {} {}",
            step.rate,
            step.delivered_per_sec,
            step.p99_ms,
            step.lost,
            step.duplicated,
            step.reordered,
            step.errors,
            if step.ok { "ok" } else { "FAIL" }
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Connects `conns` idle users and returns the server's RSS growth per connection, KiB.
pub async fn idle_kib_per_conn(url: &str, pid: u32, conns: u32) -> anyhow::Result<f64> {
    let f = fleet(url, conns);
    let before = rss_kib(pid)?;
    let after = Arc::new(Mutex::new(None));
    let gate = {
        let after = after.clone();
        StartGate(Box::new(move || {
            Box::pin(async move {
                // Every connection has its `welcome`; let the server finish its bookkeeping.
                tokio::time::sleep(Duration::from_millis(500)).await;
                *after.lock().unwrap_or_else(|e| e.into_inner()) = rss_kib(pid).ok();
            })
        }))
    };
    let workload = Workload::Idle {
        hold: Duration::from_millis(100),
    };
    let options = Options {
        body_bytes: 0,
        drain: Duration::ZERO,
        ..Options::default()
    };
    let outcome = scenario::run(&f, &workload, &options, Some(gate)).await?;
    let after = after
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .context("could not read the server's RSS")?;
    let connected = outcome.stats.connected.max(1);
    anyhow::ensure!(
        connected == u64::from(conns),
        "only {connected} of {conns} idle connections opened"
    );
    Ok(after.saturating_sub(before) as f64 / connected as f64)
}

/// The real servers (`infra/servers.sh up`), stopped when dropped.
struct Servers {
    script: PathBuf,
    dir: PathBuf,
    env: BTreeMap<String, String>,
    pids: Vec<(String, u32)>,
}

impl Servers {
    async fn up(script: &Path) -> anyhow::Result<Servers> {
        let dir = std::env::temp_dir().join(format!("loadtest-servers-{}", rand::random::<u32>()));
        let out = Command::new(script)
            .arg("up")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} up", script.display()))?;
        // From here on, dropping it stops whatever did start.
        let mut servers = Servers {
            script: script.to_owned(),
            dir: dir.clone(),
            env: BTreeMap::new(),
            pids: Vec::new(),
        };
        anyhow::ensure!(
            out.status.success(),
            "{} up failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        servers.env = std::fs::read_to_string(dir.join("servers.env"))
            .context("reading servers.env written by servers.sh")?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        servers.pids = std::fs::read_to_string(dir.join("pids"))
            .context("reading the servers' pids")?
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let pid = parts.next()?.parse().ok()?;
                Some((parts.next()?.to_owned(), pid))
            })
            .collect();
        Ok(servers)
    }

    fn get(&self, key: &str) -> anyhow::Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("servers.env has no {key}"))
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One distributed gateway and one dispatcher on the servers, in a namespace of their own
/// (keyspace, topics, consumer group, Redis prefix).
async fn start_cluster(
    config: &BenchConfig,
    cluster: &ClusterConfig,
    servers: &Servers,
) -> anyhow::Result<(Server, Server)> {
    let tag = format!("bench{:08x}", rand::random::<u32>());
    let env = [
        (
            "KAFKA_BROKERS",
            servers.get("TEST_KAFKA_BROKERS")?.to_owned(),
        ),
        ("SCYLLA_NODES", servers.get("TEST_SCYLLA_NODES")?.to_owned()),
        ("REDIS_URL", servers.get("TEST_REDIS_URL")?.to_owned()),
        ("KAFKA_TOPIC_PREFIX", format!("{tag}.")),
        ("KAFKA_GROUP", tag.clone()),
        ("SCYLLA_KEYSPACE", tag.clone()),
        ("REDIS_PREFIX", tag.clone()),
        ("STORAGE_KEYS", BENCH_KEYS.to_owned()),
        ("GATEWAY_JWT_SECRET", SECRET.to_owned()),
        (
            "RUST_LOG",
            "warn,dispatcher=info,gateway::server=info".to_owned(),
        ),
    ];
    let mut dispatcher_cmd = Command::new(&cluster.dispatcher_bin);
    dispatcher_cmd
        .args(["--admin-listen", "127.0.0.1:0"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let dispatcher = spawn(
        dispatcher_cmd,
        "cluster-dispatcher",
        "dispatcher ready",
        "admin=",
    )
    .await
    .with_context(|| {
        format!(
            "starting the dispatcher at {} (build it with `cargo build --release -p dispatcher`)",
            cluster.dispatcher_bin.display()
        )
    })?;
    let mut gateway_cmd = Command::new(&config.gateway_bin);
    gateway_cmd
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(unlimited())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let gateway = spawn(gateway_cmd, "cluster-gateway", "gateway ready", "client=").await?;
    Ok((gateway, dispatcher))
}

/// Longest the cluster is warmed up for while its JIT compilers are still busy.
const MAX_WARM_UP: Duration = Duration::from_secs(240);

/// The compilers' CPU (all server processes together, cores) below which the JVMs count as
/// warm: a fresh Cassandra compiles with about half a core for its first minute of load,
/// and what it compiles meanwhile is charged to every message measured.
const WARM_JIT_CORES: f64 = 0.15;

/// How the cluster was warmed up: how long, and what its JIT compilers used at the end.
#[derive(Clone, Debug, serde::Serialize)]
struct WarmUp {
    secs: f64,
    jit_cores_at_end: f64,
}

/// Traffic for at least `cluster.warm_up` (the first half at a low rate, then at the CPU
/// rate), then on at the CPU rate in rounds of 10 seconds until the servers' JIT
/// compiler threads have gone quiet, for at most [`MAX_WARM_UP`].
async fn warm_up(
    config: &BenchConfig,
    cluster: &ClusterConfig,
    target: &Target,
) -> anyhow::Result<WarmUp> {
    if config.progress {
        eprintln!("warming the cluster up");
    }
    let started = Instant::now();
    // Every process of the target: only the JVMs have compiler threads to count.
    let servers: Vec<u32> = target.pids.iter().map(|(_, pid)| *pid).collect();
    let mut rounds = vec![
        (200.0, cluster.warm_up / 2),
        (cluster.cpu_rate, cluster.warm_up / 2),
    ];
    loop {
        let jit_before = jit_secs(&servers);
        let at = Instant::now();
        for (rate, secs) in rounds.drain(..) {
            direct(config, target, rate, secs).await?;
        }
        let jit_cores = (jit_secs(&servers) - jit_before) / at.elapsed().as_secs_f64().max(0.001);
        if config.progress {
            eprintln!(
                "  warm-up at {:.0} s: the JIT compilers used {jit_cores:.2} cores",
                started.elapsed().as_secs_f64()
            );
        }
        if jit_cores < WARM_JIT_CORES || started.elapsed() >= MAX_WARM_UP {
            return Ok(WarmUp {
                secs: round2(started.elapsed().as_secs_f64()),
                jit_cores_at_end: round2(jit_cores),
            });
        }
        rounds.push((cluster.cpu_rate, Duration::from_secs(10)));
    }
}

/// CPU time, seconds, of the JIT compiler threads (HotSpot's `C1 CompilerThre…` and
/// `C2 CompilerThre…`) of these processes; processes without any count nothing.
fn jit_secs(pids: &[u32]) -> f64 {
    let mut total = 0.0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let is_compiler = std::fs::read_to_string(path.join("comm")).is_ok_and(|name| {
                name.starts_with("C1 Compiler") || name.starts_with("C2 Compiler")
            });
            if is_compiler {
                total += std::fs::read_to_string(path.join("stat"))
                    .ok()
                    .and_then(|stat| stat_cpu_secs(&stat))
                    .unwrap_or(0.0);
            }
        }
    }
    total
}

/// Rate limits out of the way: the bench measures throughput, not the limiter.
fn unlimited() -> [&'static str; 6] {
    [
        "--rate-per-sec",
        "1000000",
        "--rate-burst",
        "1000000",
        "--frame-rate-per-sec",
        "1000000",
    ]
}

/// Runs the whole benchmark and returns its JSON document.
pub async fn run(config: &BenchConfig, command_line: &str) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    // The servers first: starting JVMs would disturb everything measured meanwhile.
    let servers = match &config.cluster {
        Some(cluster) => {
            if config.progress {
                eprintln!(
                    "starting the real servers ({} up)",
                    cluster.servers_script.display()
                );
            }
            Some(Servers::up(&cluster.servers_script).await?)
        }
        None => None,
    };

    let mut relay_cmd = Command::new(&exe);
    relay_cmd.args(["relay", "--listen", "127.0.0.1:0"]);
    let mut relay = spawn(relay_cmd, "relay", "relay listening on", "on ").await?;
    let relay_target = Target {
        name: "relay",
        url: ws_url(&relay.value),
        pids: vec![("relay".into(), relay.pid)],
    };

    let data_dir = std::env::temp_dir().join(format!("loadtest-bench-{}", rand::random::<u32>()));
    let mut gateway_cmd = Command::new(&config.gateway_bin);
    gateway_cmd
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dev",
            "false",
        ])
        .args(unlimited())
        .arg("--data-dir")
        .arg(&data_dir)
        .env("GATEWAY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn,gateway::server=info");
    let mut gateway = spawn(gateway_cmd, "gateway", "gateway ready", "client=")
        .await
        .with_context(|| {
            format!(
                "starting the gateway at {} (build it with `cargo build --release -p gateway`)",
                config.gateway_bin.display()
            )
        })?;
    let system = Target {
        name: "system",
        url: ws_url(&gateway.value),
        pids: vec![("gateway".into(), gateway.pid)],
    };

    // Idle memory first, on fresh processes: after load, freed memory is reused by new
    // connections and the growth of RSS would understate what a connection costs.
    let idle_kib = idle_kib_per_conn(&system.url, gateway.pid, config.idle_conns).await?;
    let relay_idle_kib = idle_kib_per_conn(&relay_target.url, relay.pid, config.idle_conns).await?;

    let cluster = match (&servers, &config.cluster) {
        (Some(servers), Some(cluster)) => {
            let (gw, dp) = start_cluster(config, cluster, servers).await?;
            let mut pids = vec![("gateway".into(), gw.pid), ("dispatcher".into(), dp.pid)];
            pids.extend(servers.pids.iter().cloned());
            let target = Target {
                name: "cluster",
                url: ws_url(&gw.value),
                pids,
            };
            Some((target, gw, dp))
        }
        _ => None,
    };

    // The relay and the embedded system first, interleaved round by round, while the
    // servers idle: the JVMs' compactions and collections after load would disturb them.
    let mut steps = Vec::new();
    let (mut relay_max, mut system_max, mut cluster_max) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=config.rounds {
        if config.progress {
            eprintln!("round {round}/{}", config.rounds);
        }
        relay_max.push(find_max(config, &relay_target, &mut steps).await?);
        system_max.push(find_max(config, &system, &mut steps).await?);
    }
    let relay_max_rate = median(relay_max.clone());
    let system_max_rate = median(system_max.clone());

    let half = (system_max_rate / 2.0).max(1.0);
    let at_half = direct(config, &system, half, config.step * 2).await?;
    log_step("half", &at_half, config.progress);

    // What end-to-end encryption costs: the same rate, plain then encrypted (each device
    // encrypts in the load generator; the gateway relays larger frames, one per device).
    let e2ee_rate = (half / 2.0).clamp(1.0, 2_000.0);
    let plain = direct_with(config, &system, e2ee_rate, config.step * 2, false).await?;
    log_step("plain", &plain, config.progress);
    let encrypted = direct_with(config, &system, e2ee_rate, config.step * 2, true).await?;
    log_step("e2ee", &encrypted, config.progress);

    let mut warmed = None;
    if let (Some((target, _, _)), Some(cluster)) = (&cluster, &config.cluster) {
        warmed = Some(warm_up(config, cluster, target).await?);
        for round in 1..=config.rounds {
            if config.progress {
                eprintln!("cluster round {round}/{}", config.rounds);
            }
            cluster_max.push(find_max(config, target, &mut steps).await?);
        }
    }

    // Everything but the relay must lose, duplicate and reorder nothing, in every step.
    let mut totals = [0u64; 3];
    let mut add = |step: &Value| {
        for (total, key) in totals.iter_mut().zip(["lost", "duplicated", "reordered"]) {
            *total += step[key].as_u64().unwrap_or(0);
        }
    };
    for s in steps.iter().filter(|s| s["target"] != "relay") {
        add(&s["step"]);
    }
    add(&json!(at_half));
    add(&json!(plain));
    add(&json!(encrypted));

    let mut result = json!({
        "relay_max_rate": relay_max_rate,
        "system_max_rate": system_max_rate,
        "ratio": if relay_max_rate > 0.0 { system_max_rate / relay_max_rate } else { 0.0 },
        "idle_kib_per_conn": idle_kib,
        "relay_idle_kib_per_conn": relay_idle_kib,
        "p99_ms_at_half_rate": at_half.p99_ms,
        "half_rate": half,
        "system_cpu_us_per_msg_at_half_rate": at_half.cpu_us_per_msg,
        "relay_max_rate_by_round": relay_max,
        "system_max_rate_by_round": system_max,
        "bound_p99_ms": config.max_p99_ms,
        "users": config.users,
        "step_secs": config.step.as_secs_f64(),
        "body_bytes": config.body_bytes,
        "idle_conns": config.idle_conns,
        "half_rate_step": at_half,
        "e2ee_rate": e2ee_rate,
        "e2ee_p99_ms": encrypted.p99_ms,
        "e2ee_plain_p99_ms": plain.p99_ms,
        "e2ee_cpu_us_per_msg": encrypted.cpu_us_per_msg,
        "e2ee_plain_cpu_us_per_msg": plain.cpu_us_per_msg,
        "e2ee_plain_step": plain,
        "e2ee_step": encrypted,
        "command": command_line,
        "machine": machine(),
    });

    if let (Some((target, mut gw, mut dp)), Some(cluster_config)) = (cluster, &config.cluster) {
        let cluster_max_rate = median(cluster_max.clone());
        let half = (cluster_max_rate / 2.0).max(1.0);
        let at_half = direct(config, &target, half, config.step * 2).await?;
        log_step("c-half", &at_half, config.progress);
        let light = direct(
            config,
            &target,
            cluster_config.light_rate,
            cluster_config.measure,
        )
        .await?;
        log_step("c-light", &light, config.progress);
        let cpu = direct(
            config,
            &target,
            cluster_config.cpu_rate,
            cluster_config.measure,
        )
        .await?;
        log_step("c-cpu", &cpu, config.progress);
        for step in [&at_half, &light, &cpu] {
            add(&json!(step));
        }
        // The process that used the most CPU at the highest rate the cluster passed.
        let limiting = steps
            .iter()
            .rev()
            .find(|s| {
                s["target"] == "cluster"
                    && s["step"]["ok"] == true
                    && s["step"]["rate"].as_f64() == Some(cluster_max_rate)
            })
            .and_then(|s| s["step"]["cpu_cores"].as_object().cloned())
            .and_then(|cores| {
                cores
                    .into_iter()
                    .filter(|(name, _)| name != "loadtest")
                    .max_by(|a, b| {
                        a.1.as_f64()
                            .unwrap_or(0.0)
                            .total_cmp(&b.1.as_f64().unwrap_or(0.0))
                    })
                    .map(|(name, cores)| json!({"process": name, "cores": cores}))
            });
        let fields = json!({
            "cluster_max_rate": cluster_max_rate,
            "cluster_ratio": if relay_max_rate > 0.0 { cluster_max_rate / relay_max_rate } else { 0.0 },
            "cluster_max_rate_by_round": cluster_max,
            "cluster_limiting_process": limiting,
            "cluster_p99_ms_at_half_rate": at_half.p99_ms,
            "cluster_half_rate": half,
            "cluster_light_rate": cluster_config.light_rate,
            "cluster_light_p50_ms": light.p50_ms,
            "cluster_light_p99_ms": light.p99_ms,
            "cluster_cpu_rate": cluster_config.cpu_rate,
            "cluster_cpu_us_per_msg": cpu.cpu_us_per_msg,
            "cluster_cpu_cores": cpu.cpu_cores,
            "cluster_half_rate_step": at_half,
            "cluster_light_step": light,
            "cluster_cpu_step": cpu,
            "cluster_warm_up": warmed,
        });
        if let (Some(result), Some(fields)) = (result.as_object_mut(), fields.as_object()) {
            result.extend(fields.clone());
        }
        let _ = gw.child.kill().await;
        let _ = dp.child.kill().await;
    }
    drop(servers);
    result["lost"] = json!(totals[0]);
    result["duplicated"] = json!(totals[1]);
    result["reordered"] = json!(totals[2]);
    result["steps"] = json!(steps);

    let _ = relay.child.kill().await;
    let _ = gateway.child.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(result)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|k| k.trim().to_owned());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": kernel,
    })
}

/// A binary next to this one (`target/<profile>/<name>`).
pub fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// Keeps the summary fields in a printable order.
pub fn summary(result: &Value) -> String {
    let keys = [
        "relay_max_rate",
        "system_max_rate",
        "ratio",
        "idle_kib_per_conn",
        "relay_idle_kib_per_conn",
        "p99_ms_at_half_rate",
        "system_cpu_us_per_msg_at_half_rate",
        "e2ee_rate",
        "e2ee_plain_p99_ms",
        "e2ee_p99_ms",
        "e2ee_plain_cpu_us_per_msg",
        "e2ee_cpu_us_per_msg",
        "cluster_max_rate",
        "cluster_ratio",
        "cluster_limiting_process",
        "cluster_p99_ms_at_half_rate",
        "cluster_light_p50_ms",
        "cluster_light_p99_ms",
        "cluster_cpu_us_per_msg",
        "lost",
        "duplicated",
        "reordered",
    ];
    keys.iter()
        .filter(|k| !result[**k].is_null())
        .map(|k| format!("  {k:<36} {}\n", result[k]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
        // Fields 14 and 15 of stat(5) (utime, stime), counted from after the last ')'.
        let stat = "4242 (C2 Compiler (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 350 150 0 0 20 0";
        let secs = stat_cpu_secs(stat).expect("a well-formed stat line");
        assert!((secs - 500.0 / clock_ticks()).abs() < 1e-9, "read {secs}");
        assert_eq!(stat_cpu_secs("4242 (truncated"), None);
    }

    #[test]
    fn this_process_has_no_jit_compiler_threads() {
        // A process without HotSpot's compiler threads (this test binary) counts nothing,
        // and one that does not exist is skipped rather than failing the warm-up.
        assert_eq!(jit_secs(&[std::process::id(), u32::MAX]), 0.0);
    }
}
