//! The in-process partitioned log of the embedded mode.
//!
//! It serves a single process. Envelopes are hashed by key onto `P` bounded queues, one
//! ordered consumer per queue, exactly as Kafka partitions by key. It keeps nothing on
//! disk and cannot deliver a record twice: the store is the durable log, and a sender
//! learns that its message is durable when the dispatcher answers its connection after
//! storing it. A crash loses only what was never answered.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{Failed, InboundLog, Partition, Record};
use crate::envelope::{Envelope, PushEvent};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct MemoryLog {
    shared: Arc<Shared>,
}

struct Shared {
    senders: Vec<mpsc::Sender<Record>>,
    /// Taken by the one subscriber; a second `subscribe` is refused.
    receivers: Mutex<Option<Vec<mpsc::Receiver<Record>>>>,
}

impl std::fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLog")
            .field("partitions", &self.shared.senders.len())
            .finish()
    }
}

impl MemoryLog {
    /// A log of `partitions` queues of `capacity` records each (a full queue makes
    /// publishers wait: backpressure, not loss).
    pub fn new(partitions: u32, capacity: usize) -> Self {
        let (senders, receivers) = (0..partitions.max(1))
            .map(|_| mpsc::channel(capacity.max(1)))
            .unzip();
        MemoryLog {
            shared: Arc::new(Shared {
                senders,
                receivers: Mutex::new(Some(receivers)),
            }),
        }
    }

    pub fn partition_of(&self, key: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.shared.senders.len() as u64) as usize
    }
}

impl InboundLog for MemoryLog {
    /// Once queued, a record cannot fail here: a failure to store it is answered by the
    /// dispatcher, so `failed` is never called.
    async fn publish(&self, envelope: Envelope, _failed: Option<Failed>) -> Result<()> {
        let partition = self.partition_of(&envelope.key());
        self.shared.senders[partition]
            .send(Record::once(envelope))
            .await
            .map_err(|_| Error::Unavailable("the in-process dispatcher has stopped".into()))
    }

    async fn publish_push(&self, event: PushEvent) -> Result<()> {
        // No push provider in the embedded mode: the event is a log line and a metric.
        tracing::info!(
            user = %event.user,
            message_id = %event.message_id,
            conversation = %event.conversation,
            from = %event.from,
            "push notification"
        );
        metrics::counter!("dispatcher_push_events_total").increment(1);
        Ok(())
    }

    async fn subscribe(&self) -> Result<mpsc::Receiver<Partition>> {
        let receivers = self
            .shared
            .receivers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Error::Unavailable(
                    "the in-process log has a single consumer, already subscribed".into(),
                )
            })?;
        let (tx, rx) = mpsc::channel(receivers.len());
        for (id, records) in receivers.into_iter().enumerate() {
            // Cannot fail: the channel has room for every partition.
            let _ = tx.try_send(Partition::new(id as u32, records));
        }
        Ok(rx)
    }

    async fn ping(&self) -> Result<()> {
        if self.shared.senders.iter().any(|s| s.is_closed()) {
            return Err(Error::Unavailable(
                "the in-process dispatcher has stopped".into(),
            ));
        }
        Ok(())
    }
}
