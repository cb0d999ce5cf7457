//! The gateway's configuration: one clap struct, every flag also an environment variable,
//! defaults that run the embedded system on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use dispatcher::startup::logging::LogFormat;

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

    /// Connections waiting to be accepted on the client port, at most (the kernel caps it
    /// at `net.core.somaxconn`): room for a reconnect storm.
    #[arg(long, env = "GATEWAY_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Operator port: /healthz, /readyz, /metrics, /admin/keys (keep it off public networks).
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

    /// The at-rest key ring.
    #[command(flatten)]
    pub keys: dispatcher::startup::KeyArgs,

    /// Seconds between server pings; no pong within two intervals closes the connection.
    #[arg(long, env = "GATEWAY_HEARTBEAT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,

    /// Seconds a device stays online without a heartbeat from its node.
    #[arg(long, env = "PRESENCE_TTL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
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

    /// To-device messages a user may send per second on this gateway (each is stored for
    /// its device until confirmed), averaged; the burst is `--to-device-burst`.
    #[arg(long, env = "GATEWAY_TO_DEVICE_PER_SEC", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub to_device_per_sec: u32,

    /// Most to-device messages a user may send at once (group keys shared with every
    /// member device of a few large groups).
    #[arg(long, env = "GATEWAY_TO_DEVICE_BURST", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub to_device_burst: u32,

    /// Group notices a user may cause per second on this gateway (creating a group or
    /// changing its members tells every member, each kept until confirmed), averaged;
    /// the burst is `--group-notices-burst`.
    #[arg(long, env = "GATEWAY_GROUP_NOTICES_PER_SEC", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub group_notices_per_sec: u32,

    /// Most group notices a user may cause at once (a few groups of the largest size).
    #[arg(long, env = "GATEWAY_GROUP_NOTICES_BURST", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub group_notices_burst: u32,

    /// Largest WebSocket frame or message accepted; larger closes with 1009.
    #[arg(long, env = "GATEWAY_MAX_FRAME_BYTES", default_value_t = 128 * 1024)]
    pub max_frame_bytes: usize,

    /// Most WebSocket frames one message may arrive in (control frames aside); more
    /// closes with 1009.
    #[arg(long, env = "GATEWAY_MAX_FRAGMENTS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_fragments: u32,

    /// Largest message `body`, in bytes of UTF-8; larger gets `too_large`.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Frames queued for one connection. From half full, messages and receipts wait for a
    /// catch-up from the store; an answer that does not fit closes it with 1008 (too slow).
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..))]
    pub outbound_queue: u64,

    /// Seconds a new connection may take to send its HTTP upgrade request.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// An identity provider's JSON Web Key Set: tokens it signs (RS256, ES256, EdDSA …,
    /// the key named by `kid`) are accepted beside `--jwt-secret`'s HS256 ones.
    #[arg(long, env = "GATEWAY_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Seconds between fetches of `--jwks-url` (an unknown `kid` also fetches, at most
    /// every 5 s).
    #[arg(long, env = "GATEWAY_JWKS_REFRESH_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub jwks_refresh_secs: u64,

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

    /// PEM certificate chain for TLS on the client port (`wss://`); with `--tls-key`.
    /// Read again on SIGHUP and when the file changes.
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve the admin port over TLS too, with the same certificate.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_TLS",
        default_value_t = false,
        requires = "tls_cert"
    )]
    pub admin_tls: bool,

    /// Seconds between checks of the TLS files for a change (0: reload on SIGHUP only).
    #[arg(long, env = "GATEWAY_TLS_RELOAD_SECS", default_value_t = 10)]
    pub tls_reload_secs: u64,

    /// Seconds over which a draining gateway closes its connections (code 1012).
    #[arg(long, env = "GATEWAY_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,

    /// Milliseconds any one backend call may take before the request gets `unavailable`.
    #[arg(long, env = "GATEWAY_BACKEND_TIMEOUT_MS", default_value_t = 5000)]
    pub backend_timeout_ms: u64,

    /// The embedded store's block cache, in MiB.
    #[arg(long, env = "GATEWAY_STORE_CACHE_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub store_cache_mib: u64,

    /// The embedded store's memtable per busy keyspace, in MiB: the store holds at most
    /// about the cache plus 4.9 times this in memory (smaller: more frequent flushes).
    #[arg(long, env = "GATEWAY_STORE_MEMTABLE_MIB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub store_memtable_mib: u64,

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
    pub backends: dispatcher::startup::BackendArgs,

    #[command(flatten)]
    pub media: MediaArgs,
}

/// Attachments: where their bytes go and what is allowed.
#[derive(Clone, Debug, clap::Args)]
pub struct MediaArgs {
    /// S3-compatible bucket for media (distributed mode). Without it a cluster refuses
    /// media requests with `unavailable`; the embedded mode keeps media under the data dir.
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Endpoint of a non-AWS S3-compatible store, e.g. `http://127.0.0.1:8333`.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Azure Blob Storage container for media instead of S3 (account and credentials from
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …).
    #[arg(long, env = "AZURE_CONTAINER")]
    pub azure_container: Option<String>,

    /// Google Cloud Storage bucket for media instead of S3 (credentials from
    /// `GOOGLE_SERVICE_ACCOUNT`, …).
    #[arg(long, env = "GCS_BUCKET")]
    pub gcs_bucket: Option<String>,

    /// Where clients reach the store, when not at `--s3-endpoint` (e.g. behind a proxy,
    /// or a container network's name): upload and download URLs are signed for it.
    #[arg(long, env = "S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,

    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,

    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "")]
    pub s3_access_key_id: String,

    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub s3_secret_access_key: String,

    /// Base URL clients reach this gateway's HTTP port at, for the embedded mode's upload
    /// and download URLs. Default: `http://<the bound --listen address>`.
    #[arg(long, env = "GATEWAY_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Largest upload, in bytes.
    #[arg(long, env = "GATEWAY_MEDIA_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub media_max_bytes: u64,

    /// Content types that may be uploaded (comma separated; `type/*` matches a family).
    #[arg(
        long,
        env = "GATEWAY_MEDIA_TYPES",
        value_delimiter = ',',
        default_value = "image/*,video/*,audio/*,text/plain,application/pdf,application/zip,application/octet-stream"
    )]
    pub media_types: Vec<String>,

    /// Bytes each user may upload per UTC day.
    #[arg(long, env = "GATEWAY_MEDIA_QUOTA_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub media_quota_bytes: u64,

    /// Seconds an upload or download URL stays valid.
    #[arg(long, env = "GATEWAY_MEDIA_URL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub media_url_secs: u64,

    /// Seconds after which an upload no message references is deleted.
    #[arg(long, env = "GATEWAY_MEDIA_EXPIRE_SECS", default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub media_expire_secs: u64,
}

impl MediaArgs {
    /// Whether `content_type` (lowercase `type/subtype`, parameters ignored) may be uploaded.
    pub fn allows(&self, content_type: &str) -> bool {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let Some((family, _)) = essence.split_once('/') else {
            return false;
        };
        self.media_types.iter().map(|t| t.trim()).any(|allowed| {
            allowed.eq_ignore_ascii_case(essence)
                || allowed
                    .strip_suffix("/*")
                    .is_some_and(|f| f.eq_ignore_ascii_case(family))
        })
    }

    pub fn url_lifetime(&self) -> Duration {
        Duration::from_secs(self.media_url_secs)
    }

    pub fn expire_after(&self) -> Duration {
        Duration::from_secs(self.media_expire_secs)
    }

    /// The S3 bucket, when one is configured.
    pub fn s3(&self) -> Option<storage::blob::S3Config> {
        Some(storage::blob::S3Config {
            bucket: self.s3_bucket.clone().filter(|b| !b.is_empty())?,
            endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            public_endpoint: self.s3_public_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
        })
    }
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
        if distributed {
            self.backends.security()?;
            self.keys.required()?;
        }
        if !self.dev_mode()
            && self.jwt_secret.as_deref().is_none_or(str::is_empty)
            && self.jwks_url.is_none()
        {
            return Err(
                "--jwt-secret (GATEWAY_JWT_SECRET) or --jwks-url is required outside dev mode"
                    .into(),
            );
        }
        if self.max_body_bytes >= self.max_frame_bytes {
            return Err(format!(
                "--max-body-bytes ({}) must be smaller than --max-frame-bytes ({})",
                self.max_body_bytes, self.max_frame_bytes
            ));
        }
        let stores = [
            self.media.s3_bucket.as_deref(),
            self.media.azure_container.as_deref(),
            self.media.gcs_bucket.as_deref(),
        ];
        if stores.iter().flatten().filter(|s| !s.is_empty()).count() > 1 {
            return Err(
                "give one media store: --s3-bucket, --azure-container or --gcs-bucket".into(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_media_store_at_most() {
        let mut config = Config::defaults();
        assert_eq!(config.validate(), Ok(()));
        config.media.s3_bucket = Some("media".into());
        assert_eq!(config.validate(), Ok(()));
        config.media.gcs_bucket = Some("media".into());
        let refused = config.validate().expect_err("two stores");
        assert!(refused.contains("one media store"), "{refused}");
    }

    #[test]
    fn media_types_match_exactly_or_by_family() {
        let config = Config::parse_from(["gateway", "--media-types", "image/*,application/pdf"]);
        let media = &config.media;
        assert!(media.allows("image/png"));
        assert!(media.allows("IMAGE/JPEG; charset=binary"));
        assert!(media.allows("application/pdf"));
        assert!(!media.allows("application/pdfx"));
        assert!(!media.allows("video/mp4"));
        assert!(!media.allows("image"));
    }
}
