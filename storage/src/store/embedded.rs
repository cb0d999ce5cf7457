//! The embedded store: one redb database file in the data directory.
//!
//! Every write goes through one writer thread that gathers whatever writes are waiting
//! and commits them in a single durable transaction (group commit): under load one
//! `fsync` covers many sends, and a write's future resolves only after that commit.
//! Reads run on the blocking pool against a consistent snapshot.
//!
//! This backend serves a single process; for several gateway nodes use the distributed
//! store.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::crypto::{KeySource, Keyring};
use crate::error::{Error, Result};
use crate::model::{AckedMessage, Appended, Conversation, Group, Message, NewMessage, Receipt};
use crate::store::MessageStore;

/// `(conversation, message id) → StoredMessage`: history, in id order within a conversation.
const MESSAGES: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("messages");
/// `message id → conversation`, to find a message by id alone.
const MESSAGE_CONVERSATION: TableDefinition<u128, &str> =
    TableDefinition::new("message_conversation");
/// `(user, message id) → conversation`: what a user has not acked yet, oldest first.
const PENDING: TableDefinition<(&str, u128), &str> = TableDefinition::new("pending");
/// `(sender, client_msg_id) → (message id, created ms)`.
const IDEMPOTENCY: TableDefinition<(&str, &str), (u128, u64)> = TableDefinition::new("idempotency");
/// `(user, key) → Receipt`: receipts kept for a sender who was offline.
const RECEIPTS: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("receipt_outbox");
/// `(conversation, reader) → message id`: how far each member has read.
const READ_MARKERS: TableDefinition<(&str, &str), u128> = TableDefinition::new("read_markers");
/// `group id → Group`.
const GROUPS: TableDefinition<u128, &[u8]> = TableDefinition::new("groups");
/// `name → value`: the schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA_VERSION: u64 = 1;
/// Most writes gathered into one transaction.
const MAX_GROUP_COMMIT: usize = 512;
/// Most messages `mark_read` scans to find the senders a read covers.
const READ_SCAN_LIMIT: usize = 10_000;
/// How long a claim whose message never arrived (its publish failed) is remembered. Far
/// longer than any publish may take; a claim is forgotten as soon as its message commits.
const CLAIM_MEMORY: Duration = Duration::from_secs(60);

/// Where and how the embedded store keeps its data.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    pub keys: KeySource,
    /// How long idempotency records are kept (the protocol promises at least 24 hours).
    pub idempotency_ttl: Duration,
}

impl EmbeddedConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            data_dir: data_dir.into(),
            keys: KeySource::DevGenerated,
            idempotency_ttl: Duration::from_secs(48 * 3600),
        }
    }
}

/// The on-disk form of a message: the sender in clear (acks need it without the key),
/// the body sealed by [`Keyring::seal`].
#[derive(Serialize, Deserialize)]
struct StoredMessage {
    from: String,
    sealed: Vec<u8>,
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
    /// Claims whose message is not committed yet; their record is written with the message
    /// (one transaction per send instead of two).
    claims: Mutex<Claims>,
    db: Arc<Database>,
    keys: Keyring,
    path: PathBuf,
    /// `None` only while dropping: dropping the sender stops the writer thread.
    jobs: Option<std_mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            // Joining closes the database file before the next open of the same directory.
            let _ = writer.join();
        }
    }
}

/// Idempotency claims whose message has not committed yet.
#[derive(Default)]
struct Claims {
    /// `(sender, client_msg_id) → (message id, claimed at)`.
    pending: HashMap<(String, String), (Uuid, Instant)>,
    last_sweep: Option<Instant>,
}

impl Claims {
    /// Forgets claims whose message never came, at most once a second.
    fn sweep(&mut self) {
        let now = Instant::now();
        if self
            .last_sweep
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        self.pending
            .retain(|_, (_, at)| now.duration_since(*at) < CLAIM_MEMORY);
    }
}

/// Called once after the transaction ends, with the commit's outcome.
type Finish = Box<dyn FnOnce(Result<()>) + Send>;
/// A write: applies itself to the open transaction (or learns it could not be opened),
/// says whether the transaction must be aborted, and hands back its completion.
type Job = Box<dyn FnOnce(Result<&WriteTransaction>) -> (bool, Finish) + Send>;

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Backend(format!("embedded store: {e}"))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Backend(format!("encoding a record: {e}")))
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Backend(format!("decoding a record: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `config.data_dir`. Fails with a clear
    /// message if another process has it open.
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
        let path = dir.join("store.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::Unavailable(format!(
                "{} is already open in another process",
                path.display()
            )),
            other => Error::Backend(format!("opening {}: {other}", path.display())),
        })?;
        init_schema(&db)?;
        let db = Arc::new(db);
        let (jobs, rx) = std_mpsc::channel();
        let writer_db = db.clone();
        let ttl = config.idempotency_ttl;
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_db, &rx, ttl))
            .map_err(|source| Error::Io {
                path: "store-writer thread".into(),
                source,
            })?;
        tracing::info!(path = %path.display(), primary_key = keys.primary(), "embedded store open");
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                claims: Mutex::new(Claims::default()),
                db,
                keys,
                path,
                jobs: Some(jobs),
                writer: Some(writer),
            }),
        })
    }

    /// Runs `f` inside the next group commit and resolves once that commit is durable.
    /// `f` must check before it writes: a non-backend error it returns leaves the rest of
    /// the group untouched, so it must not have written anything.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = txn.and_then(f);
            match result {
                Ok(value) => (
                    false,
                    Box::new(move |commit: Result<()>| {
                        let _ = reply.send(commit.map(|()| value));
                    }),
                ),
                Err(e) => {
                    let abort = e.is_backend();
                    (
                        abort,
                        Box::new(move |_| {
                            let _ = reply.send(Err(e));
                        }),
                    )
                }
            }
        });
        let sender = self
            .inner
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Unavailable("the embedded store is closing".into()))?;
        sender
            .send(job)
            .map_err(|_| Error::Unavailable("the embedded store writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the embedded store writer has stopped".into()))?
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.inner.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a read snapshot, on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction, &Keyring) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let txn = inner.db.begin_read()?;
            f(&txn, &inner.keys)
        })
        .await
        .map_err(|e| Error::Backend(format!("embedded store read task: {e}")))?
    }
}

fn init_schema(db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    {
        txn.open_table(MESSAGES)?;
        txn.open_table(MESSAGE_CONVERSATION)?;
        txn.open_table(PENDING)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.open_table(RECEIPTS)?;
        txn.open_table(READ_MARKERS)?;
        txn.open_table(GROUPS)?;
        let mut meta = txn.open_table(META)?;
        let version = meta.get("schema_version")?.map(|v| v.value());
        match version {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(Error::Backend(format!(
                    "the data directory has schema version {v}, this build knows {SCHEMA_VERSION}: \
                     upgrade the binary or use another data directory"
                )))
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn writer_loop(db: &Database, jobs: &std_mpsc::Receiver<Job>, idempotency_ttl: Duration) {
    let prune_every =
        (idempotency_ttl / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut next_prune = Instant::now();
    loop {
        if Instant::now() >= next_prune {
            if let Err(e) = prune_idempotency(db, idempotency_ttl) {
                tracing::warn!(error = %e, "pruning idempotency records failed");
            }
            next_prune = Instant::now() + prune_every;
        }
        let wait = next_prune.saturating_duration_since(Instant::now());
        let first = match jobs.recv_timeout(wait) {
            Ok(job) => job,
            Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP_COMMIT {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        metrics::histogram!("storage_group_commit_size").record(batch.len() as f64);
        commit_batch(db, batch);
    }
}

fn commit_batch(db: &Database, batch: Vec<Job>) {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => {
            let message = format!("embedded store: {e}");
            for job in batch {
                let (_, finish) = job(Err(Error::Backend(message.clone())));
                finish(Err(Error::Backend(message.clone())));
            }
            return;
        }
    };
    let mut abort = false;
    let mut finishes = Vec::with_capacity(batch.len());
    for job in batch {
        let (failed, finish) = job(Ok(&txn));
        abort |= failed;
        finishes.push(finish);
    }
    let started = Instant::now();
    let outcome = if abort {
        let _ = txn.abort();
        Err("a write in the same group commit failed; nothing was written".to_owned())
    } else {
        txn.commit()
            .map_err(|e| format!("embedded store commit: {e}"))
    };
    metrics::histogram!("storage_commit_seconds").record(started.elapsed().as_secs_f64());
    for finish in finishes {
        finish(outcome.clone().map_err(Error::Backend));
    }
}

fn prune_idempotency(db: &Database, ttl: Duration) -> Result<()> {
    let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
    let txn = db.begin_write()?;
    let removed = {
        let mut table = txn.open_table(IDEMPOTENCY)?;
        let mut stale = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            if value.value().1 < cutoff {
                let (sender, cmid) = key.value();
                stale.push((sender.to_owned(), cmid.to_owned()));
            }
        }
        for (sender, cmid) in &stale {
            table.remove((sender.as_str(), cmid.as_str()))?;
        }
        stale.len()
    };
    txn.commit()?;
    if removed > 0 {
        tracing::debug!(removed, "pruned idempotency records");
    }
    Ok(())
}

/// Decrypts one stored row into a [`Message`].
fn open_message(keys: &Keyring, conversation: &str, id: u128, bytes: &[u8]) -> Result<Message> {
    let stored: StoredMessage = decode(bytes)?;
    keys.open_message(
        Uuid::from_u128(id),
        conversation,
        stored.from,
        &stored.sealed,
    )
}

struct SealedRow {
    id: u128,
    conversation: String,
    record: Vec<u8>,
    recipients: Vec<String>,
    /// `(sender, client_msg_id)` whose idempotency record is written with the message.
    claim: Option<(String, String)>,
}

impl MessageStore for EmbeddedStore {
    /// A claim is kept in memory until its message commits, and its record is written in
    /// that same transaction, which commits before `sent`: durable whenever a `sent` was
    /// given, at the cost of one write per send instead of two. The memory check, the
    /// read of committed records and the insert happen under one lock, and a claim leaves
    /// memory only after its record is committed, so a retry always finds one or the other.
    async fn claim_send(&self, sender: &str, client_msg_id: &str, proposed: Uuid) -> Result<Uuid> {
        let key = (sender.to_owned(), client_msg_id.to_owned());
        let mut claims = self.claims();
        if let Some((id, _)) = claims.pending.get(&key) {
            return Ok(*id);
        }
        // A point read of cached pages: microseconds, so it is done here, under the lock.
        let stored = {
            let txn = self.inner.db.begin_read()?;
            let table = txn.open_table(IDEMPOTENCY)?;
            let found = table.get((key.0.as_str(), key.1.as_str()))?;
            found.map(|v| Uuid::from_u128(v.value().0))
        };
        if let Some(id) = stored {
            return Ok(id);
        }
        claims.sweep();
        claims.pending.insert(key, (proposed, Instant::now()));
        Ok(proposed)
    }

    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>> {
        // Encrypt here, on the caller's task, so the single writer thread only writes.
        let mut rows = Vec::with_capacity(batch.len());
        for NewMessage {
            message,
            recipients,
            client_msg_id,
        } in batch
        {
            let claim = client_msg_id.map(|c| (message.from.clone(), c));
            let conversation = message.conversation.to_string();
            let sealed = self.inner.keys.seal(
                message.id,
                &conversation,
                &message.from,
                message.body.as_bytes(),
            )?;
            let record = encode(&StoredMessage {
                from: message.from,
                sealed,
            })?;
            rows.push(SealedRow {
                id: message.id.as_u128(),
                conversation,
                record,
                recipients,
                claim,
            });
        }
        let claimed: Vec<(String, String)> = rows.iter().filter_map(|r| r.claim.clone()).collect();
        let outcomes = self
            .write(move |txn| {
                let mut messages = txn.open_table(MESSAGES)?;
                let mut index = txn.open_table(MESSAGE_CONVERSATION)?;
                let mut pending = txn.open_table(PENDING)?;
                let mut idempotency = txn.open_table(IDEMPOTENCY)?;
                let mut outcomes = Vec::with_capacity(rows.len());
                for row in rows {
                    if index.get(row.id)?.is_some() {
                        let mut still = Vec::new();
                        for user in row.recipients {
                            if pending.get((user.as_str(), row.id))?.is_some() {
                                still.push(user);
                            }
                        }
                        outcomes.push(Appended {
                            inserted: false,
                            pending_for: still,
                        });
                        continue;
                    }
                    messages.insert((row.conversation.as_str(), row.id), row.record.as_slice())?;
                    index.insert(row.id, row.conversation.as_str())?;
                    for user in &row.recipients {
                        pending.insert((user.as_str(), row.id), row.conversation.as_str())?;
                    }
                    if let Some((sender, cmid)) = &row.claim {
                        let key = (sender.as_str(), cmid.as_str());
                        if idempotency.get(key)?.is_none() {
                            idempotency.insert(key, (row.id, now_ms()))?;
                        }
                    }
                    outcomes.push(Appended {
                        inserted: true,
                        pending_for: row.recipients,
                    });
                }
                Ok(outcomes)
            })
            .await?;
        // Committed: the records are readable now, the claims can leave memory.
        if !claimed.is_empty() {
            let mut claims = self.claims();
            for key in &claimed {
                claims.pending.remove(key);
            }
        }
        Ok(outcomes)
    }

    async fn message(&self, id: Uuid) -> Result<Option<Message>> {
        self.read(move |txn, keys| {
            let index = txn.open_table(MESSAGE_CONVERSATION)?;
            let Some(conversation) = index.get(id.as_u128())? else {
                return Ok(None);
            };
            let conversation = conversation.value().to_owned();
            let messages = txn.open_table(MESSAGES)?;
            let row = messages.get((conversation.as_str(), id.as_u128()))?;
            row.map(|r| open_message(keys, &conversation, id.as_u128(), r.value()))
                .transpose()
        })
        .await
    }

    async fn history(
        &self,
        c: &Conversation,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let conversation = c.to_string();
        self.read(move |txn, keys| {
            let messages = txn.open_table(MESSAGES)?;
            let end = before.map_or(u128::MAX, |b| b.as_u128());
            let mut page = Vec::with_capacity(limit.min(128));
            for row in messages
                .range((conversation.as_str(), 0u128)..(conversation.as_str(), end))?
                .rev()
                .take(limit)
            {
                let (key, value) = row?;
                page.push(open_message(
                    keys,
                    &conversation,
                    key.value().1,
                    value.value(),
                )?);
            }
            Ok(page)
        })
        .await
    }

    async fn pending(&self, user: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Message>> {
        let user = user.to_owned();
        self.read(move |txn, keys| {
            let pending = txn.open_table(PENDING)?;
            let messages = txn.open_table(MESSAGES)?;
            let start = after.map_or(0, |a| a.as_u128().saturating_add(1));
            let mut out = Vec::with_capacity(limit.min(128));
            for row in pending
                .range((user.as_str(), start)..=(user.as_str(), u128::MAX))?
                .take(limit)
            {
                let (key, conversation) = row?;
                let id = key.value().1;
                let conversation = conversation.value();
                if let Some(stored) = messages.get((conversation, id))? {
                    out.push(open_message(keys, conversation, id, stored.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ack(&self, user: &str, ids: &[Uuid]) -> Result<Vec<AckedMessage>> {
        let user = user.to_owned();
        let ids: Vec<u128> = ids.iter().map(|id| id.as_u128()).collect();
        self.write(move |txn| {
            let mut pending = txn.open_table(PENDING)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut acked = Vec::new();
            for id in ids {
                let Some(conversation) = pending.remove((user.as_str(), id))? else {
                    continue;
                };
                let conversation = conversation.value().to_owned();
                let Some(row) = messages.get((conversation.as_str(), id))? else {
                    continue;
                };
                let stored: StoredMessage = decode(row.value())?;
                acked.push(AckedMessage {
                    id: Uuid::from_u128(id),
                    conversation: conversation
                        .parse()
                        .map_err(|e| Error::Backend(format!("pending entry: {e}")))?,
                    from: stored.from,
                });
            }
            Ok(acked)
        })
        .await
    }

    async fn mark_read(&self, reader: &str, c: &Conversation, upto: Uuid) -> Result<Vec<String>> {
        let (reader, conversation) = (reader.to_owned(), c.to_string());
        self.write(move |txn| {
            let messages = txn.open_table(MESSAGES)?;
            let upto = upto.as_u128();
            if messages.get((conversation.as_str(), upto))?.is_none() {
                return Err(Error::NotFound(format!(
                    "message {} in {conversation}",
                    Uuid::from_u128(upto)
                )));
            }
            let mut markers = txn.open_table(READ_MARKERS)?;
            let previous = markers
                .get((conversation.as_str(), reader.as_str()))?
                .map(|m| m.value());
            if previous.is_some_and(|p| p >= upto) {
                return Ok(Vec::new());
            }
            let start = previous.map_or(0, |p| p.saturating_add(1));
            let mut senders = BTreeSet::new();
            for row in messages
                .range((conversation.as_str(), start)..=(conversation.as_str(), upto))?
                .rev()
                .take(READ_SCAN_LIMIT)
            {
                let (_, value) = row?;
                let stored: StoredMessage = decode(value.value())?;
                if stored.from != reader {
                    senders.insert(stored.from);
                }
            }
            markers.insert((conversation.as_str(), reader.as_str()), upto)?;
            Ok(senders.into_iter().collect())
        })
        .await
    }

    async fn push_receipts(&self, user: &str, receipts: Vec<Receipt>) -> Result<()> {
        let user = user.to_owned();
        let rows = receipts
            .iter()
            .map(|r| Ok((Uuid::now_v7().as_u128(), encode(r)?)))
            .collect::<Result<Vec<_>>>()?;
        self.write(move |txn| {
            let mut table = txn.open_table(RECEIPTS)?;
            for (key, bytes) in &rows {
                table.insert((user.as_str(), *key), bytes.as_slice())?;
            }
            Ok(())
        })
        .await
    }

    async fn receipts(&self, user: &str, limit: usize) -> Result<Vec<(Uuid, Receipt)>> {
        let user = user.to_owned();
        self.read(move |txn, _| {
            let table = txn.open_table(RECEIPTS)?;
            let mut out = Vec::new();
            for row in table
                .range((user.as_str(), 0u128)..=(user.as_str(), u128::MAX))?
                .take(limit)
            {
                let (key, value) = row?;
                out.push((Uuid::from_u128(key.value().1), decode(value.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn clear_receipts(&self, user: &str, upto: Uuid) -> Result<()> {
        let user = user.to_owned();
        self.write(move |txn| {
            let mut table = txn.open_table(RECEIPTS)?;
            let keys: Vec<u128> = table
                .range((user.as_str(), 0u128)..=(user.as_str(), upto.as_u128()))?
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for key in keys {
                table.remove((user.as_str(), key))?;
            }
            Ok(())
        })
        .await
    }

    async fn create_group(&self, group: Group) -> Result<()> {
        group.check_size()?;
        let bytes = encode(&group)?;
        self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS)?;
            if groups.get(group.id.as_u128())?.is_some() {
                return Err(Error::Invalid(format!("group {} already exists", group.id)));
            }
            groups.insert(group.id.as_u128(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn group(&self, id: Uuid) -> Result<Option<Group>> {
        self.read(move |txn, _| {
            let groups = txn.open_table(GROUPS)?;
            let row = groups.get(id.as_u128())?;
            row.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    async fn update_members(
        &self,
        id: Uuid,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Group> {
        self.write(move |txn| {
            let mut groups = txn.open_table(GROUPS)?;
            let mut group: Group = match groups.get(id.as_u128())? {
                Some(row) => decode(row.value())?,
                None => return Err(Error::NotFound(format!("group g:{id}"))),
            };
            group.members.extend(add);
            for member in &remove {
                group.members.remove(member);
            }
            group.check_size()?;
            groups.insert(id.as_u128(), encode(&group)?.as_slice())?;
            Ok(group)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|txn, _| {
            txn.open_table(META)?;
            Ok(())
        })
        .await
    }
}
