//! Every row of the protocol's frame tables, over real WebSocket connections.

mod common;

use common::start;
use serde_json::{json, Value};

fn is_uuid_v7(s: &Value) -> bool {
    s.as_str()
        .and_then(|s| uuid::Uuid::try_parse(s).ok())
        .is_some_and(|u| u.get_version_num() == 7)
}

#[tokio::test]
async fn send_answers_sent_and_the_recipient_gets_message() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let sent = alice.send_message("bob", "hello bob", "c-1").await;
    assert!(is_uuid_v7(&sent["message_id"]), "{sent}");
    assert_eq!(sent["conversation"], "dm:alice:bob");
    assert!(sent["ts"].as_i64().is_some_and(|ts| ts > 1_700_000_000_000));

    let message = bob.recv_type("message").await;
    assert_eq!(
        message,
        json!({
            "type": "message",
            "message_id": sent["message_id"],
            "conversation": "dm:alice:bob",
            "from": "alice",
            "body": "hello bob",
            "ts": sent["ts"],
        })
    );
    // Bob answers by naming the conversation instead of the user.
    bob.send(
        json!({"type":"send","client_msg_id":"b-1","conversation":"dm:bob:alice","body":"hi"}),
    )
    .await;
    let sent = bob.recv_type("sent").await;
    assert_eq!(sent["conversation"], "dm:alice:bob", "normalised name");
    assert_eq!(alice.recv_type("message").await["body"], "hi");
}

#[tokio::test]
async fn ack_gives_the_sender_a_delivered_receipt() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let sent = alice.send_message("bob", "m", "c-1").await;
    let message = bob.recv_type("message").await;
    bob.send(json!({"type":"ack","message_ids":[message["message_id"]]}))
        .await;
    let receipt = alice.recv_type("receipt").await;
    assert_eq!(receipt["message_id"], sent["message_id"]);
    assert_eq!(receipt["conversation"], "dm:alice:bob");
    assert_eq!(receipt["by"], "bob");
    assert_eq!(receipt["status"], "delivered");
    assert!(receipt["ts"].as_i64().is_some());
    // Acking again yields no second receipt: the next frame alice sees is the pong.
    bob.send(json!({"type":"ack","message_ids":[message["message_id"]]}))
        .await;
    bob.barrier().await;
    assert!(alice.barrier().await.is_empty(), "duplicate receipt");
}

#[tokio::test]
async fn read_gives_a_read_receipt_naming_the_message_read() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    alice.send_message("bob", "one", "c-1").await;
    let second = alice.send_message("bob", "two", "c-2").await;
    bob.recv_type("message").await;
    bob.recv_type("message").await;
    bob.send(
        json!({"type":"read","conversation":"dm:alice:bob","message_id":second["message_id"]}),
    )
    .await;
    let receipt = alice.recv_type("receipt").await;
    assert_eq!(receipt["status"], "read");
    assert_eq!(
        receipt["message_id"], second["message_id"],
        "covers every earlier message too"
    );
    assert_eq!(receipt["by"], "bob");

    // Reading a message that is not in the conversation is refused, with the frame's
    // `ref` when it has one; so are bad acks.
    bob.send(json!({"type":"read","ref":"r1","conversation":"dm:alice:bob","message_id":uuid::Uuid::now_v7().to_string()}))
        .await;
    bob.refusal("not_found", json!("r1")).await;
    bob.send(json!({"type":"ack","ref":7,"message_ids":["not an id"]}))
        .await;
    bob.refusal("bad_request", json!(7)).await;
}

#[tokio::test]
async fn typing_reaches_the_other_members_only() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    alice
        .send(json!({"type":"typing","conversation":"dm:alice:bob"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type":"typing","conversation":"dm:alice:bob","user":"alice"})
    );
    assert!(
        alice.barrier().await.is_empty(),
        "the typist does not see their own typing"
    );
    alice
        .send(json!({"type":"typing","ref":"t1","conversation":"dm:bob:carol"}))
        .await;
    alice.refusal("forbidden", json!("t1")).await;

    // At most one a conversation every 2 seconds is relayed; another conversation is
    // relayed meanwhile.
    for _ in 0..5 {
        alice
            .send(json!({"type":"typing","conversation":"dm:alice:bob"}))
            .await;
    }
    let mut carol = gw.connect("carol").await;
    alice
        .send(json!({"type":"typing","conversation":"dm:alice:carol"}))
        .await;
    assert_eq!(carol.recv_type("typing").await["user"], "alice");
    // A message after them is the fence: typing frames are pushed before it is sent.
    alice.send_message("bob", "fence", "fence").await;
    let mut relayed = 0;
    loop {
        let frame = bob.recv().await;
        match frame["type"].as_str() {
            Some("typing") => relayed += 1,
            Some("message") => break,
            _ => {}
        }
    }
    // (One may pass if the test ran slower than the interval.)
    assert!(
        relayed <= 1,
        "{relayed} of 5 typing frames within 2 s were relayed"
    );
}

#[tokio::test]
async fn history_pages_newest_first_with_before_and_limit() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            alice
                .send_message("bob", &format!("m{i}"), &format!("c-{i}"))
                .await["message_id"]
                .clone(),
        );
    }
    // Delivery follows persistence: once bob has every message, history has them too
    // (in a cluster, `sent` comes from Kafka and a dispatcher persists just after).
    for id in &ids {
        assert_eq!(&bob.recv_type("message").await["message_id"], id);
    }
    alice
        .send(json!({"type":"history","ref":"h1","conversation":"dm:alice:bob","limit":3}))
        .await;
    let page = alice.recv_type("history").await;
    assert_eq!(page["ref"], "h1");
    assert_eq!(page["conversation"], "dm:alice:bob");
    assert_eq!(page["more"], true);
    let got: Vec<Value> = page["messages"]
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["message_id"].clone())
        .collect();
    assert_eq!(got, vec![ids[6].clone(), ids[5].clone(), ids[4].clone()]);
    let first = &page["messages"][0];
    assert_eq!(
        (first["from"].as_str(), first["body"].as_str()),
        (Some("alice"), Some("m6"))
    );
    assert!(first["ts"].as_i64().is_some());

    alice.send(json!({"type":"history","ref":2,"conversation":"dm:alice:bob","before":ids[4],"limit":100})).await;
    let page = alice.recv_type("history").await;
    assert_eq!(page["ref"], 2);
    assert_eq!(page["more"], false);
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(4));
    assert_eq!(page["messages"][3]["message_id"], ids[0]);

    // The same for the other reader.
    bob.send(json!({"type":"history","ref":"b","conversation":"dm:alice:bob"}))
        .await;
    let page = bob.recv_type("history").await;
    let all: Vec<Value> = page["messages"]
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["message_id"].clone())
        .collect();
    assert_eq!(all, ids.iter().rev().cloned().collect::<Vec<_>>());

    for bad in [json!(0), json!(101), json!("ten")] {
        alice
            .send(json!({"type":"history","ref":"x","conversation":"dm:alice:bob","limit":bad}))
            .await;
        alice.refusal("bad_request", json!("x")).await;
    }
}

#[tokio::test]
async fn presence_is_sent_now_and_on_every_change() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    alice
        .send(json!({"type":"subscribe_presence","users":["bob"]}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"presence","user":"bob","status":"offline","last_seen":null})
    );

    let phone = gw.connect_device("bob", "phone").await;
    let online = alice.recv().await;
    assert_eq!(
        (online["type"].as_str(), online["status"].as_str()),
        (Some("presence"), Some("online"))
    );
    let laptop = gw.connect_device("bob", "laptop").await;
    phone.close().await;
    // Still online on the laptop: no change is announced.
    assert!(alice.barrier().await.is_empty());
    laptop.close().await;
    let offline = alice.recv().await;
    assert_eq!(offline["status"], "offline");
    assert!(offline["last_seen"].as_i64().is_some(), "{offline}");

    alice
        .send(json!({"type":"subscribe_presence","users":[]}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
    let too_many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    alice
        .send(json!({"type":"subscribe_presence","users":too_many}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
}

/// A user named twice is watched and answered once; `unsubscribe_presence` ends a watch;
/// the limit counts distinct users, so subscribing again to whom one watches is never
/// refused; and refusals carry the frame's `ref`.
#[tokio::test]
async fn presence_subscriptions_count_each_user_once_and_can_be_ended() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    alice
        .send(json!({"type":"subscribe_presence","ref":"s1","users":["bob","carol","bob"]}))
        .await;
    let statuses = alice.barrier().await;
    let mut users: Vec<&str> = statuses.iter().filter_map(|f| f["user"].as_str()).collect();
    users.sort_unstable();
    assert_eq!(users, ["bob", "carol"], "{statuses:?}");

    alice
        .send(json!({"type":"unsubscribe_presence","ref":"u1","users":["bob","dave"]}))
        .await;
    assert!(alice.barrier().await.is_empty());
    let _bob = gw.connect("bob").await;
    let _carol = gw.connect("carol").await;
    let online = alice.recv_type("presence").await;
    assert_eq!(online["user"], "carol", "{online}");
    let rest = alice.barrier().await;
    assert!(
        rest.iter().all(|f| f["type"] != "presence"),
        "bob is no longer watched: {rest:?}"
    );

    // Fill the connection's 5000 watches (carol is one of them).
    let many: Vec<String> = (0..4999).map(|i| format!("u{i}")).collect();
    for chunk in many.chunks(500) {
        alice
            .send(json!({"type":"subscribe_presence","users":chunk}))
            .await;
        let answered = alice.barrier().await;
        assert_eq!(answered.len(), chunk.len(), "{:?}", answered.first());
    }
    // Watched already: accepted, and answered again.
    alice
        .send(json!({"type":"subscribe_presence","users":["carol","u0"]}))
        .await;
    assert_eq!(alice.barrier().await.len(), 2);
    // One more is refused, with the frame's `ref`...
    alice
        .send(json!({"type":"subscribe_presence","ref":"s2","users":["bob"]}))
        .await;
    alice.refusal("bad_request", json!("s2")).await;
    // ...until one is let go.
    alice
        .send(json!({"type":"unsubscribe_presence","users":["u7"]}))
        .await;
    alice
        .send(json!({"type":"subscribe_presence","ref":"s3","users":["bob"]}))
        .await;
    let answered = alice.barrier().await;
    assert_eq!(answered.len(), 1, "{answered:?}");
    assert_eq!(
        (answered[0]["user"].as_str(), answered[0]["status"].as_str()),
        (Some("bob"), Some("online")),
        "{answered:?}"
    );

    alice
        .send(json!({"type":"unsubscribe_presence","ref":"u2","users":[]}))
        .await;
    alice.refusal("bad_request", json!("u2")).await;
}

/// The largest subscription the protocol allows is answered in full: 500 presence frames
/// at once are more than the outbound queue holds (256), and none may be dropped or close
/// the connection.
#[tokio::test]
async fn a_subscription_to_500_users_is_answered_for_each() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let users: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    alice
        .send(json!({"type":"subscribe_presence","users":users}))
        .await;
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < users.len() {
        let frame = alice.recv().await;
        assert_eq!(frame["type"], "presence", "{frame}");
        assert_eq!(frame["status"], "offline", "{frame}");
        answered.insert(frame["user"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(answered, users.into_iter().collect());
    // Still connected: a ping is answered.
    alice.send(json!({"type":"ping","ref":"after"})).await;
    assert_eq!(alice.recv_type("pong").await["ref"], "after");
}

/// A member added to a group sees its messages from then on: not in `history`, not as the
/// inbox's `last_message` or `unread`. Removed and added again, from the new joining.
#[tokio::test]
async fn a_member_added_later_sees_the_group_from_then_on() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut carol = gw.connect("carol").await;
    alice
        .send(json!({"type":"create_group","ref":"g","name":"Plans","members":["bob"]}))
        .await;
    let group = alice.recv_type_of(&["group"]).await;
    let conversation = group["conversation"]
        .as_str()
        .expect("conversation")
        .to_owned();
    let change = |kind: &str, reference: &str| json!({"type":kind,"ref":reference,"conversation":conversation,"members":["carol"]});
    let before = alice
        .send_to_group(&conversation, "a surprise for carol", "b-1")
        .await;
    // Bob reads it: it is read by everyone who will ever see it.
    let mut bob = gw.connect("bob").await;
    let pending = bob.recv_type("message").await;
    assert_eq!(pending["message_id"], before["message_id"]);
    bob.send(json!({"type":"read","conversation":conversation,"message_id":before["message_id"]}))
        .await;
    bob.barrier().await;
    alice.send(change("add_members", "add")).await;
    let added = alice.recv_type_of(&["group"]).await;
    assert_eq!(added["ref"], "add");
    let joined = added["joined"]["carol"].as_str().expect("carol's joining");
    assert!(
        joined > before["message_id"].as_str().unwrap_or("~"),
        "{added}"
    );
    carol.group_notice().await;
    let after = alice
        .send_to_group(&conversation, "welcome carol", "a-1")
        .await;
    assert_eq!(
        carol.recv_type("message").await["message_id"],
        after["message_id"]
    );

    let history = |reference: &str, limit: u64| json!({"type":"history","ref":reference,"conversation":conversation,"limit":limit});
    carol.send(history("h1", 50)).await;
    let page = carol.recv_type("history").await;
    let ids_of = |page: &Value| -> Vec<Value> {
        page["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["message_id"].clone())
            .collect()
    };
    assert_eq!(ids_of(&page), [after["message_id"].clone()], "{page}");
    assert_eq!(page["more"], false, "{page}");
    // A page that ends at the joining says there is no more.
    carol.send(history("h2", 1)).await;
    let page = carol.recv_type("history").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["more"], false, "{page}");
    // Alice, there from the start, sees both.
    alice.send(history("h3", 50)).await;
    let page = alice.recv_type("history").await;
    assert_eq!(
        ids_of(&page),
        [after["message_id"].clone(), before["message_id"].clone()],
        "{page}"
    );
    // Carol, added after it, does not hold up its status.
    assert_eq!(page["messages"][1]["status"], "read", "{page}");

    carol
        .send(json!({"type":"conversations","ref":"inbox"}))
        .await;
    let inbox = carol.recv_type("conversations").await;
    let entry = &inbox["conversations"][0];
    assert_eq!(entry["conversation"], conversation.as_str(), "{inbox}");
    assert_eq!(entry["joined"], json!({"carol": joined}), "{inbox}");
    assert_eq!(
        entry["last_message"]["message_id"], after["message_id"],
        "{inbox}"
    );
    assert_eq!(entry["unread"], 1, "{inbox}");

    // Removed, then added again: from the new joining only.
    alice.send(change("remove_members", "out")).await;
    assert_eq!(alice.recv_type_of(&["group"]).await["ref"], "out");
    carol.group_notice().await;
    let meanwhile = alice
        .send_to_group(&conversation, "carol is out", "m-1")
        .await;
    alice.send(change("add_members", "back")).await;
    assert_eq!(alice.recv_type_of(&["group"]).await["ref"], "back");
    carol.group_notice().await;
    carol.send(history("h4", 50)).await;
    let page = carol.recv_type("history").await;
    assert_eq!(
        page["messages"],
        json!([]),
        "not {meanwhile} nor older: {page}"
    );
    assert_eq!(page["more"], false, "{page}");
}

#[tokio::test]
async fn groups_are_created_changed_and_fan_out() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let mut carol = gw.connect("carol").await;
    alice
        .send(json!({"type":"create_group","ref":"g1","name":"Friends","members":["bob"]}))
        .await;
    let group = alice.recv_type("group").await;
    assert_eq!(group["ref"], "g1");
    assert_eq!(group["name"], "Friends");
    assert_eq!(group["members"], json!(["alice", "bob"]));
    let conversation = group["conversation"]
        .as_str()
        .expect("conversation")
        .to_owned();
    assert!(conversation.starts_with("g:"));
    // Members hear of it.
    let told = bob.group_notice().await;
    assert_eq!(
        (&told["conversation"], &told["change"], &told["by"]),
        (&json!(conversation), &json!("created"), &json!("alice"))
    );
    assert_eq!(
        (&told["name"], &told["members"], &told["added"]),
        (&json!("Friends"), &json!(["alice", "bob"]), &json!(["bob"]))
    );

    alice.send_to_group(&conversation, "hi all", "g-1").await;
    assert_eq!(
        bob.recv_type("message").await["conversation"],
        conversation.as_str()
    );
    carol.send(json!({"type":"send","client_msg_id":"x","conversation":conversation,"body":"let me in"})).await;
    let refused = carol.error().await;
    assert_eq!(
        (refused["code"].as_str(), refused["client_msg_id"].as_str()),
        (Some("forbidden"), Some("x"))
    );

    bob.send(
        json!({"type":"add_members","ref":"a","conversation":conversation,"members":["carol"]}),
    )
    .await;
    let group = bob.recv_type("group").await;
    assert_eq!(
        (group["ref"].as_str(), group["members"].clone()),
        (Some("a"), json!(["alice", "bob", "carol"]))
    );
    let told = carol.group_notice().await;
    assert_eq!(
        (
            &told["change"],
            &told["by"],
            &told["added"],
            &told["removed"]
        ),
        (
            &json!("members"),
            &json!("bob"),
            &json!(["carol"]),
            &json!([])
        )
    );
    alice
        .send_to_group(&conversation, "welcome carol", "g-2")
        .await;
    assert_eq!(carol.recv_type("message").await["body"], "welcome carol");
    assert_eq!(bob.recv_type("message").await["body"], "welcome carol");

    alice.send(json!({"type":"remove_members","ref":"r","conversation":conversation,"members":["bob"]})).await;
    assert_eq!(
        alice.recv_type("group").await["members"],
        json!(["alice", "carol"])
    );
    alice
        .send_to_group(&conversation, "bob is gone", "g-3")
        .await;
    assert_eq!(carol.recv_type("message").await["body"], "bob is gone");
    // The removed member is told too, with the members that remain.
    let told = bob.group_notice().await;
    assert_eq!(
        (&told["removed"], &told["members"]),
        (&json!(["bob"]), &json!(["alice", "carol"]))
    );
    assert!(
        bob.barrier().await.iter().all(|f| f["type"] != "message"),
        "removed members get nothing"
    );
    bob.send(json!({"type":"history","ref":"h","conversation":conversation}))
        .await;
    assert_eq!(bob.error().await["code"], "forbidden");

    // Any member changes the group, and there are no admins: carol removes its creator,
    // then leaves it. A change that changes nothing is answered with the group as it is,
    // and nobody is told.
    carol.send(json!({"type":"add_members","ref":"same","conversation":conversation,"members":["alice"]})).await;
    let group = carol.recv_type("group").await;
    assert_eq!(
        (group["ref"].as_str(), group["members"].clone()),
        (Some("same"), json!(["alice", "carol"]))
    );
    carol.send(json!({"type":"remove_members","ref":"out","conversation":conversation,"members":["alice"]})).await;
    let group = carol.recv_type("group").await;
    assert_eq!(group["members"], json!(["carol"]), "{group}");
    let mut told = Vec::new();
    loop {
        let notice = alice.group_notice().await;
        let removed = notice["removed"] == json!(["alice"]);
        told.push(notice);
        if removed {
            break;
        }
    }
    told.extend(alice.barrier().await);
    let by_carol: Vec<&Value> = told.iter().filter(|n| n["by"] == "carol").collect();
    assert_eq!(by_carol.len(), 1, "{by_carol:?}");
    carol.send(json!({"type":"remove_members","ref":"leave","conversation":conversation,"members":["carol"]})).await;
    let group = carol.recv_type("group").await;
    assert_eq!(
        (group["ref"].as_str(), group["members"].clone()),
        (Some("leave"), json!([]))
    );
    carol
        .send(json!({"type":"group_info","ref":"i","conversation":conversation}))
        .await;
    assert_eq!(carol.error().await["code"], "forbidden");

    let unknown = format!("g:{}", uuid::Uuid::now_v7());
    alice
        .send(json!({"type":"add_members","ref":"u","conversation":unknown,"members":["bob"]}))
        .await;
    assert_eq!(alice.error().await["code"], "not_found");
    alice.send(json!({"type":"add_members","ref":"d","conversation":"dm:alice:bob","members":["carol"]})).await;
    assert_eq!(alice.error().await["code"], "bad_request");
    alice
        .send(json!({"type":"create_group","ref":"long","name":"x".repeat(101),"members":[]}))
        .await;
    alice.refusal("bad_request", json!("long")).await;
    alice
        .send(json!({"type":"create_group","ref":"blank","name":"   ","members":[]}))
        .await;
    let error = alice.error().await;
    assert_eq!(error["ref"], "blank", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("surrounding whitespace"),
        "{error}"
    );
}

#[tokio::test]
async fn group_changes_beyond_the_budget_are_refused_and_change_nothing() {
    let gw = start(|config| {
        config.group_notices_burst = 10;
        config.group_notices_per_sec = 1;
    })
    .await;
    let mut alice = gw.connect("alice").await;
    // Five members told: half the burst.
    alice
        .send(json!({"type":"create_group","ref":"g","name":"five","members":["b","c","d","e"]}))
        .await;
    let group = alice.recv_type("group").await;
    let conversation = group["conversation"].clone();
    // Adding one would tell six: refused whole (the budget refills one a second).
    alice
        .send(json!({"type":"add_members","ref":"add","conversation":conversation,"members":["f"]}))
        .await;
    let refused = alice.error().await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(refused["ref"], "add");
    alice
        .send(json!({"type":"group_info","ref":"i","conversation":conversation}))
        .await;
    assert_eq!(
        alice.recv_type("group").await["members"],
        json!(["alice", "b", "c", "d", "e"])
    );
    // A removal tells the five: what is left of the budget.
    alice
        .send(
            json!({"type":"remove_members","ref":"rm","conversation":conversation,"members":["e"]}),
        )
        .await;
    assert_eq!(
        alice.recv_type("group").await["members"],
        json!(["alice", "b", "c", "d"])
    );
}

#[tokio::test]
async fn ping_answers_pong_with_its_ref() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    alice.send(json!({"type":"ping","ref":"p-1"})).await;
    assert_eq!(alice.recv().await, json!({"type":"pong","ref":"p-1"}));
    alice.send(json!({"type":"ping"})).await;
    assert_eq!(alice.recv().await, json!({"type":"pong"}));
}
