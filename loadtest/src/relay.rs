//! `loadtest relay`: the ceiling the system is measured against.
//!
//! A minimal in-memory WebSocket relay that speaks the same frames as the gateway, with
//! the same tokio-tungstenite settings (4 KiB read buffer, no write buffering, 128 KiB
//! frame limit, bounded per-connection queues), and nothing else: no authentication (the
//! user is the `user` query parameter), no persistence, no receipts, no presence. Its
//! messages exist only while it runs; offline recipients simply miss them.
//!
//! For testing the load generator's checker it can also misbehave on purpose: drop,
//! duplicate or reorder every n-th delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Deliberate misbehaviour, each "every n-th delivery" (0: never), and a delay of every
/// delivery (a backlog that drains after the senders stop).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub drop_every: u64,
    pub duplicate_every: u64,
    pub reorder_every: u64,
    pub delay: std::time::Duration,
}

/// A user's connections: connection number and outbound queue.
type Conns = Vec<(u64, mpsc::Sender<Utf8Bytes>)>;

#[derive(Default)]
struct Relay {
    users: Mutex<HashMap<String, Conns>>,
    groups: Mutex<HashMap<String, Vec<String>>>,
    /// Per (recipient, sender), a message held back to be delivered after the next one
    /// on the same pair (reordering, as the protocol's per-sender order would see it).
    held: Mutex<HashMap<(String, String), Utf8Bytes>>,
    deliveries: AtomicU64,
    next_conn: AtomicU64,
    faults: Faults,
}

/// The gateway's tungstenite limits and write buffering, so the comparison is of
/// everything else; the read buffer is 4 KiB where the gateway's default
/// (`--ws-read-buffer`) is 512 B, which it keeps small for idle memory (the relay's memory
/// is not measured).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * 128 * 1024 + 64 * 1024)
        .max_message_size(Some(128 * 1024))
        .max_frame_size(Some(128 * 1024))
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, faults: Faults, stop: CancellationToken) {
    let relay = Arc::new(Relay {
        faults,
        ..Relay::default()
    });
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, relay.clone(), stop.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, relay: Arc<Relay>, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let mut user = String::new();
    let mut device = "default".to_owned();
    // tungstenite's callback signature fixes the (large) error type.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        for pair in request.uri().query().unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("user", v)) => user = v.to_owned(),
                Some(("device", v)) => device = v.to_owned(),
                _ => {}
            }
        }
        Ok(response)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())).await
    else {
        return;
    };
    if user.is_empty() {
        return;
    }
    let (mut sink, mut stream) = ws.split();
    let id = relay.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(256);
    let welcome =
        json!({"type":"welcome","user":user,"device":device,"node":"relay","heartbeat_s":30})
            .to_string();
    let _ = tx.try_send(welcome.into());
    relay
        .users
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(user.clone())
        .or_default()
        .push((id, tx.clone()));

    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = stream.next() => next,
        };
        match next {
            Some(Ok(Message::Text(text))) => relay.handle(&user, &text, &tx),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    relay
        .users
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(user)
        .or_default()
        .retain(|(c, _)| *c != id);
    drop(tx);
    writer.abort();
}

impl Relay {
    fn handle(&self, user: &str, text: &str, reply: &mpsc::Sender<Utf8Bytes>) {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let answer = |v: Value| {
            let _ = reply.try_send(v.to_string().into());
        };
        match frame["type"].as_str() {
            Some("send") => {
                let id = Uuid::now_v7();
                let ts = crate::scenario::now_us() / 1000;
                let (conversation, recipients) =
                    match (frame["to"].as_str(), frame["conversation"].as_str()) {
                        (Some(to), _) => {
                            let (a, b) = if user <= to { (user, to) } else { (to, user) };
                            (format!("dm:{a}:{b}"), vec![to.to_owned()])
                        }
                        (None, Some(c)) => {
                            let members = self
                                .groups
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get(c)
                                .cloned()
                                .unwrap_or_default();
                            (
                                c.to_owned(),
                                members.into_iter().filter(|m| m != user).collect(),
                            )
                        }
                        (None, None) => return,
                    };
                answer(
                    json!({"type":"sent","client_msg_id":frame["client_msg_id"],"message_id":id.to_string(),"conversation":conversation,"ts":ts}),
                );
                let message: Utf8Bytes = json!({"type":"message","message_id":id.to_string(),"conversation":conversation,"from":user,"body":frame["body"],"ts":ts})
                    .to_string()
                    .into();
                for recipient in recipients {
                    self.deliver(&recipient, user, message.clone());
                }
            }
            Some("create_group") => {
                let conversation = format!("g:{}", Uuid::now_v7());
                let mut members: Vec<String> = frame["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                members.push(user.to_owned());
                members.sort();
                members.dedup();
                self.groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(conversation.clone(), members.clone());
                answer(
                    json!({"type":"group","ref":frame["ref"],"conversation":conversation,"name":frame["name"],"members":members}),
                );
            }
            Some("ping") => answer(json!({"type":"pong","ref":frame["ref"]})),
            _ => {}
        }
    }

    fn deliver(&self, recipient: &str, sender: &str, message: Utf8Bytes) {
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
        let f = self.faults;
        if f.drop_every > 0 && n.is_multiple_of(f.drop_every) {
            return;
        }
        let mut frames = Vec::with_capacity(2);
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let pair = (recipient.to_owned(), sender.to_owned());
            if f.reorder_every > 0 && n.is_multiple_of(f.reorder_every) && !held.contains_key(&pair)
            {
                held.insert(pair, message);
                return;
            }
            frames.push(message.clone());
            if let Some(earlier) = held.remove(&pair) {
                frames.push(earlier);
            }
        }
        if f.duplicate_every > 0 && n.is_multiple_of(f.duplicate_every) {
            frames.push(message);
        }
        let conns: Vec<mpsc::Sender<Utf8Bytes>> = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(recipient)
            .into_iter()
            .flatten()
            .map(|(_, conn)| conn.clone())
            .collect();
        let deliver = move || {
            for conn in &conns {
                for frame in &frames {
                    let _ = conn.try_send(frame.clone());
                }
            }
        };
        if f.delay.is_zero() {
            deliver();
        } else {
            let delay = f.delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                deliver();
            });
        }
    }
}
