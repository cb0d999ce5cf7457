//! Migration of a data directory written by an earlier build (schema version 1: one redb
//! file, `store.redb`) into the journal-and-LSM store.
//!
//! The old file is read once, every row is written in the new layout, the new store is
//! synced and marked as migrated, and only then is the old file renamed to
//! `store.redb.migrated` (kept, not deleted, until the operator removes it). An interrupted
//! migration simply runs again: every write is an upsert of the same key.

use std::path::Path;

use fjall::PersistMode;
use redb::{ReadableTable, TableDefinition};

use super::{encode, id_key, key, Db, PendingEntry, SendRecord, StoredMessage, SCHEMA_VERSION};
use crate::error::{Error, Result};

const MESSAGES: TableDefinition<'static, (&str, u128), &[u8]> = TableDefinition::new("messages");
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

/// The old store's file name in the data directory.
const OLD_FILE: &str = "store.redb";
/// Rows written per journal batch during the copy.
const CHUNK: usize = 10_000;
/// Marks a store whose rows came from an old file (so the copy is not done twice).
const MIGRATED: &str = "migrated_from_redb";

fn old(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!(
        "reading the old store ({OLD_FILE}) to migrate it: {e}"
    ))
}

/// Copies `<dir>/store.redb` into `db` if it is there, then renames it.
pub(super) fn from_redb_if_present(dir: &Path, db: &Db) -> Result<()> {
    let path = dir.join(OLD_FILE);
    if !path.exists() {
        return Ok(());
    }
    if db.meta.get(MIGRATED)?.is_none() {
        tracing::warn!(from = %path.display(), "migrating the embedded store to schema version 2, then {SCHEMA_VERSION}");
        let counts = copy(&path, db)?;
        db.meta.insert(MIGRATED, [1u8])?;
        // The copy has version 2's layout; `check_schema` takes it on from there.
        db.meta.insert("schema_version", 2u64.to_be_bytes())?;
        db.database.persist(PersistMode::SyncAll)?;
        tracing::warn!(?counts, "migration copied every row");
    }
    let kept = dir.join(format!("{OLD_FILE}.migrated"));
    std::fs::rename(&path, &kept).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    tracing::warn!(kept = %kept.display(), "the old store file is kept; remove it once the new one has served you well");
    Ok(())
}

/// Rows copied per table, for the log.
#[derive(Debug, Default)]
#[allow(dead_code)] // Read through `Debug` only.
struct Counts {
    messages: usize,
    pending: usize,
    sends: usize,
    receipts: usize,
    markers: usize,
    groups: usize,
}

fn copy(path: &Path, db: &Db) -> Result<Counts> {
    let old_db = redb::Database::open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::Unavailable(format!(
            "{} is already open in another process",
            path.display()
        )),
        other => old(other),
    })?;
    let txn = old_db.begin_read().map_err(old)?;
    let version = txn
        .open_table(META)
        .map_err(old)?
        .get("schema_version")
        .map_err(old)?
        .map(|v| v.value());
    if version != Some(1) {
        return Err(Error::Backend(format!(
            "{} has schema version {version:?}; this build migrates version 1 only",
            path.display()
        )));
    }
    let mut counts = Counts::default();
    let mut batch = db.batch();
    let flush = |batch: &mut fjall::OwnedWriteBatch, force: bool| -> Result<()> {
        if force || batch.len() >= CHUNK {
            std::mem::replace(batch, db.batch()).commit()?;
        }
        Ok(())
    };

    let messages = txn.open_table(MESSAGES).map_err(old)?;
    for row in messages.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        let (conversation, id) = k.value();
        batch.insert(&db.messages, id_key(conversation, id), v.value().to_vec());
        counts.messages += 1;
        flush(&mut batch, false)?;
    }

    let pending = txn.open_table(PENDING).map_err(old)?;
    for row in pending.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        let (user, id) = k.value();
        let conversation = v.value();
        // The new entry also names the sender, which the old one left to the message row.
        let Some(message) = messages.get((conversation, id)).map_err(old)? else {
            continue;
        };
        let stored: StoredMessage = super::decode(message.value())?;
        let entry = encode(&PendingEntry {
            conversation: conversation.to_owned(),
            from: stored.from,
        })?;
        batch.insert(&db.pending, id_key(user, id), entry);
        counts.pending += 1;
        flush(&mut batch, false)?;
    }

    let index = txn.open_table(MESSAGE_CONVERSATION).map_err(old)?;
    let sends = txn.open_table(IDEMPOTENCY).map_err(old)?;
    for row in sends.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        let (sender, cmid) = k.value();
        let (id, created_ms) = v.value();
        // A claim whose message never arrived points nowhere and is left behind.
        let Some(conversation) = index.get(id).map_err(old)? else {
            continue;
        };
        let record = encode(&SendRecord {
            id,
            conversation: conversation.value().to_owned(),
            created_ms,
        })?;
        batch.insert(&db.sends, key(sender, cmid.as_bytes()), record);
        counts.sends += 1;
        flush(&mut batch, false)?;
    }

    let receipts = txn.open_table(RECEIPTS).map_err(old)?;
    for row in receipts.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        let (user, key) = k.value();
        batch.insert(&db.receipts, id_key(user, key), v.value().to_vec());
        counts.receipts += 1;
        flush(&mut batch, false)?;
    }

    let markers = txn.open_table(READ_MARKERS).map_err(old)?;
    for row in markers.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        let (conversation, reader) = k.value();
        batch.insert(
            &db.markers,
            key(conversation, reader.as_bytes()),
            v.value().to_be_bytes(),
        );
        counts.markers += 1;
        flush(&mut batch, false)?;
    }

    let groups = txn.open_table(GROUPS).map_err(old)?;
    for row in groups.iter().map_err(old)? {
        let (k, v) = row.map_err(old)?;
        batch.insert(&db.groups, k.value().to_be_bytes(), v.value().to_vec());
        counts.groups += 1;
        flush(&mut batch, false)?;
    }
    flush(&mut batch, true)?;
    Ok(counts)
}
