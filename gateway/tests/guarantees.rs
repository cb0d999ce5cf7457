//! The protocol's guarantees 2-8 over real WebSocket connections (1, durability, is in
//! `durability.rs`; the push event of 7 in `push.rs`).

mod common;

use common::start;
use serde_json::{json, Value};

fn ids(frames: &[Value]) -> Vec<Value> {
    frames.iter().map(|f| f["message_id"].clone()).collect()
}

#[tokio::test]
async fn g2_resending_a_client_msg_id_answers_the_same_message_once() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let first = alice.send_message("bob", "once", "same-id").await;
    let again = alice.send_message("bob", "once", "same-id").await;
    assert_eq!(first, again, "same message_id, conversation and ts");
    // From another device too.
    let mut laptop = gw.connect_device("alice", "laptop").await;
    let third = laptop.send_message("bob", "once", "same-id").await;
    assert_eq!(first["message_id"], third["message_id"]);

    assert_eq!(
        bob.recv_type("message").await["message_id"],
        first["message_id"]
    );
    let rest = bob.barrier().await;
    assert!(
        rest.iter().all(|f| f["type"] != "message"),
        "a second message was created: {rest:?}"
    );
    bob.send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob"}))
        .await;
    assert_eq!(
        bob.recv_type("history").await["messages"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn g2_a_retry_delivers_the_message_again_only_to_who_has_not_acked_it() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    // Bob's connect replay is over once a message sent after it reached him (held until
    // the replay ends, or read by it): "again?" then comes live, not from the replay,
    // which would make its repeat a copy the connection drops.
    alice.send_message("bob", "fence", "fence").await;
    assert_eq!(bob.recv_type("message").await["body"], "fence");
    let first = alice.send_message("bob", "again?", "retried").await;
    let id = first["message_id"].clone();
    assert_eq!(bob.recv_type("message").await["message_id"], id);

    // Not acked yet: the retry routes the stored message to bob once more (a first
    // delivery lost with a gateway reaches him now), under the same id.
    alice.send_message("bob", "again?", "retried").await;
    let repeat = loop {
        let frame = bob.recv_raw().await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!(repeat["message_id"], id, "{repeat}");
    assert_eq!(repeat["body"], "again?");

    // Acked (the `delivered` receipt says the ack is stored): a retry reaches nobody.
    bob.send(json!({"type":"ack","message_ids":[id]})).await;
    let receipt = alice.recv_type_of(&["receipt"]).await;
    assert_eq!(receipt["message_id"], id, "{receipt}");
    let again = alice.send_message("bob", "again?", "retried").await;
    assert_eq!(again["message_id"], id);
    let before = bob.duplicates;
    let rest = bob.barrier().await;
    assert!(
        rest.iter().all(|f| f["type"] != "message") && bob.duplicates == before,
        "an acked message came again: {rest:?}"
    );
}

#[tokio::test]
async fn g3_pending_messages_come_oldest_first_then_live_and_stay_until_acked() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(
            alice
                .send_message("bob", &format!("while away {i}"), &format!("c-{i}"))
                .await,
        );
    }
    let mut bob = gw.connect("bob").await;
    let live = alice.send_message("bob", "live", "c-live").await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(bob.recv_type("message").await);
    }
    let mut expected = ids(&sent);
    expected.push(live["message_id"].clone());
    assert_eq!(ids(&got), expected, "pending oldest first, then live");

    // Not acked: all six come again on reconnect. Then ack three of them.
    bob.close().await;
    let mut bob = gw.connect("bob").await;
    let mut again = Vec::new();
    for _ in 0..6 {
        again.push(bob.recv_type("message").await);
    }
    assert_eq!(ids(&again), expected);
    bob.send(json!({"type":"ack","message_ids":[expected[0], expected[1], expected[5]]}))
        .await;
    // The acks have landed once alice has their `delivered` receipts (until then the
    // messages may come again: guarantee 3).
    let mut receipted = std::collections::BTreeSet::new();
    while receipted.len() < 3 {
        let receipt = alice.recv_type("receipt").await;
        assert_eq!(receipt["status"], "delivered", "{receipt}");
        receipted.insert(receipt["message_id"].to_string());
    }
    let acked: std::collections::BTreeSet<String> = [&expected[0], &expected[1], &expected[5]]
        .iter()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(receipted, acked);
    bob.close().await;

    // Only the unacked three come back, and a new live message after them.
    let mut bob = gw.connect("bob").await;
    let marker = alice.send_message("bob", "marker", "c-marker").await;
    let mut third = Vec::new();
    for _ in 0..4 {
        third.push(bob.recv_type("message").await);
    }
    assert_eq!(
        ids(&third),
        vec![
            expected[2].clone(),
            expected[3].clone(),
            expected[4].clone(),
            marker["message_id"].clone()
        ]
    );
}

#[tokio::test]
async fn g4_one_senders_messages_arrive_in_order_and_history_is_the_same_for_all() {
    let gw = start(|c| {
        c.rate_per_sec = 1000;
        c.rate_burst = 1000;
    })
    .await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    // Pipelined: all sends go out before any answer is read.
    for i in 0..100 {
        alice.send(json!({"type":"send","client_msg_id":format!("c-{i}"),"to":"bob","body":format!("{i}")})).await;
    }
    let mut sent = Vec::new();
    for _ in 0..100 {
        sent.push(alice.recv_type("sent").await);
    }
    let bodies: Vec<String> = sent
        .iter()
        .map(|s| s["client_msg_id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        bodies,
        (0..100).map(|i| format!("c-{i}")).collect::<Vec<_>>()
    );
    let mut received = Vec::new();
    for _ in 0..100 {
        received.push(bob.recv_type("message").await);
    }
    let order: Vec<String> = received
        .iter()
        .map(|m| m["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(order, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(ids(&received), ids(&sent));

    let mut pages = Vec::new();
    for client in [&mut alice, &mut bob] {
        client
            .send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob","limit":100}))
            .await;
        pages.push(client.recv_type("history").await["messages"].clone());
    }
    // The same for both, but for the status the sender sees of her own messages.
    for item in pages[0].as_array_mut().into_iter().flatten() {
        let status = item.as_object_mut().and_then(|m| m.remove("status"));
        assert!(
            status.is_some(),
            "no status on the sender's own message: {item}"
        );
    }
    assert_eq!(pages[0], pages[1]);
    let newest_first: Vec<Value> = ids(&sent).into_iter().rev().collect();
    assert_eq!(ids(pages[0].as_array().expect("array")), newest_first);
}

#[tokio::test]
async fn g5_users_reach_only_their_own_conversations() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut mallory = gw.connect("mallory").await;
    let sent = alice.send_message("bob", "private", "c-1").await;
    let cases = [
        json!({"type":"history","ref":"h","conversation":"dm:alice:bob"}),
        json!({"type":"read","conversation":"dm:alice:bob","message_id":sent["message_id"]}),
        json!({"type":"typing","conversation":"dm:alice:bob"}),
        json!({"type":"send","client_msg_id":"m","conversation":"dm:alice:bob","body":"spoof"}),
    ];
    for frame in cases {
        mallory.send(frame.clone()).await;
        assert_eq!(mallory.error().await["code"], "forbidden", "{frame}");
    }
    // Acking someone else's message changes nothing and tells nobody.
    mallory
        .send(json!({"type":"ack","message_ids":[sent["message_id"]]}))
        .await;
    mallory.barrier().await;
    assert!(
        alice.barrier().await.is_empty(),
        "a receipt for a non-recipient"
    );
    let mut bob = gw.connect("bob").await;
    assert_eq!(
        bob.recv_type("message").await["message_id"],
        sent["message_id"],
        "still pending for bob"
    );
}

#[tokio::test]
async fn g6_group_receipts_come_per_member_and_offline_senders_get_them_later() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let mut carol = gw.connect("carol").await;
    alice
        .send(json!({"type":"create_group","ref":"g","name":"team","members":["bob","carol"]}))
        .await;
    let conversation = alice.recv_type("group").await["conversation"]
        .as_str()
        .expect("id")
        .to_owned();
    let sent = alice
        .send_to_group(&conversation, "hello team", "g-1")
        .await;
    alice.close().await;

    for member in [&mut bob, &mut carol] {
        let message = member.recv_type("message").await;
        member
            .send(json!({"type":"ack","message_ids":[message["message_id"]]}))
            .await;
        member.send(json!({"type":"read","conversation":conversation,"message_id":message["message_id"]})).await;
        member.barrier().await;
    }
    // Neither member sees receipts for alice's message.
    assert!(bob.barrier().await.iter().all(|f| f["type"] != "receipt"));

    let mut alice = gw.connect("alice").await;
    // Kept receipts come on the connect; one produced meanwhile may come live as well:
    // repeats are dropped by `receipt_id`, as clients do.
    let mut receipts = std::collections::BTreeMap::new();
    while receipts.len() < 4 {
        let r = alice.recv_type("receipt").await;
        assert_eq!(r["message_id"], sent["message_id"]);
        assert_eq!(r["conversation"], conversation.as_str());
        let id = r["receipt_id"].as_str().unwrap_or("").to_owned();
        receipts.insert(
            id,
            (
                r["by"].as_str().unwrap_or("").to_owned(),
                r["status"].as_str().unwrap_or("").to_owned(),
            ),
        );
    }
    let mut got: Vec<(String, String)> = receipts.values().cloned().collect();
    got.sort();
    let expected: Vec<(String, String)> = [
        ("bob", "delivered"),
        ("bob", "read"),
        ("carol", "delivered"),
        ("carol", "read"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, expected);

    // Confirmed, they are not replayed on the next connect: a message from bob, which
    // comes after the replay, comes with no receipt before it.
    let ids: Vec<&String> = receipts.keys().collect();
    alice.send(json!({"type":"ack","receipt_ids":ids})).await;
    alice.barrier().await;
    alice.close().await;
    let mut alice = gw.connect("alice").await;
    bob.send_to_group(&conversation, "after", "g-2").await;
    loop {
        let frame = alice.recv().await;
        assert_ne!(
            frame["type"], "receipt",
            "a confirmed receipt came again: {frame}"
        );
        if frame["type"] == "message" {
            break;
        }
    }
}

#[tokio::test]
async fn g8_the_senders_other_devices_see_the_message_too() {
    let gw = start(|_| {}).await;
    let mut phone = gw.connect_device("alice", "phone").await;
    let mut laptop = gw.connect_device("alice", "laptop").await;
    let mut bob = gw.connect("bob").await;
    let sent = phone.send_message("bob", "from my phone", "c-1").await;
    let echo = laptop.recv_type("message").await;
    assert_eq!(echo["message_id"], sent["message_id"]);
    assert_eq!(
        (echo["from"].as_str(), echo["body"].as_str()),
        (Some("alice"), Some("from my phone"))
    );
    let first = bob.recv_type("message").await;
    bob.send(json!({"type":"ack","message_ids":[first["message_id"]]}))
        .await;
    bob.barrier().await;
    // The sending device gets `sent`, not its own message back.
    assert!(phone.barrier().await.iter().all(|f| f["type"] != "message"));

    // Both of bob's devices get messages to bob; one device's ack is enough.
    let mut bob_tablet = gw.connect_device("bob", "tablet").await;
    let second = phone.send_message("bob", "to every device", "c-2").await;
    let on_phone = bob.recv_type("message").await;
    assert_eq!(on_phone["message_id"], second["message_id"]);
    // The tablet may get the first message again before it: the ack is applied by the
    // dispatcher after the log takes it, and the tablet's replay may read the queue first
    // ("until the ack lands, the same message can arrive again on reconnect").
    let mut on_tablet = bob_tablet.recv_type("message").await;
    if on_tablet["message_id"] == first["message_id"] {
        on_tablet = bob_tablet.recv_type("message").await;
    }
    assert_eq!(on_tablet["message_id"], second["message_id"]);
}

/// Reads your writes: once `sent` is answered, the message is in history on every
/// gateway; once a recipient got it, it is in the recipient's history too.
#[tokio::test]
async fn g9_history_includes_a_message_once_it_is_sent_or_received_on_every_gateway() {
    let gw = start(|_| {}).await;
    // In a cluster: phone and bob on one gateway, laptop on the other.
    let mut phone = gw.connect_device("alice", "phone").await;
    let mut laptop = gw.connect_device("alice", "laptop").await;
    let mut bob = gw.connect("bob").await;
    let history =
        |n: usize| json!({"type":"history","ref":n,"conversation":"dm:alice:bob","limit":100});
    for n in 0..20 {
        let sent = phone
            .send_message("bob", &format!("m{n}"), &format!("c{n}"))
            .await;
        laptop.send(history(n)).await;
        // The laptop also gets the message itself (guarantee 8), before or after.
        let listed = loop {
            let frame = laptop.recv_type_of(&["history", "message"]).await;
            if frame["type"] == "history" {
                break frame;
            }
        };
        assert!(
            ids(listed["messages"].as_array().expect("messages")).contains(&sent["message_id"]),
            "round {n}: the other device's history misses what was sent: {listed}"
        );
        let got = bob.recv_type("message").await;
        assert_eq!(got["message_id"], sent["message_id"]);
        bob.send(history(n)).await;
        let listed = bob.recv_type("history").await;
        assert!(
            ids(listed["messages"].as_array().expect("messages")).contains(&sent["message_id"]),
            "round {n}: the recipient's history misses what it received: {listed}"
        );
        bob.send(json!({"type":"ack","message_ids":[got["message_id"]]}))
            .await;
    }
}

/// A receipt is kept until a device of its recipient confirms it (`ack` with
/// `receipt_ids`): pushed live, and again on every connect until then, so that one pushed
/// to a connection (or a node) that died in that instant is not lost.
#[tokio::test]
async fn g6_a_receipt_comes_again_on_every_connect_until_confirmed() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect_device("alice", "phone").await;
    let mut bob = gw.connect("bob").await;
    let sent = alice.send_message("bob", "hi", "c1").await;
    let got = bob.recv_type("message").await;
    bob.send(json!({"type":"ack","message_ids":[got["message_id"]]}))
        .await;
    let live = alice.recv_type("receipt").await;
    assert_eq!(
        (&live["message_id"], live["status"].as_str()),
        (&sent["message_id"], Some("delivered"))
    );
    assert!(
        live["receipt_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{live}"
    );

    // Not confirmed: the next connection gets it again, with the same id.
    alice.close().await;
    let mut alice = gw.connect_device("alice", "phone").await;
    let again = alice.recv_type("receipt").await;
    assert_eq!(again["receipt_id"], live["receipt_id"]);
    assert_eq!(again["message_id"], sent["message_id"]);
    alice
        .send(json!({"type":"ack","receipt_ids":[again["receipt_id"]]}))
        .await;
    assert!(alice.barrier().await.is_empty(), "the ack is not answered");
    alice.close().await;

    // Confirmed: gone, for every device of alice. A message from bob comes after the
    // replay, and no receipt before it.
    let mut laptop = gw.connect_device("alice", "laptop").await;
    bob.send_message("alice", "after", "b1").await;
    loop {
        let frame = laptop.recv().await;
        assert_ne!(
            frame["type"], "receipt",
            "a confirmed receipt came again: {frame}"
        );
        if frame["type"] == "message" {
            break;
        }
    }
}

/// Two devices of a recipient acking one message at once produce one `delivered` receipt
/// (in a cluster the devices sit on different gateways).
#[tokio::test]
async fn g6_two_devices_acking_at_once_produce_one_delivered_receipt() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut phone = gw.connect_device("bob", "phone").await;
    let mut tablet = gw.connect_device("bob", "tablet").await;
    let sent = alice.send_message("bob", "hi", "c1").await;
    let on_phone = phone.recv_type("message").await;
    let on_tablet = tablet.recv_type("message").await;
    // Both acks go out before either can have been applied.
    phone
        .send(json!({"type":"ack","message_ids":[on_phone["message_id"]]}))
        .await;
    tablet
        .send(json!({"type":"ack","message_ids":[on_tablet["message_id"]]}))
        .await;
    let first = alice.recv_type("receipt").await;
    assert_eq!(
        (&first["message_id"], first["status"].as_str()),
        (&sent["message_id"], Some("delivered"))
    );
    // A later message's receipt follows the acks in bob's partition: any second receipt
    // for the first message would come before it.
    let later = alice.send_message("bob", "later", "c2").await;
    let again = phone.recv_type("message").await;
    phone
        .send(json!({"type":"ack","message_ids":[again["message_id"]]}))
        .await;
    loop {
        let receipt = alice.recv_type("receipt").await;
        if receipt["message_id"] == later["message_id"] {
            break;
        }
        assert_eq!(
            receipt["receipt_id"], first["receipt_id"],
            "a second `delivered` receipt for one message: {receipt}"
        );
    }
}
