//! `loadtest bench`: the system against the relay, on loopback, in one run.
//!
//! Starts the relay and the embedded gateway (fresh data dir) as separate processes, runs
//! the same `direct` workload against each, interleaved, `rounds` times, stepping the rate
//! to find the highest rate delivered in full with p99 send→delivered within the bound;
//! then measures p99 at half the system's rate and the server's RSS per idle connection.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::Tokens;
use crate::report::Report;
use crate::scenario::{self, Fleet, Options, StartGate, Workload};

const SECRET: &str = "loadtest-bench-secret";

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
}

/// One rate tried against one target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub rate: f64,
    pub delivered_per_sec: f64,
    pub p99_ms: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub errors: u64,
    pub ok: bool,
}

struct Server {
    child: Child,
    url: String,
    pid: u32,
}

/// Starts a process and waits for the log line that carries its address.
async fn spawn(mut command: Command, marker: &str, field: &str) -> anyhow::Result<Server> {
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
    let found = tokio::time::timeout(Duration::from_secs(30), async {
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
                        .and_then(|r| r.split_whitespace().next());
                    return value.map(str::to_owned);
                }
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
    .with_context(|| format!("the server never printed {marker:?}"))?;
    // Keep draining both pipes so the server never blocks on a full one.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    tokio::spawn(async move { while let Ok(Some(_)) = errs.next_line().await {} });
    let url = if found.starts_with("ws://") {
        found
    } else {
        format!("ws://{found}/ws")
    };
    Ok(Server { child, url, pid })
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
    url: &str,
    rate: f64,
    secs: Duration,
) -> anyhow::Result<Step> {
    let f = fleet(url, config.users);
    let workload = Workload::Direct {
        rates: vec![rate],
        step: secs,
    };
    let options = Options {
        body_bytes: config.body_bytes,
        drain: Duration::from_secs(5),
        partial: false,
        progress: false,
        connect_timeout: Duration::from_secs(60),
    };
    let outcome = scenario::run(&f, &workload, &options, None).await?;
    let verdict = outcome.ledger.verdict();
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
        delivered_per_sec: report.delivered_per_sec,
        p99_ms: p99,
        lost: verdict.lost,
        duplicated: verdict.duplicated,
        reordered: verdict.reordered,
        errors,
        ok: complete && errors == 0 && verdict.clean() && p99 <= config.max_p99_ms,
    })
}

/// The highest rate of the ladder (refined by bisection) that passes.
async fn find_max(
    config: &BenchConfig,
    url: &str,
    name: &str,
    steps: &mut Vec<Value>,
) -> anyhow::Result<f64> {
    let mut best = 0.0;
    let mut failed = None;
    for &rate in &config.ladder {
        let step = direct(config, url, rate, config.step).await?;
        log_step(name, &step, config.progress);
        steps.push(json!({"target": name, "step": step}));
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
            let step = direct(config, url, mid, config.step).await?;
            log_step(name, &step, config.progress);
            steps.push(json!({"target": name, "step": step}));
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
            "  {name:<7} {:>7.0} msgs/s → delivered {:>8.0}/s p99 {:>7.2} ms lost {} dup {} reord {} err {} {}",
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
async fn idle_kib_per_conn(url: &str, pid: u32, conns: u32) -> anyhow::Result<f64> {
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
        partial: false,
        progress: false,
        connect_timeout: Duration::from_secs(60),
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

/// Runs the whole benchmark and returns its JSON document.
pub async fn run(config: &BenchConfig, command_line: &str) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    let mut relay_cmd = Command::new(&exe);
    relay_cmd.args(["relay", "--listen", "127.0.0.1:0"]);
    let mut relay = spawn(relay_cmd, "relay listening on", "on ").await?;

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
        .args([
            "--rate-per-sec",
            "1000000",
            "--rate-burst",
            "1000000",
            "--frame-rate-per-sec",
            "1000000",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("GATEWAY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn,gateway::server=info");
    let mut gateway = spawn(gateway_cmd, "gateway ready", "client=")
        .await
        .with_context(|| {
            format!(
                "starting the gateway at {} (build it with `cargo build --release -p gateway`)",
                config.gateway_bin.display()
            )
        })?;

    // Idle memory first, on fresh processes: after load, freed memory is reused by new
    // connections and the growth of RSS would understate what a connection costs.
    let idle_kib = idle_kib_per_conn(&gateway.url, gateway.pid, config.idle_conns).await?;
    let relay_idle_kib = idle_kib_per_conn(&relay.url, relay.pid, config.idle_conns).await?;

    let mut steps = Vec::new();
    let (mut relay_max, mut system_max) = (Vec::new(), Vec::new());
    for round in 1..=config.rounds {
        if config.progress {
            eprintln!("round {round}/{}", config.rounds);
        }
        relay_max.push(find_max(config, &relay.url, "relay", &mut steps).await?);
        system_max.push(find_max(config, &gateway.url, "system", &mut steps).await?);
    }
    let relay_max_rate = median(relay_max.clone());
    let system_max_rate = median(system_max.clone());

    let half = (system_max_rate / 2.0).max(1.0);
    let at_half = direct(config, &gateway.url, half, config.step * 2).await?;
    log_step("half", &at_half, config.progress);

    let mut totals = (0, 0, 0);
    for s in steps.iter().filter(|s| s["target"] == "system") {
        totals.0 += s["step"]["lost"].as_u64().unwrap_or(0);
        totals.1 += s["step"]["duplicated"].as_u64().unwrap_or(0);
        totals.2 += s["step"]["reordered"].as_u64().unwrap_or(0);
    }
    totals.0 += at_half.lost;
    totals.1 += at_half.duplicated;
    totals.2 += at_half.reordered;

    let _ = relay.child.kill().await;
    let _ = gateway.child.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);

    Ok(json!({
        "relay_max_rate": relay_max_rate,
        "system_max_rate": system_max_rate,
        "ratio": if relay_max_rate > 0.0 { system_max_rate / relay_max_rate } else { 0.0 },
        "idle_kib_per_conn": idle_kib,
        "relay_idle_kib_per_conn": relay_idle_kib,
        "p99_ms_at_half_rate": at_half.p99_ms,
        "half_rate": half,
        "lost": totals.0,
        "duplicated": totals.1,
        "reordered": totals.2,
        "relay_max_rate_by_round": relay_max,
        "system_max_rate_by_round": system_max,
        "bound_p99_ms": config.max_p99_ms,
        "users": config.users,
        "step_secs": config.step.as_secs_f64(),
        "body_bytes": config.body_bytes,
        "idle_conns": config.idle_conns,
        "steps": steps,
        "half_rate_step": at_half,
        "command": command_line,
        "machine": machine(),
    }))
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

/// The gateway binary next to this one (`target/<profile>/gateway`).
pub fn default_gateway_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join("gateway")
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
        "lost",
        "duplicated",
        "reordered",
    ];
    keys.iter()
        .map(|k| format!("  {k:<24} {}\n", result[k]))
        .collect()
}
