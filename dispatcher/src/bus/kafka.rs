//! The inbound log on Kafka: gateways produce, dispatchers consume in one consumer group.
//!
//! - Producer: idempotent, `acks=all`, a short linger (2 ms by default) so that one
//!   produce request carries what arrived meanwhile, lz4. `publish` queues the record in
//!   call order and returns what resolves on the broker's acknowledgement, or fails within
//!   the publish timeout when the broker is unreachable (a circuit breaker then fails fast
//!   until it is back).
//! - Consumer fetches wait up to a few milliseconds (`fetch.wait.max.ms`, 5 by default)
//!   for data to gather: a broker spends its CPU per request, and without the wait a
//!   consumer would fetch once per record.
//! - Topics `<prefix>messages` and `<prefix>push`, created when missing with the configured
//!   partition count. Records are JSON [`Envelope`]s keyed by [`Envelope::key`].
//! - Consumer: cooperative-sticky assignment; offsets are *stored* only once the
//!   dispatcher committed the record (persisted) and every earlier record of the partition
//!   too, and auto-committed from there: at-least-once, and replays are harmless because
//!   every store write is idempotent. A record the dispatcher could not persist is read
//!   again: the partition seeks back to it after a jittered backoff.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use storage::resilience::{Breaker, Guarded};
use tokio::sync::mpsc;

use super::{Accepted, InboundLog, Partition, Record};
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
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic_prefix: "chat.".into(),
            partitions: 8,
            replication: None,
            group: "chat-dispatchers".into(),
            publish_timeout: Duration::from_secs(5),
            partition_buffer: 1024,
            linger: Duration::from_millis(2),
            fetch_wait: Duration::from_millis(5),
        }
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
    producer: FutureProducer,
    breaker: Breaker,
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

fn guarded(e: Guarded<Error>) -> Error {
    match e {
        Guarded::Inner(e) => e,
        other => Error::Unavailable(other.to_string()),
    }
}

fn is_unavailable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_))
}

impl KafkaLog {
    /// Creates the producer and the topics when missing. Fails when no broker answers
    /// within the publish timeout.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let timeout_ms = config.publish_timeout.as_millis().to_string();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("compression.type", "lz4")
            .set("message.timeout.ms", &timeout_ms)
            .set("socket.connection.setup.timeout.ms", &timeout_ms)
            .set("reconnect.backoff.max.ms", "1000")
            .create()
            .map_err(unavailable)?;
        let log = KafkaLog {
            shared: Arc::new(Shared {
                breaker: Breaker::new("kafka", config.publish_timeout + Duration::from_secs(1)),
                config,
                producer,
            }),
        };
        log.ensure_topics().await?;
        Ok(log)
    }

    async fn ensure_topics(&self) -> Result<()> {
        let config = &self.shared.config;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(unavailable)?;
        let (messages, push) = (config.messages_topic(), config.push_topic());
        let partitions = i32::try_from(config.partitions.max(1)).unwrap_or(i32::MAX);
        let replication = match config.replication {
            Some(r) => r,
            None => {
                let shared = self.shared.clone();
                let timeout = config.publish_timeout;
                let brokers = tokio::task::spawn_blocking(move || {
                    shared
                        .producer
                        .client()
                        .fetch_metadata(None, timeout)
                        .map(|m| m.brokers().len())
                })
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
        let topics = [
            NewTopic::new(&messages, partitions, TopicReplication::Fixed(replication)),
            NewTopic::new(&push, partitions, TopicReplication::Fixed(replication)),
        ];
        let options = AdminOptions::new().operation_timeout(Some(config.publish_timeout));
        let results = tokio::time::timeout(
            config.publish_timeout * 2,
            admin.create_topics(topics.iter(), &options),
        )
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "no Kafka broker at {} answered within {:?}",
                config.brokers,
                config.publish_timeout * 2
            ))
        })?
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

    /// Queues a record in the producer (in call order: librdkafka keeps a partition's
    /// records in order, and the idempotent producer keeps them so across retries) and
    /// returns what resolves on the broker's acknowledgement.
    async fn produce(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<Accepted> {
        let shared = &self.shared;
        if !shared.breaker.is_closed() {
            metrics::counter!("backend_rejected_total", "backend" => "kafka").increment(1);
            return Err(Error::Unavailable(
                "circuit open: kafka failed repeatedly and is given a rest".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + shared.config.publish_timeout;
        let delivery = loop {
            let record = FutureRecord::to(topic).key(key).payload(&payload);
            match shared.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // The producer's queue is full: wait for the broker to drain it.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(produce_error(e)),
            }
        };
        let breaker = shared.breaker.clone();
        let acknowledged = async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(produce_error(e)),
                Err(_) => Err(Error::Unavailable("the Kafka producer was closed".into())),
            }
        };
        Ok(Accepted::pending(async move {
            breaker
                .call(is_unavailable, acknowledged)
                .await
                .map_err(guarded)
        }))
    }
}

fn produce_error(e: KafkaError) -> Error {
    match e {
        KafkaError::MessageProduction(code)
            if matches!(
                code,
                RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessage
            ) =>
        {
            Error::Rejected(format!("the broker refused the record: {code}"))
        }
        e => Error::Unavailable(format!("Kafka did not take the record: {e}")),
    }
}

impl InboundLog for KafkaLog {
    async fn publish(&self, envelope: Envelope) -> Result<Accepted> {
        let payload = serde_json::to_vec(&envelope).map_err(|e| Error::Rejected(e.to_string()))?;
        self.produce(
            &self.shared.config.messages_topic(),
            &envelope.key(),
            payload,
        )
        .await
    }

    async fn publish_push(&self, event: PushEvent) -> Result<()> {
        let payload = serde_json::to_vec(&event).map_err(|e| Error::Rejected(e.to_string()))?;
        self.produce(&self.shared.config.push_topic(), &event.user, payload)
            .await?
            .durable()
            .await?;
        metrics::counter!("dispatcher_push_events_total").increment(1);
        Ok(())
    }

    async fn subscribe(&self) -> Result<mpsc::Receiver<Partition>> {
        let config = &self.shared.config;
        let (events, rebalances) = mpsc::unbounded_channel();
        let context = GroupContext {
            events,
            topic: config.messages_topic(),
        };
        let consumer: StreamConsumer<GroupContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("statistics.interval.ms", "5000")
            .set("reconnect.backoff.max.ms", "1000")
            .set(
                "fetch.wait.max.ms",
                config.fetch_wait.as_millis().to_string(),
            )
            .set("fetch.min.bytes", "65536")
            .create_with_context(context)
            .map_err(unavailable)?;
        consumer
            .subscribe(&[&config.messages_topic()])
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(pump(
            Arc::new(Detached(Some(consumer))),
            rebalances,
            tx,
            config.messages_topic(),
            config.partition_buffer.max(1),
        ));
        Ok(rx)
    }

    async fn ping(&self) -> Result<()> {
        let shared = self.shared.clone();
        let timeout = shared.config.publish_timeout;
        tokio::task::spawn_blocking(move || {
            shared
                .producer
                .client()
                .fetch_metadata(Some(&shared.config.messages_topic()), timeout)
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }
}

/// The consumer, closed on a thread of its own when the last handle goes: closing leaves
/// the group, which waits for the broker, and a broker that is down must not hang the
/// runtime (or the process's exit) with it.
struct Detached(Option<StreamConsumer<GroupContext>>);

impl std::ops::Deref for Detached {
    type Target = StreamConsumer<GroupContext>;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            Some(consumer) => consumer,
            None => unreachable!("taken only in drop"),
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Turns rebalances into events for the pump, commits what is stored before partitions
/// go, and publishes the consumer lag.
struct GroupContext {
    events: mpsc::UnboundedSender<GroupEvent>,
    topic: String,
}

impl GroupContext {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (id, partition) in &topic.partitions {
                if *id >= 0 && partition.consumer_lag >= 0 {
                    metrics::gauge!("dispatcher_consumer_lag", "partition" => id.to_string())
                        .set(partition.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = self.partitions(list);
            tracing::info!(?revoked, "partitions revoked");
            // Commit what was stored before another consumer takes these partitions over.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                    tracing::warn!(error = %e, "commit on revoke failed");
                }
            }
            let _ = self.events.send(GroupEvent::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned = self.partitions(list);
                tracing::info!(?assigned, "partitions assigned");
                let _ = self.events.send(GroupEvent::Assigned(assigned));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Offsets of one partition: which records are out with the dispatcher, what is stored.
#[derive(Default)]
struct Offsets {
    /// Bumped whenever the partition is read again from an earlier offset (a seek back):
    /// verdicts on records handed out before belong to an older generation and move
    /// nothing.
    generation: u64,
    /// Handed to the dispatcher and not yet persisted (or failed: kept until redone).
    open: BTreeSet<i64>,
    /// Highest offset handed out in this generation.
    highest: i64,
    /// Highest offset stored for commit (the next read starts after it).
    stored: i64,
    /// Consecutive failures, for the backoff before reading a failed record again.
    failures: u32,
    /// A seek back is scheduled.
    rewinding: bool,
}

impl Offsets {
    fn new() -> Self {
        Offsets {
            highest: -1,
            stored: -1,
            ..Offsets::default()
        }
    }

    /// Notes a record handed to the dispatcher; returns its generation.
    fn hand_out(&mut self, offset: i64) -> u64 {
        if offset <= self.highest {
            // Read again from an earlier offset: what is still out is superseded.
            self.generation += 1;
            self.open.clear();
            self.highest = offset - 1;
            self.stored = self.stored.min(offset - 1);
        }
        self.open.insert(offset);
        self.highest = offset;
        self.generation
    }
}

struct Feed {
    records: mpsc::Sender<Record>,
    offsets: Arc<Mutex<Offsets>>,
    revoked: Arc<std::sync::atomic::AtomicBool>,
}

impl Feed {
    fn revoke(&self) {
        self.revoked
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

fn lock(offsets: &Mutex<Offsets>) -> MutexGuard<'_, Offsets> {
    offsets.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the consumer and feeds each assigned partition's records, in order, to its own
/// [`Partition`]. Ends when the dispatcher drops the partition receiver.
async fn pump(
    consumer: Arc<Detached>,
    mut rebalances: mpsc::UnboundedReceiver<GroupEvent>,
    partitions: mpsc::Sender<Partition>,
    topic: String,
    buffer: usize,
) {
    let mut feeds: HashMap<i32, Feed> = HashMap::new();
    // Applies a rebalance. Every assignment gets a fresh feed: its records start at the
    // committed offset, whatever an earlier feed of the same partition had seen.
    let apply = |event: GroupEvent, feeds: &mut HashMap<i32, Feed>| match event {
        GroupEvent::Assigned(ids) => {
            for id in ids {
                let (tx, rx) = mpsc::channel(buffer);
                let (partition, revoked) =
                    Partition::revocable(u32::try_from(id).unwrap_or_default(), rx);
                if partitions.try_send(partition).is_err() {
                    continue;
                }
                let fresh = Feed {
                    records: tx,
                    offsets: Arc::new(Mutex::new(Offsets::new())),
                    revoked,
                };
                if let Some(old) = feeds.insert(id, fresh) {
                    old.revoke();
                }
            }
        }
        GroupEvent::Revoked(ids) => {
            for id in ids {
                // The dispatcher stops taking this partition's records; its next owner
                // reads them again from the committed offset.
                if let Some(feed) = feeds.remove(&id) {
                    feed.revoke();
                }
            }
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = partitions.closed() => break,
            event = rebalances.recv() => match event {
                Some(event) => apply(event, &mut feeds),
                None => break,
            },
            message = consumer.recv() => {
                // A rebalance callback runs inside `recv`: apply what it announced before
                // looking at the record it returned.
                while let Ok(event) = rebalances.try_recv() {
                    apply(event, &mut feeds);
                }
                let message = match message {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let (id, offset) = (message.partition(), message.offset());
                let Some(feed) = feeds.get(&id) else {
                    // Fetched before the partition was revoked: its new owner reads it.
                    metrics::counter!("dispatcher_stale_records_total").increment(1);
                    continue;
                };
                let envelope = match message.payload().map(serde_json::from_slice::<Envelope>) {
                    Some(Ok(envelope)) => envelope,
                    other => {
                        // Not ours to fix by replaying: skip it, loudly.
                        tracing::error!(partition = id, offset, ?other, "undecodable record skipped");
                        metrics::counter!("dispatcher_undecodable_records_total").increment(1);
                        drop(message);
                        let generation = lock(&feed.offsets).hand_out(offset);
                        settle(&consumer, &topic, id, offset, generation, &feed.offsets, Ok(()));
                        continue;
                    }
                };
                drop(message);
                let offsets = feed.offsets.clone();
                let records = feed.records.clone();
                let generation = lock(&offsets).hand_out(offset);
                let commit = {
                    let (consumer, topic, offsets) = (consumer.clone(), topic.clone(), offsets.clone());
                    move |outcome: std::result::Result<(), String>| {
                        settle(&consumer, &topic, id, offset, generation, &offsets, outcome);
                    }
                };
                if records.send(Record::new(envelope, commit)).await.is_err() {
                    // The dispatcher let go of this partition: read it again if reassigned.
                    if let Some(feed) = feeds.remove(&id) {
                        feed.revoke();
                    }
                }
            }
        }
    }
    tracing::info!("Kafka consumer stopped");
}

/// Records the dispatcher's verdict on one record: store the offset below which every
/// record is persisted, or schedule a seek back to a record that failed.
fn settle(
    consumer: &Arc<Detached>,
    topic: &str,
    partition: i32,
    offset: i64,
    generation: u64,
    offsets: &Arc<Mutex<Offsets>>,
    outcome: std::result::Result<(), String>,
) {
    let mut o = lock(offsets);
    if o.generation != generation {
        // Handed out before a seek back: the record comes (came) again.
        return;
    }
    match outcome {
        Ok(()) => {
            o.open.remove(&offset);
            o.failures = 0;
            let safe = match o.open.first() {
                Some(first) => first - 1,
                None => o.highest,
            };
            if safe > o.stored {
                match consumer.store_offset(topic, partition, safe) {
                    Ok(()) => o.stored = safe,
                    Err(e) => {
                        tracing::debug!(error = %e, partition, "offset not stored (revoked?)")
                    }
                }
            }
        }
        Err(reason) => {
            metrics::counter!("dispatcher_redeliveries_total").increment(1);
            if o.rewinding {
                return;
            }
            o.rewinding = true;
            o.failures = o.failures.saturating_add(1);
            // Full jitter over an exponential ceiling: 100 ms doubling, at most 5 s.
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1u32 << o.failures.min(6))
                .min(Duration::from_secs(5));
            let wait = ceiling.mul_f64(rand::random::<f64>());
            let to = o.open.first().copied().unwrap_or(offset).min(offset);
            tracing::warn!(partition, offset = to, ?wait, %reason, "record not persisted: reading it again");
            let (consumer, topic, offsets) = (consumer.clone(), topic.to_owned(), offsets.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let seek = tokio::task::spawn_blocking(move || {
                    consumer.seek(
                        &topic,
                        partition,
                        Offset::Offset(to),
                        Duration::from_secs(5),
                    )
                })
                .await;
                if let Ok(Err(e)) = seek {
                    tracing::warn!(error = %e, partition, "seek back failed");
                }
                lock(&offsets).rewinding = false;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Offsets;

    #[test]
    fn reading_a_partition_again_starts_a_new_generation() {
        let mut o = Offsets::new();
        assert_eq!(o.hand_out(10), 0);
        assert_eq!(o.hand_out(11), 0);
        assert_eq!(o.hand_out(12), 0);
        o.stored = 11;
        // A seek back to 11: verdicts on what was out before no longer count.
        assert_eq!(o.hand_out(11), 1);
        assert_eq!(o.open.iter().copied().collect::<Vec<_>>(), vec![11]);
        assert_eq!((o.highest, o.stored), (11, 10));
        assert_eq!(o.hand_out(12), 1);
    }
}
