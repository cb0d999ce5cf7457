//! A small WebSocket client that speaks the protocol as an outside client does: raw JSON
//! frames over a real connection, with the waits and assertions the tests share.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

/// Connects to a gateway's WebSocket URL with a bearer token and reads the `welcome`.
pub(crate) async fn connect_url(url: &str, token: &str, user: &str) -> Client {
    try_connect_url(url, token, user)
        .await
        .unwrap_or_else(|e| panic!("{user}: connect: {e}"))
}

/// Like [`connect_url`], but a failure to connect is returned, not a panic (for clients
/// that try another gateway).
pub(crate) async fn try_connect_url(url: &str, token: &str, user: &str) -> Result<Client, String> {
    try_connect_with(url, token, user, None).await
}

/// Like [`try_connect_url`], through `connector` (a `wss://` client's trust, for one).
pub(crate) async fn try_connect_with(
    url: &str,
    token: &str,
    user: &str,
    connector: Option<tokio_tungstenite::Connector>,
) -> Result<Client, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    request.headers_mut().insert("authorization", bearer);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector);
    let (ws, _) = timeout(WAIT, connecting)
        .await
        .map_err(|_| format!("{url}: no handshake within {WAIT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let mut client = Client {
        ws,
        user: user.into(),
        welcome: Value::Null,
        seen: Default::default(),
        duplicates: 0,
    };
    match client.try_recv(WAIT).await {
        Ok(Some(welcome)) if welcome["type"] == "welcome" => {
            client.welcome = welcome;
            Ok(client)
        }
        other => Err(format!("{url}: no welcome: {other:?}")),
    }
}

/// The HTTP status a WebSocket handshake was refused with.
pub(crate) async fn refused_status(request: impl IntoClientRequest + Unpin) -> u16 {
    refused(request).await.0
}

/// The HTTP status and body a WebSocket handshake was refused with.
pub(crate) async fn refused(request: impl IntoClientRequest + Unpin) -> (u16, String) {
    match timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("in time")
    {
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

pub(crate) struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    pub welcome: Value,
    /// Message ids this connection has received, to drop repeats as the protocol tells
    /// clients to (guarantee 3: a device may see a message twice before its ack lands).
    seen: std::collections::HashSet<String>,
    /// How many repeated `message` frames were dropped.
    pub duplicates: usize,
}

/// How a connection ended, as the client saw it.
#[derive(Debug)]
pub(crate) enum Ended {
    Closed(Option<CloseFrame>),
    Dropped(String),
}

impl Ended {
    pub(crate) fn code(&self) -> Option<u16> {
        match self {
            Ended::Closed(Some(frame)) => Some(frame.code.into()),
            _ => None,
        }
    }
}

impl Client {
    pub(crate) async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame, as JSON; a `message` frame whose id this connection already
    /// received is dropped, as a client does.
    pub(crate) async fn recv(&mut self) -> Value {
        loop {
            let frame = self.recv_raw().await;
            if frame["type"] == "message" {
                let id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                if !self.seen.insert(id) {
                    self.duplicates += 1;
                    continue;
                }
            }
            return frame;
        }
    }

    /// The next text frame within `wait` (repeated messages dropped, as in [`Client::recv`]):
    /// `Ok(None)` when none came, `Err` once the connection ended.
    pub(crate) async fn try_recv(&mut self, wait: Duration) -> Result<Option<Value>, Ended> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(next) => next,
            };
            let frame = match next {
                None => return Err(Ended::Dropped("end of stream".into())),
                Some(Err(e)) => return Err(Ended::Dropped(e.to_string())),
                Some(Ok(Message::Close(frame))) => return Err(Ended::Closed(frame)),
                Some(Ok(Message::Text(text))) => {
                    serde_json::from_str::<Value>(&text).expect("JSON frame")
                }
                Some(Ok(_)) => continue,
            };
            if frame["type"] == "message" {
                let id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                if !self.seen.insert(id) {
                    self.duplicates += 1;
                    continue;
                }
            }
            return Ok(Some(frame));
        }
    }

    /// Sends a frame; `false` when the connection is gone.
    pub(crate) async fn try_send(&mut self, frame: Value) -> bool {
        self.ws.send(Message::text(frame.to_string())).await.is_ok()
    }

    /// The next text frame, as JSON, repeats included.
    pub(crate) async fn recv_raw(&mut self) -> Value {
        loop {
            let message = timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.user))
                .unwrap_or_else(|| panic!("{}: connection ended", self.user))
                .unwrap_or_else(|e| panic!("{}: {e}", self.user));
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Close(frame) => panic!("{}: closed {frame:?}", self.user),
                _ => continue,
            }
        }
    }

    /// The next frame of type `kind`, skipping presence, typing and receipt frames and
    /// group notices only (tests that care about those assert them with `barrier` or
    /// `group_notice`). A `group` asked for is an answer (it has a `ref`).
    pub(crate) async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind && frame.get("notice_id").is_none() {
                return frame;
            }
            assert!(
                is_incidental(&frame),
                "{}: expected {kind}, got {frame}",
                self.user
            );
        }
    }

    /// The next group notice (a `group` frame with a `notice_id`), skipping presence,
    /// typing and receipt frames.
    pub(crate) async fn group_notice(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == "group" && frame.get("notice_id").is_some() {
                return frame;
            }
            assert!(
                ["presence", "typing", "receipt"].contains(&frame["type"].as_str().unwrap_or("")),
                "{}: expected a group notice, got {frame}",
                self.user
            );
        }
    }

    /// The next frame of one of `kinds`, skipping presence, typing and receipt frames and
    /// group notices.
    pub(crate) async fn recv_type_of(&mut self, kinds: &[&str]) -> Value {
        loop {
            let frame = self.recv().await;
            let kind = frame["type"].as_str().unwrap_or("");
            if kinds.contains(&kind) && !(kind == "group" && frame.get("notice_id").is_some()) {
                return frame;
            }
            assert!(
                is_incidental(&frame),
                "{}: expected {kinds:?}, got {frame}",
                self.user
            );
        }
    }

    /// Sends a message and returns the `sent` answer.
    pub(crate) async fn send_message(
        &mut self,
        to: &str,
        body: &str,
        client_msg_id: &str,
    ) -> Value {
        self.send(json!({"type":"send","client_msg_id":client_msg_id,"to":to,"body":body}))
            .await;
        let sent = self.recv_type("sent").await;
        assert_eq!(sent["client_msg_id"], client_msg_id, "{sent}");
        sent
    }

    pub(crate) async fn send_to_group(
        &mut self,
        conversation: &str,
        body: &str,
        client_msg_id: &str,
    ) -> Value {
        self.send(json!({"type":"send","client_msg_id":client_msg_id,"conversation":conversation,"body":body}))
            .await;
        self.recv_type("sent").await
    }

    /// Round-trips a ping: every frame the server queued before the pong is read first
    /// and returned.
    pub(crate) async fn barrier(&mut self) -> Vec<Value> {
        let reference = format!("barrier-{}", uuid::Uuid::now_v7());
        self.send(json!({"type":"ping","ref":reference})).await;
        let mut before = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "pong" && frame["ref"] == reference.as_str() {
                return before;
            }
            before.push(frame);
        }
    }

    pub(crate) async fn error(&mut self) -> Value {
        self.recv_type("error").await
    }

    /// The next `error`, checked to have `code` and to carry the refused frame's `ref`.
    pub(crate) async fn refusal(&mut self, code: &str, reference: Value) -> Value {
        let error = self.error().await;
        assert_eq!(
            (error["code"].as_str(), &error["ref"]),
            (Some(code), &reference),
            "{}: {error}",
            self.user
        );
        error
    }

    /// Waits for the server to end the connection.
    pub(crate) async fn ended(&mut self) -> Ended {
        loop {
            let next = timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: still open after {WAIT:?}", self.user));
            match next {
                None => return Ended::Dropped("end of stream".into()),
                Some(Err(e)) => return Ended::Dropped(e.to_string()),
                Some(Ok(Message::Close(frame))) => return Ended::Closed(frame),
                Some(Ok(_)) => continue,
            }
        }
    }

    pub(crate) async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's close arrives so that the disconnect is processed.
        let _ = timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Frames a test that waits for something else may pass over: presence, typing, receipts
/// and group notices.
pub(crate) fn is_incidental(frame: &Value) -> bool {
    ["presence", "typing", "receipt"].contains(&frame["type"].as_str().unwrap_or(""))
        || (frame["type"] == "group" && frame.get("notice_id").is_some())
}
