//! Choosing and connecting the backends: the flags both binaries share, and the
//! [`Backends`] they give.
//!
//! Given `--kafka-brokers`, `--scylla-nodes` and `--redis-url` (all three), a process runs
//! distributed; given none, the gateway runs the embedded system. Anything in between is
//! refused with the names of what is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use presence::{MemoryPresence, Presence, PresenceService, RedisConfig, RedisPresence};
use storage::crypto::Keyring;
use storage::tls::{client_config, secret, Credentials};
use storage::{EmbeddedConfig, EmbeddedStore, MessageStore, ScyllaConfig, ScyllaStore, Store};

use crate::log::{
    InboundLog, KafkaCompression as Compression, KafkaConfig, KafkaLog, KafkaSettings, Log,
    MemoryLog,
};

/// The three backends a process runs on: all distributed ([`BackendArgs::connect`]) or
/// all embedded ([`Backends::embedded`]).
#[derive(Clone, Debug)]
pub struct Backends {
    pub store: Store,
    pub presence: Presence,
    pub log: Log,
}

impl Backends {
    /// The embedded system's backends: the store in its data directory, presence in memory,
    /// and an in-process log of `partitions` partitions.
    pub async fn embedded(
        store: EmbeddedConfig,
        presence_ttl: Duration,
        partitions: u32,
    ) -> crate::Result<Backends> {
        Ok(Backends {
            store: Store::Embedded(EmbeddedStore::open(store).await?),
            presence: Presence::Memory(MemoryPresence::new(presence_ttl)),
            log: Log::Memory(MemoryLog::new(partitions, 1024)),
        })
    }

    /// The readiness checks (`/readyz`): each backend by name (`store:scylla`, …) with
    /// `Ok` or why it did not answer within `timeout`. The three are asked at once.
    pub async fn readiness(&self, timeout: Duration) -> Vec<(String, Result<(), String>)> {
        async fn check<E: std::fmt::Display>(
            timeout: Duration,
            call: impl std::future::Future<Output = Result<(), E>>,
        ) -> Result<(), String> {
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            }
        }
        let (store, presence, log) = tokio::join!(
            check(timeout, self.store.ping()),
            check(timeout, self.presence.ping()),
            check(timeout, self.log.ping()),
        );
        vec![
            (format!("store:{}", self.store.backend()), store),
            (format!("presence:{}", self.presence.backend()), presence),
            (format!("log:{}", self.log.backend()), log),
        ]
    }
}

/// How a client talks to the Kafka brokers (librdkafka's `security.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KafkaSecurity {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

/// The SASL mechanism for `sasl-plaintext` and `sasl-ssl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    Plain,
    #[value(name = "scram-sha-256")]
    ScramSha256,
    #[value(name = "scram-sha-512")]
    ScramSha512,
}

/// CQL consistency for reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsistencyArg {
    One,
    LocalOne,
    Quorum,
    LocalQuorum,
    EachQuorum,
    All,
}

impl From<ConsistencyArg> for storage::Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::One => storage::Consistency::One,
            ConsistencyArg::LocalOne => storage::Consistency::LocalOne,
            ConsistencyArg::Quorum => storage::Consistency::Quorum,
            ConsistencyArg::LocalQuorum => storage::Consistency::LocalQuorum,
            ConsistencyArg::EachQuorum => storage::Consistency::EachQuorum,
            ConsistencyArg::All => storage::Consistency::All,
        }
    }
}

/// The distributed backends. Every flag is also an environment variable.
#[derive(Clone, Debug, Args)]
pub struct BackendArgs {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Prefix of the topic names (`<prefix>messages`, `<prefix>push`).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "chat.")]
    pub kafka_topic_prefix: String,

    /// Partitions of the topics when this process creates them; dispatchers scale up to
    /// this many.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = KafkaConfig::DEFAULT_PARTITIONS, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub kafka_partitions: u32,

    /// Replication factor of topics created here. Default: 3, or the broker count when
    /// the cluster has fewer brokers.
    #[arg(long, env = "KAFKA_REPLICATION", value_parser = clap::value_parser!(i32).range(1..=16))]
    pub kafka_replication: Option<i32>,

    /// The dispatchers' consumer group.
    #[arg(long, env = "KAFKA_GROUP", default_value = "chat-dispatchers")]
    pub kafka_group: String,

    /// Milliseconds a producer waits for more records to send in the same request
    /// (`linger.ms`): fewer requests for the broker, that much more latency. librdkafka
    /// sends one request per partition, so a linger only gathers records of the same
    /// partition: worth raising where each partition gets hundreds of records a second.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub kafka_linger_ms: u64,

    /// Milliseconds a dispatcher's fetch waits at the broker for records to gather
    /// (`fetch.wait.max.ms`): fewer requests for the broker, up to that much more latency.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub kafka_fetch_wait_ms: u64,

    /// How producers compress the records of a request (`compression.type`). None by
    /// default: a request mostly carries one record of a few hundred bytes, which lz4
    /// does not shrink and the broker would decompress to validate.
    #[arg(long, env = "KAFKA_COMPRESSION", value_enum, default_value_t = Compression::None)]
    pub kafka_compression: Compression,

    /// How to talk to the brokers: TLS (`ssl`, `sasl-ssl`) and SASL credentials
    /// (`sasl-plaintext`, `sasl-ssl`).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", value_enum, default_value_t = KafkaSecurity::Plaintext)]
    pub kafka_security_protocol: KafkaSecurity,

    /// The SASL mechanism, with `--kafka-username` and a password.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_enum, default_value_t = SaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: SaslMechanism,

    /// SASL username.
    #[arg(long, env = "KAFKA_USERNAME")]
    pub kafka_username: Option<String>,

    /// SASL password (or `--kafka-password-file`).
    #[arg(long, env = "KAFKA_PASSWORD", hide_env_values = true)]
    pub kafka_password: Option<String>,

    /// A file holding the SASL password (a mounted secret).
    #[arg(long, env = "KAFKA_PASSWORD_FILE")]
    pub kafka_password_file: Option<PathBuf>,

    /// PEM CA certificates to trust the brokers by (TLS); default: the system's.
    #[arg(long, env = "KAFKA_CA_FILE")]
    pub kafka_ca_file: Option<PathBuf>,

    /// ScyllaDB (or Cassandra) contact points, `host:port[,host:port…]`.
    #[arg(long, env = "SCYLLA_NODES", value_delimiter = ',')]
    pub scylla_nodes: Vec<String>,

    /// Keyspace, created with its tables (versioned migrations) when missing.
    #[arg(long, env = "SCYLLA_KEYSPACE", default_value = "chat")]
    pub scylla_keyspace: String,

    /// Replication factor of a keyspace created here. Default: 3, or the node count when
    /// the cluster has fewer nodes.
    #[arg(long, env = "SCYLLA_REPLICATION", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub scylla_replication: Option<u32>,

    /// Consistency of reads and writes (LWTs use LOCAL_SERIAL).
    #[arg(long, env = "SCYLLA_CONSISTENCY", value_enum, default_value_t = ConsistencyArg::LocalQuorum)]
    pub scylla_consistency: ConsistencyArg,

    /// Username for the nodes' PasswordAuthenticator.
    #[arg(long, env = "SCYLLA_USERNAME")]
    pub scylla_username: Option<String>,

    /// Password (or `--scylla-password-file`).
    #[arg(long, env = "SCYLLA_PASSWORD", hide_env_values = true)]
    pub scylla_password: Option<String>,

    /// A file holding the password (a mounted secret).
    #[arg(long, env = "SCYLLA_PASSWORD_FILE")]
    pub scylla_password_file: Option<PathBuf>,

    /// Client encryption to the nodes (TLS).
    #[arg(long, env = "SCYLLA_TLS", default_value_t = false)]
    pub scylla_tls: bool,

    /// PEM CA certificates to trust the nodes by (implies `--scylla-tls`); default: the
    /// system's.
    #[arg(long, env = "SCYLLA_CA_FILE")]
    pub scylla_ca_file: Option<PathBuf>,

    /// Redis, `redis://host:port[/db]` (`rediss://` for TLS, `redis-cluster://h1:p1,h2:p2`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis ACL username (with a password), instead of any in the URL.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Redis password (or `--redis-password-file`); alone, it is the `default` user's.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// A file holding the Redis password (a mounted secret).
    #[arg(long, env = "REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM CA certificates to trust Redis by, for a `rediss://` URL; default: the system's.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "REDIS_PREFIX", default_value = "chat")]
    pub redis_prefix: String,

    /// Seconds after a gateway node stops refreshing its liveness key before its users go
    /// offline.
    #[arg(long, env = "PRESENCE_NODE_TTL_SECS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub node_ttl_secs: u64,
}

impl BackendArgs {
    /// `Ok(true)` when all three backends are given, `Ok(false)` when none is, and an
    /// error naming what is missing otherwise.
    pub fn distributed(&self) -> Result<bool, String> {
        let given = [
            (
                "--kafka-brokers (KAFKA_BROKERS)",
                self.kafka_brokers.is_some(),
            ),
            (
                "--scylla-nodes (SCYLLA_NODES)",
                !self.scylla_nodes.is_empty(),
            ),
            ("--redis-url (REDIS_URL)", self.redis_url.is_some()),
        ];
        let missing: Vec<&str> = given.iter().filter(|(_, g)| !g).map(|(n, _)| *n).collect();
        match missing.len() {
            0 => Ok(true),
            3 => Ok(false),
            _ => Err(format!(
                "distributed mode needs all three backends; missing {}",
                missing.join(", ")
            )),
        }
    }

    /// Connects the three distributed backends. `timeout` bounds every backend call.
    pub async fn connect(
        &self,
        keys: Keyring,
        presence_ttl: Duration,
        timeout: Duration,
    ) -> crate::Result<Backends> {
        let (Some(brokers), Some(redis_url)) = (&self.kafka_brokers, &self.redis_url) else {
            return Err(crate::Error::Unavailable(
                "distributed mode needs --kafka-brokers, --scylla-nodes and --redis-url".into(),
            ));
        };
        let security = self.security().map_err(crate::Error::Unavailable)?;
        let mut kafka = KafkaConfig::new(brokers.clone());
        kafka.security = security.kafka;
        kafka.topic_prefix = self.kafka_topic_prefix.clone();
        kafka.partitions = self.kafka_partitions;
        kafka.replication = self.kafka_replication;
        kafka.group = self.kafka_group.clone();
        kafka.publish_timeout = timeout;
        kafka.linger = Duration::from_millis(self.kafka_linger_ms);
        kafka.fetch_wait = Duration::from_millis(self.kafka_fetch_wait_ms);
        kafka.compression = self.kafka_compression;

        let mut scylla = ScyllaConfig::new(self.scylla_nodes.clone(), keys);
        scylla.keyspace = self.scylla_keyspace.clone();
        scylla.replication = self.scylla_replication;
        scylla.consistency = self.scylla_consistency.into();
        scylla.timeout = timeout;
        scylla.credentials = security.scylla_credentials;
        scylla.tls = security.scylla_tls;

        let mut redis = RedisConfig::new(redis_url.clone());
        redis.prefix = self.redis_prefix.clone();
        redis.ttl = presence_ttl;
        redis.node_ttl = Duration::from_secs(self.node_ttl_secs);
        redis.timeout = timeout.min(Duration::from_secs(2));
        redis.credentials = security.redis_credentials;
        redis.tls = security.redis_tls;

        let (store, presence, log) = tokio::try_join!(
            async { Ok::<_, crate::Error>(ScyllaStore::connect(scylla).await?) },
            async { Ok::<_, crate::Error>(RedisPresence::connect(redis).await?) },
            KafkaLog::connect(kafka),
        )?;
        Ok(Backends {
            store: Store::Scylla(store),
            presence: Presence::Redis(presence),
            log: Log::Kafka(log),
        })
    }

    /// The credentials and TLS settings of the three backends, secrets read from their
    /// files; an error names the flag or file at fault.
    pub fn security(&self) -> Result<Security, String> {
        let kafka_password = secret(
            self.kafka_password.as_deref(),
            self.kafka_password_file.as_deref(),
            "--kafka-password",
        )?;
        let mut kafka = Vec::new();
        let mut set = |key: &str, value: &str| kafka.push((key.to_owned(), value.to_owned()));
        let (tls, sasl) = match self.kafka_security_protocol {
            KafkaSecurity::Plaintext => (false, false),
            KafkaSecurity::Ssl => (true, false),
            KafkaSecurity::SaslPlaintext => (false, true),
            KafkaSecurity::SaslSsl => (true, true),
        };
        let protocol = match (tls, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        set("security.protocol", protocol);
        if sasl {
            let (Some(username), Some(password)) = (&self.kafka_username, &kafka_password) else {
                return Err(format!(
                    "--kafka-security-protocol {} needs --kafka-username and \
                     --kafka-password (or --kafka-password-file)",
                    protocol.replace('_', "-")
                ));
            };
            let mechanism = match self.kafka_sasl_mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            };
            set("sasl.mechanism", mechanism);
            set("sasl.username", username);
            set("sasl.password", password);
        } else if self.kafka_username.is_some() || kafka_password.is_some() {
            return Err(
                "Kafka credentials need --kafka-security-protocol sasl-ssl (or sasl-plaintext)"
                    .into(),
            );
        }
        if let Some(ca) = &self.kafka_ca_file {
            if !tls {
                return Err(
                    "--kafka-ca-file needs --kafka-security-protocol ssl or sasl-ssl".into(),
                );
            }
            readable("--kafka-ca-file", ca)?;
            set("ssl.ca.location", &ca.display().to_string());
        }

        let scylla_password = secret(
            self.scylla_password.as_deref(),
            self.scylla_password_file.as_deref(),
            "--scylla-password",
        )?;
        let scylla_credentials = match (&self.scylla_username, scylla_password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password,
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "give both --scylla-username and --scylla-password (or its file)".into(),
                )
            }
        };
        let scylla_tls = if self.scylla_tls || self.scylla_ca_file.is_some() {
            Some(Arc::new(client_config(
                "CQL",
                self.scylla_ca_file.as_deref(),
            )?))
        } else {
            None
        };

        let redis_password = secret(
            self.redis_password.as_deref(),
            self.redis_password_file.as_deref(),
            "--redis-password",
        )?;
        let redis_credentials = match (&self.redis_username, redis_password) {
            (username, Some(password)) => Some(Credentials {
                username: username.clone().unwrap_or_else(|| "default".into()),
                password,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err("--redis-username needs --redis-password (or its file)".into())
            }
        };
        let redis_tls = match &self.redis_ca_file {
            Some(ca) => {
                let url = self.redis_url.as_deref().unwrap_or_default();
                if !url.starts_with("rediss") {
                    return Err("--redis-ca-file is for TLS: give a `rediss://` --redis-url".into());
                }
                Some(client_config("redis", Some(ca))?)
            }
            None => None,
        };
        Ok(Security {
            kafka: KafkaSettings(kafka),
            scylla_credentials,
            scylla_tls,
            redis_credentials,
            redis_tls,
        })
    }
}

/// What [`BackendArgs::security`] gives each backend.
#[derive(Debug)]
pub struct Security {
    pub kafka: KafkaSettings,
    pub scylla_credentials: Option<Credentials>,
    pub scylla_tls: Option<Arc<rustls::ClientConfig>>,
    pub redis_credentials: Option<Credentials>,
    pub redis_tls: Option<rustls::ClientConfig>,
}

fn readable(flag: &str, path: &Path) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| format!("{flag} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        backends: BackendArgs,
    }

    fn security(flags: &[&str]) -> Result<Security, String> {
        let args = [
            "test",
            "--kafka-brokers",
            "k:9092",
            "--redis-url",
            "redis://r:6379",
        ];
        let parsed = Flags::try_parse_from(args.iter().chain(flags)).map_err(|e| e.to_string())?;
        parsed.backends.security()
    }

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_flags() {
        let refusals = [
            (
                &["--kafka-security-protocol", "sasl-ssl"][..],
                "--kafka-username",
            ),
            (
                &["--kafka-username", "u", "--kafka-password", "p"][..],
                "sasl-ssl",
            ),
            (
                &["--kafka-ca-file", "/etc/hostname"][..],
                "--kafka-ca-file needs",
            ),
            (&["--scylla-username", "u"][..], "--scylla-password"),
            (&["--redis-username", "u"][..], "--redis-password"),
            (&["--redis-ca-file", "/etc/hostname"][..], "rediss://"),
            (
                &[
                    "--redis-password",
                    "a",
                    "--redis-password-file",
                    "/etc/hostname",
                ][..],
                "not both",
            ),
        ];
        for (flags, expected) in refusals {
            let error = security(flags).expect_err("refused");
            assert!(error.contains(expected), "{flags:?}: {error}");
        }
    }

    #[test]
    fn sasl_over_tls_becomes_librdkafka_settings_and_hides_the_password() {
        let s = security(&[
            "--kafka-security-protocol",
            "sasl-ssl",
            "--kafka-sasl-mechanism",
            "scram-sha-256",
            "--kafka-username",
            "chat",
            "--kafka-password",
            "s3cret",
        ])
        .expect("valid");
        let get = |key: &str| {
            s.kafka
                .0
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(get("sasl.username"), Some("chat"));
        assert_eq!(get("sasl.password"), Some("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
        // A password alone is the Redis `default` user's.
        let s = security(&["--redis-password", "pw"]).expect("valid");
        assert_eq!(
            s.redis_credentials.map(|c| c.username),
            Some("default".to_owned())
        );
    }
}
