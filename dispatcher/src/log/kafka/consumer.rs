//! The consumer side of the Kafka log: the dispatchers' consumer group, rebalances, and
//! one ordered feed per assigned partition.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use storage::resilience::Backoff;

use super::offsets::{Offsets, Settled};
use super::{unavailable, KafkaConfig};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::log::{Partition, Record};

/// Joins the consumer group and starts the task that feeds each assigned partition.
pub(super) fn subscribe(config: &KafkaConfig) -> Result<mpsc::Receiver<Partition>> {
    let (events, rebalances) = mpsc::unbounded_channel();
    let context = GroupContext {
        events,
        topic: config.messages_topic(),
        closing: AtomicBool::new(false),
    };
    let consumer: StreamConsumer<GroupContext> = config
        .client()
        .set("group.id", &config.group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Stored offsets are committed right after each batch (see `committer`); the
        // timer is only a backstop.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "5000")
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

/// The consumer, closed on a thread of its own when the last handle goes: closing leaves
/// the group, which waits for the broker, and a broker that is down must not hang the
/// runtime (or the process's exit) with it for longer than [`CLOSE_WAIT`].
struct Detached(Option<StreamConsumer<GroupContext>>);

/// How long dropping the consumer waits for its close. The wait is what lets a stopping
/// dispatcher leave the group before the process exits: without it the exit could win, and
/// the group then waited for the session timeout (6 s) before handing its partitions on,
/// with every send to them waiting (a CI run's rolling restart saw 6 s without deliveries).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

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
            consumer.context().closing.store(true, Ordering::Release);
            let (closed, done) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || {
                    drop(consumer);
                    let _ = closed.send(());
                });
            if spawned.is_ok() && done.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!(
                    "the Kafka consumer did not close within {CLOSE_WAIT:?}: the group \
                     hands its partitions on after the session timeout"
                );
            }
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
    /// Set when the consumer is being closed: the revoke that closing brings commits
    /// through librdkafka's own auto-commit on unassign, not through a commit of ours
    /// issued from inside the close (a CI run's test process aborted on librdkafka's
    /// assertion that nothing is in progress when its group terminates).
    closing: AtomicBool,
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
            // Commit what was stored before another consumer takes these partitions over
            // (librdkafka's auto-commit on unassign covers it too). Asynchronously: this
            // runs on a runtime worker, and a synchronous commit waits for the group
            // coordinator without a bound, forever if the broker dies meanwhile (a
            // dispatcher shutting down as its broker went away hung that way). A lost
            // assignment is someone else's already: nothing to commit.
            if consumer.assignment_lost() {
                tracing::info!("assignment lost: its offsets are not committed");
            } else if self.closing.load(Ordering::Acquire) {
                tracing::debug!("closing: librdkafka commits the stored offsets on unassign");
            } else if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
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

struct Feed {
    records: mpsc::Sender<Record>,
    offsets: Arc<Mutex<Offsets>>,
    revoked: Arc<AtomicBool>,
}

impl Feed {
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// What tells a seek back whether this feed still stands.
    fn watch(&self) -> FeedWatch {
        FeedWatch {
            revoked: self.revoked.clone(),
            records: self.records.downgrade(),
        }
    }
}

/// Whether a feed still stands: not revoked, still held by the pump (which drops its feeds
/// when it stops), and still read by the dispatcher.
#[derive(Clone)]
struct FeedWatch {
    revoked: Arc<AtomicBool>,
    records: mpsc::WeakSender<Record>,
}

impl FeedWatch {
    fn stands(&self) -> bool {
        !self.revoked.load(Ordering::Acquire)
            && self
                .records
                .upgrade()
                .is_some_and(|records| !records.is_closed())
    }
}

fn lock(offsets: &Mutex<Offsets>) -> MutexGuard<'_, Offsets> {
    offsets.lock().unwrap_or_else(|e| e.into_inner())
}

/// Least time between two offset commits: a commit follows each batch the dispatcher
/// finishes, but a busy dispatcher finishing hundreds a second sends one per gap.
const COMMIT_GAP: Duration = Duration::from_millis(100);

/// Commits the stored offsets soon after each batch, so that a dispatcher that dies reads
/// again only what it was handling then (each record read again is a duplicate delivery
/// at worst), not everything since the last tick of a timer. Ends with the consumer.
async fn committer(consumer: std::sync::Weak<Detached>, mut wanted: mpsc::Receiver<()>) {
    while wanted.recv().await.is_some() {
        let Some(consumer) = consumer.upgrade() else {
            break;
        };
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                tracing::debug!(error = %e, "offset commit failed (the next one retries)");
            }
        }
        drop(consumer);
        tokio::time::sleep(COMMIT_GAP).await;
    }
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
    let (commit, wanted) = mpsc::channel(1);
    tokio::spawn(committer(Arc::downgrade(&consumer), wanted));
    let settler = Arc::new(Settler {
        consumer: consumer.clone(),
        topic: topic.clone(),
        commit,
    });
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
                        settler.settle(id, offset, generation, &feed.offsets, &feed.watch(), true);
                        continue;
                    }
                };
                drop(message);
                let offsets = feed.offsets.clone();
                let records = feed.records.clone();
                let generation = lock(&offsets).hand_out(offset);
                let commit = {
                    let (settler, offsets, watch) = (settler.clone(), offsets.clone(), feed.watch());
                    move |outcome: std::result::Result<(), String>| {
                        if let Err(reason) = &outcome {
                            metrics::counter!("dispatcher_redeliveries_total").increment(1);
                            tracing::warn!(partition = id, offset, %reason, "record not persisted: it is read again");
                        }
                        settler.settle(id, offset, generation, &offsets, &watch, outcome.is_ok());
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

/// What acting on the dispatcher's verdicts needs: the consumer, the topic, and the
/// committer to wake once an offset is stored.
struct Settler {
    consumer: Arc<Detached>,
    topic: String,
    commit: mpsc::Sender<()>,
}

impl Settler {
    /// Records the dispatcher's verdict on one record and does what it asks: store the offset
    /// below which every record is persisted (and have it committed soon), or read the
    /// partition again from a record that failed, after a jittered backoff.
    fn settle(
        &self,
        partition: i32,
        offset: i64,
        generation: u64,
        offsets: &Arc<Mutex<Offsets>>,
        feed: &FeedWatch,
        persisted: bool,
    ) {
        let (consumer, topic) = (&self.consumer, self.topic.as_str());
        let mut o = lock(offsets);
        match o.settle(offset, generation, persisted) {
            Settled::Nothing => {}
            Settled::Store(safe) => match consumer.store_offset(topic, partition, safe) {
                Ok(()) => {
                    o.stored(safe);
                    // Full: a commit is already wanted, and it takes this offset too.
                    if let Err(TrySendError::Closed(_)) = self.commit.try_send(()) {
                        tracing::debug!("offset committer gone");
                    }
                }
                Err(e) => tracing::debug!(error = %e, partition, "offset not stored (revoked?)"),
            },
            Settled::Rewind { to, wait } => {
                tracing::warn!(partition, offset = to, ?wait, "reading the partition again");
                let (consumer, topic, offsets, feed) = (
                    consumer.clone(),
                    topic.to_owned(),
                    offsets.clone(),
                    feed.clone(),
                );
                tokio::spawn(async move {
                    seek_back(
                        wait,
                        seek_retries(),
                        || feed.stands(),
                        || {
                            let (consumer, topic) = (consumer.clone(), topic.clone());
                            async move {
                                tokio::task::spawn_blocking(move || {
                                    consumer.seek(
                                        &topic,
                                        partition,
                                        Offset::Offset(to),
                                        Duration::from_secs(5),
                                    )
                                })
                                .await
                                .map_err(|e| e.to_string())?
                                .map_err(|e| e.to_string())
                            }
                        },
                    )
                    .await;
                    lock(&offsets).rewound();
                });
            }
        }
    }
}

/// Longest wait between two attempts at a seek back that failed.
const SEEK_RETRY_MAX: Duration = Duration::from_secs(5);

/// Waits between attempts at a seek back: 200 ms doubling, at most [`SEEK_RETRY_MAX`].
fn seek_retries() -> Backoff {
    Backoff::new(Duration::from_millis(200), SEEK_RETRY_MAX)
}

/// Seeks back after `wait`, and again after a growing wait while the seek fails and the
/// feed still `stands`. A seek fails when the partition is not being fetched at that
/// moment (librdkafka's `Local: Erroneous state`, seen as a partition was being assigned or
/// moving): given up, the failed record would only be read again on the next rebalance,
/// and its offset would hold back every commit of the partition until then. A feed that no
/// longer stands needs no seek: whoever reads the partition next starts at the committed
/// offset, below the failed record. Returns whether a seek succeeded.
async fn seek_back<F, Fut>(
    wait: Duration,
    mut backoff: Backoff,
    stands: impl Fn() -> bool,
    mut seek: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), String>>,
{
    let mut wait = wait;
    loop {
        tokio::time::sleep(wait).await;
        if !stands() {
            return false;
        }
        match seek().await {
            Ok(()) => return true,
            Err(e) => {
                metrics::counter!("dispatcher_seek_retries_total").increment(1);
                wait = backoff.next().unwrap_or(SEEK_RETRY_MAX);
                tracing::warn!(error = %e, ?wait, "seek back failed: trying again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Retries a millisecond apart.
    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(1), Duration::from_millis(1))
    }

    /// A seek that counts its attempts and fails the first `failures` of them.
    fn seek_failing(
        attempts: &AtomicUsize,
        failures: usize,
    ) -> impl FnMut() -> std::future::Ready<std::result::Result<(), String>> + '_ {
        move || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if n < failures {
                Err("Local: Erroneous state".to_owned())
            } else {
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_failed_seek_back_is_tried_again_until_it_succeeds() {
        let attempts = AtomicUsize::new(0);
        let done = seek_back(Duration::ZERO, quick(), || true, seek_failing(&attempts, 3)).await;
        assert!(done);
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            4,
            "three failures, then the seek"
        );
    }

    #[tokio::test]
    async fn a_seek_back_stops_once_the_feed_no_longer_stands() {
        let attempts = AtomicUsize::new(0);
        let done = seek_back(
            Duration::ZERO,
            quick(),
            // Stands for the first two attempts, then the partition is revoked.
            || attempts.load(Ordering::SeqCst) < 2,
            seek_failing(&attempts, usize::MAX),
        )
        .await;
        assert!(!done);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_feed_stands_until_revoked_dropped_or_no_longer_read() {
        let feed = |records: mpsc::Sender<Record>| Feed {
            records,
            offsets: Arc::new(Mutex::new(Offsets::new())),
            revoked: Arc::new(AtomicBool::new(false)),
        };
        let (tx, _rx) = mpsc::channel(1);
        let standing = feed(tx);
        let watch = standing.watch();
        assert!(watch.stands());
        standing.revoke();
        assert!(!watch.stands(), "revoked");

        let (tx, _rx) = mpsc::channel(1);
        let dropped = feed(tx);
        let watch = dropped.watch();
        drop(dropped);
        assert!(!watch.stands(), "the pump let go of it");

        let (tx, rx) = mpsc::channel(1);
        let unread = feed(tx);
        let watch = unread.watch();
        drop(rx);
        assert!(!watch.stands(), "the dispatcher let go of it");
        drop(unread);
    }
}
