//! The inbound log on Kafka: gateways produce, dispatchers consume in one consumer group.
//!
//! - Producer ([`producer`]): idempotent, `acks=all`, no linger by default (librdkafka sends a
//!   request per partition, so a linger only gathers a partition's own records), uncompressed
//!   by default (`--kafka-compression`). `publish` queues the record in call order; a record
//!   the broker does not take within the publish timeout is reported to the publisher's
//!   callback (a circuit breaker then fails fast until the broker is back).
//! - Consumer fetches wait up to a few milliseconds (`fetch.wait.max.ms`, 5 by default)
//!   for data to gather: a broker spends its CPU per request, and without the wait a
//!   consumer would fetch once per record.
//! - Topics `<prefix>messages` and `<prefix>push`, created when missing with the configured
//!   partition count. Records are JSON [`Envelope`]s keyed by [`Envelope::key`].
//! - Consumer ([`consumer`], [`offsets`]): cooperative-sticky assignment; offsets are *stored* only once the
//!   dispatcher committed the record (persisted) and every earlier record of the partition
//!   too, and auto-committed from there: at-least-once, and replays are harmless because
//!   every store write is idempotent. A record the dispatcher could not persist is read
//!   again: the partition seeks back to it after a jittered backoff.

mod consumer;
mod offsets;
mod producer;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::BaseProducer;
use storage::resilience::Breaker;
use tokio::sync::mpsc;

use self::producer::Producer;
use super::{Failed, InboundLog, Partition};
use crate::envelope::{Envelope, PushEvent};
use crate::error::{Error, Result};

/// How to reach Kafka and how the topics look.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// Prepended to the topic names `messages` and `push`: `chat.` by default.
    pub topic_prefix: String,
    /// Partitions of a topic created here (an existing topic keeps its own).
    pub partitions: u32,
    /// Replication factor of a topic created here. `None`: 3, or the broker count when
    /// the cluster has fewer brokers.
    pub replication: Option<i32>,
    /// The consumer group every dispatcher joins.
    pub group: String,
    /// A publish fails with `unavailable` when the broker has not acknowledged it by then.
    pub publish_timeout: Duration,
    /// Records buffered per assigned partition between the consumer and the dispatcher.
    pub partition_buffer: usize,
    /// How long the producer waits for more records to send in one request.
    pub linger: Duration,
    /// How long a fetch waits at the broker for records to gather.
    pub fetch_wait: Duration,
    /// How the producers compress the records of a request (`compression.type`).
    pub compression: Compression,
    /// Records the producer holds at most (queued, in flight, or with their delivery
    /// report not yet served): librdkafka's `queue.buffering.max.messages`.
    pub max_queued: usize,
    /// librdkafka settings for every client (producer, consumer, admin): TLS and SASL
    /// (`security.protocol`, `sasl.*`, `ssl.ca.location`). Values are not logged.
    pub security: Settings,
}

/// How a producer compresses the records it sends (librdkafka's `compression.type`; the
/// broker keeps what the producer sent, and a consumer reads every codec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Lz4,
    Snappy,
}

impl Compression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Snappy => "snappy",
        }
    }
}

/// librdkafka settings whose values may be secret: `Debug` shows the keys only.
#[derive(Clone, Default)]
pub struct Settings(pub Vec<(String, String)>);

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl KafkaConfig {
    /// Partitions of a topic created here unless configured (`--kafka-partitions`):
    /// dispatchers scale up to this many.
    pub const DEFAULT_PARTITIONS: u32 = 32;

    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic_prefix: "chat.".into(),
            partitions: Self::DEFAULT_PARTITIONS,
            replication: None,
            group: "chat-dispatchers".into(),
            publish_timeout: Duration::from_secs(5),
            partition_buffer: 1024,
            linger: Duration::ZERO,
            fetch_wait: Duration::from_millis(5),
            compression: Compression::None,
            max_queued: 100_000,
            security: Settings::default(),
        }
    }

    /// A client configuration with the brokers and the security settings.
    pub(crate) fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.security.0 {
            client.set(key, value);
        }
        client
    }

    pub fn messages_topic(&self) -> String {
        format!("{}messages", self.topic_prefix)
    }

    pub fn push_topic(&self) -> String {
        format!("{}push", self.topic_prefix)
    }
}

/// A cheap-clone handle to the Kafka log (one producer, shared).
#[derive(Clone)]
pub struct KafkaLog {
    shared: Arc<Shared>,
}

struct Shared {
    config: KafkaConfig,
    producer: Producer,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.shared.config.brokers)
            .field("topic_prefix", &self.shared.config.topic_prefix)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

impl KafkaLog {
    /// Creates the producer and the topics when missing. Fails when no broker answers
    /// within the publish timeout.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let breaker = Breaker::new("kafka", config.publish_timeout + Duration::from_secs(1));
        let producer = Producer::new(&config, breaker)?;
        let log = KafkaLog {
            shared: Arc::new(Shared { config, producer }),
        };
        log.ensure_topics().await?;
        Ok(log)
    }

    async fn ensure_topics(&self) -> Result<()> {
        let config = &self.shared.config;
        let admin: AdminClient<DefaultClientContext> =
            config.client().create().map_err(unavailable)?;
        // Serves its queue below, where librdkafka puts a refused login or handshake.
        let watch = Watch::default();
        let refused = watch.refused.clone();
        let probe: BaseProducer<Watch> = config
            .client()
            .create_with_context(watch)
            .map_err(unavailable)?;
        let (messages, push) = (config.messages_topic(), config.push_topic());
        let partitions = i32::try_from(config.partitions.max(1)).unwrap_or(i32::MAX);
        let replication = match config.replication {
            Some(r) => r,
            None => {
                let shared = self.shared.clone();
                let brokers = tokio::task::spawn_blocking(move || shared.producer.brokers())
                    .await
                    .map_err(unavailable)?
                    .map_err(|e| {
                        Error::Unavailable(format!(
                            "no Kafka broker at {} answered: {e}",
                            config.brokers
                        ))
                    })?;
                i32::try_from(brokers.clamp(1, 3)).unwrap_or(1)
            }
        };
        // A write is acknowledged (acks=all) once in sync on a majority of the replicas, so
        // that losing one broker of three loses nothing acknowledged and stops nothing.
        let min_insync = (replication / 2 + 1).to_string();
        let topics = [
            NewTopic::new(&messages, partitions, TopicReplication::Fixed(replication))
                .set("min.insync.replicas", &min_insync),
            NewTopic::new(&push, partitions, TopicReplication::Fixed(replication))
                .set("min.insync.replicas", &min_insync),
        ];
        let options = AdminOptions::new().operation_timeout(Some(config.publish_timeout));
        // A broker that refuses the credentials or the TLS handshake fails the start now,
        // in its own words, instead of at the timeout.
        let refusal = async {
            loop {
                probe.poll(Duration::ZERO);
                if let Some(reason) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    return reason;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let creating = async {
            tokio::select! {
                results = admin.create_topics(topics.iter(), &options) => Ok(results),
                reason = refusal => Err(Error::Unavailable(format!(
                    "Kafka at {} refused this client: {reason}",
                    config.brokers
                ))),
            }
        };
        let results = tokio::time::timeout(config.publish_timeout * 2, creating)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no Kafka broker at {} answered within {:?} (is it up, and does \
                 --kafka-security-protocol match its listener?)",
                    config.brokers,
                    config.publish_timeout * 2
                ))
            })??
            .map_err(unavailable)?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, partitions, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Error::Unavailable(format!(
                        "creating Kafka topic {topic}: {code}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// A probe client's context: remembers an authentication or TLS failure, which
/// librdkafka reports as an event on the client's queue while it goes on retrying.
#[derive(Default)]
struct Watch {
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        ) {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            refused.get_or_insert_with(|| reason.to_owned());
        }
        tracing::error!(error = %error, reason, "Kafka client error");
    }
}

impl rdkafka::producer::ProducerContext for Watch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

impl InboundLog for KafkaLog {
    async fn publish(&self, envelope: Envelope, failed: Option<Failed>) -> Result<()> {
        let payload = serde_json::to_vec(&envelope).map_err(|e| Error::Rejected(e.to_string()))?;
        let topic = self.shared.config.messages_topic();
        self.shared
            .producer
            .send(&topic, &envelope.key(), &payload, failed)
            .await
    }

    /// Queued, not awaited: a push event that Kafka does not take is logged and counted.
    async fn publish_push(&self, event: PushEvent) -> Result<()> {
        let payload = serde_json::to_vec(&event).map_err(|e| Error::Rejected(e.to_string()))?;
        let topic = self.shared.config.push_topic();
        let failed: Failed = Box::new(|e| {
            metrics::counter!("dispatcher_push_events_failed_total").increment(1);
            tracing::warn!(error = %e, "a push event was lost");
        });
        self.shared
            .producer
            .send(&topic, &event.user, &payload, Some(failed))
            .await?;
        metrics::counter!("dispatcher_push_events_total").increment(1);
        Ok(())
    }

    async fn subscribe(&self) -> Result<mpsc::Receiver<Partition>> {
        consumer::subscribe(&self.shared.config)
    }

    async fn ping(&self) -> Result<()> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.producer.ping(&shared.config.messages_topic()))
            .await
            .map_err(unavailable)?
    }
}
