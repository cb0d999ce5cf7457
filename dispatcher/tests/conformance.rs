//! The inbound-log conformance suite, written once generic over [`InboundLog`] and
//! instantiated for each backend by `conformance!`.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use dispatcher::{Bus, Envelope, InboundLog, MemoryLog, Partition};
use tokio::time::timeout;
use uuid::Uuid;

trait Backend {
    fn make() -> impl Future<Output = Bus>;
}

struct Memory;

impl Backend for Memory {
    async fn make() -> Bus {
        Bus::Memory(MemoryLog::new(4, 64))
    }
}

fn ack(user: &str) -> Envelope {
    Envelope::Ack {
        user: user.into(),
        message_ids: vec![Uuid::now_v7()],
    }
}

/// Consumes every assigned partition, committing each record, until `count` records
/// arrived; returns `(partition, envelope)` in consumption order per partition.
async fn consume(bus: &Bus, count: usize) -> Vec<(u32, Envelope)> {
    let mut assigned = bus.subscribe().await.expect("subscribe");
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
    let bus = B::make().await;
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let mut sent: HashMap<String, Vec<Envelope>> = HashMap::new();
    let mut publishers = Vec::new();
    for user in &users {
        let envelopes: Vec<Envelope> = (0..25).map(|_| ack(user)).collect();
        sent.insert(user.clone(), envelopes.clone());
        let bus = bus.clone();
        publishers.push(tokio::spawn(async move {
            for e in envelopes {
                bus.publish(e).await.expect("publish");
            }
        }));
    }
    let got = consume(&bus, 200).await;
    for p in publishers {
        p.await.expect("publisher");
    }
    for user in &users {
        let mine: Vec<_> = got.iter().filter(|(_, e)| e.key() == *user).collect();
        let partitions: std::collections::BTreeSet<u32> = mine.iter().map(|(p, _)| *p).collect();
        assert_eq!(partitions.len(), 1, "{user} spread over {partitions:?}");
        let order: Vec<Envelope> = mine.into_iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(&order, &sent[user], "{user}'s records out of order");
    }
}

async fn a_refused_record_fails_its_publisher<B: Backend>() {
    let bus = B::make().await;
    let mut assigned = bus.subscribe().await.expect("subscribe");
    tokio::spawn(async move {
        while let Some(mut partition) = assigned.recv().await {
            tokio::spawn(async move {
                while let Some(batch) = partition.next_batch(16).await {
                    for record in batch {
                        record.commit(Err("refused on purpose".into()));
                    }
                }
            });
        }
    });
    let err = bus.publish(ack("zoe")).await.expect_err("refused");
    assert!(err.to_string().contains("refused on purpose"), "{err}");
}

async fn ping_answers<B: Backend>() {
    B::make().await.ping().await.expect("ping");
}

macro_rules! conformance {
    ($module:ident => $backend:ident: $($scenario:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario::<super::$backend>().await;
                }
            )*
        }
    };
}

conformance!(memory => Memory:
    one_key_is_one_ordered_partition,
    a_refused_record_fails_its_publisher,
    ping_answers,
);
