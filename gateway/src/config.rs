//! The gateway's configuration: one clap struct, every flag also an environment variable,
//! defaults that run the embedded system on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use dispatcher::logging::LogFormat;

/// With no backend configured the gateway runs the whole system in one process: the
/// dispatcher on an in-process partitioned log, the embedded store in `--data-dir`, and
/// in-memory presence; dev mode is then on unless `--dev false`. With `--kafka-brokers`,
/// `--scylla-nodes` and `--redis-url` it is one gateway of a distributed cluster (run
/// `dispatcher` processes beside it); dev mode is then off unless `--dev true`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "WebSocket chat gateway (embedded mode when no backend is configured)"
)]
pub struct Config {
    /// Client port: WebSocket at /ws, plus the dev endpoints in dev mode.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Operator port: /healthz, /readyz, /metrics.
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Where the embedded store keeps its data.
    #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// HS256 secret that client tokens are signed with. Required outside dev mode; in dev
    /// mode one is generated into the data dir when not given.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Dev mode: POST /dev/token and the demo page at /. Default: on in embedded mode.
    #[arg(long, env = "GATEWAY_DEV")]
    pub dev: Option<bool>,

    /// This node's name in `welcome` and in presence. Default: `gw-<random>`.
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Key ring file for at-rest encryption: lines of `<id>:<64 hex chars>`, last is primary.
    #[arg(long, env = "STORAGE_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,

    /// The key ring inline (comma or newline separated), instead of a file.
    #[arg(
        long,
        env = "STORAGE_KEYS",
        hide_env_values = true,
        conflicts_with = "keys_file"
    )]
    pub keys: Option<String>,

    /// Seconds between server pings; no pong within two intervals closes the connection.
    #[arg(long, env = "GATEWAY_HEARTBEAT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,

    /// Seconds a device stays online without a heartbeat from its node.
    #[arg(long, env = "GATEWAY_PRESENCE_TTL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub presence_ttl_secs: u64,

    /// Messages per second a user may send (per gateway node).
    #[arg(long, env = "GATEWAY_RATE_PER_SEC", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_per_sec: u32,

    /// Messages a user may send in a burst.
    #[arg(long, env = "GATEWAY_RATE_BURST", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,

    /// Frames other than `send` per second per connection (burst: twice this).
    #[arg(long, env = "GATEWAY_FRAME_RATE_PER_SEC", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub frame_rate_per_sec: u32,

    /// One-time keys a user may claim per second on this gateway (`keys_claim`, one per
    /// device named), averaged; the burst is `--key-claim-burst`.
    #[arg(long, env = "GATEWAY_KEY_CLAIMS_PER_SEC", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub key_claims_per_sec: u32,

    /// Most one-time keys a user may claim at once (a new group of many devices).
    #[arg(long, env = "GATEWAY_KEY_CLAIM_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub key_claim_burst: u32,

    /// Largest WebSocket frame or message accepted; larger closes with 1009.
    #[arg(long, env = "GATEWAY_MAX_FRAME_BYTES", default_value_t = 128 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest message `body`, in bytes of UTF-8; larger gets `too_large`.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Frames queued for one connection before it counts as too slow (closed with 1008).
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..))]
    pub outbound_queue: u64,

    /// Seconds a new connection may take to send its HTTP upgrade request.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// When set, client tokens must carry this audience (`aud`).
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, client tokens must carry this issuer (`iss`).
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Most connections one user may hold on this gateway; more are refused with 429.
    #[arg(long, env = "GATEWAY_MAX_CONNS_PER_USER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns_per_user: u32,

    /// Browser origins allowed to open WebSockets (comma separated). Empty: any origin.
    /// Requests without an Origin header (non-browser clients) are always allowed.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Seconds over which a draining gateway closes its connections (code 1012).
    #[arg(long, env = "GATEWAY_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,

    /// Milliseconds any one backend call may take before the request gets `unavailable`.
    #[arg(long, env = "GATEWAY_BACKEND_TIMEOUT_MS", default_value_t = 5000)]
    pub backend_timeout_ms: u64,

    /// Partitions of the in-process inbound log (embedded mode).
    #[arg(long, env = "GATEWAY_PARTITIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,

    /// WebSocket read buffer per connection, in bytes. It is reserved for every
    /// connection (tungstenite's default of 128 KiB costs ~136 KiB per idle connection);
    /// larger frames are still read whole, in more reads.
    #[arg(long, env = "GATEWAY_WS_READ_BUFFER", default_value_t = 512)]
    pub ws_read_buffer: usize,

    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub backends: dispatcher::backends::BackendArgs,
}

impl Config {
    /// The defaults, as if the binary ran with no flags and no environment.
    pub fn defaults() -> Self {
        Config::parse_from(["gateway"])
    }

    /// Dev mode: on by default in embedded mode, off by default when distributed.
    pub fn dev_mode(&self) -> bool {
        self.dev.unwrap_or(!self.is_distributed())
    }

    /// Whether the distributed backends are configured (`validate` refuses half of them).
    pub fn is_distributed(&self) -> bool {
        self.backends.distributed().unwrap_or(false)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    pub fn presence_ttl(&self) -> Duration {
        Duration::from_secs(self.presence_ttl_secs)
    }

    pub fn backend_timeout(&self) -> Duration {
        Duration::from_millis(self.backend_timeout_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// Checks what clap cannot: combinations and bounds between flags.
    pub fn validate(&self) -> Result<(), String> {
        let distributed = self.backends.distributed()?;
        if distributed && self.keys.is_none() && self.keys_file.is_none() {
            return Err(
                "distributed mode needs the at-rest key ring shared by every process: \
                 set STORAGE_KEYS or STORAGE_KEYS_FILE"
                    .into(),
            );
        }
        if !self.dev_mode() && self.jwt_secret.as_deref().is_none_or(str::is_empty) {
            return Err("--jwt-secret (GATEWAY_JWT_SECRET) is required outside dev mode".into());
        }
        if self.max_body_bytes >= self.max_frame_bytes {
            return Err(format!(
                "--max-body-bytes ({}) must be smaller than --max-frame-bytes ({})",
                self.max_body_bytes, self.max_frame_bytes
            ));
        }
        if let Some(node) = &self.node_id {
            if !storage::is_valid_id(node) {
                return Err(format!(
                    "--node-id {node:?}: use 1-64 characters of A-Z a-z 0-9 _ . @ -"
                ));
            }
        }
        Ok(())
    }
}
