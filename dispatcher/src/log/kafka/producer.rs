//! The producer side of the Kafka log: gateways publish envelopes, dispatchers push events.
//!
//! Idempotent, `acks=all`, a linger of `--kafka-linger-ms` (none by default), compressed as
//! `--kafka-compression` says (not by default). A record is queued in call order (librdkafka
//! keeps a partition's records in order, and the idempotent producer keeps them so across
//! retries); nothing waits for its acknowledgement — the dispatcher's
//! answer to the sending connection is what confirms a message — so no task and no wake-up of the
//! runtime is spent per record on success. A record the broker did not take within the publish
//! timeout is reported to its publisher's callback. Delivery reports come by produce response (one
//! event for many records, and at these rates most requests carry one record). A thread of the
//! producer's own serves them every [`GATHER`], all that have come at once, rather than waking for
//! each as it comes (as rdkafka's `ThreadedProducer` does, whose polling thread woke about 2,000
//! times a second at 1,000 messages a second, and took 8% of a gateway's CPU; this one wakes 200
//! times a second, idle or not). They must still be served promptly — librdkafka counts a record
//! against its queue bound (`queue.buffering.max.messages`) until its report is served — and they
//! feed the backend's circuit breaker. Nobody waits for a report on success, so the gathering
//! delays no answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use storage::resilience::Breaker;

use super::{unavailable, KafkaConfig};
use crate::error::{Error, Result};
use crate::log::Failed;

/// What a record carries to its delivery report: who to tell if it fails.
struct Notice(Option<Failed>);

/// How long delivery reports gather between two servings.
const GATHER: Duration = Duration::from_millis(5);

/// Counts delivery reports for the breaker and passes failures on.
struct Reports {
    breaker: Breaker,
    /// Events served (reports and statistics): how the serving thread tells that a poll
    /// found the queue empty.
    served: AtomicU64,
}

impl ClientContext for Reports {
    /// librdkafka's statistics (every 5 s): the records it holds, queued or in flight.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.served.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("inbound_log_producer_queued_records").set(statistics.msg_cnt as f64);
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Notice>;

    fn delivery(&self, result: &DeliveryResult<'_>, notice: Box<Notice>) {
        self.served.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => self.breaker.record(true),
            Err((e, _)) => {
                self.breaker.record(false);
                metrics::counter!("inbound_log_delivery_failures_total").increment(1);
                tracing::warn!(error = %e, "Kafka did not take a record");
                if let Some(failed) = notice.0 {
                    failed(produce_error(e.clone()));
                }
            }
        }
    }
}

pub(super) fn produce_error(e: KafkaError) -> Error {
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

/// The producer; its delivery reports are served while it lives.
pub(super) struct Producer {
    inner: Arc<BaseProducer<Reports>>,
    /// Tells the serving thread to stop; joined on drop.
    stop: Arc<AtomicBool>,
    serving: Option<JoinHandle<()>>,
    breaker: Breaker,
    timeout: Duration,
}

/// The serving thread: every [`GATHER`], every event that has come. `poll` with no wait serves
/// at most one event, so it is called until a call serves nothing.
fn serve(producer: &BaseProducer<Reports>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(GATHER);
        loop {
            let served = producer.context().served.load(Ordering::Relaxed);
            producer.poll(Duration::ZERO);
            if producer.context().served.load(Ordering::Relaxed) == served {
                break;
            }
        }
    }
}

impl Producer {
    pub(super) fn new(config: &KafkaConfig, breaker: Breaker) -> Result<Self> {
        let timeout_ms = config.publish_timeout.as_millis().to_string();
        let inner: BaseProducer<Reports> = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set(
                "queue.buffering.max.messages",
                config.max_queued.to_string(),
            )
            .set("compression.type", config.compression.as_str())
            .set("message.timeout.ms", &timeout_ms)
            .set("socket.connection.setup.timeout.ms", &timeout_ms)
            .set("reconnect.backoff.max.ms", "1000")
            .set("statistics.interval.ms", "5000")
            .create_with_context(Reports {
                breaker: breaker.clone(),
                served: AtomicU64::new(0),
            })
            .map_err(unavailable)?;
        let inner = Arc::new(inner);
        let stop = Arc::new(AtomicBool::new(false));
        let serving = std::thread::Builder::new()
            .name("kafka-reports".into())
            .spawn({
                let (producer, stop) = (inner.clone(), stop.clone());
                move || serve(&producer, &stop)
            })
            .map_err(|e| Error::Unavailable(format!("starting the Kafka report thread: {e}")))?;
        Ok(Producer {
            inner,
            stop,
            serving: Some(serving),
            breaker,
            timeout: config.publish_timeout,
        })
    }

    /// Queues a record; `failed` is told if the broker does not take it in time.
    pub(super) async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        failed: Option<Failed>,
    ) -> Result<()> {
        if !self.breaker.is_closed() {
            metrics::counter!("backend_rejected_total", "backend" => "kafka").increment(1);
            return Err(Error::Unavailable(
                "circuit open: kafka failed repeatedly and is given a rest".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut notice = Box::new(Notice(failed));
        loop {
            let record = BaseRecord::with_opaque_to(topic, notice)
                .key(key)
                .payload(payload);
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // The producer's queue is full: wait for the broker to drain it.
                    notice = record.delivery_opaque;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(produce_error(e)),
            }
        }
    }

    /// How many brokers the cluster has (blocking: call it off the runtime).
    pub(super) fn brokers(&self) -> Result<usize> {
        self.inner
            .client()
            .fetch_metadata(None, self.timeout)
            .map(|m| m.brokers().len())
            .map_err(unavailable)
    }

    /// Answers when `topic`'s metadata can be read (blocking: call it off the runtime).
    pub(super) fn ping(&self, topic: &str) -> Result<()> {
        self.inner
            .client()
            .fetch_metadata(Some(topic), self.timeout)
            .map(|_| ())
            .map_err(unavailable)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // What is still queued goes out now, or is lost (its senders got no `sent`).
        let _ = self.inner.flush(Duration::from_secs(2));
        self.stop.store(true, Ordering::Release);
        if let Some(serving) = self.serving.take() {
            let _ = serving.join();
        }
    }
}
