//! A test gateway on loopback and a small WebSocket client that speaks the protocol.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::auth::Auth;
use gateway::{Config, Running};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";
/// Upper bound on waiting for any one expected event.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct TestGateway {
    pub running: Option<Running>,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    auth: Auth,
}

/// Starts a gateway on a fresh data dir; `tune` adjusts the configuration first.
pub async fn start(tune: impl FnOnce(&mut Config)) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(dir, tune).await
}

/// Starts a gateway on an existing data dir.
pub async fn start_in(dir: tempfile::TempDir, tune: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().to_path_buf();
    config.jwt_secret = Some(SECRET.into());
    config.node_id = Some("test-node".into());
    config.drain_secs = 1;
    tune(&mut config);
    let running = gateway::start(config).await.expect("gateway starts");
    TestGateway {
        client_addr: running.client_addr,
        admin_addr: running.admin_addr,
        running: Some(running),
        dir,
        auth: Auth::new(SECRET.as_bytes()),
    }
}

impl TestGateway {
    pub fn token(&self, user: &str) -> String {
        self.auth.mint(user, Duration::from_secs(3600))
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.client_addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.client_addr)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    pub async fn connect(&self, user: &str) -> Client {
        self.connect_device(user, "default").await
    }

    pub async fn connect_device(&self, user: &str, device: &str) -> Client {
        let url = self.ws_url(&format!("?device={device}"));
        connect_url(&url, &self.token(user), user).await
    }

    /// Drains and stops the gateway, returning its data dir for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await;
        }
        self.dir
    }

    /// Waits until a metric reaches `at_least` (metrics are updated after the frames
    /// that cause them are sent, so a test awaits them like any other event).
    pub async fn metric_reaches(&self, name: &str, at_least: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.metric(name).await;
            if value >= at_least || tokio::time::Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.admin("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Connects to a gateway's WebSocket URL with a bearer token and reads the `welcome`.
pub async fn connect_url(url: &str, token: &str, user: &str) -> Client {
    let mut request = url.into_client_request().expect("request");
    let bearer = format!("Bearer {token}").parse().expect("header");
    request.headers_mut().insert("authorization", bearer);
    let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut client = Client {
        ws,
        user: user.into(),
        welcome: Value::Null,
    };
    client.welcome = client.recv().await;
    assert_eq!(
        client.welcome["type"], "welcome",
        "first frame: {}",
        client.welcome
    );
    client
}

/// The HTTP status a WebSocket handshake was refused with.
pub async fn refused_status(request: impl IntoClientRequest + Unpin) -> u16 {
    match timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("in time")
    {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    pub welcome: Value,
}

/// How a connection ended, as the client saw it.
#[derive(Debug)]
pub enum Ended {
    Closed(Option<CloseFrame>),
    Dropped(String),
}

impl Ended {
    pub fn code(&self) -> Option<u16> {
        match self {
            Ended::Closed(Some(frame)) => Some(frame.code.into()),
            _ => None,
        }
    }
}

impl Client {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame, as JSON.
    pub async fn recv(&mut self) -> Value {
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

    /// The next frame of type `kind`, skipping presence, typing and receipt frames only
    /// (tests that care about those assert them with `barrier`).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
            let incidental =
                ["presence", "typing", "receipt"].contains(&frame["type"].as_str().unwrap_or(""));
            assert!(incidental, "{}: expected {kind}, got {frame}", self.user);
        }
    }

    /// Sends a message and returns the `sent` answer.
    pub async fn send_message(&mut self, to: &str, body: &str, client_msg_id: &str) -> Value {
        self.send(json!({"type":"send","client_msg_id":client_msg_id,"to":to,"body":body}))
            .await;
        let sent = self.recv_type("sent").await;
        assert_eq!(sent["client_msg_id"], client_msg_id, "{sent}");
        sent
    }

    pub async fn send_to_group(
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
    pub async fn barrier(&mut self) -> Vec<Value> {
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

    pub async fn error(&mut self) -> Value {
        self.recv_type("error").await
    }

    /// Waits for the server to end the connection.
    pub async fn ended(&mut self) -> Ended {
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

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's close arrives so that the disconnect is processed.
        let _ = timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
