//! What only the ScyllaDB backend has to show: a keyspace written by schema version 1 keeps
//! working after the upgrade to version 2 (its send records still answer retries, its
//! pending entries still ack and replay), and version 3 fills its inboxes; a failed write is
//! retried whole. Runs on the real CQL node (`TEST_SCYLLA_NODES`).

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use storage::crypto::Keyring;
use storage::{ts_of, Conversation, Message, MessageStore, NewMessage, ScyllaConfig, ScyllaStore};
use uuid::Uuid;

/// The CQL node, or `None` (skipped) when the suite runs without servers; `CI` demands it.
fn nodes() -> Option<String> {
    match std::env::var("TEST_SCYLLA_NODES") {
        Ok(nodes) if !nodes.is_empty() => Some(nodes),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "TEST_SCYLLA_NODES is not set: this suite needs its server (run ./infra/test.sh)"
            )
        }
        _ => {
            eprintln!("skipped: TEST_SCYLLA_NODES is not set (./infra/test.sh starts the servers)");
            None
        }
    }
}

fn keys() -> Keyring {
    Keyring::parse(&format!("1:{}", "cd".repeat(32))).expect("test key")
}

async fn run(session: &Session, cql: &str) {
    let mut statement = scylla::statement::Statement::new(cql);
    statement.set_request_timeout(Some(std::time::Duration::from_secs(60)));
    session
        .query_unpaged(statement, ())
        .await
        .unwrap_or_else(|e| panic!("{cql}: {e}"));
}

/// Schema version 1 as that version's binaries created it, applied an hour ago.
async fn version_1_keyspace(session: &Session, ks: &str) {
    for cql in [
        format!(
            "CREATE KEYSPACE {ks} WITH replication = \
             {{'class': 'NetworkTopologyStrategy', 'replication_factor': 1}}"
        ),
        format!(
            "CREATE TABLE {ks}.schema_migrations (version int PRIMARY KEY, description text, \
             applied_at timestamp)"
        ),
        format!("CREATE TABLE {ks}.schema_lock (id int PRIMARY KEY, owner uuid)"),
        format!(
            "CREATE TABLE {ks}.messages (conversation text, bucket int, id uuid, sender text, \
             sealed blob, PRIMARY KEY ((conversation, bucket), id)) \
             WITH CLUSTERING ORDER BY (id DESC)"
        ),
        format!(
            "CREATE TABLE {ks}.conversation_buckets (conversation text, bucket int, \
             PRIMARY KEY (conversation, bucket)) WITH CLUSTERING ORDER BY (bucket DESC)"
        ),
        format!("CREATE TABLE {ks}.message_index (id uuid PRIMARY KEY, conversation text)"),
        format!(
            "CREATE TABLE {ks}.pending (user text, id uuid, conversation text, \
             PRIMARY KEY (user, id)) WITH CLUSTERING ORDER BY (id ASC)"
        ),
        format!(
            "CREATE TABLE {ks}.idempotency (sender text, cmid text, id uuid, \
             PRIMARY KEY ((sender, cmid)))"
        ),
        format!(
            "CREATE TABLE {ks}.receipt_outbox (user text, key uuid, receipt blob, \
             PRIMARY KEY (user, key)) WITH CLUSTERING ORDER BY (key ASC)"
        ),
        format!(
            "CREATE TABLE {ks}.read_markers (conversation text, reader text, upto uuid, \
             PRIMARY KEY (conversation, reader))"
        ),
        format!("CREATE TABLE {ks}.groups (id uuid PRIMARY KEY, name text, members set<text>)"),
    ] {
        run(session, &cql).await;
    }
    let an_hour_ago = scylla::value::CqlTimestamp(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("ms")
            - 3_600_000,
    );
    session
        .query_unpaged(
            format!(
                "INSERT INTO {ks}.schema_migrations (version, description, applied_at) \
                 VALUES (1, 'initial schema', ?)"
            ),
            (an_hour_ago,),
        )
        .await
        .expect("version row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_keyspace_keeps_working_after_the_upgrade() {
    let Some(nodes) = nodes() else { return };
    let ks = format!("t{}", Uuid::new_v4().simple());
    let session = SessionBuilder::new()
        .known_nodes(nodes.split(','))
        .build()
        .await
        .expect("connect");
    version_1_keyspace(&session, &ks).await;

    // What a version-1 dispatcher left: a message pending for bob, its send record.
    let conversation = Conversation::direct("alice", "bob");
    let name = conversation.to_string();
    let id = Uuid::now_v7();
    let body = "sent before the upgrade";
    let sealed = keys()
        .seal(id, &name, "alice", body.as_bytes())
        .expect("seal");
    let bucket = i32::try_from(ts_of(id) / (10 * 24 * 3600 * 1000)).expect("bucket");
    for (cql, values) in [
        (
            format!("INSERT INTO {ks}.messages (conversation, bucket, id, sender, sealed) VALUES (?, ?, ?, ?, ?)"),
            0,
        ),
        (format!("INSERT INTO {ks}.conversation_buckets (conversation, bucket) VALUES (?, ?)"), 1),
        (format!("INSERT INTO {ks}.pending (user, id, conversation) VALUES (?, ?, ?)"), 2),
        (format!("INSERT INTO {ks}.idempotency (sender, cmid, id) VALUES (?, ?, ?)"), 3),
    ] {
        let result = match values {
            0 => {
                session
                    .query_unpaged(cql, (name.as_str(), bucket, id, "alice", sealed.as_slice()))
                    .await
            }
            1 => session.query_unpaged(cql, (name.as_str(), bucket)).await,
            2 => session.query_unpaged(cql, ("bob", id, name.as_str())).await,
            _ => session.query_unpaged(cql, ("alice", "c-old", id)).await,
        };
        result.expect("version-1 row");
    }
    // And a group nobody wrote in yet.
    let group = Uuid::now_v7();
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.groups (id, name, members) VALUES (?, ?, ?)"),
            (group, "old friends", vec!["alice", "carol"]),
        )
        .await
        .expect("version-1 group");

    let mut config = ScyllaConfig::new(nodes.split(',').map(str::to_owned).collect(), keys());
    config.keyspace = ks.clone();
    config.replication = Some(1);
    let store = ScyllaStore::connect(config)
        .await
        .expect("connect and migrate");

    let old = Message {
        id,
        conversation: conversation.clone(),
        from: "alice".into(),
        body: body.into(),
        ts: ts_of(id),
        e2ee: None,
        attachments: Vec::new(),
    };
    // Schema version 3 filled the inboxes: each conversation for its members, at its
    // latest activity (the group's, its creation).
    let inbox = |user: &'static str| {
        let store = &store;
        async move {
            store
                .conversations(user, None, 10)
                .await
                .expect("inbox")
                .into_iter()
                .map(|e| (e.conversation, e.activity))
                .collect::<Vec<_>>()
        }
    };
    let g = Conversation::Group(group);
    assert_eq!(
        inbox("alice").await,
        vec![(g.clone(), group), (conversation.clone(), id)]
    );
    assert_eq!(inbox("bob").await, vec![(conversation.clone(), id)]);
    assert_eq!(inbox("carol").await, vec![(g, group)]);

    // The pending entry replays, and a retry of the old send is still the old message.
    assert_eq!(
        store.pending("bob", None, 10).await.expect("pending"),
        vec![old.clone()]
    );
    let retry = Message {
        id: Uuid::now_v7(),
        body: "retried after the upgrade".into(),
        ..old.clone()
    };
    let out = store
        .append(&[NewMessage {
            message: retry,
            recipients: vec!["bob".into()],
            client_msg_id: Some("c-old".into()),
        }])
        .await
        .expect("retry");
    assert_eq!((out[0].id, out[0].inserted), (id, false));
    assert_eq!(out[0].pending_for, vec!["bob".to_string()]);
    // An entry without a sender (version 1) still acks with its sender.
    let acked = store.ack("bob", &[id], Vec::new()).await.expect("ack");
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0].message.from, "alice");
    assert!(store
        .pending("bob", None, 10)
        .await
        .expect("pending")
        .is_empty());

    let _ = session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await;
}

/// A TCP proxy to the CQL node that can swallow write batches (CQL v4 frames whose opcode
/// is BATCH) while it passes everything else, so that a write fails between reads that
/// succeed. A swallowed request never reaches the node: the driver times it out.
struct BatchEater {
    addr: std::net::SocketAddr,
    eating: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BatchEater {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let eating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let eat = eating.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let eat = eat.clone();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                tokio::spawn(async move {
                    const BATCH: u8 = 0x0D;
                    let mut header = [0u8; 9];
                    while from_client.read_exact(&mut header).await.is_ok() {
                        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                        let mut body = vec![0u8; len as usize];
                        if from_client.read_exact(&mut body).await.is_err() {
                            break;
                        }
                        if header[4] == BATCH && eat.load(Ordering::SeqCst) {
                            continue;
                        }
                        if to_server.write_all(&header).await.is_err()
                            || to_server.write_all(&body).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        BatchEater { addr, eating }
    }

    fn eat(&self, on: bool) {
        self.eating.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A write that fails is retried whole: the row saying which history bucket holds a
/// conversation's messages is not skipped the second time because the first attempt meant
/// to write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_first_write_failed_is_in_history_after_the_retry() {
    let Some(nodes) = nodes() else { return };
    let node = nodes.split(',').next().expect("a node").to_owned();
    let proxy = BatchEater::start(node.clone()).await;
    let ks = format!("t{}", Uuid::new_v4().simple());
    let mut config = ScyllaConfig::new(vec![proxy.addr.to_string()], keys());
    config.keyspace = ks.clone();
    config.replication = Some(1);
    config.timeout = std::time::Duration::from_secs(1);
    let store = ScyllaStore::connect(config).await.expect("connect");

    let conversation = Conversation::direct("dora", "erin");
    let id = Uuid::now_v7();
    let new = NewMessage {
        message: Message {
            id,
            conversation: conversation.clone(),
            from: "dora".into(),
            body: "the first of its conversation".into(),
            ts: ts_of(id),
            e2ee: None,
            attachments: Vec::new(),
        },
        recipients: vec!["erin".into()],
        client_msg_id: Some("c-1".into()),
    };
    proxy.eat(true);
    let refused = store.append(std::slice::from_ref(&new)).await;
    assert!(refused.is_err(), "a write that never arrived: {refused:?}");
    proxy.eat(false);

    // The dispatcher appends the batch again; the store's breaker may still be open for a
    // moment after the failures, so the retry is repeated until it is let through.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let appended = loop {
        match store.append(std::slice::from_ref(&new)).await {
            Ok(out) => break out,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("retrying the append: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the append never succeeded again: {e}"),
        }
    };
    assert_eq!((appended[0].id, appended[0].inserted), (id, true));
    let history = store
        .history(&conversation, None, 10)
        .await
        .expect("history");
    assert_eq!(
        history.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![id],
        "the message is stored but history cannot find its bucket"
    );

    let session = SessionBuilder::new()
        .known_node(&node)
        .build()
        .await
        .expect("connect");
    let _ = session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await;
}
