//! The inbound-log conformance suite, written once generic over [`InboundLog`] and
//! instantiated for each backend by `conformance!`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use dispatcher::log::KafkaCompression;
use dispatcher::{Envelope, InboundLog, KafkaConfig, KafkaLog, Log, MemoryLog, Partition};
use tokio::time::timeout;
use uuid::Uuid;

trait Backend {
    fn make() -> impl Future<Output = Log>;

    /// False when the backend's server is not configured here (the suite is skipped,
    /// which `server_url` refuses under CI).
    fn available() -> bool {
        true
    }
}

struct Memory;

impl Backend for Memory {
    async fn make() -> Log {
        Log::Memory(MemoryLog::new(4, 64))
    }
}

struct Kafka;

impl Backend for Kafka {
    async fn make() -> Log {
        let brokers = server_url("TEST_KAFKA_BROKERS").expect("checked by available()");
        Log::Kafka(
            KafkaLog::connect(kafka_config(&brokers))
                .await
                .expect("kafka"),
        )
    }

    fn available() -> bool {
        server_url("TEST_KAFKA_BROKERS").is_some()
    }
}

/// A Kafka log's configuration with topics and a consumer group of its own on the shared
/// broker, and four partitions.
fn kafka_config(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers);
    let tag = Uuid::new_v4().simple().to_string();
    config.topic_prefix = format!("t{tag}.");
    config.group = format!("g{tag}");
    config.partitions = 4;
    config
}

// `server_url`: a test server's address from the environment, written once for every
// suite that needs real servers.
#[path = "../../storage/tests/common/mod.rs"]
mod servers;
use servers::server_url;

fn ack(user: &str) -> Envelope {
    Envelope::Ack {
        user: user.into(),
        message_ids: vec![Uuid::now_v7()],
        device: None,
    }
}

/// Consumes every assigned partition, committing each record, until `count` records
/// arrived; returns `(partition, envelope)` in consumption order per partition.
async fn consume(log: &Log, count: usize) -> Vec<(u32, Envelope)> {
    let mut assigned = log.subscribe().await.expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut partition) = assigned.recv().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let id = partition.id;
                while let Some(batch) = Partition::next_batch(&mut partition, 16).await {
                    for record in batch {
                        let _ = tx.send((id, record.envelope.clone()));
                        record.commit(Ok(()));
                    }
                }
            });
        }
    });
    let mut got = Vec::new();
    while got.len() < count {
        let item = timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("records within 30 s")
            .expect("consumer alive");
        got.push(item);
    }
    got
}

async fn one_key_is_one_ordered_partition<B: Backend>() {
    let log = B::make().await;
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let mut sent: HashMap<String, Vec<Envelope>> = HashMap::new();
    let mut publishers = Vec::new();
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for user in &users {
        let envelopes: Vec<Envelope> = (0..25).map(|_| ack(user)).collect();
        sent.insert(user.clone(), envelopes.clone());
        let (log, lost) = (log.clone(), lost.clone());
        publishers.push(tokio::spawn(async move {
            for e in envelopes {
                let lost = lost.clone();
                let failed: dispatcher::Failed = Box::new(move |_| {
                    lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
                log.publish(e, Some(failed)).await.expect("publish");
            }
        }));
    }
    let got = consume(&log, 200).await;
    for p in publishers {
        p.await.expect("publisher");
    }
    assert_eq!(
        lost.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "records the log did not hold"
    );
    for user in &users {
        let mine: Vec<_> = got.iter().filter(|(_, e)| e.key() == *user).collect();
        let partitions: std::collections::BTreeSet<u32> = mine.iter().map(|(p, _)| *p).collect();
        assert_eq!(partitions.len(), 1, "{user} spread over {partitions:?}");
        let order: Vec<Envelope> = mine.into_iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(&order, &sent[user], "{user}'s records out of order");
    }
}

/// A record the consumer could not persist is never silently dropped: a log that says it
/// delivers such a record again (Kafka) does so until it is persisted; one that cannot (the
/// in-process log, which holds nothing of its own) says so, for the dispatcher to tell
/// the publisher.
async fn a_record_not_persisted_is_not_lost<B: Backend>() {
    let log = B::make().await;
    let mut assigned = log.subscribe().await.expect("subscribe");
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let refused = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        while let Some(mut partition) = assigned.recv().await {
            let (tx, refused) = (tx.clone(), refused.clone());
            tokio::spawn(async move {
                while let Some(batch) = partition.next_batch(16).await {
                    for record in batch {
                        let first = refused
                            .lock()
                            .expect("lock")
                            .insert(format!("{:?}", record.envelope));
                        let _ = tx.send((first, record.is_redelivered(), record.envelope.clone()));
                        if first {
                            record.commit(Err("refused on purpose".into()));
                        } else {
                            record.commit(Ok(()));
                        }
                    }
                }
            });
        }
    });
    let envelope = ack("zoe");
    log.publish(envelope.clone(), None).await.expect("publish");
    let (first, redelivered, got) = timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("the record within 30 s")
        .expect("consumer alive");
    assert!(first);
    assert_eq!(got, envelope);
    if redelivered {
        let (first, _, again) = timeout(Duration::from_secs(30), seen.recv())
            .await
            .expect("the refused record is delivered again within 30 s")
            .expect("consumer alive");
        assert!(!first);
        assert_eq!(again, envelope);
    } else {
        assert_eq!(
            log.backend(),
            "memory",
            "only the in-process log cannot redeliver"
        );
    }
}

async fn ping_answers<B: Backend>() {
    B::make().await.ping().await.expect("ping");
}

/// One test per scenario for one backend.
macro_rules! instantiate {
    ($module:ident => $backend:ident: $($scenario:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if !<super::$backend as super::Backend>::available() {
                        return;
                    }
                    super::$scenario::<super::$backend>().await;
                }
            )*
        }
    };
}

/// Every scenario, listed once, against both backends.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        instantiate!(memory => Memory: $($scenario),*);
        instantiate!(kafka => Kafka: $($scenario),*);
    };
}

conformance!(
    one_key_is_one_ordered_partition,
    a_record_not_persisted_is_not_lost,
    ping_answers,
);

/// Kafka only: a record counts against the producer's queue bound until its delivery
/// report is served, so reports must be served as they come. Records published one per
/// millisecond go out in batches of one, each with a report of its own: with a bound of
/// 200, 2,000 of them take two seconds; serving one report per 20 ms poll tick (as a bug
/// once did) would stall the publisher at 50 records a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_producer_keeps_going_far_past_its_queue_bound() {
    let Some(brokers) = server_url("TEST_KAFKA_BROKERS") else {
        return;
    };
    let mut config = kafka_config(&brokers);
    config.max_queued = 200;
    let log = Log::Kafka(KafkaLog::connect(config).await.expect("kafka"));
    let published = timeout(Duration::from_secs(20), async {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..2_000 {
            tick.tick().await;
            log.publish(ack(&format!("user{}", i % 50)), None)
                .await
                .expect("publish");
        }
    })
    .await;
    assert!(published.is_ok(), "the producer stalled on its queue bound");
}

/// Kafka only: a producer set to compress (`--kafka-compression lz4` or `snappy`; the
/// default sends records as they are) writes records the consumer reads back whole and in
/// order, so an operator can switch codecs on a running cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_records_read_back_whole_and_in_order() {
    let Some(brokers) = server_url("TEST_KAFKA_BROKERS") else {
        return;
    };
    for compression in [KafkaCompression::Lz4, KafkaCompression::Snappy] {
        let mut config = kafka_config(&brokers);
        config.compression = compression;
        let log = Log::Kafka(KafkaLog::connect(config).await.expect("kafka"));
        let mut sent: HashMap<String, Vec<Envelope>> = HashMap::new();
        for i in 0..40 {
            let user = format!("user{}", i % 4);
            let envelope = ack(&user);
            sent.entry(user).or_default().push(envelope.clone());
            log.publish(envelope, None).await.expect("publish");
        }
        let got = consume(&log, 40).await;
        for (user, expected) in &sent {
            let order: Vec<Envelope> = got
                .iter()
                .filter(|(_, e)| e.key() == *user)
                .map(|(_, e)| e.clone())
                .collect();
            assert_eq!(&order, expected, "{compression:?}: {user}'s records");
        }
    }
}
