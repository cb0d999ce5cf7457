//! What a chat client shows after a reload: the inbox (`conversations`), a group's name and
//! members (`group_info` and group notices), and the state of one's own messages
//! (`history` items' `status` and the members' markers). Through real WebSockets, against
//! the embedded gateway or, with `CHAT_TEST_CLUSTER`, the cluster.

mod common;

use common::{start, Client};
use serde_json::{json, Value};

/// Asks for a page of the inbox and returns the answer.
async fn inbox(client: &mut Client, extra: Value) -> Value {
    let mut request = json!({"type":"conversations","ref":"inbox"});
    if let (Some(request), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
        request.extend(extra.clone());
    }
    client.send(request).await;
    let answer = client.recv_type("conversations").await;
    assert_eq!(answer["ref"], "inbox", "{answer}");
    answer
}

fn names(page: &Value) -> Vec<String> {
    page["conversations"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|c| c["conversation"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn marker<'a>(markers: &'a Value, user: &str) -> &'a Value {
    markers
        .as_array()
        .and_then(|all| all.iter().find(|m| m["user"] == user))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn the_inbox_lists_conversations_by_activity_with_last_message_unread_and_markers() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let mut carol = gw.connect("carol").await;
    let mut sent = Vec::new();
    for (i, body) in ["one", "two", "three"].iter().enumerate() {
        sent.push(alice.send_message("bob", body, &format!("a-{i}")).await);
    }
    carol.send_message("alice", "hello alice", "c-1").await;
    alice.recv_type("message").await;
    carol
        .send(json!({"type":"create_group","ref":"g","name":"team","members":["alice","bob"]}))
        .await;
    let group = carol.recv_type("group").await;
    let g = group["conversation"].as_str().expect("group id").to_owned();

    // Latest activity first: the group's creation, carol's message, alice's three.
    let page = inbox(&mut alice, json!({})).await;
    assert_eq!(names(&page), [g.as_str(), "dm:alice:carol", "dm:alice:bob"]);
    assert_eq!(page["more"], false);
    let all = &page["conversations"];
    assert_eq!(
        (&all[0]["name"], &all[0]["members"], &all[0]["last_message"]),
        (
            &json!("team"),
            &json!(["alice", "bob", "carol"]),
            &Value::Null
        )
    );
    assert_eq!(
        all[1]["name"],
        Value::Null,
        "a direct conversation has no name"
    );
    assert_eq!(all[1]["members"], json!(["alice", "carol"]));
    assert_eq!(all[1]["unread"], 1);
    assert_eq!(all[1]["last_message"]["body"], "hello alice");
    assert_eq!(
        all[2]["unread"], 0,
        "alice's own messages are not unread for her"
    );
    assert_eq!(all[2]["last_message"]["message_id"], sent[2]["message_id"]);
    assert_eq!(all[2]["last_message"]["status"], "sent");

    // Paged by activity.
    let first = inbox(&mut alice, json!({"limit": 2})).await;
    assert_eq!((names(&first).len(), &first["more"]), (2, &json!(true)));
    let cursor = first["conversations"][1]["activity"].clone();
    let rest = inbox(&mut alice, json!({"limit": 2, "before": cursor})).await;
    assert_eq!(names(&rest), ["dm:alice:bob"]);
    assert_eq!(rest["more"], false);

    // Bob has three unread; he stores all three and reads up to the second.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(bob.recv_type("message").await["message_id"].clone());
    }
    let page = inbox(&mut bob, json!({})).await;
    assert_eq!(names(&page), [g.as_str(), "dm:alice:bob"]);
    assert_eq!(page["conversations"][1]["unread"], 3);
    bob.send(json!({"type":"ack","message_ids":ids})).await;
    bob.send(json!({"type":"read","conversation":"dm:alice:bob","message_id":ids[1]}))
        .await;
    // Alice hears of both (three delivered receipts and one read), then sees them in her
    // inbox and history.
    let mut statuses = Vec::new();
    while statuses.len() < 4 {
        let receipt = alice.recv_type("receipt").await;
        statuses.push(receipt["status"].as_str().unwrap_or("").to_owned());
    }
    statuses.sort();
    assert_eq!(statuses, ["delivered", "delivered", "delivered", "read"]);
    let page = inbox(&mut bob, json!({})).await;
    assert_eq!(
        page["conversations"][1]["unread"], 1,
        "unread moves with read"
    );
    let page = inbox(&mut alice, json!({})).await;
    let dm = &page["conversations"][2];
    assert_eq!(dm["last_message"]["status"], "delivered");
    let bobs = marker(&dm["markers"], "bob");
    assert_eq!((&bobs["delivered"], &bobs["read"]), (&ids[2], &ids[1]));

    alice
        .send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob"}))
        .await;
    let history = alice.recv_type("history").await;
    let states: Vec<&Value> = history["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| &m["status"]).collect())
        .unwrap_or_default();
    assert_eq!(
        states,
        [&json!("delivered"), &json!("read"), &json!("read")]
    );
    assert_eq!(marker(&history["markers"], "bob")["read"], ids[1]);
    // Bob's history shows alice's messages with no status: only the sender sees one.
    bob.send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob"}))
        .await;
    let history = bob.recv_type("history").await;
    assert!(history["messages"]
        .as_array()
        .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m.get("status").is_none())));

    alice
        .send(json!({"type":"conversations","ref":"bad","limit":0}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
    alice
        .send(json!({"type":"conversations","ref":"bad","before":"yesterday"}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
}

#[tokio::test]
async fn group_ticks_turn_read_only_when_every_member_read() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    alice
        .send(json!({"type":"create_group","ref":"g","name":"trio","members":["bob","carol"]}))
        .await;
    let g = alice.recv_type("group").await["conversation"]
        .as_str()
        .expect("group id")
        .to_owned();
    let sent = alice.send_to_group(&g, "hi both", "g-1").await;
    let message = bob.recv_type("message").await;
    bob.send(json!({"type":"ack","message_ids":[message["message_id"]]}))
        .await;
    bob.send(json!({"type":"read","conversation":g,"message_id":message["message_id"]}))
        .await;
    for _ in 0..2 {
        alice.recv_type("receipt").await;
    }
    let status = |history: &Value| history["messages"][0]["status"].clone();
    alice
        .send(json!({"type":"history","ref":"h","conversation":g}))
        .await;
    assert_eq!(
        status(&alice.recv_type("history").await),
        "sent",
        "carol (offline) has not got it"
    );

    let mut carol = gw.connect("carol").await;
    let message = carol.recv_type("message").await;
    assert_eq!(message["message_id"], sent["message_id"]);
    carol
        .send(json!({"type":"ack","message_ids":[message["message_id"]]}))
        .await;
    alice.recv_type("receipt").await;
    alice
        .send(json!({"type":"history","ref":"h","conversation":g}))
        .await;
    assert_eq!(status(&alice.recv_type("history").await), "delivered");
    carol
        .send(json!({"type":"read","conversation":g,"message_id":message["message_id"]}))
        .await;
    alice.recv_type("receipt").await;
    alice
        .send(json!({"type":"history","ref":"h","conversation":g}))
        .await;
    assert_eq!(status(&alice.recv_type("history").await), "read");
}

#[tokio::test]
async fn group_changes_reach_members_live_and_on_reconnect_until_confirmed() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    alice
        .send(json!({"type":"create_group","ref":"g","name":"plans","members":["bob","dave"]}))
        .await;
    let g = alice.recv_type("group").await["conversation"]
        .as_str()
        .expect("group id")
        .to_owned();
    assert_eq!(bob.group_notice().await["change"], "created");

    // Carol is offline when bob adds her and removes dave.
    bob.send(json!({"type":"add_members","ref":"a","conversation":g,"members":["carol"]}))
        .await;
    bob.recv_type("group").await;
    bob.send(json!({"type":"remove_members","ref":"r","conversation":g,"members":["dave"]}))
        .await;
    bob.recv_type("group").await;

    let mut carol = gw.connect("carol").await;
    let (told, next) = (carol.group_notice().await, carol.group_notice().await);
    assert_eq!(
        (&told["conversation"], &told["by"], &told["added"]),
        (&json!(g), &json!("bob"), &json!(["carol"]))
    );
    assert_eq!(next["removed"], json!(["dave"]));
    assert_eq!(next["members"], json!(["alice", "bob", "carol"]));
    // She can ask for the group, and finds it in her inbox.
    carol
        .send(json!({"type":"group_info","ref":"i","conversation":g}))
        .await;
    let info = carol.recv_type("group").await;
    assert_eq!(
        (&info["ref"], &info["name"], &info["members"]),
        (
            &json!("i"),
            &json!("plans"),
            &json!(["alice", "bob", "carol"])
        )
    );
    assert_eq!(names(&inbox(&mut carol, json!({})).await), [g.as_str()]);

    // Unconfirmed, they come again on the next connect; confirmed, never again.
    carol.close().await;
    let mut carol = gw.connect("carol").await;
    let again = carol.group_notice().await;
    assert_eq!(again["notice_id"], told["notice_id"]);
    let again = carol.group_notice().await;
    assert_eq!(again["notice_id"], next["notice_id"]);
    carol
        .send(json!({"type":"ack","notice_ids":[told["notice_id"], next["notice_id"]]}))
        .await;
    carol.barrier().await;
    carol.close().await;
    let mut carol = gw.connect("carol").await;
    bob.send_to_group(&g, "after", "b-1").await;
    loop {
        let frame = carol.recv().await;
        assert_ne!(
            frame["type"], "group",
            "a confirmed notice came again: {frame}"
        );
        if frame["type"] == "message" {
            break;
        }
    }

    // Dave, removed, was told (on connect) and lost the group from his inbox and its info.
    let mut dave = gw.connect("dave").await;
    let mut changes = Vec::new();
    for _ in 0..2 {
        changes.push(dave.group_notice().await["change"].clone());
    }
    assert_eq!(changes, [json!("created"), json!("members")]);
    assert!(names(&inbox(&mut dave, json!({})).await).is_empty());
    dave.send(json!({"type":"group_info","ref":"i","conversation":g}))
        .await;
    assert_eq!(dave.error().await["code"], "forbidden");
    assert_eq!(alice.recv_type("message").await["body"], "after");
    alice
        .send(json!({"type":"group_info","ref":"i","conversation":"dm:alice:bob"}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
}

#[tokio::test]
async fn empty_bodies_are_refused() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    for (cmid, body) in [("e-1", ""), ("e-2", " \n\t ")] {
        alice
            .send(json!({"type":"send","client_msg_id":cmid,"to":"bob","body":body}))
            .await;
        let refused = alice.error().await;
        assert_eq!(
            (refused["code"].as_str(), refused["client_msg_id"].as_str()),
            (Some("bad_request"), Some(cmid))
        );
    }
    // Nothing was stored.
    alice
        .send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob"}))
        .await;
    assert_eq!(alice.recv_type("history").await["messages"], json!([]));
}
