//! What only the embedded backend has to show: durability across reopening the data
//! directory, exclusive use of it, encryption on disk, expiry of send records, and the
//! migration of a data directory written by an earlier version.

use storage::crypto::KeySource;
use storage::{
    ts_of, Conversation, EmbeddedConfig, EmbeddedStore, Error, Message, MessageStore, NewMessage,
};
use uuid::Uuid;

fn key(id: u32, byte: u8) -> String {
    format!("{id}:{}", hex_of(byte))
}

fn hex_of(byte: u8) -> String {
    std::iter::repeat_n(format!("{byte:02x}"), 32).collect()
}

async fn open(dir: &std::path::Path, keys: KeySource) -> storage::Result<EmbeddedStore> {
    let mut config = EmbeddedConfig::new(dir);
    config.keys = keys;
    EmbeddedStore::open(config).await
}

fn message(body: &str) -> Message {
    let id = Uuid::now_v7();
    Message {
        id,
        conversation: Conversation::direct("alice", "bob"),
        from: "alice".into(),
        body: body.into(),
        ts: ts_of(id),
        e2ee: None,
        attachments: Vec::new(),
    }
}

#[tokio::test]
async fn data_survives_reopening_and_the_directory_is_exclusive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = message("still here");
    {
        let store = open(dir.path(), KeySource::DevGenerated)
            .await
            .expect("open");
        let busy = open(dir.path(), KeySource::DevGenerated).await;
        assert!(matches!(busy, Err(Error::Unavailable(_))), "{busy:?}");
        store
            .append(&[NewMessage {
                message: m.clone(),
                recipients: vec!["bob".into()],
                client_msg_id: None,
            }])
            .await
            .expect("append");
    }
    let store = open(dir.path(), KeySource::DevGenerated)
        .await
        .expect("reopen");
    assert_eq!(
        store.pending("bob", None, 10).await.expect("pending"),
        vec![m]
    );
}

#[tokio::test]
async fn bodies_are_not_on_disk_in_clear_and_keys_rotate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = message("the secret plans 1234567890");
    {
        let store = open(dir.path(), KeySource::Inline(key(1, 1)))
            .await
            .expect("open");
        store
            .append(&[NewMessage {
                message: old.clone(),
                recipients: vec![],
                client_msg_id: None,
            }])
            .await
            .expect("append");
    }
    let files = files_under(&dir.path().join("store"));
    assert!(!files.is_empty());
    for file in files {
        let raw = std::fs::read(&file).expect("read a store file");
        assert!(
            !raw.windows(16).any(|w| w == b"the secret plans"),
            "the body is on disk in clear in {}",
            file.display()
        );
    }

    // A new primary key: old rows still decrypt, new rows use the new key.
    let rotated = format!("{}\n{}", key(1, 1), key(2, 2));
    let new = message("after rotation");
    {
        let store = open(dir.path(), KeySource::Inline(rotated))
            .await
            .expect("open");
        assert_eq!(
            store
                .message(&old.conversation, old.id)
                .await
                .expect("old row"),
            Some(old.clone())
        );
        store
            .append(&[NewMessage {
                message: new.clone(),
                recipients: vec![],
                client_msg_id: None,
            }])
            .await
            .expect("append");
    }

    // Without key 2 the new row is an error naming the key, never garbage.
    let store = open(dir.path(), KeySource::Inline(key(1, 1)))
        .await
        .expect("open");
    assert_eq!(
        store
            .message(&old.conversation, old.id)
            .await
            .expect("old row"),
        Some(old)
    );
    let err = store
        .message(&new.conversation, new.id)
        .await
        .expect_err("unknown key");
    assert!(matches!(err, Error::UnknownKey(_, 2)), "{err}");
    drop(store);

    // A wrong key under the same id fails authentication.
    let store = open(
        dir.path(),
        KeySource::Inline(format!("{}\n{}", key(1, 1), key(2, 3))),
    )
    .await
    .expect("open");
    assert!(matches!(
        store.message(&new.conversation, new.id).await,
        Err(Error::Decrypt(_))
    ));
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn new(message: &Message, client_msg_id: &str) -> NewMessage {
    NewMessage {
        message: message.clone(),
        recipients: vec!["bob".into()],
        client_msg_id: Some(client_msg_id.into()),
    }
}

#[tokio::test]
async fn a_send_record_is_durable_with_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = message("first attempt");
    {
        let store = open(dir.path(), KeySource::DevGenerated)
            .await
            .expect("open");
        let out = store.append(&[new(&first, "c-1")]).await.expect("append");
        assert!(out[0].inserted);
    }
    let store = open(dir.path(), KeySource::DevGenerated)
        .await
        .expect("reopen");
    let retry = message("second attempt");
    let out = store.append(&[new(&retry, "c-1")]).await.expect("retry");
    assert_eq!((out[0].id, out[0].inserted), (first.id, false));
    assert_eq!(out[0].pending_for, vec!["bob".to_string()]);
}

#[tokio::test]
async fn send_records_expire_after_their_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EmbeddedConfig::new(dir.path());
    config.idempotency_ttl = std::time::Duration::from_millis(300);
    let store = EmbeddedStore::open(config).await.expect("open");
    let first = message("first");
    store.append(&[new(&first, "c-1")]).await.expect("append");
    // The record's age is what expires it: this wait is the thing under test.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let later = message("a new message under an old key");
    let out = store.append(&[new(&later, "c-1")]).await.expect("append");
    assert_eq!((out[0].id, out[0].inserted), (later.id, true));
}

/// A data directory of schema version 1 (one redb file) is migrated on open: every row is
/// there afterwards, in the new layout, and the old file is kept aside.
#[tokio::test]
async fn a_version_1_data_directory_is_migrated() {
    use redb::TableDefinition;
    const MESSAGES: TableDefinition<'static, (&str, u128), &[u8]> =
        TableDefinition::new("messages");
    const MESSAGE_CONVERSATION: TableDefinition<'static, u128, &str> =
        TableDefinition::new("message_conversation");
    const PENDING: TableDefinition<'static, (&str, u128), &str> = TableDefinition::new("pending");
    const IDEMPOTENCY: TableDefinition<'static, (&str, &str), (u128, u64)> =
        TableDefinition::new("idempotency");
    const RECEIPTS: TableDefinition<'static, (&str, u128), &[u8]> =
        TableDefinition::new("receipt_outbox");
    const READ_MARKERS: TableDefinition<'static, (&str, &str), u128> =
        TableDefinition::new("read_markers");
    const GROUPS: TableDefinition<'static, u128, &[u8]> = TableDefinition::new("groups");
    const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

    #[derive(serde::Serialize)]
    struct StoredMessage {
        from: String,
        sealed: Vec<u8>,
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let keys = storage::crypto::Keyring::parse(&key(1, 7)).expect("keys");
    let m1 = message("from the old store");
    let m2 = message("acked long ago");
    let group = storage::Group {
        id: Uuid::now_v7(),
        name: "old friends".into(),
        members: ["alice", "bob"].into_iter().map(String::from).collect(),
        joined: Default::default(),
    };
    let receipt = storage::Receipt {
        message_id: m2.id,
        conversation: m2.conversation.clone(),
        by: "bob".into(),
        status: storage::ReceiptStatus::Delivered,
        ts: 5,
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    {
        let db = redb::Database::create(dir.path().join("store.redb")).expect("old file");
        let txn = db.begin_write().expect("txn");
        {
            let name = m1.conversation.to_string();
            let mut messages = txn.open_table(MESSAGES).expect("table");
            let mut index = txn.open_table(MESSAGE_CONVERSATION).expect("table");
            for m in [&m1, &m2] {
                let sealed = keys
                    .seal(m.id, &name, &m.from, m.body.as_bytes())
                    .expect("seal");
                let row = postcard::to_stdvec(&StoredMessage {
                    from: m.from.clone(),
                    sealed,
                })
                .expect("encode");
                messages
                    .insert((name.as_str(), m.id.as_u128()), row.as_slice())
                    .expect("insert");
                index.insert(m.id.as_u128(), name.as_str()).expect("insert");
            }
            txn.open_table(PENDING)
                .expect("table")
                .insert(("bob", m1.id.as_u128()), name.as_str())
                .expect("insert");
            txn.open_table(IDEMPOTENCY)
                .expect("table")
                .insert(("alice", "c-old"), (m1.id.as_u128(), now_ms))
                .expect("insert");
            let bytes = postcard::to_stdvec(&receipt).expect("encode");
            txn.open_table(RECEIPTS)
                .expect("table")
                .insert(("alice", Uuid::now_v7().as_u128()), bytes.as_slice())
                .expect("insert");
            txn.open_table(READ_MARKERS)
                .expect("table")
                .insert((name.as_str(), "bob"), m2.id.as_u128())
                .expect("insert");
            let bytes = postcard::to_stdvec(&group).expect("encode");
            txn.open_table(GROUPS)
                .expect("table")
                .insert(group.id.as_u128(), bytes.as_slice())
                .expect("insert");
            txn.open_table(META)
                .expect("table")
                .insert("schema_version", 1)
                .expect("insert");
        }
        txn.commit().expect("commit");
    }

    let store = open(dir.path(), KeySource::Inline(key(1, 7)))
        .await
        .expect("open migrates");
    assert!(!dir.path().join("store.redb").exists());
    assert!(dir.path().join("store.redb.migrated").exists());
    assert_eq!(
        store
            .history(&m1.conversation, None, 10)
            .await
            .expect("history"),
        vec![m2.clone(), m1.clone()]
    );
    assert_eq!(
        store.pending("bob", None, 10).await.expect("pending"),
        vec![m1.clone()]
    );
    let acked = store.ack("bob", &[m1.id], Vec::new()).await.expect("ack");
    assert_eq!(acked.len(), 1);
    assert_eq!(
        acked[0].message.from, "alice",
        "the pending entry names its sender"
    );
    let retry = message("retried after the upgrade");
    let out = store.append(&[new(&retry, "c-old")]).await.expect("retry");
    assert_eq!((out[0].id, out[0].inserted), (m1.id, false));
    assert_eq!(
        store.group(group.id).await.expect("group"),
        Some(group.clone())
    );
    // A receipt kept before notices existed reads as a receipt notice (before the one
    // the ack above kept).
    let kept = store.notices("alice", None, 10).await.expect("notices");
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept[0].1, storage::Notice::Receipt(receipt));
    assert_eq!(
        Some(&kept[1]),
        acked[0]
            .receipt
            .as_ref()
            .map(|(id, r)| (*id, storage::Notice::Receipt(r.clone())))
            .as_ref()
    );
    // Inboxes were filled from the messages and groups (schema version 3).
    for user in ["alice", "bob"] {
        let inbox = store.conversations(user, None, 10).await.expect("inbox");
        let listed: Vec<_> = inbox
            .iter()
            .map(|e| (e.conversation.clone(), e.activity))
            .collect();
        let mut expected = vec![
            (m1.conversation.clone(), m2.id),
            (group.conversation(), group.id),
        ];
        expected.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
        assert_eq!(listed, expected, "{user}'s inbox");
    }
    assert!(
        store
            .mark_read("bob", &m1.conversation, m2.id)
            .await
            .expect("read")
            .is_empty(),
        "the read marker came along"
    );
    drop(store);
    // Opening again does not migrate again.
    open(dir.path(), KeySource::Inline(key(1, 7)))
        .await
        .expect("reopen");
}
