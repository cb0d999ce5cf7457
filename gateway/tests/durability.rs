//! Guarantee 1: `sent` means durable. A real gateway process is SIGKILLed right after
//! answering `sent` and restarted on the same data dir; nothing is lost.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Client, SECRET, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Process {
    child: Child,
    client: String,
}

async fn spawn(data_dir: &std::path::Path) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dev",
            "false",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("GATEWAY_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the gateway binary");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let client = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if line.contains("gateway ready") {
                let addr = line
                    .split("client=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                return addr.expect("client address in the ready line").to_owned();
            }
        }
        panic!("the gateway exited before it was ready");
    })
    .await
    .expect("ready in time");
    // Keep draining the log so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process { child, client }
}

async fn connect(addr: &str, user: &str) -> Client {
    let token = gateway::auth::Auth::new(SECRET.as_bytes()).mint(user, Duration::from_secs(600));
    common::connect_url(&format!("ws://{addr}/ws"), &token, user).await
}

#[tokio::test]
async fn sigkill_after_sent_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = spawn(dir.path()).await;
    let mut alice = connect(&first.client, "alice").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        // Pipelined sends: several are in flight when the process dies.
        alice.send(json!({"type":"send","client_msg_id":format!("c-{i}"),"to":"bob","body":format!("m{i}")})).await;
    }
    while sent.len() < 20 {
        let frame = alice.recv().await;
        assert_eq!(frame["type"], "sent", "{frame}");
        sent.push(frame);
    }
    // SIGKILL right after the last `sent`: no drain, no flush, no goodbye.
    first.child.start_kill().expect("kill -9");
    first.child.wait().await.expect("reaped");
    assert!(
        alice.ws.next().await.is_none_or(|r| r.is_err()),
        "the connection died with the process"
    );

    let second = spawn(dir.path()).await;
    let mut bob = connect(&second.client, "bob").await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(bob.recv_type("message").await);
    }
    let sent_ids: Vec<&Value> = sent.iter().map(|s| &s["message_id"]).collect();
    let got_ids: Vec<&Value> = got.iter().map(|m| &m["message_id"]).collect();
    assert_eq!(got_ids, sent_ids, "every sent message, in order");

    // Idempotency records survived the crash too.
    let mut alice = connect(&second.client, "alice").await;
    let again = alice.send_message("bob", "m0", "c-0").await;
    assert_eq!(again["message_id"], sent[0]["message_id"]);
}
