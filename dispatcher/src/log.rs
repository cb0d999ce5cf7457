//! The inbound log contract and the enum of backends that is what actually runs.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::envelope::{Envelope, PushEvent};
use crate::error::{Error, Result};

mod kafka;
mod memory;

pub use kafka::{
    Compression as KafkaCompression, KafkaConfig, KafkaLog, Settings as KafkaSettings,
};
pub use memory::MemoryLog;

/// What the dispatcher is told once it has dealt with a record.
pub type Commit = Box<dyn FnOnce(Result<(), String>) + Send>;

/// One consumed record and the means to commit it.
pub struct Record {
    pub envelope: Envelope,
    commit: Commit,
    /// Whether the log delivers the record again when it is committed with an error
    /// (Kafka reads it again; the in-process log, which has no storage, cannot).
    redelivered: bool,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("envelope", &self.envelope)
            .finish()
    }
}

impl Record {
    /// A record that the log delivers again when committed with an error.
    pub fn new(
        envelope: Envelope,
        commit: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Self {
        Record {
            envelope,
            commit: Box::new(commit),
            redelivered: true,
        }
    }

    /// A record that the log cannot deliver again: if it is not persisted, its publisher
    /// must be told.
    pub fn once(envelope: Envelope) -> Self {
        Record {
            envelope,
            commit: Box::new(|_| {}),
            redelivered: false,
        }
    }

    /// Whether committing this record with an error makes the log deliver it again.
    pub fn is_redelivered(&self) -> bool {
        self.redelivered
    }

    /// Commits the record: `Ok` once it is persisted and routed (the log may forget it),
    /// `Err` when it could not be persisted (a log that can delivers it again). Dropping a
    /// record without committing it leaves it to be redelivered where the log can.
    pub fn commit(self, outcome: Result<(), String>) {
        (self.commit)(outcome);
    }

    pub fn into_parts(self) -> (Envelope, Commit) {
        (self.envelope, self.commit)
    }
}

/// Told when the log could not hold an envelope it had queued (Kafka: the broker never
/// acknowledged it). It runs on a thread of the log's, so it must be quick.
pub type Failed = Box<dyn FnOnce(Error) + Send + Sync>;

/// One partition assigned to this consumer: records in log order.
#[derive(Debug)]
pub struct Partition {
    pub id: u32,
    records: mpsc::Receiver<Record>,
    /// Set when the log took the partition away: what is still buffered belongs to its
    /// next owner, who reads it again from the committed offset.
    revoked: Arc<AtomicBool>,
}

impl Partition {
    pub fn new(id: u32, records: mpsc::Receiver<Record>) -> Self {
        Partition::revocable(id, records).0
    }

    /// A partition and the flag that revokes it.
    pub fn revocable(id: u32, records: mpsc::Receiver<Record>) -> (Self, Arc<AtomicBool>) {
        let revoked = Arc::new(AtomicBool::new(false));
        let partition = Partition {
            id,
            records,
            revoked: revoked.clone(),
        };
        (partition, revoked)
    }

    /// Waits for at least one record and takes up to `max` of those already waiting.
    /// `None` when the partition was revoked or the log closed.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Record>> {
        if self.revoked.load(Ordering::Acquire) {
            return None;
        }
        let mut batch = Vec::new();
        match self.records.recv_many(&mut batch, max).await {
            0 => None,
            _ => Some(batch),
        }
    }
}

/// What every inbound log does. Exactly two implementations exist: [`MemoryLog`] (one
/// process) and Kafka; one conformance suite (`tests/conformance.rs`) runs against both.
pub trait InboundLog: Send + Sync + 'static {
    /// Appends an envelope to the partition of its key, behind everything the same caller
    /// published before (await this before publishing the next one to keep their order).
    /// Resolves once the envelope is queued. Should the log fail to hold it durably after
    /// that (Kafka: no acknowledgement from the broker, acks=all, within the publish
    /// timeout), `failed` is told. Success is not reported: the dispatcher's answer to the
    /// sending connection is what confirms a message, and nothing else waits for one.
    fn publish(
        &self,
        envelope: Envelope,
        failed: Option<Failed>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Emits a push-notification event for an offline recipient.
    fn publish_push(&self, event: PushEvent) -> impl Future<Output = Result<()>> + Send;

    /// Joins the consumer group: partitions arrive as they are assigned.
    fn subscribe(&self) -> impl Future<Output = Result<mpsc::Receiver<Partition>>> + Send;

    /// Answers when the log is reachable (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The inbound log that runs, chosen from configuration.
#[derive(Clone, Debug)]
pub enum Log {
    Memory(MemoryLog),
    Kafka(KafkaLog),
}

impl Log {
    pub fn backend(&self) -> &'static str {
        match self {
            Log::Memory(_) => "memory",
            Log::Kafka(_) => "kafka",
        }
    }
}

impl InboundLog for Log {
    async fn publish(&self, envelope: Envelope, failed: Option<Failed>) -> Result<()> {
        let result = match self {
            Log::Memory(log) => log.publish(envelope, failed).await,
            Log::Kafka(log) => log.publish(envelope, failed).await,
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Error::Unavailable(_)) => "unavailable",
            Err(_) => "rejected",
        };
        metrics::counter!("inbound_log_publish_total", "outcome" => outcome).increment(1);
        result
    }
    async fn publish_push(&self, event: PushEvent) -> Result<()> {
        match self {
            Log::Memory(log) => log.publish_push(event).await,
            Log::Kafka(log) => log.publish_push(event).await,
        }
    }
    async fn subscribe(&self) -> Result<mpsc::Receiver<Partition>> {
        match self {
            Log::Memory(log) => log.subscribe().await,
            Log::Kafka(log) => log.subscribe().await,
        }
    }
    async fn ping(&self) -> Result<()> {
        match self {
            Log::Memory(log) => log.ping().await,
            Log::Kafka(log) => log.ping().await,
        }
    }
}
