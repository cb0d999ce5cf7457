//! What only the embedded backend has to show: durability across reopening the data
//! directory, exclusive use of it, and encryption on disk.

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
            .append(vec![NewMessage {
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
            .append(vec![NewMessage {
                message: old.clone(),
                recipients: vec![],
                client_msg_id: None,
            }])
            .await
            .expect("append");
    }
    let raw = std::fs::read(dir.path().join("store.redb")).expect("read db file");
    assert!(
        !raw.windows(16).any(|w| w == b"the secret plans"),
        "the body is on disk in clear"
    );

    // A new primary key: old rows still decrypt, new rows use the new key.
    let rotated = format!("{}\n{}", key(1, 1), key(2, 2));
    let new = message("after rotation");
    {
        let store = open(dir.path(), KeySource::Inline(rotated))
            .await
            .expect("open");
        assert_eq!(
            store.message(old.id).await.expect("old row"),
            Some(old.clone())
        );
        store
            .append(vec![NewMessage {
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
    assert_eq!(store.message(old.id).await.expect("old row"), Some(old));
    let err = store.message(new.id).await.expect_err("unknown key");
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
        store.message(new.id).await,
        Err(Error::Decrypt(_))
    ));
}

#[tokio::test]
async fn a_claim_is_durable_with_its_message_and_only_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = message("claimed");
    let unappended = Uuid::now_v7();
    {
        let store = open(dir.path(), KeySource::DevGenerated)
            .await
            .expect("open");
        assert_eq!(
            store.claim_send("alice", "c-1", m.id).await.expect("claim"),
            m.id
        );
        // A retry before the message is stored already gets the same id.
        assert_eq!(
            store
                .claim_send("alice", "c-1", Uuid::now_v7())
                .await
                .expect("retry"),
            m.id
        );
        store
            .append(vec![NewMessage {
                message: m.clone(),
                recipients: vec!["bob".into()],
                client_msg_id: Some("c-1".into()),
            }])
            .await
            .expect("append");
        // Claimed, but its message never appended (the sender never got `sent`).
        assert_eq!(
            store
                .claim_send("alice", "c-2", unappended)
                .await
                .expect("claim"),
            unappended
        );
    }
    let store = open(dir.path(), KeySource::DevGenerated)
        .await
        .expect("reopen");
    assert_eq!(
        store
            .claim_send("alice", "c-1", Uuid::now_v7())
            .await
            .expect("after restart"),
        m.id
    );
    let fresh = Uuid::now_v7();
    assert_eq!(
        store
            .claim_send("alice", "c-2", fresh)
            .await
            .expect("after restart"),
        fresh,
        "a claim without its message may be forgotten: no `sent` promised anything"
    );
}
