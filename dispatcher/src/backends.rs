//! Choosing and connecting the backends: the flags both binaries share.
//!
//! Given `--kafka-brokers`, `--scylla-nodes` and `--redis-url` (all three), a process runs
//! distributed; given none, the gateway runs the embedded system. Anything in between is
//! refused with the names of what is missing.

use std::time::Duration;

use clap::{Args, ValueEnum};
use presence::{Presence, RedisConfig, RedisPresence};
use storage::crypto::Keyring;
use storage::{ScyllaConfig, ScyllaStore, Store};

use crate::bus::{Bus, KafkaConfig, KafkaLog};

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
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub kafka_partitions: u32,

    /// Replication factor of topics created here. Default: 3, or the broker count when
    /// the cluster has fewer brokers.
    #[arg(long, env = "KAFKA_REPLICATION", value_parser = clap::value_parser!(i32).range(1..=16))]
    pub kafka_replication: Option<i32>,

    /// The dispatchers' consumer group.
    #[arg(long, env = "KAFKA_GROUP", default_value = "chat-dispatchers")]
    pub kafka_group: String,

    /// Milliseconds a producer waits for more records to send in the same request
    /// (`linger.ms`): fewer requests for the broker, that much more latency.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub kafka_linger_ms: u64,

    /// Milliseconds a dispatcher's fetch waits at the broker for records to gather
    /// (`fetch.wait.max.ms`): fewer requests for the broker, up to that much more latency.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub kafka_fetch_wait_ms: u64,

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

    /// Redis, `redis://host:port[/db]` (`rediss://` for TLS, `redis-cluster://h1:p1,h2:p2`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

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
    ) -> crate::Result<(Store, Presence, Bus)> {
        let (Some(brokers), Some(redis_url)) = (&self.kafka_brokers, &self.redis_url) else {
            return Err(crate::Error::Unavailable(
                "distributed mode needs --kafka-brokers, --scylla-nodes and --redis-url".into(),
            ));
        };
        let mut kafka = KafkaConfig::new(brokers.clone());
        kafka.topic_prefix = self.kafka_topic_prefix.clone();
        kafka.partitions = self.kafka_partitions;
        kafka.replication = self.kafka_replication;
        kafka.group = self.kafka_group.clone();
        kafka.publish_timeout = timeout;
        kafka.linger = Duration::from_millis(self.kafka_linger_ms);
        kafka.fetch_wait = Duration::from_millis(self.kafka_fetch_wait_ms);

        let mut scylla = ScyllaConfig::new(self.scylla_nodes.clone(), keys);
        scylla.keyspace = self.scylla_keyspace.clone();
        scylla.replication = self.scylla_replication;
        scylla.consistency = self.scylla_consistency.into();
        scylla.timeout = timeout;

        let mut redis = RedisConfig::new(redis_url.clone());
        redis.prefix = self.redis_prefix.clone();
        redis.ttl = presence_ttl;
        redis.node_ttl = Duration::from_secs(self.node_ttl_secs);
        redis.timeout = timeout.min(Duration::from_secs(2));

        let (store, presence, bus) = tokio::try_join!(
            async { Ok::<_, crate::Error>(ScyllaStore::connect(scylla).await?) },
            async { Ok::<_, crate::Error>(RedisPresence::connect(redis).await?) },
            KafkaLog::connect(kafka),
        )?;
        Ok((
            Store::Scylla(store),
            Presence::Redis(presence),
            Bus::Kafka(bus),
        ))
    }
}
