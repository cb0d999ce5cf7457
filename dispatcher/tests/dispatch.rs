//! The dispatch loop on the embedded backends: persist, then deliver to the node holding
//! the recipient, or leave pending; answer the sending connection; acks and reads become
//! receipts for the sender.

use std::time::Duration;

use dispatcher::startup::Backends;
use dispatcher::{Dispatcher, Envelope, InboundLog, Log};
use presence::{ConnRef, Location, NodeDelivery, Payload, Presence, PresenceService};
use storage::{
    ts_of, Conversation, EmbeddedConfig, Group, Message, MessageStore, Notice, ReceiptStatus, Store,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Harness {
    store: Store,
    presence: Presence,
    log: Log,
    /// The node of the test's own sending connection: answers to sends arrive here.
    answers: UnboundedReceiver<Vec<NodeDelivery>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// The test's sending connection.
const ORIGIN: &str = "origin-node";

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let backends = Backends::embedded(EmbeddedConfig::new(dir.path()), Duration::from_secs(60), 4)
        .await
        .expect("backends");
    let shutdown = CancellationToken::new();
    let answers = backends
        .presence
        .deliveries(ORIGIN)
        .await
        .expect("deliveries");
    let dispatcher = Dispatcher::new(backends.clone());
    tokio::spawn(dispatcher.run(shutdown.clone()));
    Harness {
        store: backends.store,
        presence: backends.presence,
        log: backends.log,
        answers,
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
        e2ee: None,
        attachments: Vec::new(),
    }
}

/// The next batch of deliveries published to a node.
async fn next(rx: &mut UnboundedReceiver<Vec<NodeDelivery>>) -> Vec<NodeDelivery> {
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

/// Publishes a message from the test's connection and waits for the dispatcher's answer:
/// it is stored then, under the returned id.
async fn publish_message(h: &mut Harness, message: Message, client_msg_id: &str) -> Payload {
    let envelope = Envelope::Message {
        message: Box::new(message),
        origin: Some(ConnRef {
            node: ORIGIN.into(),
            conn: 1,
        }),
        client_msg_id: Some(client_msg_id.into()),
    };
    h.log.publish(envelope, None).await.expect("publish");
    answer(h, client_msg_id).await
}

/// Waits for the dispatcher's answer to a send.
async fn answer(h: &mut Harness, client_msg_id: &str) -> Payload {
    loop {
        for delivery in next(&mut h.answers).await {
            match &delivery.payload {
                Payload::Sent {
                    client_msg_id: c, ..
                }
                | Payload::Refused {
                    client_msg_id: c, ..
                } if c == client_msg_id => return delivery.payload,
                _ => {}
            }
        }
    }
}

/// Waits until the dispatcher has handled everything published so far under `key` (one
/// partition is handled in order): a message to that user, answered.
async fn barrier(h: &mut Harness, key: &str) {
    let cmid = format!("barrier-{}", Uuid::now_v7());
    publish_message(h, message("barrier", key, "barrier"), &cmid).await;
}

#[tokio::test]
async fn online_recipients_get_the_message_after_it_is_stored() {
    let mut h = start().await;
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "bob", "n1", "phone", 1).await;
    let m = message("alice", "bob", "hi");
    let answer = publish_message(&mut h, m.clone(), "c1").await;
    // Answered, so the message is already stored and pending.
    assert_eq!(
        answer,
        Payload::Sent {
            conn: 1,
            client_msg_id: "c1".into(),
            message_id: m.id,
            conversation: m.conversation.clone(),
            ts: m.ts,
        }
    );
    assert_eq!(
        h.store.pending("bob", None, 10).await.expect("pending"),
        vec![m.clone()]
    );
    let delivery = next(&mut node).await.remove(0);
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
    let envelope = Envelope::Message {
        message: Box::new(m.clone()),
        origin: Some(origin.clone()),
        client_msg_id: Some("e1".into()),
    };
    h.log.publish(envelope, None).await.expect("publish");
    // One publish to n1: the answer to the sending connection, then the echo to the
    // others, which leaves the sending one out.
    let batch = next(&mut node).await;
    assert_eq!(batch.len(), 2, "{batch:?}");
    assert!(matches!(batch[0].payload, Payload::Sent { conn: 8, .. }));
    assert_eq!(batch[1].users, vec!["alice".to_string()]);
    assert_eq!(batch[1].except, Some(origin));
    assert_eq!(batch[1].payload, Payload::Message(m));
}

#[tokio::test]
async fn a_retried_send_resolves_to_the_first_and_is_stored_once() {
    let mut h = start().await;
    let first = message("alice", "bob", "once");
    let retry = message("alice", "bob", "once, sent again");
    let a = publish_message(&mut h, first.clone(), "same").await;
    let b = publish_message(&mut h, retry, "same").await;
    assert_eq!(a, b, "the retry is answered with the first message");
    let history = h
        .store
        .history(&first.conversation, None, 10)
        .await
        .expect("history");
    assert_eq!(history, vec![first]);
}

#[tokio::test]
async fn a_replayed_message_is_stored_once_and_not_redelivered_after_ack() {
    let mut h = start().await;
    let m = message("alice", "bob", "once");
    publish_message(&mut h, m.clone(), "r1").await;
    publish_message(&mut h, m.clone(), "r1").await;
    assert_eq!(
        h.store
            .history(&m.conversation, None, 10)
            .await
            .expect("history")
            .len(),
        1
    );
    h.log
        .publish(
            Envelope::Ack {
                user: "bob".into(),
                message_ids: vec![m.id],
                device: None,
            },
            None,
        )
        .await
        .expect("ack");
    barrier(&mut h, "bob").await;
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "bob", "n1", "phone", 1).await;
    publish_message(&mut h, m.clone(), "r1").await;
    let pending = h.store.pending("bob", None, 10).await.expect("pending");
    assert!(
        !pending.iter().any(|p| p.id == m.id),
        "an acked message is pending again"
    );
    assert!(
        node.try_recv().is_err(),
        "an acked message was delivered again"
    );
}

#[tokio::test]
async fn two_acks_of_one_message_make_one_receipt() {
    let mut h = start().await;
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    let m = message("alice", "bob", "acked twice");
    publish_message(&mut h, m.clone(), "t1").await;
    online(&h, "alice", "n1", "phone", 1).await;
    // Two of bob's devices ack at once: both acks are in the log before either is handled
    // (one ordered partition for bob), and only the first finds the message pending.
    for _ in 0..2 {
        h.log
            .publish(
                Envelope::Ack {
                    user: "bob".into(),
                    message_ids: vec![m.id],
                    device: None,
                },
                None,
            )
            .await
            .expect("ack");
    }
    barrier(&mut h, "bob").await;
    let mut receipts = Vec::new();
    while let Ok(batch) = node.try_recv() {
        receipts.extend(
            batch
                .into_iter()
                .filter(|d| matches!(d.payload, Payload::Receipt { .. })),
        );
    }
    assert_eq!(receipts.len(), 1, "{receipts:?}");
}

#[tokio::test]
async fn receipts_are_kept_until_confirmed_and_pushed_to_online_senders() {
    let mut h = start().await;
    let m1 = message("alice", "bob", "one");
    let m2 = message("alice", "bob", "two");
    publish_message(&mut h, m1.clone(), "m1").await;
    publish_message(&mut h, m2.clone(), "m2").await;
    // Alice is offline: the delivered receipt is kept for her.
    h.log
        .publish(
            Envelope::Ack {
                user: "bob".into(),
                message_ids: vec![m1.id],
                device: None,
            },
            None,
        )
        .await
        .expect("ack");
    barrier(&mut h, "bob").await;
    let kept = h.store.notices("alice", None, 10).await.expect("notices");
    assert_eq!(kept.len(), 1);
    let Notice::Receipt(first) = &kept[0].1 else {
        panic!("not a receipt: {kept:?}")
    };
    assert_eq!(
        (first.message_id, first.status),
        (m1.id, ReceiptStatus::Delivered)
    );

    // Alice is online: the read receipt for m2 goes to her node and covers m1 too.
    let mut node = h.presence.deliveries("n1").await.expect("deliveries");
    online(&h, "alice", "n1", "phone", 1).await;
    h.log
        .publish(
            Envelope::Read {
                user: "bob".into(),
                conversation: m2.conversation.clone(),
                message_id: m2.id,
            },
            None,
        )
        .await
        .expect("read");
    let delivery = next(&mut node).await.remove(0);
    let Payload::Receipt { id, receipt } = delivery.payload else {
        panic!("not a receipt: {delivery:?}")
    };
    assert_eq!(
        (receipt.message_id, receipt.status, receipt.by.as_str()),
        (m2.id, ReceiptStatus::Read, "bob")
    );
    // Pushed live and kept too, under the id it was pushed with, until a device confirms
    // it: a node that died with it in flight loses nothing.
    let kept = h.store.notices("alice", None, 10).await.expect("notices");
    let ids: Vec<_> = kept.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 2, "{kept:?}");
    assert_eq!(ids[1], id);
    assert_eq!(kept[1].1, Notice::Receipt(receipt));
}

/// A batch's reads are taken together, but a reader's reads of one conversation in log
/// order: each covers what came after the marker the one before it left.
#[tokio::test]
async fn reads_become_receipts_in_log_order_per_reader() {
    let mut h = start().await;
    let readers = ["bob", "carol", "dan", "erin"];
    let mut sent = Vec::new();
    for reader in readers {
        let messages: Vec<Message> = (0..3)
            .map(|i| message("alice", reader, &format!("{reader} {i}")))
            .collect();
        for (i, m) in messages.iter().enumerate() {
            publish_message(&mut h, m.clone(), &format!("{reader}-{i}")).await;
        }
        sent.push(messages);
    }
    // Every reader reads its first message, then its last, all published at once.
    for (reader, messages) in readers.iter().zip(&sent) {
        for m in [&messages[0], &messages[2]] {
            let read = Envelope::Read {
                user: reader.to_string(),
                conversation: m.conversation.clone(),
                message_id: m.id,
            };
            h.log.publish(read, None).await.expect("read");
        }
    }
    for reader in readers {
        barrier(&mut h, reader).await;
    }
    let kept = h.store.notices("alice", None, 100).await.expect("notices");
    let mut receipts: Vec<(String, Uuid)> = kept
        .iter()
        .filter_map(|(_, notice)| match notice {
            Notice::Receipt(r) if r.status == ReceiptStatus::Read => {
                Some((r.by.clone(), r.message_id))
            }
            _ => None,
        })
        .collect();
    receipts.sort();
    let mut expected: Vec<(String, Uuid)> = readers
        .iter()
        .zip(&sent)
        .flat_map(|(reader, m)| [(reader.to_string(), m[0].id), (reader.to_string(), m[2].id)])
        .collect();
    expected.sort();
    assert_eq!(
        receipts, expected,
        "a receipt per read: the second read covered what came after the first"
    );
    for (reader, messages) in readers.iter().zip(&sent) {
        let markers = h
            .store
            .markers(&messages[0].conversation)
            .await
            .expect("markers");
        let marker = markers.iter().find(|m| m.user == *reader);
        assert_eq!(
            marker.and_then(|m| m.read),
            Some(messages[2].id),
            "{reader}"
        );
    }
}

/// Messages to several groups handled together (their groups read at once): each reaches
/// the members of its own group but its sender, and nobody else.
#[tokio::test]
async fn messages_to_many_groups_at_once_reach_their_own_members() {
    let mut h = start().await;
    let groups: Vec<Group> = (0..6)
        .map(|g| Group {
            id: Uuid::now_v7(),
            name: format!("group {g}"),
            members: (0..3).map(|m| format!("g{g}m{m}")).collect(),
            joined: Default::default(),
        })
        .collect();
    for group in &groups {
        h.store.create_group(group.clone()).await.expect("group");
    }
    for (g, group) in groups.iter().enumerate() {
        let id = Uuid::now_v7();
        let message = Message {
            id,
            conversation: Conversation::Group(group.id),
            from: format!("g{g}m0"),
            body: format!("to group {g}"),
            ts: ts_of(id),
            e2ee: None,
            attachments: Vec::new(),
        };
        let envelope = Envelope::Message {
            message: Box::new(message),
            origin: Some(ConnRef {
                node: ORIGIN.into(),
                conn: 1,
            }),
            client_msg_id: Some(format!("g{g}")),
        };
        h.log.publish(envelope, None).await.expect("publish");
    }
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < groups.len() {
        for delivery in next(&mut h.answers).await {
            if let Payload::Sent { client_msg_id, .. } = delivery.payload {
                answered.insert(client_msg_id);
            }
        }
    }
    for g in 0..groups.len() {
        for m in 0..3 {
            let user = format!("g{g}m{m}");
            let bodies: Vec<String> = h
                .store
                .pending(&user, None, 10)
                .await
                .expect("pending")
                .into_iter()
                .map(|message| message.body)
                .collect();
            let expected = if m == 0 {
                vec![]
            } else {
                vec![format!("to group {g}")]
            };
            assert_eq!(bodies, expected, "{user}");
        }
    }
}
