//! Guarantee 1: `sent` means durable. A real gateway process is SIGKILLed right after
//! answering `sent`, and again in the middle of sustained load, and restarted on the same
//! data dir; nothing that was `sent` is lost (end-to-end encrypted messages included).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{embedded_gateway, Process};
use common::{Client, SECRET};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn connect(gateway: &Process, user: &str) -> Client {
    let token = gateway::auth::Auth::new(SECRET.as_bytes()).mint(user, Duration::from_secs(600));
    common::connect_url(&format!("ws://{}/ws", gateway.addr), &token, user).await
}

#[tokio::test]
async fn sigkill_after_sent_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = embedded_gateway(dir.path()).await;
    let mut alice = connect(&first, "alice").await;
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
    first.sigkill().await;
    assert!(
        alice.ws.next().await.is_none_or(|r| r.is_err()),
        "the connection died with the process"
    );

    let second = embedded_gateway(dir.path()).await;
    let mut bob = connect(&second, "bob").await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(bob.recv_type("message").await);
    }
    let sent_ids: Vec<&Value> = sent.iter().map(|s| &s["message_id"]).collect();
    let got_ids: Vec<&Value> = got.iter().map(|m| &m["message_id"]).collect();
    assert_eq!(got_ids, sent_ids, "every sent message, in order");

    // Idempotency records survived the crash too.
    let mut alice = connect(&second, "alice").await;
    let again = alice.send_message("bob", "m0", "c-0").await;
    assert_eq!(again["message_id"], sent[0]["message_id"]);
}

/// The same for end-to-end encrypted messages (and the device keys they need): every
/// `sent` one is in the recipient device's own queue after the crash, and decrypts.
#[tokio::test]
async fn sigkill_after_an_encrypted_sent_loses_nothing() {
    use loadtest::e2ee::E2eeDevice;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = embedded_gateway(dir.path()).await;
    let connect_device = |gateway: &Process, user: &str| {
        let token =
            gateway::auth::Auth::new(SECRET.as_bytes()).mint(user, Duration::from_secs(600));
        let url = format!("ws://{}/ws?device=phone", gateway.addr);
        let user = user.to_owned();
        async move { common::connect_url(&url, &token, &user).await }
    };
    let (mut alice, mut bob) = (
        connect_device(&first, "alice").await,
        connect_device(&first, "bob").await,
    );
    let (mut alice_keys, mut bob_keys) = (
        E2eeDevice::new("alice", "phone"),
        E2eeDevice::new("bob", "phone"),
    );
    for (client, keys) in [(&mut alice, &mut alice_keys), (&mut bob, &mut bob_keys)] {
        client.send(keys.keys_upload("k", 20)).await;
        client.recv_type("keys").await;
    }
    bob.close().await;
    alice
        .send(json!({"type":"keys_claim","ref":"c","devices":[{"user":"bob","device":"phone"}]}))
        .await;
    let claimed = alice.recv_type("keys_claimed").await;
    alice_keys.start_sessions(&claimed).expect("session");
    let bob_phone = ("bob".to_owned(), "phone".to_owned());
    for i in 0..10 {
        let e2ee = alice_keys
            .encrypt_direct(std::slice::from_ref(&bob_phone), &format!("secret {i}"))
            .expect("encrypt");
        alice
            .send(json!({"type":"send","client_msg_id":format!("e-{i}"),"to":"bob","e2ee":e2ee}))
            .await;
    }
    let mut sent = Vec::new();
    while sent.len() < 10 {
        let frame = alice.recv().await;
        assert_eq!(frame["type"], "sent", "{frame}");
        sent.push(frame["message_id"].clone());
    }
    first.sigkill().await;

    let second = embedded_gateway(dir.path()).await;
    let mut bob = connect_device(&second, "bob").await;
    for (i, id) in sent.iter().enumerate() {
        let message = bob.recv_type("message").await;
        assert_eq!(&message["message_id"], id, "every sent message, in order");
        let text = bob_keys
            .decrypt(&message)
            .expect("decrypts after the crash");
        assert_eq!(text, format!("secret {i}"));
    }
}

/// Senders each keep many sends in flight, as fast as the gateway answers (the most it
/// sustains), to recipients who are away; the process is SIGKILLed once thousands were
/// answered, and every message that got `sent` is then pending for its recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_sustained_load_loses_no_sent_message() {
    const SENDERS: usize = 20;
    const IN_FLIGHT: usize = 32;
    const KILL_AFTER: usize = 3_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = embedded_gateway(dir.path()).await;
    // Recipient → (message id → body) of every send answered with `sent`.
    let answered: Arc<Mutex<HashMap<String, HashMap<String, String>>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = connect(&first, &format!("sender{s}")).await;
        let (answered, count, enough) = (answered.clone(), count.clone(), enough.clone());
        senders.push(tokio::spawn(async move {
            let to = format!("away{s}");
            let mut bodies: HashMap<String, String> = HashMap::new();
            let mut next = 0usize;
            loop {
                while bodies.len() < IN_FLIGHT {
                    let cmid = format!("c{next}");
                    let body = format!("{to} {next}");
                    let frame = json!({"type":"send","client_msg_id":cmid,"to":to,"body":body});
                    if client
                        .ws
                        .send(Message::text(frame.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    bodies.insert(cmid, body);
                    next += 1;
                }
                let frame = match client.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        serde_json::from_str::<Value>(&text).expect("JSON frame")
                    }
                    Some(Ok(_)) => continue,
                    // The process is gone.
                    _ => return,
                };
                let cmid = frame["client_msg_id"].as_str().unwrap_or_default();
                let body = bodies.remove(cmid).expect("an answer to a send in flight");
                if frame["type"] != "sent" {
                    // Refused (the server was too slow to confirm it): no promise made.
                    assert_eq!(frame["code"], "unavailable", "{frame}");
                    continue;
                }
                let id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                answered
                    .lock()
                    .expect("lock")
                    .entry(to.clone())
                    .or_default()
                    .insert(id, body);
                if count.fetch_add(1, Ordering::Relaxed) + 1 == KILL_AFTER {
                    enough.notify_one();
                }
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), enough.notified())
        .await
        .expect("thousands of sends answered within two minutes");
    first.sigkill().await;
    for sender in senders {
        sender.await.expect("sender");
    }
    let answered = std::mem::take(&mut *answered.lock().expect("lock"));
    let total: usize = answered.values().map(HashMap::len).sum();
    assert!(total >= KILL_AFTER, "{total} answered");

    let second = embedded_gateway(dir.path()).await;
    for (recipient, expected) in answered {
        let mut client = connect(&second, &recipient).await;
        let mut missing = expected;
        // Pending messages arrive oldest first; those stored but never answered may
        // arrive too.
        while !missing.is_empty() {
            let message = client.recv_type("message").await;
            let id = message["message_id"].as_str().unwrap_or_default();
            if let Some(body) = missing.remove(id) {
                assert_eq!(message["body"], body.as_str(), "{message}");
            }
        }
        client.close().await;
    }
}
