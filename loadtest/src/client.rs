//! A small typed client of the chat protocol (version 1), usable on its own as a Rust
//! client library. It speaks only the client protocol: any gateway, or the relay.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Why a client could not connect or talk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad gateway URL {0:?}: expected ws://host:port[/ws]")]
    Url(String),
    #[error("cannot connect to {addr} from {source_ip:?}: {error}")]
    Connect {
        addr: SocketAddr,
        source_ip: Option<IpAddr>,
        error: std::io::Error,
    },
    /// `status`: the HTTP status the server answered the upgrade with, if it answered one.
    #[error("WebSocket handshake with {url} failed: {error}")]
    Handshake {
        url: String,
        error: String,
        status: Option<u16>,
    },
    #[error("getting a dev token from {url}: {error}")]
    Token { url: String, error: String },
    #[error("connection closed")]
    Closed,
    #[error("WebSocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        client_msg_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        conversation: Option<String>,
        body: String,
        /// Uploaded files (`{"media_id": …}`) the message carries.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<Value>,
    },
    /// Confirms messages (stored on this device), receipts (shown) and notices (taken:
    /// to-device messages, `keys_low`).
    Ack {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        message_ids: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        receipt_ids: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        notice_ids: Vec<String>,
    },
    Read {
        conversation: String,
        message_id: String,
    },
    Typing {
        conversation: String,
    },
    History {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    SubscribePresence {
        users: Vec<String>,
    },
    CreateGroup {
        #[serde(rename = "ref")]
        reference: Value,
        name: String,
        members: Vec<String>,
    },
    AddMembers {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        members: Vec<String>,
    },
    RemoveMembers {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        members: Vec<String>,
    },
    Ping {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
    },
}

impl ClientFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A message as the server sends it (live, pending, or in a history page).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct MessageFrame {
    pub message_id: String,
    pub conversation: String,
    pub from: String,
    /// Empty for an end-to-end encrypted message, which has `e2ee` instead.
    #[serde(default)]
    pub body: String,
    pub ts: i64,
    /// This device's ciphertext of an end-to-end encrypted message (see [`crate::e2ee`]).
    #[serde(default)]
    pub e2ee: Option<Value>,
    #[serde(default)]
    pub attachments: Vec<AttachmentFrame>,
}

/// A file a message carries (the parts the load generator checks).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AttachmentFrame {
    pub media_id: String,
    pub size: u64,
    pub sha256: String,
}

/// Frames the server sends. Unknown types parse as `Other`, so newer servers work.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: String,
        device: String,
        node: String,
        heartbeat_s: u64,
    },
    Sent {
        client_msg_id: String,
        message_id: String,
        conversation: String,
        ts: i64,
    },
    Message(MessageFrame),
    Receipt {
        receipt_id: String,
        message_id: String,
        conversation: String,
        by: String,
        status: String,
        ts: i64,
    },
    Presence {
        user: String,
        status: String,
        last_seen: Option<i64>,
    },
    Typing {
        conversation: String,
        user: String,
    },
    History {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        messages: Vec<MessageFrame>,
        more: bool,
    },
    Group {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        conversation: String,
        name: String,
        members: Vec<String>,
    },
    Pong {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
    Error {
        code: String,
        message: String,
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    Keys {
        #[serde(rename = "ref")]
        reference: Value,
        one_time_keys: u64,
    },
    KeysClaimed {
        #[serde(rename = "ref")]
        reference: Value,
        keys: Vec<Value>,
    },
    ToDeviceSent {
        #[serde(rename = "ref")]
        reference: Value,
    },
    ToDevice {
        notice_id: String,
        from: String,
        e2ee: Value,
    },
    KeysLow {
        notice_id: String,
        one_time_keys: u64,
    },
    MediaUpload {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        url: String,
        headers: std::collections::BTreeMap<String, String>,
    },
    MediaComplete {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
    },
    MediaUrl {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        url: String,
    },
    #[serde(other)]
    Other,
}

impl ServerFrame {
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Unexpected(format!("{e}: {text:.200}")))
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws://host:port` or `ws://host:port/ws`.
    pub url: String,
    pub token: String,
    pub user: String,
    pub device: String,
    /// Source address to connect from (127.0.0.x spreads ports over many sources).
    pub source_ip: Option<IpAddr>,
}

pub type Stream = WebSocketStream<TcpStream>;

/// The writing half of a connection.
pub struct Writer {
    sink: SplitSink<Stream, Message>,
}

/// The reading half of a connection.
pub struct Reader {
    stream: SplitStream<Stream>,
}

/// Splits `ws://host:port[/path]` into the socket address and the path (default `/ws`).
pub fn parse_url(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| Error::Url(url.into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/ws".to_owned()),
    };
    let addr = host.parse().map_err(|_| Error::Url(url.into()))?;
    Ok((addr, path))
}

/// Opens a TCP connection from `source_ip` without reserving a port at bind time
/// (`IP_BIND_ADDRESS_NO_PORT`), so one source address serves many destinations.
async fn tcp_connect(addr: SocketAddr, source_ip: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source_ip {
        if ip.is_ipv4() {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(std::io::Error::from)?;
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects and reads the `welcome` frame.
pub async fn connect(target: &Target) -> Result<(Writer, Reader, ServerFrame)> {
    let (addr, path) = parse_url(&target.url)?;
    let tcp = tcp_connect(addr, target.source_ip)
        .await
        .map_err(|error| Error::Connect {
            addr,
            source_ip: target.source_ip,
            error,
        })?;
    let url = format!(
        "ws://{addr}{path}?device={}&user={}",
        target.device, target.user
    );
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::Handshake {
            url: url.clone(),
            error: e.to_string(),
            status: None,
        })?;
    let bearer = format!("Bearer {}", target.token)
        .parse()
        .map_err(|_| Error::Handshake {
            url: url.clone(),
            error: "token is not a valid header value".into(),
            status: None,
        })?;
    request.headers_mut().insert("authorization", bearer);
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .map_err(|e| Error::Handshake {
            url,
            status: match &e {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    Some(response.status().as_u16())
                }
                _ => None,
            },
            error: e.to_string(),
        })?;
    let (sink, stream) = ws.split();
    let mut reader = Reader { stream };
    let welcome = reader.next().await?.ok_or(Error::Closed)?;
    if !matches!(welcome, ServerFrame::Welcome { .. }) {
        return Err(Error::Unexpected(format!(
            "first frame was {welcome:?}, not welcome"
        )));
    }
    Ok((Writer { sink }, reader, welcome))
}

impl Writer {
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.send_text(frame.to_json()).await
    }

    /// Sends already-serialized frames with one flush.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }

    pub async fn feed_text(&mut self, text: String) -> Result<()> {
        self.sink.feed(Message::text(text)).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await?;
        Ok(())
    }

    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.sink.close()).await;
    }
}

impl Reader {
    /// The next frame; `None` once the connection is closed.
    pub async fn next(&mut self) -> Result<Option<ServerFrame>> {
        loop {
            match self.stream.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => return ServerFrame::parse(&text).map(Some),
                Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// How the load generator gets tokens.
#[derive(Clone, Debug)]
pub enum Tokens {
    /// Minted locally with the operator's HS256 secret.
    Secret(String),
    /// Fetched from a dev-mode gateway's `POST /dev/token`.
    Dev,
}

impl Tokens {
    /// A token for `user`; `url` is the gateway the user connects to.
    pub async fn token(&self, url: &str, user: &str) -> Result<String> {
        match self {
            Tokens::Secret(secret) => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
                    + 24 * 3600;
                let claims = serde_json::json!({ "sub": user, "exp": exp });
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                )
                .map_err(|e| Error::Token {
                    url: url.into(),
                    error: e.to_string(),
                })
            }
            Tokens::Dev => {
                let (addr, _) = parse_url(url)?;
                let endpoint = format!("http://{addr}/dev/token");
                let fail = |error: String| Error::Token {
                    url: endpoint.clone(),
                    error,
                };
                // reqwest's own message ("error sending request") names no cause: the
                // chain below it says whether the port was closed or the name unknown.
                let response = reqwest::Client::new()
                    .post(&endpoint)
                    .body(serde_json::json!({ "user": user }).to_string())
                    .send()
                    .await
                    .map_err(|e| {
                        fail(format!(
                            "{:#} (is a gateway in dev mode listening there? Otherwise pass \
                             --jwt-secret)",
                            anyhow::Error::new(e)
                        ))
                    })?;
                if !response.status().is_success() {
                    return Err(fail(format!("HTTP {}", response.status())));
                }
                let body: Value = response.json().await.map_err(|e| fail(e.to_string()))?;
                body["token"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| fail("no token in the answer".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_that_cannot_be_fetched_says_why() {
        // A port that was just free: nothing listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let error = Tokens::Dev
            .token(&url, "alice")
            .await
            .expect_err("nothing listens");
        let message = error.to_string().to_lowercase();
        assert!(message.contains("refused"), "{message}");
        assert!(message.contains("--jwt-secret"), "{message}");
    }

    #[test]
    fn urls_parse() {
        let (addr, path) = parse_url("ws://127.0.0.1:8080").expect("url");
        assert_eq!((addr.port(), path.as_str()), (8080, "/ws"));
        assert_eq!(parse_url("ws://127.0.0.1:1/x").expect("url").1, "/x");
        assert!(parse_url("http://127.0.0.1:1").is_err());
        assert!(
            parse_url("ws://localhost:1").is_err(),
            "an address, not a name"
        );
    }

    #[test]
    fn frames_round_trip_the_contract() {
        let send = ClientFrame::Send {
            client_msg_id: "c".into(),
            to: Some("bob".into()),
            conversation: None,
            body: "b".into(),
            attachments: Vec::new(),
        };
        assert_eq!(
            send.to_json(),
            r#"{"type":"send","client_msg_id":"c","to":"bob","body":"b"}"#
        );
        let frame = ServerFrame::parse(r#"{"type":"message","message_id":"m","conversation":"dm:a:b","from":"a","body":"x","ts":1}"#)
            .expect("parse");
        assert!(
            matches!(frame, ServerFrame::Message(MessageFrame { ref from, .. }) if from == "a")
        );
        assert_eq!(
            ServerFrame::parse(r#"{"type":"future_thing","x":1}"#).expect("parse"),
            ServerFrame::Other
        );
    }
}
