//! The load generator's correctness checker is itself tested: a relay that drops,
//! duplicates or reorders on purpose must be caught, a faithful one must pass, and a short
//! run against the embedded gateway must lose nothing.

use std::time::Duration;

use loadtest::client::Tokens;
use loadtest::ledger::Verdict;
use loadtest::relay::{self, Faults};
use loadtest::scenario::{self, Fleet, Options, Workload};
use tokio_util::sync::CancellationToken;

async fn start_relay(faults: Faults) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(relay::serve(listener, faults, stop.clone()));
    (url, stop)
}

fn fleet(url: &str, tokens: Tokens, users: u32) -> Fleet {
    Fleet {
        urls: vec![url.to_owned()],
        tokens,
        users,
        first_user: 0,
        local_users: users,
        prefix: format!("t{:06x}-", rand::random::<u32>() & 0xff_ffff),
        source_ips: Vec::new(),
        concurrency: 64,
    }
}

/// Direct traffic while a quarter of the users drop without a goodbye every 0.7 s and
/// come back 0.3 s later.
fn churn() -> Workload {
    Workload::Reconnect {
        rates: vec![100.0],
        step: Duration::from_secs(3),
        fraction: 0.25,
        every: Duration::from_millis(700),
        offline: Duration::from_millis(300),
    }
}

fn options() -> Options {
    Options {
        body_bytes: 64,
        drain: Duration::from_secs(15),
        ..Options::default()
    }
}

async fn run(
    url: &str,
    tokens: Tokens,
    users: u32,
    workload: Workload,
) -> (Verdict, loadtest::stats::Stats) {
    let outcome = scenario::run(&fleet(url, tokens, users), &workload, &options(), None)
        .await
        .expect("run");
    (outcome.ledger.verdict(), outcome.stats)
}

fn direct(rate: f64, secs: f64) -> Workload {
    Workload::Direct {
        rates: vec![rate],
        step: Duration::from_secs_f64(secs),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_drops_duplicates_and_reorders_is_caught() {
    let faults = Faults {
        drop_every: 50,
        duplicate_every: 40,
        reorder_every: 30,
        ..Faults::default()
    };
    let (url, stop) = start_relay(faults).await;
    let (verdict, _) = run(&url, Tokens::Secret("x".into()), 10, direct(400.0, 1.5)).await;
    stop.cancel();
    assert!(verdict.lost > 0, "drops not caught: {verdict:?}");
    assert!(verdict.duplicated > 0, "duplicates not caught: {verdict:?}");
    assert!(verdict.reordered > 0, "reordering not caught: {verdict:?}");
    assert!(!verdict.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faithful_relay_passes() {
    let (url, stop) = start_relay(Faults::default()).await;
    let (verdict, stats) = run(&url, Tokens::Secret("x".into()), 10, direct(400.0, 1.0)).await;
    stop.cancel();
    assert_eq!(stats.offered, 400);
    assert_eq!(verdict.accepted, 400);
    assert_eq!(
        (verdict.lost, verdict.duplicated, verdict.reordered),
        (0, 0, 0),
        "{verdict:?}"
    );
    assert_eq!(verdict.delivered, verdict.expected);
    assert_eq!(
        stats.delivered.len(),
        400,
        "one latency sample per delivery"
    );
}

/// What arrives only after the senders stopped is a backlog drained, not a rate sustained:
/// a relay that delivers everything 1.5 s late sustains nothing during a 1 s run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drained_after_the_run_is_not_a_sustained_rate() {
    let faults = Faults {
        delay: Duration::from_millis(1500),
        ..Faults::default()
    };
    let (url, stop) = start_relay(faults).await;
    let outcome = scenario::run(
        &fleet(&url, Tokens::Secret("x".into()), 10),
        &direct(200.0, 1.0),
        &options(),
        None,
    )
    .await
    .expect("run");
    stop.cancel();
    let verdict = outcome.ledger.verdict();
    assert_eq!(verdict.delivered, 200, "{verdict:?}");
    let report = loadtest::report::Report::new(
        "direct",
        vec![url],
        10,
        1,
        &outcome.stats,
        verdict,
        outcome.send_secs,
    );
    assert_eq!(report.delivered_per_sec, 0.0, "{report:?}");
    assert_eq!(report.delivered_after_window, 200);
    assert!(report.drain_secs >= 0.4, "{}", report.drain_secs);

    // Without the delay, what is delivered is sustained.
    let (url, stop) = start_relay(Faults::default()).await;
    let outcome = scenario::run(
        &fleet(&url, Tokens::Secret("x".into()), 10),
        &direct(200.0, 1.0),
        &options(),
        None,
    )
    .await
    .expect("run");
    stop.cancel();
    let report = loadtest::report::Report::new(
        "direct",
        vec![url],
        10,
        1,
        &outcome.stats,
        outcome.ledger.verdict(),
        outcome.send_secs,
    );
    assert!(report.delivered_per_sec > 150.0, "{report:?}");
}

async fn start_gateway() -> (gateway::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = gateway::Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().to_path_buf();
    config.jwt_secret = Some("lt-secret".into());
    config.drain_secs = 0;
    (gateway::start(config).await.expect("gateway"), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_runs_against_the_embedded_gateway_lose_nothing() {
    let (gw, _dir) = start_gateway().await;
    let url = format!("ws://{}/ws", gw.client_addr);
    let tokens = Tokens::Secret("lt-secret".into());

    let (verdict, stats) = run(&url, tokens.clone(), 20, direct(200.0, 1.0)).await;
    assert_eq!(
        (stats.offered, verdict.accepted),
        (200, 200),
        "{:?}",
        stats.errors
    );
    assert!(verdict.clean() && verdict.lost == 0, "{verdict:?}");
    assert_eq!(verdict.delivered, 200);

    let group = Workload::Group {
        size: 5,
        rates: vec![100.0],
        step: Duration::from_secs(1),
    };
    let (verdict, _) = run(&url, tokens.clone(), 20, group).await;
    assert_eq!(
        verdict.expected, 400,
        "each of 100 messages owed to 4 members"
    );
    assert!(verdict.clean() && verdict.delivered == 400, "{verdict:?}");

    // Users drop without a goodbye and come back: what was sent meanwhile arrives.
    let churn = churn();
    let (verdict, stats) = run(&url, tokens, 20, churn).await;
    assert!(
        stats.errors.get("reconnects_forced").copied().unwrap_or(0) >= 3,
        "{:?}",
        stats.errors
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.reordered, 0, "{verdict:?}");
    gw.shutdown();
    gw.wait().await;
}

/// A wrong token or path is refused at every attempt, which retrying does not mend: the run
/// says so as soon as every user was refused, not after the connect timeout (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_every_user_ends_the_run_with_the_reason() {
    let (gw, _dir) = start_gateway().await;
    let url = format!("ws://{}/ws", gw.client_addr);
    let cases = [
        (url.clone(), Tokens::Secret("not-the-secret".into()), "401"),
        (
            format!("ws://{}/nope", gw.client_addr),
            Tokens::Secret("lt-secret".into()),
            "404",
        ),
    ];
    for (url, tokens, status) in cases {
        let (fleet, workload, options) = (fleet(&url, tokens, 5), direct(10.0, 1.0), options());
        let run = scenario::run(&fleet, &workload, &options, None);
        let Err(error) = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("ended before the connect timeout")
        else {
            panic!("a run in which no user connected passed");
        };
        let message = error.to_string();
        assert!(message.contains(&format!("HTTP {status}")), "{message}");
        assert!(message.contains("refused every user"), "{message}");
    }
    gw.shutdown();
    gw.wait().await;
}

/// Encrypted runs go through the same checker, which decrypts what arrives: a message it
/// cannot decrypt counts as an error and is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_runs_against_the_embedded_gateway_lose_nothing() {
    let (gw, _dir) = start_gateway().await;
    let url = format!("ws://{}/ws", gw.client_addr);
    let tokens = Tokens::Secret("lt-secret".into());
    let e2ee = Options {
        e2ee: true,
        ..options()
    };
    let run = |workload: Workload| {
        let (url, tokens, e2ee) = (url.clone(), tokens.clone(), e2ee.clone());
        async move {
            let outcome = scenario::run(&fleet(&url, tokens, 20), &workload, &e2ee, None)
                .await
                .expect("run");
            (outcome.ledger.verdict(), outcome.stats)
        }
    };
    let (verdict, stats) = run(direct(200.0, 1.0)).await;
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert_eq!(verdict.accepted, 200, "{verdict:?}");
    assert!(verdict.clean() && verdict.delivered == 200, "{verdict:?}");

    let group = Workload::Group {
        size: 5,
        rates: vec![100.0],
        step: Duration::from_secs(1),
    };
    let (verdict, stats) = run(group).await;
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert_eq!(verdict.expected, 400, "{verdict:?}");
    assert!(verdict.clean() && verdict.delivered == 400, "{verdict:?}");

    // Dropped devices get their ciphertexts on reconnect, from their own queues.
    let churn = churn();
    let (verdict, stats) = run(churn).await;
    assert_eq!(
        stats.errors.get("undecryptable"),
        None,
        "{:?}",
        stats.errors
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.reordered, 0, "{verdict:?}");
    gw.shutdown();
    gw.wait().await;
}

/// Messages with attachments: every user uploads a file first, and each recipient
/// downloads what it gets and checks the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_attachments_check_every_downloaded_byte() {
    let stats = hundred_messages(Options {
        attachments: 0.5,
        attachment_bytes: 20_000,
        ..options()
    })
    .await;
    // About half of the 100 messages carry a file; each arrived, was downloaded, matched.
    assert!(
        (20..=80).contains(&stats.attachments_verified),
        "{} attachments verified",
        stats.attachments_verified
    );
}

/// 100 messages among 10 users in a second, on a fresh embedded gateway: every one
/// delivered, no error.
async fn hundred_messages(options: Options) -> loadtest::stats::Stats {
    let (gw, _dir) = start_gateway().await;
    let url = format!("ws://{}/ws", gw.client_addr);
    let outcome = scenario::run(
        &fleet(&url, Tokens::Secret("lt-secret".into()), 10),
        &direct(100.0, 1.0),
        &options,
        None,
    )
    .await
    .expect("run");
    let (verdict, stats) = (outcome.ledger.verdict(), outcome.stats);
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert!(verdict.clean() && verdict.delivered == 100, "{verdict:?}");
    gw.shutdown();
    gw.wait().await;
    stats
}

/// `--read`: recipients mark each message read as it comes, and the senders get the
/// `read` receipts (counted; the last may still be on their way when the run ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_that_read_count_the_read_receipts() {
    let stats = hundred_messages(Options {
        read: true,
        ..options()
    })
    .await;
    assert!(
        (1..=100).contains(&stats.read_receipts),
        "{} read receipts for 100 messages read",
        stats.read_receipts
    );
}

/// A receipt the sender had not confirmed when its connection dropped comes again after
/// it reconnects; counted once, a message read makes at most one read receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_that_come_again_after_a_reconnect_count_once() {
    let (gw, _dir) = start_gateway().await;
    let url = format!("ws://{}/ws", gw.client_addr);
    let reading = Options {
        read: true,
        ..options()
    };
    let outcome = scenario::run(
        &fleet(&url, Tokens::Secret("lt-secret".into()), 10),
        &Workload::Reconnect {
            rates: vec![500.0],
            step: Duration::from_secs(4),
            fraction: 0.5,
            every: Duration::from_millis(150),
            offline: Duration::from_millis(20),
        },
        &reading,
        None,
    )
    .await
    .expect("run");
    let (verdict, stats) = (outcome.ledger.verdict(), outcome.stats);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert!(
        stats.errors.get("reconnects_forced").copied().unwrap_or(0) >= 10,
        "{:?}",
        stats.errors
    );
    // Every message that came was read once: confirmed or not (its sender dropped before
    // its `sent`), each makes at most one read receipt.
    let came = verdict.delivered + verdict.unconfirmed;
    assert!(
        (1..=came).contains(&stats.read_receipts),
        "{} read receipts for {came} messages that came",
        stats.read_receipts,
    );
    gw.shutdown();
    gw.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_exits_non_zero_when_anything_was_lost() {
    let (bad, stop_bad) = start_relay(Faults {
        drop_every: 10,
        ..Faults::default()
    })
    .await;
    let (good, stop_good) = start_relay(Faults::default()).await;
    let exe = env!("CARGO_BIN_EXE_loadtest");
    let common = [
        "direct",
        "--jwt-secret",
        "x",
        "--users",
        "5",
        "--rate",
        "100",
        "--step-secs",
        "1",
        "--drain-secs",
        "1",
        "--quiet",
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let plot = dir.path().join("plot.svg");

    let failed = tokio::process::Command::new(exe)
        .args(common)
        .args(["--url", &bad])
        .output()
        .await
        .expect("run");
    assert_eq!(
        failed.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&failed.stdout)
    );
    assert!(String::from_utf8_lossy(&failed.stdout).contains("FAILED"));

    let passed = tokio::process::Command::new(exe)
        .args(common)
        .args(["--url", &good])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .await
        .expect("run");
    assert_eq!(
        passed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    assert_eq!(report["verdict"]["lost"], 0);
    assert_eq!(report["offered"], 100);
    assert!(report["delivery_latency"]["p99_ms"].as_f64().is_some());
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("throughput"),
        "an SVG plot"
    );
    // Spread over two processes: the rate is shared, the ledgers merge, the verdict is whole.
    let split = tokio::process::Command::new(exe)
        .args(common)
        .args(["--url", &good, "--users", "6", "--processes", "2"])
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .expect("run");
    assert_eq!(
        split.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&split.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    assert_eq!(report["processes"], 2);
    assert_eq!(report["offered"], 100, "two processes share the total rate");
    assert_eq!(report["connected"], 6);
    assert_eq!(report["verdict"]["expected"], 100);
    assert_eq!(
        report["verdict"]["delivered"], 100,
        "deliveries across processes are matched"
    );
    stop_bad.cancel();
    stop_good.cancel();
}

#[test]
fn the_cli_names_a_bad_argument_instead_of_panicking() {
    let exe = env!("CARGO_BIN_EXE_loadtest");
    let cases: [(&[&str], &str); 6] = [
        (&["direct", "--users", "0"], "--users"),
        (&["direct", "--users", "1"], "at least 2 users"),
        (&["direct", "--rate", "100,0"], "0 is not above 0"),
        (
            &["direct", "--step-secs", "soon"],
            "\"soon\" is not a number",
        ),
        (&["idle", "--hold-secs=-1"], "-1 is below 0"),
        (&["reconnect", "--fraction", "2"], "not between 0 and 1"),
    ];
    for (args, expected) in cases {
        let out = std::process::Command::new(exe)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
