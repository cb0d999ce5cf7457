//! The dispatch loop on the embedded backends: persist, then deliver to the node holding
//! the recipient, or leave pending; acks and reads become receipts for the sender.

use std::time::Duration;

use dispatcher::{Bus, Dispatcher, Envelope, InboundLog, MemoryLog};
use presence::{
    ConnRef, Location, MemoryPresence, NodeDelivery, Payload, Presence, PresenceService,
};
use storage::{
    ts_of, Conversation, EmbeddedConfig, EmbeddedStore, Message, MessageStore, ReceiptStatus, Store,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Harness {
    store: Store,
    presence: Presence,
    bus: Bus,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::Embedded(
        EmbeddedStore::open(EmbeddedConfig::new(dir.path()))
            .await
            .expect("store"),
    );
    let presence = Presence::Memory(MemoryPresence::new(Duration::from_secs(60)));
    let bus = Bus::Memory(MemoryLog::new(4, 64));
    let shutdown = CancellationToken::new();
    let dispatcher = Dispatcher::new(store.clone(), presence.clone(), bus.clone());
    tokio::spawn(dispatcher.run(shutdown.clone()));
    Harness {
        store,
        presence,
        bus,
        shutdown,
        _dir: dir,
    }
}

fn message(from: &str, to: &str, body: &str) -> Message {
    let id = Uuid::now_v7();
    Message {
        id,
        conversation: Conversation::direct(from, to),
        from: from.into(),
        body: body.into(),
        ts: ts_of(id),
    }
}

async fn next(rx: &mut UnboundedReceiver<NodeDelivery>) -> NodeDelivery {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery in time")
        .expect("channel open")
}

/// Marks `user` connected on `node`.
async fn online(h: &Harness, user: &str, node: &str, device: &str, conn: u64) {
    let at = Location {
        node: node.into(),
        device: device.into(),
        conn,
    };
    h.presence.connect(user, &at).await.expect("connect");
}

/// Publishes a message and waits until it is stored.
async fn publish_message(h: &Harness, message: Message, origin: Option<ConnRef>) {
    let envelope = Envelope::Message {
        message,
        origin,
        client_msg_id: None,
    };
    h.bus.publish(envelope).await.expect("publish");
}

#[tokio::test]
async fn online_recipients_get_the_message_after_it_is_stored() {
    let h = start().await;
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "bob", "n1", "phone", 1).await;
    let m = message("alice", "bob", "hi");
    publish_message(&h, m.clone(), None).await;
    // `publish` resolved, so the message is already stored and pending.
    assert_eq!(
        h.store.pending("bob", None, 10).await.expect("pending"),
        vec![m.clone()]
    );
    let delivery = next(&mut node).await;
    assert_eq!(delivery.users, vec!["bob".to_string()]);
    assert_eq!(delivery.payload, Payload::Message(m));
}

#[tokio::test]
async fn the_senders_other_devices_get_an_echo_but_not_the_sending_one() {
    let h = start().await;
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "alice", "n1", "web", 9).await;
    let m = message("alice", "bob", "echo");
    let origin = ConnRef {
        node: "n1".into(),
        conn: 8,
    };
    publish_message(&h, m.clone(), Some(origin.clone())).await;
    let delivery = next(&mut node).await;
    assert_eq!(delivery.users, vec!["alice".to_string()]);
    assert_eq!(delivery.except, Some(origin));
}

#[tokio::test]
async fn a_replayed_message_is_stored_once_and_not_redelivered_after_ack() {
    let h = start().await;
    let m = message("alice", "bob", "once");
    let envelope = Envelope::Message {
        message: m.clone(),
        origin: None,
        client_msg_id: None,
    };
    h.bus.publish(envelope.clone()).await.expect("publish");
    h.bus.publish(envelope.clone()).await.expect("replay");
    assert_eq!(
        h.store
            .history(&m.conversation, None, 10)
            .await
            .expect("history")
            .len(),
        1
    );
    h.bus
        .publish(Envelope::Ack {
            user: "bob".into(),
            message_ids: vec![m.id],
        })
        .await
        .expect("ack");
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "bob", "n1", "phone", 1).await;
    h.bus.publish(envelope).await.expect("replay after ack");
    assert!(h
        .store
        .pending("bob", None, 10)
        .await
        .expect("pending")
        .is_empty());
    assert!(
        node.try_recv().is_err(),
        "an acked message was delivered again"
    );
}

#[tokio::test]
async fn receipts_reach_online_senders_and_wait_for_offline_ones() {
    let h = start().await;
    let m1 = message("alice", "bob", "one");
    let m2 = message("alice", "bob", "two");
    for m in [&m1, &m2] {
        publish_message(&h, m.clone(), None).await;
    }
    // Alice is offline: the delivered receipt is kept for her.
    h.bus
        .publish(Envelope::Ack {
            user: "bob".into(),
            message_ids: vec![m1.id],
        })
        .await
        .expect("ack");
    let kept = h.store.receipts("alice", 10).await.expect("receipts");
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].1.message_id, kept[0].1.status),
        (m1.id, ReceiptStatus::Delivered)
    );

    // Alice is online: the read receipt for m2 goes to her node and covers m1 too.
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "alice", "n1", "phone", 1).await;
    h.bus
        .publish(Envelope::Read {
            user: "bob".into(),
            conversation: m2.conversation.clone(),
            message_id: m2.id,
        })
        .await
        .expect("read");
    let delivery = next(&mut node).await;
    let Payload::Receipt(receipt) = delivery.payload else {
        panic!("not a receipt: {delivery:?}")
    };
    assert_eq!(
        (receipt.message_id, receipt.status, receipt.by.as_str()),
        (m2.id, ReceiptStatus::Read, "bob")
    );
}
