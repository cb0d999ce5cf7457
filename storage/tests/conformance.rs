//! The store conformance suite: every scenario is written once, generic over
//! [`MessageStore`], and instantiated for each backend by `conformance!`.

mod common;

use std::collections::BTreeSet;
use std::future::Future;

use common::server_url;
use storage::{
    ts_of, Conversation, EmbeddedConfig, EmbeddedStore, Error, Group, GroupChange, GroupChangeKind,
    Message, MessageStore, NewMessage, Notice, Receipt, ReceiptStatus, ScyllaConfig, ScyllaStore,
    Store,
};
use uuid::Uuid;

/// Makes a fresh, empty store; the returned guard keeps its resources alive.
trait Backend {
    type Guard;
    fn make() -> impl Future<Output = (Store, Self::Guard)>;

    /// False when the backend's server is not configured here (the suite is skipped,
    /// which `server_url` refuses under CI).
    fn available() -> bool {
        true
    }
}

struct Embedded;

impl Backend for Embedded {
    type Guard = tempfile::TempDir;
    async fn make() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path()))
            .await
            .expect("open embedded store");
        (Store::Embedded(store), dir)
    }
}

struct Scylla;

impl Backend for Scylla {
    type Guard = ();
    async fn make() -> (Store, ()) {
        let nodes = server_url("TEST_SCYLLA_NODES").expect("checked by available()");
        let keys =
            storage::crypto::Keyring::parse(&format!("1:{}", "ab".repeat(32))).expect("test key");
        let mut config = ScyllaConfig::new(nodes.split(',').map(str::to_owned).collect(), keys);
        // Every test its own keyspace on the shared node, replication 1 (one node).
        config.keyspace = format!("t{}", Uuid::new_v4().simple());
        config.replication = Some(1);
        config.consistency = storage::Consistency::LocalQuorum;
        let store = ScyllaStore::connect(config)
            .await
            .expect("connect to the CQL node");
        (Store::Scylla(store), ())
    }

    fn available() -> bool {
        server_url("TEST_SCYLLA_NODES").is_some()
    }
}

fn message(from: &str, conversation: &Conversation, body: &str) -> Message {
    let id = Uuid::now_v7();
    Message {
        id,
        conversation: conversation.clone(),
        from: from.into(),
        body: body.into(),
        ts: ts_of(id),
        e2ee: None,
        attachments: Vec::new(),
    }
}

/// A message sent `days_ago` days ago (its id says when, as every id does).
fn message_days_ago(from: &str, conversation: &Conversation, days_ago: u64) -> Message {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let secs = now - days_ago * 24 * 3600;
    let id = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));
    Message {
        id,
        conversation: conversation.clone(),
        from: from.into(),
        body: format!("{days_ago} days ago"),
        ts: ts_of(id),
        e2ee: None,
        attachments: Vec::new(),
    }
}

fn dm(a: &str, b: &str) -> Conversation {
    Conversation::direct(a, b)
}

async fn append_one<S: MessageStore>(
    store: &S,
    m: &Message,
    recipients: &[&str],
) -> storage::Appended {
    let mut out = store
        .append(&[NewMessage {
            message: m.clone(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            client_msg_id: None,
        }])
        .await
        .expect("append");
    out.pop().expect("one outcome")
}

async fn append_with(
    store: &impl MessageStore,
    m: &Message,
    recipients: &[&str],
    client_msg_id: &str,
) -> storage::Appended {
    let mut out = store
        .append(&[NewMessage {
            message: m.clone(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            client_msg_id: Some(client_msg_id.into()),
        }])
        .await
        .expect("append");
    out.pop().expect("one outcome")
}

async fn retried_sends_resolve_to_the_first<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let first = message("alice", &c, "hello");
    let out = append_with(&store, &first, &["bob"], "c1").await;
    assert_eq!(
        (out.id, &out.conversation, out.inserted),
        (first.id, &c, true)
    );
    // A retry (another proposed id, even another body or conversation) is the first.
    let retry = message("alice", &dm("alice", "carol"), "hello again");
    let out = append_with(&store, &retry, &["bob"], "c1").await;
    assert_eq!(
        (out.id, &out.conversation, out.inserted),
        (first.id, &c, false)
    );
    assert_eq!(out.pending_for, vec!["bob".to_string()], "still pending");
    assert_eq!(out.ts(), first.ts);
    assert_eq!(
        store.history(&c, None, 10).await.expect("history"),
        vec![first.clone()]
    );
    assert!(store
        .history(&dm("alice", "carol"), None, 10)
        .await
        .expect("history")
        .is_empty());
    // The key is per sender.
    let bobs = message("bob", &c, "mine");
    assert!(append_with(&store, &bobs, &["alice"], "c1").await.inserted);
    // Within one call, a later message with the key of an earlier one is the earlier one.
    let (a, b) = (message("alice", &c, "a"), message("alice", &c, "b"));
    let both: Vec<NewMessage> = [&a, &b]
        .into_iter()
        .map(|m| NewMessage {
            message: m.clone(),
            recipients: vec!["bob".into()],
            client_msg_id: Some("c2".into()),
        })
        .collect();
    let out = store.append(&both).await.expect("append");
    assert_eq!(
        out.iter().map(|o| (o.id, o.inserted)).collect::<Vec<_>>(),
        vec![(a.id, true), (a.id, false)]
    );
    assert_eq!(out[1].pending_for, vec!["bob".to_string()]);
    // Once acked, a retry is pending for nobody (it is not delivered again).
    store
        .ack("bob", &[first.id], Vec::new())
        .await
        .expect("ack");
    let late = message("alice", &c, "late retry");
    let out = append_with(&store, &late, &["bob"], "c1").await;
    assert_eq!((out.id, out.inserted), (first.id, false));
    assert!(out.pending_for.is_empty());
}

async fn append_is_idempotent_by_message_id<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let m = message("alice", &c, "hello");
    let first = append_one(&store, &m, &["bob"]).await;
    assert!(first.inserted);
    assert_eq!(first.pending_for, vec!["bob".to_string()]);
    let again = append_one(&store, &m, &["bob"]).await;
    assert!(!again.inserted);
    assert_eq!(
        again.pending_for,
        vec!["bob".to_string()],
        "still pending: a replay may deliver"
    );
    assert_eq!(store.history(&c, None, 10).await.expect("history").len(), 1);
    assert_eq!(
        store.pending("bob", None, 10).await.expect("pending").len(),
        1
    );

    store.ack("bob", &[m.id], Vec::new()).await.expect("ack");
    let replay = append_one(&store, &m, &["bob"]).await;
    assert!(
        replay.pending_for.is_empty(),
        "a replay must not re-queue an acked message"
    );
    assert!(store
        .pending("bob", None, 10)
        .await
        .expect("pending")
        .is_empty());
}

async fn messages_round_trip_decrypted<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let m = message("alice", &c, "héllo ✓ — 64 KiB would do too");
    append_one(&store, &m, &["bob"]).await;
    assert_eq!(store.message(&c, m.id).await.expect("get"), Some(m.clone()));
    assert_eq!(store.message(&c, Uuid::now_v7()).await.expect("get"), None);
    assert_eq!(
        store
            .message(&dm("alice", "carol"), m.id)
            .await
            .expect("get"),
        None,
        "a message is found in its own conversation only"
    );
}

async fn history_pages_newest_first<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let other = dm("alice", "carol");
    let mut sent = Vec::new();
    for i in 0..25 {
        let m = message(
            if i % 2 == 0 { "alice" } else { "bob" },
            &c,
            &format!("m{i}"),
        );
        append_one(&store, &m, &["x"]).await;
        sent.push(m);
    }
    append_one(&store, &message("alice", &other, "elsewhere"), &["carol"]).await;

    let page = store.history(&c, None, 10).await.expect("history");
    let expected: Vec<_> = sent.iter().rev().take(10).cloned().collect();
    assert_eq!(page, expected);

    let before = page.last().expect("non-empty").id;
    let page2 = store.history(&c, Some(before), 10).await.expect("history");
    assert_eq!(
        page2,
        sent.iter()
            .rev()
            .skip(10)
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
    );
    let page3 = store
        .history(&c, Some(page2[9].id), 10)
        .await
        .expect("history");
    assert_eq!(page3.len(), 5);
    assert_eq!(page3.last().map(|m| m.body.as_str()), Some("m0"));
    assert!(store
        .history(&dm("x", "y"), None, 10)
        .await
        .expect("history")
        .is_empty());
}

async fn pending_is_oldest_first_until_acked<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let ms: Vec<_> = (0..5)
        .map(|i| message("alice", &c, &format!("p{i}")))
        .collect();
    for m in &ms {
        append_one(&store, m, &["bob"]).await;
    }
    let all = store.pending("bob", None, 100).await.expect("pending");
    assert_eq!(all, ms);
    let after = store
        .pending("bob", Some(ms[1].id), 2)
        .await
        .expect("pending");
    assert_eq!(after, ms[2..4].to_vec());
    assert!(store
        .pending("alice", None, 100)
        .await
        .expect("pending")
        .is_empty());

    let acked = store
        .ack("bob", &[ms[0].id, ms[3].id, Uuid::now_v7()], Vec::new())
        .await
        .expect("ack");
    let acked_ids: Vec<_> = acked.iter().map(|a| a.message.id).collect();
    assert_eq!(acked_ids, vec![ms[0].id, ms[3].id]);
    assert!(acked
        .iter()
        .all(|a| a.message.from == "alice" && a.message.conversation == c));
    assert!(
        store
            .ack("bob", &[ms[0].id], Vec::new())
            .await
            .expect("ack")
            .is_empty(),
        "acks are idempotent"
    );
    let left: Vec<_> = store
        .pending("bob", None, 100)
        .await
        .expect("pending")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec![ms[1].id, ms[2].id, ms[4].id]);
}

/// Entries the caller knows to be pending (it appended them) are acked and reported like
/// the others.
async fn known_pending_entries_are_acked_like_the_others<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let (m1, m2, m3) = (
        message("alice", &c, "1"),
        message("alice", &c, "2"),
        message("alice", &c, "3"),
    );
    for m in [&m1, &m2, &m3] {
        append_one(&store, m, &["bob"]).await;
    }
    let known = storage::AckedMessage {
        id: m1.id,
        conversation: c.clone(),
        from: "alice".into(),
    };
    let acked = store
        .ack("bob", &[m1.id, m2.id], vec![known])
        .await
        .expect("ack");
    let mut ids: Vec<_> = acked.iter().map(|a| a.message.id).collect();
    ids.sort();
    assert_eq!(ids, vec![m1.id, m2.id]);
    assert!(acked
        .iter()
        .all(|a| a.message.from == "alice" && a.message.conversation == c));
    let left = store.pending("bob", None, 10).await.expect("pending");
    assert_eq!(left, vec![m3]);
}

/// An ack keeps a delivered receipt for the sender of each message it removes (someone
/// else's), in the same write: what it reports is what the sender will find kept.
async fn acks_keep_delivered_receipts_for_the_senders<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let (m1, m2) = (message("alice", &c, "1"), message("alice", &c, "2"));
    let note = message("bob", &c, "to self");
    for m in [&m1, &m2] {
        append_one(&store, m, &["bob"]).await;
    }
    append_one(&store, &note, &["bob"]).await;
    let known = storage::AckedMessage {
        id: m1.id,
        conversation: c.clone(),
        from: "alice".into(),
    };
    let acked = store
        .ack("bob", &[m1.id, m2.id, note.id], vec![known])
        .await
        .expect("ack");
    assert_eq!(acked.len(), 3, "{acked:?}");
    let mut reported = Vec::new();
    for a in &acked {
        match &a.receipt {
            Some((id, receipt)) => {
                assert_eq!(a.message.from, "alice");
                assert_eq!(receipt.message_id, a.message.id);
                assert_eq!(receipt.conversation, c);
                assert_eq!(receipt.by, "bob");
                assert_eq!(receipt.status, ReceiptStatus::Delivered);
                reported.push((*id, Notice::Receipt(receipt.clone())));
            }
            None => assert_eq!(a.message.id, note.id, "only one's own message has none"),
        }
    }
    reported.sort_by_key(|(id, _)| *id);
    assert_eq!(reported.len(), 2);
    let kept = store.notices("alice", None, 100).await.expect("notices");
    assert_eq!(kept, reported);
    assert!(store
        .notices("bob", None, 100)
        .await
        .expect("notices")
        .is_empty());
    // A repeated ack removes nothing, so it keeps nothing more.
    assert!(store
        .ack("bob", &[m1.id, m2.id], Vec::new())
        .await
        .expect("ack again")
        .is_empty());
    assert_eq!(
        store.notices("alice", None, 100).await.expect("notices"),
        reported
    );
}

async fn read_markers_cover_earlier_messages<S: MessageStore>(store: S) {
    let g = Conversation::Group(Uuid::now_v7());
    let a1 = message("alice", &g, "a1");
    let c1 = message("carol", &g, "c1");
    let b1 = message("bob", &g, "b1");
    let a2 = message("alice", &g, "a2");
    for m in [&a1, &c1, &b1, &a2] {
        append_one(&store, m, &[]).await;
    }
    let senders = |receipts: Vec<(String, Uuid, Receipt)>| -> Vec<String> {
        receipts.into_iter().map(|(to, _, _)| to).collect()
    };
    let covered = store.mark_read("bob", &g, b1.id).await.expect("read");
    assert_eq!(
        senders(covered.clone()),
        vec!["alice".to_string(), "carol".to_string()]
    );
    // Each sender's read receipt is kept for it, as returned.
    for (to, id, receipt) in &covered {
        assert_eq!(
            (receipt.message_id, receipt.by.as_str(), receipt.status),
            (b1.id, "bob", ReceiptStatus::Read)
        );
        assert_eq!(
            store.notices(to, None, 10).await.expect("notices"),
            vec![(*id, Notice::Receipt(receipt.clone()))]
        );
    }
    // Moving back or re-reading covers nothing new.
    assert!(store
        .mark_read("bob", &g, c1.id)
        .await
        .expect("read")
        .is_empty());
    assert!(store
        .mark_read("bob", &g, b1.id)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        senders(store.mark_read("bob", &g, a2.id).await.expect("read")),
        vec!["alice".to_string()]
    );
    assert_eq!(
        store
            .notices("alice", None, 10)
            .await
            .expect("notices")
            .len(),
        2,
        "re-reads keep nothing, the further read kept one more"
    );
    let missing = store.mark_read("bob", &g, Uuid::now_v7()).await;
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    let wrong_conversation = store.mark_read("bob", &dm("alice", "bob"), a1.id).await;
    assert!(matches!(wrong_conversation, Err(Error::NotFound(_))));
}

/// Messages weeks apart (different buckets in ScyllaDB): a read covers every message
/// between the reader's marker and what it read, whichever buckets they are in, and a read
/// within the marker's own bucket covers just what came after the marker.
async fn read_markers_cover_messages_across_weeks<S: MessageStore>(store: S) {
    let g = Conversation::Group(Uuid::now_v7());
    let mut sent = Vec::new();
    for (from, days_ago) in [
        ("carol", 45u64),
        ("dan", 30),
        ("erin", 16),
        ("carol", 15),
        ("frank", 1),
        ("gina", 0),
    ] {
        let m = message_days_ago(from, &g, days_ago);
        append_one(&store, &m, &[]).await;
        sent.push(m);
    }
    // Sent now, after gina's (which is in the same second): in her bucket.
    let hana = message("hana", &g, "h");
    let ivan = message("ivan", &g, "i");
    for m in [&hana, &ivan] {
        append_one(&store, m, &[]).await;
    }
    let senders = |receipts: Vec<(String, Uuid, Receipt)>| -> Vec<String> {
        receipts.into_iter().map(|(to, _, _)| to).collect()
    };
    let read = |upto: Uuid| {
        let store = &store;
        let g = g.clone();
        async move { senders(store.mark_read("bob", &g, upto).await.expect("read")) }
    };
    assert_eq!(read(sent[1].id).await, ["carol", "dan"], "no marker yet");
    assert_eq!(
        read(sent[4].id).await,
        ["carol", "erin", "frank"],
        "from a marker 30 days back to yesterday"
    );
    assert_eq!(read(sent[5].id).await, ["gina"]);
    assert_eq!(
        read(ivan.id).await,
        ["hana", "ivan"],
        "within the marker's bucket"
    );
    assert_eq!(
        read(sent[0].id).await,
        Vec::<String>::new(),
        "behind the marker"
    );
}

async fn notices_are_kept_until_dropped<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let receipt = |status| {
        let r = Receipt {
            message_id: Uuid::now_v7(),
            conversation: c.clone(),
            by: "bob".into(),
            status,
            ts: 1,
        };
        (Uuid::now_v7(), Notice::Receipt(r))
    };
    let (r1, r2) = (
        receipt(ReceiptStatus::Delivered),
        receipt(ReceiptStatus::Read),
    );
    // A group change is kept the same way.
    let r3 = (
        Uuid::now_v7(),
        Notice::Group(GroupChange {
            group: Group {
                id: Uuid::now_v7(),
                name: "team".into(),
                members: ["alice", "bob"].into_iter().map(String::from).collect(),
                joined: Default::default(),
            },
            change: GroupChangeKind::Created,
            by: "bob".into(),
            added: vec!["alice".into()],
            removed: vec![],
            ts: 2,
        }),
    );
    let alice = |(id, r): &(Uuid, Notice)| ("alice".to_string(), *id, r.clone());
    let carol_receipt = receipt(ReceiptStatus::Read);
    store
        .push_notices(vec![
            alice(&r1),
            ("carol".into(), carol_receipt.0, carol_receipt.1.clone()),
            alice(&r2),
        ])
        .await
        .expect("push");
    store.push_notices(vec![alice(&r3)]).await.expect("push");
    // Kept again (a retried batch): still once.
    store
        .push_notices(vec![alice(&r1)])
        .await
        .expect("push again");
    let kept = store.notices("alice", None, 100).await.expect("notices");
    assert_eq!(kept, vec![r1.clone(), r2.clone(), r3.clone()]);
    // Paged by id.
    let first = store.notices("alice", None, 2).await.expect("page");
    assert_eq!(first, vec![r1.clone(), r2.clone()]);
    let rest = store.notices("alice", Some(r2.0), 2).await.expect("page");
    assert_eq!(rest, vec![r3.clone()]);
    assert!(store
        .notices("bob", None, 100)
        .await
        .expect("notices")
        .is_empty());
    // Dropped by user and id, in any order; unknown ids are ignored.
    assert_eq!(
        store.notices("carol", None, 100).await.expect("notices"),
        vec![carol_receipt.clone()]
    );
    store
        .drop_notices(&[
            ("alice".into(), r3.0),
            ("carol".into(), carol_receipt.0),
            ("alice".into(), r1.0),
            ("alice".into(), Uuid::now_v7()),
        ])
        .await
        .expect("drop");
    let left = store.notices("alice", None, 100).await.expect("notices");
    assert_eq!(left, vec![r2]);
    assert!(store
        .notices("carol", None, 100)
        .await
        .expect("notices")
        .is_empty());
    store
        .drop_notices(&[("bob".into(), left[0].0)])
        .await
        .expect("drop");
    assert_eq!(
        store
            .notices("alice", None, 100)
            .await
            .expect("notices")
            .len(),
        1,
        "another user's drop leaves alice's notices alone"
    );
}

async fn inboxes_list_conversations_by_latest_activity<S: MessageStore>(store: S) {
    let (ab, ac) = (dm("alice", "bob"), dm("alice", "carol"));
    let group = Group {
        id: Uuid::now_v7(),
        name: "team".into(),
        members: ["alice", "bob", "dave"]
            .into_iter()
            .map(String::from)
            .collect(),
        joined: Default::default(),
    };
    let g = group.conversation();
    let m1 = message("alice", &ab, "to bob");
    append_one(&store, &m1, &["bob"]).await;
    let m2 = message("carol", &ac, "to alice");
    append_one(&store, &m2, &["alice"]).await;
    store.create_group(group.clone()).await.expect("create");
    let listed = |user: &'static str, before: Option<Uuid>, limit: usize| {
        let store = &store;
        async move {
            store
                .conversations(user, before, limit)
                .await
                .expect("conversations")
                .into_iter()
                .map(|e| (e.conversation, e.activity))
                .collect::<Vec<_>>()
        }
    };
    // Latest activity first: the group's creation, then carol's message, then alice's.
    let all = listed("alice", None, 10).await;
    let order: Vec<&Conversation> = all.iter().map(|(c, _)| c).collect();
    assert_eq!(order, vec![&g, &ac, &ab]);
    assert_eq!(all[1].1, m2.id);
    assert_eq!(all[2].1, m1.id);
    // The group is in every member's inbox, and the sender's message in both inboxes.
    assert_eq!(listed("dave", None, 10).await.len(), 1);
    let bobs: Vec<Conversation> = listed("bob", None, 10)
        .await
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert_eq!(bobs, vec![g.clone(), ab.clone()]);
    // Paged by activity.
    let first = listed("alice", None, 2).await;
    assert_eq!(first.len(), 2);
    let rest = listed("alice", Some(first[1].1), 2).await;
    assert_eq!(rest, vec![(ab.clone(), m1.id)]);
    // A new message moves its conversation up; a retry (not inserted) does not.
    let m3 = message("bob", &ab, "back to alice");
    append_one(&store, &m3, &["alice"]).await;
    let top = listed("alice", None, 1).await;
    assert_eq!(top, vec![(ab.clone(), m3.id)]);
    append_one(&store, &m1, &["bob"]).await;
    assert_eq!(listed("alice", None, 1).await, top);
    // The removed lose the group; the others see the change as its latest activity.
    store
        .update_members(group.id, vec!["erin".into()], vec!["dave".into()])
        .await
        .expect("update");
    assert!(listed("dave", None, 10).await.is_empty());
    assert_eq!(listed("erin", None, 10).await.len(), 1);
    assert_eq!(listed("alice", None, 1).await[0].0, g);
    assert!(listed("nobody", None, 10).await.is_empty());
}

async fn markers_say_how_far_members_read_and_stored<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let a1 = message("alice", &c, "a1");
    let a2 = message("alice", &c, "a2");
    let b1 = message("bob", &c, "b1");
    for (m, to) in [(&a1, "bob"), (&a2, "bob"), (&b1, "alice")] {
        append_one(&store, m, &[to]).await;
    }
    assert!(store.markers(&c).await.expect("markers").is_empty());
    // Acks out of order: the delivered marker stays at the newest.
    store.ack("bob", &[a2.id], vec![]).await.expect("ack");
    store.ack("bob", &[a1.id], vec![]).await.expect("ack");
    store.mark_read("bob", &c, a1.id).await.expect("read");
    // Acking one's own message (a note to self, an echo) moves no delivered marker.
    let self_note = message("alice", &c, "note");
    append_one(&store, &self_note, &["alice"]).await;
    store
        .ack("alice", &[self_note.id], vec![])
        .await
        .expect("ack");
    let markers = store.markers(&c).await.expect("markers");
    let bob = markers
        .iter()
        .find(|m| m.user == "bob")
        .expect("bob's marker");
    assert_eq!(bob.delivered, Some(a2.id));
    assert_eq!(bob.read, Some(a1.id));
    assert!(markers
        .iter()
        .filter(|m| m.user == "alice")
        .all(|m| m.delivered.is_none() && m.read.is_none()));
    store.ack("alice", &[b1.id], vec![]).await.expect("ack");
    let markers = store.markers(&c).await.expect("markers");
    let alice = markers
        .iter()
        .find(|m| m.user == "alice")
        .expect("alice's marker");
    assert_eq!((alice.delivered, alice.read), (Some(b1.id), None));
}

async fn groups_and_membership<S: MessageStore>(store: S) {
    let id = Uuid::now_v7();
    let members: BTreeSet<String> = ["alice", "bob"].into_iter().map(String::from).collect();
    let group = Group {
        id,
        name: "friends".into(),
        members,
        joined: Default::default(),
    };
    store.create_group(group.clone()).await.expect("create");
    assert!(matches!(
        store.create_group(group.clone()).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(store.group(id).await.expect("group"), Some(group));
    let updated = store
        .update_members(id, vec!["carol".into(), "dave".into()], vec!["bob".into()])
        .await
        .expect("update");
    let names: Vec<_> = updated.members.iter().map(String::as_str).collect();
    assert_eq!(names, ["alice", "carol", "dave"]);
    // The newcomers joined then, together; the creation's members are not there.
    let joined: Vec<_> = updated.joined.keys().map(String::as_str).collect();
    assert_eq!(joined, ["carol", "dave"]);
    let at = updated.joined["carol"];
    assert_eq!(updated.joined["dave"], at);
    assert!(at > id && at < Uuid::now_v7(), "{at} after {id}");
    assert!(updated.shows("carol", Uuid::now_v7()) && !updated.shows("carol", id));
    assert!(updated.shows("alice", id));
    assert_eq!(store.group(id).await.expect("group"), Some(updated));
    // Adding a member again changes nothing; one removed is forgotten, and joins anew.
    let again = store
        .update_members(id, vec!["carol".into(), "bob".into()], vec!["dave".into()])
        .await
        .expect("update");
    assert_eq!(again.joined["carol"], at);
    assert!(again.joined["bob"] > at, "{:?}", again.joined);
    assert!(!again.joined.contains_key("dave"));
    assert_eq!(store.group(id).await.expect("group"), Some(again));
    assert!(matches!(
        store.update_members(Uuid::now_v7(), vec![], vec![]).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(store.group(Uuid::now_v7()).await.expect("group"), None);
}

async fn groups_are_bounded<S: MessageStore>(store: S) {
    let id = Uuid::now_v7();
    let members = (0..storage::MAX_GROUP_MEMBERS)
        .map(|i| format!("u{i}"))
        .collect();
    store
        .create_group(Group {
            id,
            name: "big".into(),
            members,
            joined: Default::default(),
        })
        .await
        .expect("create");
    let over = store
        .update_members(id, vec!["one-more".into()], vec![])
        .await;
    assert!(matches!(over, Err(Error::Invalid(_))), "{over:?}");
    let unchanged = store.group(id).await.expect("group").expect("exists");
    assert_eq!(unchanged.members.len(), storage::MAX_GROUP_MEMBERS);
}

async fn concurrent_writes_all_land<S: MessageStore + Clone>(store: S) {
    let c = dm("alice", "bob");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let m = message("alice", &c, &format!("c{i}"));
            let out = append_with(&store, &m, &["bob"], &format!("k{i}")).await;
            assert_eq!((out.id, out.inserted), (m.id, true));
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        store
            .pending("bob", None, 1000)
            .await
            .expect("pending")
            .len(),
        200
    );
    assert_eq!(
        store.history(&c, None, 100).await.expect("history").len(),
        100
    );
}

/// Messages weeks apart (different history buckets in ScyllaDB): paging crosses them in
/// order, and each is found by id.
async fn history_pages_across_weeks<S: MessageStore>(store: S) {
    let c = dm("carol", "dan");
    let mut sent = Vec::new();
    for days_ago in [45u64, 30, 16, 15, 1, 0] {
        let m = message_days_ago("carol", &c, days_ago);
        append_one(&store, &m, &["dan"]).await;
        sent.push(m);
    }
    sent.reverse(); // newest first
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(&c, before, 4).await.expect("history");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        before = page.last().map(|m| m.id);
        paged.extend(page);
    }
    assert_eq!(
        paged, sent,
        "every message once, newest first, across buckets"
    );
    for m in &sent {
        assert_eq!(
            store.message(&c, m.id).await.expect("message").as_ref(),
            Some(m)
        );
    }
    let pending = store.pending("dan", None, 100).await.expect("pending");
    let oldest_first: Vec<Message> = sent.iter().rev().cloned().collect();
    assert_eq!(pending, oldest_first);
}

fn keys(tag: &str) -> storage::DeviceKeys {
    storage::DeviceKeys {
        identity_key: format!("identity-{tag}"),
        signing_key: format!("signing-{tag}"),
    }
}

fn one_time(ids: std::ops::Range<u32>) -> Vec<storage::OneTimeKey> {
    ids.map(|i| storage::OneTimeKey {
        id: format!("k{i:03}"),
        key: format!("key-{i}"),
    })
    .collect()
}

async fn device_keys_are_published_listed_and_replaced<S: MessageStore>(store: S) {
    let fallback = storage::OneTimeKey {
        id: "f1".into(),
        key: "fallback".into(),
    };
    let n = store
        .publish_keys(
            "bob",
            "phone",
            keys("a"),
            one_time(0..5),
            Some(fallback.clone()),
        )
        .await
        .expect("publish");
    assert_eq!(n, 5);
    // Ids already there are ignored: the supply grows by the new ones only.
    let n = store
        .publish_keys("bob", "phone", keys("a"), one_time(3..8), None)
        .await
        .expect("publish more");
    assert_eq!(n, 8);
    store
        .publish_keys("bob", "laptop", keys("b"), Vec::new(), None)
        .await
        .expect("second device");
    let listed = store
        .devices(&["bob".into(), "nobody".into()])
        .await
        .expect("devices");
    let names: Vec<&str> = listed.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["laptop", "phone"]);
    assert_eq!(listed[1].keys, keys("a"));
    // A new identity under the same id: the old keys are gone, the new ones count.
    let n = store
        .publish_keys("bob", "phone", keys("c"), one_time(100..102), None)
        .await
        .expect("new identity");
    assert_eq!(n, 2);
    let claimed = store
        .claim_key("bob", "phone")
        .await
        .expect("claim")
        .expect("a device");
    assert_eq!(claimed.device.keys, keys("c"));
    assert!(claimed.key.is_some_and(|k| k.id.starts_with("k10")));
    let (_, plain) = fill_phone_queues(&store).await;
    store.remove_device("bob", "phone").await.expect("remove");
    store
        .remove_device("bob", "phone")
        .await
        .expect("idempotent");
    assert_phone_queue_gone(&store, plain).await;
    let listed = store.devices(&["bob".into()]).await.expect("devices");
    assert_eq!(listed.len(), 1);
    assert_eq!(store.claim_key("bob", "phone").await.expect("claim"), None);
}

/// Something in bob/phone's own queue (an end-to-end encrypted message and a notice), and
/// a message in bob's: (the phone's message, bob's).
async fn fill_phone_queues<S: MessageStore>(store: &S) -> (Message, Message) {
    let mut sealed = message("alice", &dm("alice", "bob"), "");
    sealed.e2ee = Some(storage::E2ee {
        device: "a".into(),
        to: vec![storage::ForDevice {
            user: "bob".into(),
            device: "phone".into(),
            olm: Some(storage::OlmCiphertext {
                kind: 0,
                ciphertext: "c".into(),
            }),
        }],
        group: None,
    });
    append_one(store, &sealed, &["bob/phone"]).await;
    let plain = message("alice", &dm("alice", "bob"), "for every device");
    append_one(store, &plain, &["bob"]).await;
    store
        .push_notices(vec![(
            "bob/phone".into(),
            Uuid::now_v7(),
            Notice::KeysLow { remaining: 1 },
        )])
        .await
        .expect("notice");
    (sealed, plain)
}

/// bob/phone's own queue is empty; bob's still holds `plain`.
async fn assert_phone_queue_gone<S: MessageStore>(store: &S, plain: Message) {
    assert!(store
        .pending("bob/phone", None, 10)
        .await
        .expect("pending")
        .is_empty());
    assert!(store
        .notices("bob/phone", None, 10)
        .await
        .expect("notices")
        .is_empty());
    assert_eq!(
        store.pending("bob", None, 10).await.expect("pending"),
        vec![plain],
        "the user's queue stays"
    );
}

async fn a_new_identity_forgets_what_was_kept_for_the_old_one<S: MessageStore>(store: S) {
    store
        .publish_keys("bob", "phone", keys("a"), one_time(0..3), None)
        .await
        .expect("publish");
    let (sealed, plain) = fill_phone_queues(&store).await;
    // The same identity again (more keys, say): everything stays.
    store
        .publish_keys("bob", "phone", keys("a"), one_time(3..4), None)
        .await
        .expect("renew");
    assert_eq!(
        store.pending("bob/phone", None, 10).await.expect("pending"),
        vec![sealed.clone()]
    );
    assert_eq!(
        store
            .notices("bob/phone", None, 10)
            .await
            .expect("notices")
            .len(),
        1
    );
    // A different one: what only identity a could read goes; the user's queue stays.
    store
        .publish_keys("bob", "phone", keys("b"), Vec::new(), None)
        .await
        .expect("new identity");
    assert_phone_queue_gone(&store, plain).await;
    let listed = store.devices(&["bob".into()]).await.expect("devices");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].keys, keys("b"));
}

async fn one_time_keys_are_claimed_once_then_the_fallback<S: MessageStore + Clone>(store: S) {
    let fallback = storage::OneTimeKey {
        id: "f".into(),
        key: "fallback".into(),
    };
    store
        .publish_keys(
            "bob",
            "phone",
            keys("a"),
            one_time(0..12),
            Some(fallback.clone()),
        )
        .await
        .expect("publish");
    // 20 claims at once for 12 keys.
    let claims = (0..20).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_key("bob", "phone").await })
    });
    let mut handed = BTreeSet::new();
    let mut fallbacks = 0;
    for claim in claims {
        let claimed = claim
            .await
            .expect("task")
            .expect("claim")
            .expect("a device");
        let key = claimed.key.expect("a key");
        if claimed.fallback {
            assert_eq!(key, fallback);
            fallbacks += 1;
        } else {
            assert!(handed.insert(key.id.clone()), "{} handed out twice", key.id);
        }
    }
    assert_eq!(handed.len(), 12);
    assert_eq!(fallbacks, 8);
    let last = store
        .claim_key("bob", "phone")
        .await
        .expect("claim")
        .expect("a device");
    assert_eq!((last.remaining, last.fallback), (0, true));
}

async fn key_supplies_and_device_lists_are_bounded<S: MessageStore>(store: S) {
    store
        .publish_keys("bob", "phone", keys("a"), one_time(0..150), None)
        .await
        .expect("150 keys");
    let refused = store
        .publish_keys("bob", "phone", keys("a"), one_time(150..251), None)
        .await;
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    let claimed = store
        .claim_key("bob", "phone")
        .await
        .expect("claim")
        .expect("a device");
    assert_eq!(claimed.remaining, 149, "a refused upload stored keys");
    for i in 1..storage::MAX_DEVICES_PER_USER {
        store
            .publish_keys("bob", &format!("d{i}"), keys("x"), Vec::new(), None)
            .await
            .expect("a device");
    }
    let refused = store
        .publish_keys("bob", "one-too-many", keys("x"), Vec::new(), None)
        .await;
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    let listed = store.devices(&["bob".into()]).await.expect("devices");
    assert_eq!(listed.len(), storage::MAX_DEVICES_PER_USER);
}

/// An end-to-end encrypted message is pending for each device it is for, acked by each
/// alone, and stored as given (its ciphertexts, no body).
async fn device_queues_hold_encrypted_messages<S: MessageStore>(store: S) {
    let c = dm("alice", "bob");
    let mut m = message("alice", &c, "");
    m.e2ee = Some(storage::E2ee {
        device: "phone".into(),
        to: ["phone", "laptop"]
            .iter()
            .map(|d| storage::ForDevice {
                user: "bob".into(),
                device: (*d).into(),
                olm: Some(storage::OlmCiphertext {
                    kind: 0,
                    ciphertext: format!("ciphertext-for-{d}"),
                }),
            })
            .collect(),
        group: None,
    });
    let queues = m.queues(vec!["bob".into()]);
    assert_eq!(queues, ["bob/phone", "bob/laptop"]);
    let out = store
        .append(&[NewMessage {
            message: m.clone(),
            recipients: queues,
            client_msg_id: Some("e".into()),
        }])
        .await
        .expect("append");
    assert!(out[0].inserted);
    assert_eq!(
        store.pending("bob/phone", None, 10).await.expect("pending"),
        vec![m.clone()]
    );
    assert!(store
        .pending("bob", None, 10)
        .await
        .expect("pending")
        .is_empty());
    assert_eq!(
        store.message(&c, m.id).await.expect("message"),
        Some(m.clone())
    );
    // One device's ack leaves the other's entry; it moves bob's delivered marker.
    let acked = store
        .ack("bob/phone", &[m.id], Vec::new())
        .await
        .expect("ack");
    assert_eq!(acked.len(), 1);
    assert_eq!(
        store
            .pending("bob/laptop", None, 10)
            .await
            .expect("pending")
            .len(),
        1
    );
    let markers = store.markers(&c).await.expect("markers");
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(
        (markers[0].user.as_str(), markers[0].delivered),
        ("bob", Some(m.id))
    );
    // Both users' inboxes have it, under the user.
    for user in ["alice", "bob"] {
        let inbox = store.conversations(user, None, 10).await.expect("inbox");
        assert_eq!(inbox.len(), 1, "{user}: {inbox:?}");
    }
    assert!(store
        .conversations("bob/phone", None, 10)
        .await
        .expect("inbox")
        .is_empty());
}

fn ring(text: &str) -> storage::crypto::Keyring {
    storage::crypto::Keyring::parse(text).expect("test key ring")
}

/// Rotating the at-rest key: every row stays readable while a pass seals the old rows
/// again under the new primary key and new messages keep arriving; afterwards the old key
/// can go, and a second pass finds nothing left to do.
async fn rows_stay_readable_through_a_key_rotation(store: Store) {
    let (k1, k2) = (
        format!("1:{}", "11".repeat(32)),
        format!("2:{}", "22".repeat(32)),
    );
    store.keys().replace_with(&ring(&k1));
    let conversations: Vec<_> = (0..30).map(|i| dm("rota", &format!("peer{i}"))).collect();
    let mut written = Vec::new();
    for round in 0..20 {
        let batch: Vec<NewMessage> = conversations
            .iter()
            .map(|c| NewMessage {
                message: message("rota", c, &format!("{c} #{round}")),
                recipients: Vec::new(),
                client_msg_id: None,
            })
            .collect();
        store.append(&batch).await.expect("append");
        written.extend(batch.into_iter().map(|n| n.message));
    }

    store.keys().replace_with(&ring(&format!("{k1}\n{k2}")));
    let progress = std::sync::Arc::new(storage::Reencryption::default());
    let pass = tokio::spawn({
        let (store, progress) = (store.clone(), progress.clone());
        async move { store.reencrypt(&progress).await }
    });
    let all_readable = |store: Store, expected: Vec<Message>| async move {
        for c in &conversations_of(&expected) {
            let page = store
                .history(c, None, 1000)
                .await
                .expect("history readable");
            let bodies: BTreeSet<_> = page.iter().map(|m| m.body.clone()).collect();
            for m in expected.iter().filter(|m| &m.conversation == c) {
                assert!(
                    bodies.contains(&m.body),
                    "{} lost its body {:?}",
                    m.id,
                    m.body
                );
            }
        }
    };
    // At least once, and for as long as the pass runs.
    let mut checks = 0;
    while checks == 0 || !pass.is_finished() {
        let fresh = message(
            "rota",
            &conversations[checks % 30],
            &format!("during {checks}"),
        );
        append_one(&store, &fresh, &[]).await;
        written.push(fresh);
        all_readable(store.clone(), written.clone()).await;
        checks += 1;
    }
    pass.await.expect("pass task").expect("re-encryption pass");
    let rewritten = progress
        .rewritten
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        rewritten, 600,
        "every row sealed with key 1 was sealed again"
    );
    assert!(progress.scanned.load(std::sync::atomic::Ordering::Relaxed) >= 600);

    // Key 1 retired: everything, old and new, opens with key 2 alone.
    store.keys().replace_with(&ring(&k2));
    all_readable(store.clone(), written.clone()).await;
    let again = storage::Reencryption::default();
    store.reencrypt(&again).await.expect("second pass");
    assert_eq!(
        again.rewritten.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        again.scanned.load(std::sync::atomic::Ordering::Relaxed),
        written.len() as u64
    );
}

fn conversations_of(messages: &[Message]) -> BTreeSet<Conversation> {
    messages.iter().map(|m| m.conversation.clone()).collect()
}

async fn ping_answers<S: MessageStore>(store: S) {
    store.ping().await.expect("ping");
}

/// One test per scenario for one backend.
macro_rules! instantiate {
    ($module:ident => $backend:ident: $($scenario:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if !<super::$backend as Backend>::available() {
                        return;
                    }
                    let (store, _guard) = <super::$backend as Backend>::make().await;
                    super::$scenario(store).await;
                }
            )*
        }
    };
}

/// Every scenario, listed once, against both backends.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        instantiate!(embedded => Embedded: $($scenario),*);
        instantiate!(scylla => Scylla: $($scenario),*);
    };
}

conformance!(
    retried_sends_resolve_to_the_first,
    append_is_idempotent_by_message_id,
    messages_round_trip_decrypted,
    history_pages_newest_first,
    pending_is_oldest_first_until_acked,
    known_pending_entries_are_acked_like_the_others,
    acks_keep_delivered_receipts_for_the_senders,
    read_markers_cover_earlier_messages,
    read_markers_cover_messages_across_weeks,
    notices_are_kept_until_dropped,
    inboxes_list_conversations_by_latest_activity,
    markers_say_how_far_members_read_and_stored,
    groups_and_membership,
    groups_are_bounded,
    concurrent_writes_all_land,
    history_pages_across_weeks,
    device_keys_are_published_listed_and_replaced,
    a_new_identity_forgets_what_was_kept_for_the_old_one,
    one_time_keys_are_claimed_once_then_the_fallback,
    key_supplies_and_device_lists_are_bounded,
    device_queues_hold_encrypted_messages,
    rows_stay_readable_through_a_key_rotation,
    ping_answers,
);
