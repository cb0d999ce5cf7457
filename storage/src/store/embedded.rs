//! The embedded store: an LSM tree with a write-ahead journal (fjall) in the data
//! directory.
//!
//! Every write runs on one writer thread ([`writer::GroupCommit`]): each write commits to
//! the journal and the memtables at once (visible to readers from then on), and one
//! `fdatasync` of the journal then covers every write of the group. A write that needs
//! durability (a message, a group change) resolves only after that sync; a group of acks
//! and kept or dropped receipts only is handed to the operating system (so it
//! survives `kill -9`), not synced, because losing one to a power cut costs a repeated
//! delivery, never a message. Reads run on the
//! blocking pool.
//!
//! Keys are byte strings that sort the way the data is read: `conversation ␀ id` for
//! history, `user ␀ id` for pending queues (user ids and conversation names never contain a
//! zero byte), message ids as 16 big-endian bytes (UUIDv7: time order), each behind an
//! 8-byte hash of its name (`rows.rs`, with the row types).
//!
//! This backend serves a single process; for several gateway nodes use the distributed
//! store.

mod migrate;
mod reclaim;
mod rows;
mod writer;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fjall::compaction::filter::Factory;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};
use uuid::Uuid;

use self::reclaim::Reclaimer;
use self::rows::*;
use self::writer::GroupCommit;
use crate::crypto::{KeySource, Keyring};
use crate::error::{Error, Result};
use crate::model::{
    device_address, user_of, Acked, AckedMessage, Appended, Claimed, Conversation, Device,
    DeviceKeys, Group, InboxEntry, Marker, Message, NewMessage, Notice, OneTimeKey, Receipt,
    ReceiptStatus,
};
use crate::store::{
    check_supply, inbox_page, inbox_users, remember_written, MessageStore, Reencryption,
    StoredThisCall,
};

/// The on-disk format this build writes. Version 1 was a redb file (`store.redb`), which
/// is migrated on first open; 3 added inboxes; 4 added device keys and end-to-end
/// encrypted messages (which builds before it cannot read).
const SCHEMA_VERSION: u64 = 4;
/// Most messages `mark_read` scans to find the senders a read covers.
const READ_SCAN_LIMIT: usize = 10_000;
/// Inbox rows the writer thread remembers as written (about 10 MiB at most).
const INBOX_ROWS_REMEMBERED: usize = 100_000;
/// The store's directory inside the data directory.
const STORE_DIR: &str = "store";

/// Message rows a re-encryption pass reads at a time, and seals again in one commit at
/// most.
const REENCRYPT_PAGE: usize = 512;
/// Memory bounds by default: the block cache, and the memtable of each of the four busy
/// keyspaces before it is flushed (the other seven get an eighth of that). Smaller
/// memtables flush more often, which stalls the writer more often (docs/benchmarks.md).
const DEFAULT_CACHE_BYTES: u64 = 16 << 20;
const DEFAULT_MEMTABLE_BYTES: u64 = 32 << 20;

/// Where and how the embedded store keeps its data.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    pub keys: KeySource,
    /// How long idempotency records are kept (the protocol promises at least 24 hours).
    pub idempotency_ttl: Duration,
    /// The block cache, in bytes.
    pub cache_bytes: u64,
    /// The memtable of each busy keyspace, in bytes; the store holds at most about
    /// `cache_bytes + 4.9 × memtable_bytes` in memory.
    pub memtable_bytes: u64,
}

impl EmbeddedConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            data_dir: data_dir.into(),
            keys: KeySource::DevGenerated,
            idempotency_ttl: Duration::from_secs(48 * 3600),
            cache_bytes: DEFAULT_CACHE_BYTES,
            memtable_bytes: DEFAULT_MEMTABLE_BYTES,
        }
    }
}

/// A cheap-clone handle to the embedded store.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

struct Inner {
    /// Declared before `db` so that it drops first: the writer finishes its last group
    /// while the database is still open.
    writer: GroupCommit<Db>,
    /// Also before `db`: it holds handles to the keyspaces.
    _reclaimer: Reclaimer,
    db: Db,
    path: PathBuf,
    /// Reads running on the blocking pool at once, at most.
    reads: tokio::sync::Semaphore,
}

/// Most reads on the blocking pool at once. A connect storm replays thousands of queues:
/// unbounded, each read in flight held a thread of the pool (up to 512, each with its
/// stack and allocator arena resident), for reads that take microseconds on two cores.
const CONCURRENT_READS: usize = 32;

/// Journal kept at most before every keyspace holding its oldest part is flushed at once
/// (fjall's default; a restart replays at most this much). At 64 MiB that happened every
/// ~20 s at 3,000 msgs/s and stalled the gateway for 100-300 ms; at 512 MiB the busy
/// keyspaces flush one at a time, when their own memtable is full, long before.
const MAX_JOURNAL_BYTES: u64 = 512 << 20;

/// Threads for flushes and compactions: half the cores (at least one, at most four), so
/// that a burst of them leaves the rest to the connections. With two threads on two cores,
/// a flush and the compactions after it took both at once and held messages back for
/// 100-300 ms; with one, the same minute at 3,000 msgs/s had a p99 of 8-10 ms.
fn background_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 4)
}

/// The database and its keyspaces (each an LSM tree of its own, one shared journal).
#[derive(Clone)]
struct Db {
    database: Database,
    messages: Keyspace,
    pending: Keyspace,
    sends: Keyspace,
    receipts: Keyspace,
    markers: Keyspace,
    delivered: Keyspace,
    inbox: Keyspace,
    groups: Keyspace,
    devices: Keyspace,
    one_time_keys: Keyspace,
    meta: Keyspace,
    keys: Keyring,
    idempotency_ttl: Duration,
    /// Inbox rows (`user ␀ conversation`) this process has written, so that each is
    /// written once rather than with every message: a conversation's latest message is
    /// read from `messages` when an inbox is listed. Used by the writer thread only;
    /// cleared when full ([`INBOX_ROWS_REMEMBERED`]).
    inbox_written: Arc<Mutex<HashSet<Vec<u8>>>>,
}

impl Db {
    fn open(path: &std::path::Path, keys: Keyring, config: &EmbeddedConfig) -> Result<Self> {
        let idempotency_ttl = config.idempotency_ttl;
        let ttl_ms = u64::try_from(idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        let big = config.memtable_bytes.max(1 << 20);
        let small = (big / 8).max(1 << 20);
        let database = Database::builder(path)
            .cache_size(config.cache_bytes)
            // The writer thread persists once per group (`sync`); without this every
            // write would also be flushed to the operating system on its own.
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .worker_threads(background_threads())
            .with_compaction_filter_factories(Arc::new(move |keyspace: &str| {
                (keyspace == "sends").then(|| Arc::new(ExpireSends { ttl_ms }) as Arc<dyn Factory>)
            }))
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => Error::Unavailable(format!(
                    "{} is already open in another process",
                    path.display()
                )),
                other => Error::Backend(format!("opening {}: {other}", path.display())),
            })?;
        let open = |name: &str, memtable: u64| {
            database.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable)
                    .manual_journal_persist(true)
            })
        };
        let db = Db {
            messages: open("messages", big)?,
            pending: open("pending", big)?,
            sends: open("sends", big)?,
            receipts: open("receipt_outbox", small)?,
            markers: open("read_markers", small)?,
            delivered: open("delivered_markers", small)?,
            inbox: open("inbox", big)?,
            groups: open("groups", small)?,
            devices: open("devices", small)?,
            one_time_keys: open("one_time_keys", small)?,
            meta: open("meta", small)?,
            database,
            keys,
            idempotency_ttl,
            inbox_written: Arc::default(),
        };
        Ok(db)
    }

    /// Every keyspace, for the thread that frees their flushed memtables.
    fn keyspaces(&self) -> Vec<Keyspace> {
        [
            &self.messages,
            &self.pending,
            &self.sends,
            &self.receipts,
            &self.markers,
            &self.delivered,
            &self.inbox,
            &self.groups,
            &self.devices,
            &self.one_time_keys,
            &self.meta,
        ]
        .into_iter()
        .cloned()
        .collect()
    }

    /// Refuses data written by a newer build; records the version in a new store.
    fn check_schema(&self) -> Result<()> {
        match self.meta.get("schema_version")? {
            None => {
                self.meta
                    .insert("schema_version", SCHEMA_VERSION.to_be_bytes())?;
                self.database.persist(PersistMode::SyncAll)?;
                Ok(())
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION.to_be_bytes() => Ok(()),
            Some(v) if v.as_ref() == 3u64.to_be_bytes() => {
                // Version 4 only added keyspaces, which open empty.
                self.meta
                    .insert("schema_version", SCHEMA_VERSION.to_be_bytes())?;
                self.database.persist(PersistMode::SyncAll)?;
                tracing::warn!("upgraded the embedded store to schema version {SCHEMA_VERSION}");
                Ok(())
            }
            Some(v) if v.as_ref() == 2u64.to_be_bytes() => {
                let conversations = self.fill_inboxes()?;
                self.meta
                    .insert("schema_version", SCHEMA_VERSION.to_be_bytes())?;
                self.database.persist(PersistMode::SyncAll)?;
                tracing::warn!(
                    conversations,
                    "upgraded the embedded store to schema version {SCHEMA_VERSION}: inboxes filled"
                );
                Ok(())
            }
            Some(v) => Err(Error::Backend(format!(
                "the data directory has schema version {:?}, this build knows {SCHEMA_VERSION}: \
                 upgrade the binary or use another data directory",
                v.as_ref()
            ))),
        }
    }

    /// Version 3 added inboxes: each conversation enters its members' inboxes with its
    /// latest message (a group with none, with its creation). Returns how many
    /// conversations there were.
    fn fill_inboxes(&self) -> Result<usize> {
        let mut latest: std::collections::BTreeMap<String, u128> = Default::default();
        for row in self.messages.iter() {
            let key = row.key()?;
            let id = id_of(&key)?;
            let name = name_of(&key)?;
            let at = latest.entry(name.to_owned()).or_default();
            *at = (*at).max(id);
        }
        let mut groups = HashMap::new();
        for row in self.groups.iter() {
            let group = decode_group(&row.value()?)?;
            latest
                .entry(group.conversation().to_string())
                .or_insert(group.id.as_u128());
            groups.insert(group.id, group.members);
        }
        let mut batch = self.batch();
        for (name, activity) in &latest {
            let members: Vec<String> = match parse_conversation(name)? {
                Conversation::Direct(a, b) => vec![a, b],
                Conversation::Group(id) => groups
                    .get(&id)
                    .map(|m| m.iter().cloned().collect())
                    .unwrap_or_default(),
            };
            for member in members {
                batch.insert(
                    &self.inbox,
                    key(&member, name.as_bytes()),
                    activity.to_be_bytes(),
                );
            }
        }
        batch.commit()?;
        Ok(latest.len())
    }

    /// Puts a group in users' inboxes with `activity` as its latest, unless they have a
    /// later one there already.
    fn touch_inboxes<'a>(
        &self,
        batch: &mut OwnedWriteBatch,
        conversation: &str,
        users: impl IntoIterator<Item = &'a String>,
        activity: u128,
    ) -> Result<()> {
        for user in users {
            let key = key(user, conversation.as_bytes());
            let newer = self
                .inbox
                .get(&key)?
                .map(|v| id_value(&v))
                .transpose()?
                .is_some_and(|at| at > activity);
            if !newer {
                batch.insert(&self.inbox, key, activity.to_be_bytes());
            }
        }
        Ok(())
    }

    fn batch(&self) -> OwnedWriteBatch {
        self.database.batch()
    }

    /// Removes, in `batch`, what is kept for one device (`user/device`): its one-time
    /// keys, its pending end-to-end encrypted messages and its kept notices.
    fn forget_device_queue(&self, batch: &mut OwnedWriteBatch, device: &str) -> Result<()> {
        let queue = key(device, &[]);
        for keyspace in [&self.one_time_keys, &self.pending, &self.receipts] {
            for row in keyspace.prefix(&queue) {
                batch.remove(keyspace, row.key()?.to_vec());
            }
        }
        Ok(())
    }

    /// The inbox rows this process has written ([`Db::inbox_written`]).
    fn inbox_written(&self) -> std::sync::MutexGuard<'_, HashSet<Vec<u8>>> {
        self.inbox_written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of a conversation's newest message.
    fn latest_message(&self, conversation: &str) -> Result<Option<u128>> {
        let newest = self
            .messages
            .range(id_key(conversation, 0)..=id_key(conversation, u128::MAX))
            .next_back();
        newest.map(|row| id_of(&row.key()?)).transpose()
    }

    /// Keeps a receipt for `to` under `id`, in `batch` (with the ack or read marker that
    /// made it).
    fn keep_receipt(
        &self,
        batch: &mut OwnedWriteBatch,
        to: &str,
        id: Uuid,
        receipt: &Receipt,
    ) -> Result<()> {
        let notice = Notice::Receipt(receipt.clone()).to_stored()?;
        batch.insert(&self.receipts, id_key(to, id.as_u128()), notice);
        Ok(())
    }

    fn sync(&self, durable: bool) -> Result<()> {
        let mode = if durable {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        self.database.persist(mode).map_err(backend)
    }

    /// The message a `(sender, client_msg_id)` already stored, unless expired.
    fn send_record(&self, sender: &str, client_msg_id: &str) -> Result<Option<SendRecord>> {
        let Some(value) = self.sends.get(key(sender, client_msg_id.as_bytes()))? else {
            return Ok(None);
        };
        let record: SendRecord = decode(&value)?;
        let ttl_ms = u64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
        Ok((record.created_ms.saturating_add(ttl_ms) >= now_ms()).then_some(record))
    }

    fn load(&self, conversation: &str, id: u128) -> Result<Option<Message>> {
        let Some(row) = self.messages.get(id_key(conversation, id))? else {
            return Ok(None);
        };
        let stored: StoredMessage = decode(&row)?;
        self.keys
            .open_message(
                Uuid::from_u128(id),
                conversation,
                stored.from,
                &stored.sealed,
            )
            .map(Some)
    }
}

impl EmbeddedStore {
    /// The key ring the store seals and opens message bodies with.
    pub fn keys(&self) -> &Keyring {
        &self.inner.db.keys
    }

    /// Opens (creating if needed) the store in `config.data_dir`, migrating a store of an
    /// earlier version found there. Fails with a clear message if another process has it
    /// open.
    pub async fn open(config: EmbeddedConfig) -> Result<Self> {
        tokio::task::spawn_blocking(move || Self::open_blocking(config))
            .await
            .map_err(|e| Error::Backend(format!("opening the embedded store: {e}")))?
    }

    fn open_blocking(config: EmbeddedConfig) -> Result<Self> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let keys = Keyring::load(&config.keys, dir)?;
        let path = dir.join(STORE_DIR);
        let db = Db::open(&path, keys.clone(), &config)?;
        migrate::from_redb_if_present(dir, &db)?;
        db.check_schema()?;
        let writer = GroupCommit::start("store-writer", db.clone(), Db::sync)?;
        let reclaimer = Reclaimer::start(db.keyspaces())?;
        tracing::info!(path = %path.display(), primary_key = keys.primary(), "embedded store open");
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                writer,
                _reclaimer: reclaimer,
                db,
                path,
                reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            }),
        })
    }

    /// Runs `f` on the writer thread (see the module doc); `durable` writes resolve after
    /// the group's sync.
    async fn write<T, F>(&self, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        self.inner.writer.run(durable, f).await
    }

    /// Runs `f` on the blocking pool (at most [`CONCURRENT_READS`] at once).
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        let _permit = self
            .inner
            .reads
            .acquire()
            .await
            .map_err(|e| Error::Backend(format!("embedded store reads: {e}")))?;
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| Error::Backend(format!("embedded store read task: {e}")))?
    }
}

/// A message sealed and encoded on the caller's task, so the writer thread only writes
/// (its body is in the sealed record, which travels beside it).
struct SealedRow {
    new: NewMessage,
    id: u128,
    name: String,
    pending: Vec<u8>,
}

impl MessageStore for EmbeddedStore {
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        let keys = &self.inner.db.keys;
        let mut rows = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for new in batch {
            let message = &new.message;
            let name = message.conversation.to_string();
            let sealed = keys.seal(message.id, &name, &message.from, &message.content()?)?;
            let pending = encode(&PendingEntry {
                conversation: name.clone(),
                from: message.from.clone(),
            })?;
            let record = encode(&StoredMessage {
                from: message.from.clone(),
                sealed,
            })?;
            // What the writer thread needs of the message, the body aside (it is sealed).
            let new = NewMessage {
                message: message.clone_header(),
                recipients: new.recipients.clone(),
                client_msg_id: new.client_msg_id.clone(),
            };
            rows.push(SealedRow {
                id: message.id.as_u128(),
                name,
                pending,
                new,
            });
            records.push(record);
        }
        self.write(true, move |db| {
            let mut batch = db.batch();
            let mut outcomes = Vec::with_capacity(rows.len());
            let mut this_call = StoredThisCall::default();
            let mut inbox_rows = HashSet::new();
            let mut inbox_written = db.inbox_written();
            for (row, record) in rows.iter().zip(records) {
                if let Some(outcome) = this_call.earlier(&row.new) {
                    outcomes.push(outcome);
                    continue;
                }
                let new = &row.new;
                let earlier = match &new.client_msg_id {
                    Some(cmid) => db
                        .send_record(&new.message.from, cmid)?
                        .map(|r| Ok::<_, Error>((r.id, parse_conversation(&r.conversation)?)))
                        .transpose()?,
                    None => db
                        .messages
                        .contains_key(id_key(&row.name, row.id))?
                        .then(|| (row.id, new.message.conversation.clone())),
                };
                if let Some((id, conversation)) = earlier {
                    let mut still = Vec::new();
                    for user in &new.recipients {
                        if db.pending.contains_key(id_key(user, id))? {
                            still.push(user.clone());
                        }
                    }
                    outcomes.push(Appended {
                        id: Uuid::from_u128(id),
                        conversation,
                        inserted: false,
                        pending_for: still,
                    });
                    continue;
                }
                batch.insert(&db.messages, id_key(&row.name, row.id), record);
                for user in &new.recipients {
                    // Written once per (user, message) and removed once by its ack: a
                    // weak tombstone then suffices (see `ack`).
                    batch.insert(&db.pending, id_key(user, row.id), row.pending.clone());
                }
                // The conversation in its sender's and recipients' inboxes, once per
                // process: its latest activity is read from its messages when an inbox is
                // listed, and the row's own id (this message's, or a group change's) is a
                // floor under it. Written without reading what is there: only a group
                // change made while this message was on its way can be newer, and it is
                // older by milliseconds at most.
                for user in inbox_users(&new.message.from, &new.recipients) {
                    let inbox_row = key(user, row.name.as_bytes());
                    if !inbox_written.contains(&inbox_row) && inbox_rows.insert(inbox_row.clone()) {
                        batch.insert(&db.inbox, inbox_row, row.id.to_be_bytes());
                    }
                }
                if let Some(cmid) = &new.client_msg_id {
                    let record = encode(&SendRecord {
                        id: row.id,
                        conversation: row.name.clone(),
                        created_ms: now_ms(),
                    })?;
                    batch.insert(&db.sends, key(&new.message.from, cmid.as_bytes()), record);
                }
                this_call.stored(new);
                outcomes.push(Appended {
                    id: Uuid::from_u128(row.id),
                    conversation: new.message.conversation.clone(),
                    inserted: true,
                    pending_for: new.recipients.clone(),
                });
            }
            batch.commit()?;
            // Remembered only once committed: a failed write is retried whole.
            remember_written(&mut inbox_written, inbox_rows, INBOX_ROWS_REMEMBERED);
            Ok(outcomes)
        })
        .await
    }

    async fn message(&self, c: &Conversation, id: Uuid) -> Result<Option<Message>> {
        let conversation = c.to_string();
        self.read(move |db| db.load(&conversation, id.as_u128()))
            .await
    }

    async fn history(
        &self,
        c: &Conversation,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let conversation = c.to_string();
        self.read(move |db| {
            let start = id_key(&conversation, 0);
            let end = id_key(&conversation, before.map_or(u128::MAX, |b| b.as_u128()));
            let mut page = Vec::with_capacity(limit.min(128));
            for row in db.messages.range(start..end).rev().take(limit) {
                let (key, value) = row.into_inner()?;
                let id = id_of(&key)?;
                let stored: StoredMessage = decode(&value)?;
                page.push(db.keys.open_message(
                    Uuid::from_u128(id),
                    &conversation,
                    stored.from,
                    &stored.sealed,
                )?);
            }
            Ok(page)
        })
        .await
    }

    async fn pending(&self, user: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Message>> {
        let user = user.to_owned();
        self.read(move |db| {
            let start = id_key(&user, after.map_or(0, |a| a.as_u128().saturating_add(1)));
            let end = id_key(&user, u128::MAX);
            let mut out = Vec::with_capacity(limit.min(128));
            for row in db.pending.range(start..=end).take(limit) {
                let (key, value) = row.into_inner()?;
                let entry: PendingEntry = decode(&value)?;
                if let Some(message) = db.load(&entry.conversation, id_of(&key)?)? {
                    out.push(message);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Not synced: an ack lost to a power cut only means the message comes again (its
    /// receipts are in the same write, so they are lost with it or kept with it). `known`
    /// entries are removed without reading them: a memtable lookup costs about as much as
    /// the insert that removes the entry (a profile at 4,000 msgs/s showed it).
    async fn ack(&self, user: &str, ids: &[Uuid], known: Vec<AckedMessage>) -> Result<Vec<Acked>> {
        let queue = user.to_owned();
        let ids: Vec<u128> = ids.iter().map(|id| id.as_u128()).collect();
        self.write(false, move |db| {
            // A device's queue moves its user's marker.
            let user = user_of(&queue);
            let mut batch = db.batch();
            let mut acked = Vec::new();
            let mut seen = BTreeSet::new();
            // The newest message acked per conversation (sent by someone else).
            let mut delivered: std::collections::BTreeMap<Conversation, u128> = Default::default();
            let mut take = |key: Vec<u8>, entry: AckedMessage| -> Result<()> {
                // A pending key is written once and deleted once, so a weak tombstone
                // (dropped with the entry when compaction meets them) is enough.
                batch.remove_weak(&db.pending, key);
                let done = Acked::new(entry, &queue);
                if let Some((id, receipt)) = &done.receipt {
                    let at = delivered.entry(receipt.conversation.clone()).or_default();
                    *at = (*at).max(receipt.message_id.as_u128());
                    db.keep_receipt(&mut batch, &done.message.from, *id, receipt)?;
                }
                acked.push(done);
                Ok(())
            };
            // Entries the caller knows to be pending are removed without reading them.
            for entry in known {
                let id = entry.id.as_u128();
                if seen.insert(id) {
                    take(id_key(&queue, id), entry)?;
                }
            }
            for id in ids {
                if !seen.insert(id) {
                    continue;
                }
                let pending_key = id_key(&queue, id);
                let Some(value) = db.pending.get(&pending_key)? else {
                    continue;
                };
                let entry: PendingEntry = decode(&value)?;
                let entry = AckedMessage {
                    id: Uuid::from_u128(id),
                    conversation: parse_conversation(&entry.conversation)?,
                    from: entry.from,
                };
                take(pending_key, entry)?;
            }
            for (conversation, id) in delivered {
                let marker = key(&conversation.to_string(), user.as_bytes());
                let newer = match db.delivered.get(&marker)? {
                    Some(v) => id_value(&v)? >= id,
                    None => false,
                };
                if !newer {
                    batch.insert(&db.delivered, marker, id.to_be_bytes());
                }
            }
            batch.commit()?;
            Ok(acked)
        })
        .await
    }

    async fn mark_read(
        &self,
        reader: &str,
        c: &Conversation,
        upto: Uuid,
    ) -> Result<Vec<(String, Uuid, Receipt)>> {
        let (reader, conversation, c) = (reader.to_owned(), c.to_string(), c.clone());
        self.write(true, move |db| {
            let upto = upto.as_u128();
            if !db.messages.contains_key(id_key(&conversation, upto))? {
                return Err(Error::NotFound(format!(
                    "message {} in {conversation}",
                    Uuid::from_u128(upto)
                )));
            }
            let marker = key(&conversation, reader.as_bytes());
            let previous = db.markers.get(&marker)?.map(|v| id_value(&v)).transpose()?;
            if previous.is_some_and(|p| p >= upto) {
                return Ok(Vec::new());
            }
            let start = id_key(&conversation, previous.map_or(0, |p| p.saturating_add(1)));
            let mut senders = BTreeSet::new();
            for row in db
                .messages
                .range(start..=id_key(&conversation, upto))
                .rev()
                .take(READ_SCAN_LIMIT)
            {
                let stored: StoredMessage = decode(&row.value()?)?;
                if stored.from != reader {
                    senders.insert(stored.from);
                }
            }
            // The receipts in the same write as the marker.
            let mut batch = db.batch();
            let mut receipts = Vec::with_capacity(senders.len());
            for to in senders {
                let (id, receipt) =
                    Receipt::now(Uuid::from_u128(upto), &c, &reader, ReceiptStatus::Read);
                db.keep_receipt(&mut batch, &to, id, &receipt)?;
                receipts.push((to, id, receipt));
            }
            batch.insert(&db.markers, marker, upto.to_be_bytes());
            batch.commit()?;
            Ok(receipts)
        })
        .await
    }

    /// Not waiting for the journal's sync: a receipt or group notice is status, and the
    /// journal survives a crash of the process; the next group commit makes it durable. A
    /// to-device message is content (a key the device cannot get otherwise): synced.
    async fn push_notices(&self, notices: Vec<(String, Uuid, Notice)>) -> Result<()> {
        let durable = notices
            .iter()
            .any(|(_, _, n)| matches!(n, Notice::ToDevice(_)));
        let rows = notices
            .iter()
            .map(|(user, id, n)| Ok((id_key(user, id.as_u128()), n.to_stored()?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(durable, move |db| {
            let mut batch = db.batch();
            for (key, bytes) in rows {
                batch.insert(&db.receipts, key, bytes);
            }
            batch.commit()?;
            Ok(())
        })
        .await
    }

    async fn notices(
        &self,
        user: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Notice)>> {
        let user = user.to_owned();
        self.read(move |db| {
            let from = match after {
                Some(after) => after.as_u128().saturating_add(1),
                None => 0,
            };
            let mut out = Vec::new();
            for row in db
                .receipts
                .range(id_key(&user, from)..=id_key(&user, u128::MAX))
                .take(limit)
            {
                let (key, value) = row.into_inner()?;
                out.push((Uuid::from_u128(id_of(&key)?), Notice::from_stored(&value)?));
            }
            Ok(out)
        })
        .await
    }

    async fn drop_notices(&self, notices: &[(String, Uuid)]) -> Result<()> {
        let keys: Vec<_> = notices
            .iter()
            .map(|(user, id)| id_key(user, id.as_u128()))
            .collect();
        self.write(false, move |db| {
            let mut batch = db.batch();
            for key in keys {
                batch.remove(&db.receipts, key);
            }
            batch.commit()?;
            Ok(())
        })
        .await
    }

    /// The user's whole inbox is read and sorted: one user's conversations are few
    /// enough (thousands at most) for that. Each conversation's activity is the later of
    /// its row's and its newest message's (one reverse seek each).
    async fn conversations(
        &self,
        user: &str,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<InboxEntry>> {
        let prefix = key(user, &[]);
        self.read(move |db| {
            let mut all = Vec::new();
            for row in db.inbox.prefix(&prefix) {
                let (key, value) = row.into_inner()?;
                let name = key
                    .get(prefix.len()..)
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| Error::Backend("a stored inbox key is malformed".into()))?;
                let floor = id_value(&value)?;
                let latest = db.latest_message(name)?.unwrap_or_default();
                all.push(InboxEntry {
                    conversation: parse_conversation(name)?,
                    activity: Uuid::from_u128(floor.max(latest)),
                });
            }
            Ok(inbox_page(all, before, limit))
        })
        .await
    }

    async fn markers(&self, c: &Conversation) -> Result<Vec<Marker>> {
        let prefix = key(&c.to_string(), &[]);
        self.read(move |db| {
            let mut markers: std::collections::BTreeMap<String, Marker> = Default::default();
            for (keyspace, read) in [(&db.markers, true), (&db.delivered, false)] {
                for row in keyspace.prefix(&prefix) {
                    let (key, value) = row.into_inner()?;
                    let user = key
                        .get(prefix.len()..)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| Error::Backend("a stored marker key is malformed".into()))?;
                    let id = Some(Uuid::from_u128(id_value(&value)?));
                    let marker = markers.entry(user.to_owned()).or_insert_with(|| Marker {
                        user: user.to_owned(),
                        ..Marker::default()
                    });
                    if read {
                        marker.read = id;
                    } else {
                        marker.delivered = id;
                    }
                }
            }
            Ok(markers.into_values().collect())
        })
        .await
    }

    async fn create_group(&self, group: Group) -> Result<()> {
        group.check_size()?;
        let bytes = encode_group(&group)?;
        self.write(true, move |db| {
            let key = group.id.as_u128().to_be_bytes();
            if db.groups.contains_key(key)? {
                return Err(Error::Invalid(format!("group {} already exists", group.id)));
            }
            let mut batch = db.batch();
            batch.insert(&db.groups, key, bytes);
            let name = group.conversation().to_string();
            db.touch_inboxes(&mut batch, &name, &group.members, Uuid::now_v7().as_u128())?;
            batch.commit()?;
            Ok(())
        })
        .await
    }

    async fn group(&self, id: Uuid) -> Result<Option<Group>> {
        self.read(move |db| {
            db.groups
                .get(id.as_u128().to_be_bytes())?
                .map(|v| decode_group(&v))
                .transpose()
        })
        .await
    }

    async fn update_members(
        &self,
        id: Uuid,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Group> {
        self.write(true, move |db| {
            let key = id.as_u128().to_be_bytes();
            let mut group = match db.groups.get(key)? {
                Some(row) => decode_group(&row)?,
                None => return Err(Error::NotFound(format!("group g:{id}"))),
            };
            group.change_members(&add, &remove, Uuid::now_v7());
            group.check_size()?;
            let mut batch = db.batch();
            batch.insert(&db.groups, key, encode_group(&group)?);
            let name = group.conversation().to_string();
            // A row removed here may still be remembered as written: nothing re-adds it
            // but a message to its user, and only a member is sent one (re-adding a
            // member writes the row below).
            for member in remove.iter().filter(|m| !group.members.contains(*m)) {
                batch.remove(&db.inbox, self::key(member, name.as_bytes()));
            }
            db.touch_inboxes(&mut batch, &name, &group.members, Uuid::now_v7().as_u128())?;
            batch.commit()?;
            Ok(group)
        })
        .await
    }

    async fn publish_keys(
        &self,
        user: &str,
        device: &str,
        keys: DeviceKeys,
        one_time: Vec<OneTimeKey>,
        fallback: Option<OneTimeKey>,
    ) -> Result<usize> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(true, move |db| {
            let address = device_address(&user, &device);
            let record_key = key(&user, device.as_bytes());
            let old: Option<DeviceRecord> = db
                .devices
                .get(&record_key)?
                .map(|v| decode(&v))
                .transpose()?;
            let devices = db.devices.prefix(key(&user, &[])).count();
            let mut batch = db.batch();
            let mut held: BTreeSet<Vec<u8>> = BTreeSet::new();
            let renewed = old.as_ref().is_some_and(|o| o.keys == keys);
            if renewed {
                for row in db.one_time_keys.prefix(key(&address, &[])) {
                    held.insert(row.key()?.to_vec());
                }
            } else if old.is_some() {
                // A new identity under an old id: what was kept for the old one (its
                // keys, and ciphertexts only it could read) is of no use to the new.
                db.forget_device_queue(&mut batch, &address)?;
            }
            for k in &one_time {
                if held.insert(key(&address, k.id.as_bytes())) {
                    batch.insert(
                        &db.one_time_keys,
                        key(&address, k.id.as_bytes()),
                        k.key.as_bytes(),
                    );
                }
            }
            check_supply(devices + usize::from(old.is_none()), held.len())?;
            let fallback = fallback.or(old.filter(|_| renewed).and_then(|o| o.fallback));
            batch.insert(
                &db.devices,
                record_key,
                encode(&DeviceRecord { keys, fallback })?,
            );
            batch.commit()?;
            Ok(held.len())
        })
        .await
    }

    async fn devices(&self, users: &[String]) -> Result<Vec<Device>> {
        let users = users.to_vec();
        self.read(move |db| {
            let mut out = Vec::new();
            for user in users {
                let prefix = key(&user, &[]);
                for row in db.devices.prefix(&prefix) {
                    let (k, value) = row.into_inner()?;
                    let device = k
                        .get(prefix.len()..)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| Error::Backend("a stored device key is malformed".into()))?;
                    let record: DeviceRecord = decode(&value)?;
                    out.push(Device {
                        user: user.clone(),
                        device: device.to_owned(),
                        keys: record.keys,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    /// On the writer thread, which runs one write at a time: a key read there and removed
    /// in the same write is handed out once.
    async fn claim_key(&self, user: &str, device: &str) -> Result<Option<Claimed>> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(false, move |db| {
            let Some(value) = db.devices.get(key(&user, device.as_bytes()))? else {
                return Ok(None);
            };
            let record: DeviceRecord = decode(&value)?;
            let prefix = key(&device_address(&user, &device), &[]);
            let mut rows = db.one_time_keys.prefix(&prefix);
            let first = rows.next().map(|r| r.into_inner()).transpose()?;
            let remaining = rows.count();
            let (key, fallback) = match first {
                Some((k, v)) => {
                    let id = k
                        .get(prefix.len()..)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| Error::Backend("a stored key id is malformed".into()))?
                        .to_owned();
                    let key = String::from_utf8(v.to_vec())
                        .map_err(|_| Error::Backend("a stored one-time key is malformed".into()))?;
                    db.one_time_keys.remove(k)?;
                    (Some(OneTimeKey { id, key }), false)
                }
                None => (record.fallback.clone(), record.fallback.is_some()),
            };
            Ok(Some(Claimed {
                device: Device {
                    user,
                    device,
                    keys: record.keys,
                },
                key,
                fallback,
                remaining,
            }))
        })
        .await
    }

    async fn remove_device(&self, user: &str, device: &str) -> Result<()> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(true, move |db| {
            let mut batch = db.batch();
            batch.remove(&db.devices, key(&user, device.as_bytes()));
            db.forget_device_queue(&mut batch, &device_address(&user, &device))?;
            batch.commit()?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|db| {
            db.meta.get("schema_version")?;
            Ok(())
        })
        .await
    }

    async fn reencrypt(&self, progress: &Reencryption) -> Result<()> {
        // Pages in key order, read on the blocking pool; the stale rows of each page are
        // sealed again on the writer thread, which re-reads each one there: writes are
        // serialised by that thread, so nothing can change a row between the read and
        // the rewrite (and message rows only ever change here).
        let mut after: Option<Vec<u8>> = None;
        loop {
            let from = after.clone();
            let (stale, last, scanned) = self
                .read(move |db| {
                    let primary = db.keys.primary();
                    let start = from.map_or(Bound::Unbounded, Bound::Excluded);
                    let (mut stale, mut last, mut scanned) = (Vec::new(), None, 0u64);
                    for row in db
                        .messages
                        .range::<Vec<u8>, _>((start, Bound::Unbounded))
                        .take(REENCRYPT_PAGE)
                    {
                        let (key, value) = row.into_inner()?;
                        let stored: StoredMessage = decode(&value)?;
                        if Keyring::sealed_with(&stored.sealed) != Some(primary) {
                            stale.push(key.to_vec());
                        }
                        last = Some(key.to_vec());
                        scanned += 1;
                    }
                    Ok((stale, last, scanned))
                })
                .await?;
            let rewritten = if stale.is_empty() {
                0
            } else {
                self.write(true, move |db| {
                    let mut batch = db.batch();
                    let mut rewritten = 0u64;
                    for key in stale {
                        let Some(value) = db.messages.get(&key)? else {
                            continue;
                        };
                        let stored: StoredMessage = decode(&value)?;
                        let id = Uuid::from_u128(id_of(&key)?);
                        let name = name_of(&key)?;
                        if let Some(sealed) =
                            db.keys.reseal(id, name, &stored.from, &stored.sealed)?
                        {
                            let record = encode(&StoredMessage {
                                from: stored.from,
                                sealed,
                            })?;
                            batch.insert(&db.messages, key, record);
                            rewritten += 1;
                        }
                    }
                    batch.commit()?;
                    Ok(rewritten)
                })
                .await?
            };
            progress.add(scanned, rewritten);
            match last {
                Some(key) if scanned == REENCRYPT_PAGE as u64 => after = Some(key),
                _ => return Ok(()),
            }
        }
    }
}
