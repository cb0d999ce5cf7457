//! The distributed store on ScyllaDB (or Apache Cassandra: same CQL, same driver).
//!
//! Tables, in the configured keyspace (see ARCHITECTURE.md "Data layout"):
//!
//! | table | partition key | clustering | what |
//! |---|---|---|---|
//! | `messages` | `(conversation, bucket)` | `id DESC` | sealed bodies; a bucket is 10 days of a conversation, so no partition grows without bound |
//! | `conversation_buckets` | `conversation` | `bucket DESC` | which buckets hold messages, for paging across them |
//! | `pending` | `user` | `id ASC` | each user's undelivered messages with their conversation and sender, 30-day TTL, short `gc_grace_seconds` (deleted often) |
//! | `sends` | `sender:client_msg_id` | — | the message a send stored, 48 h TTL; written after the message, so its presence means "completely appended"; read many keys at a time |
//! | `receipt_outbox` | `user` | `key ASC` | receipts kept for an offline sender, 30-day TTL |
//! | `read_markers` | `conversation` | `reader` | how far each member has read (`upto`) and has stored (`delivered`) |
//! | `inbox` | `user` | `conversation` | each user's conversations and their latest activity |
//! | `groups` | `id` | — | name, members (a set of at most 1024), when later members joined |
//! | `devices` | `user` | `device` | each device's published identity keys and fallback key |
//! | `one_time_keys` | `(user, device)` | `key_id` | unclaimed one-time keys; a claim is an LWT delete, so no key is handed out twice |
//! | `schema_migrations` | `version` | — | which migrations ran |
//! | `message_index`, `idempotency` | — | — | written by schema version 1 only (`idempotency` is still read for 48 hours after an upgrade) |
//!
//! Reads are prepared statements run at the configured consistency (LOCAL_QUORUM by
//! default; LOCAL_SERIAL for LWTs), token-aware, under a timeout and the backend's circuit
//! breaker, retried with backoff (every statement is idempotent). Writes go through the
//! [`batcher`], which sends what concurrent callers write as one unlogged batch. No send
//! takes a lightweight transaction: a retried send is recognised when it is appended,
//! by the dispatcher that owns its conversation's partition of the inbound log. Message
//! bodies are sealed exactly as in the embedded store ([`Keyring`]).

mod batcher;
mod schema;
mod statements;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::try_join_all;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::ExecutionError;
use scylla::response::PagingState;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use uuid::Uuid;

use self::batcher::{Batcher, Limits, Write};
use self::statements::Statements;
use super::{
    check_supply, inbox_page, inbox_users, remember_written, MessageStore, Reencryption,
    StoredThisCall,
};
use crate::crypto::Keyring;
use crate::error::{Error, Result};
use crate::model::{
    ts_of, user_of, Acked, AckedMessage, Appended, Claimed, Conversation, Device, DeviceKeys,
    Group, InboxEntry, Marker, Message, NewMessage, Notice, OneTimeKey, Receipt, ReceiptStatus,
};
use crate::resilience::{retry, Breaker, Guarded};

/// One history bucket: 10 days of a conversation.
const BUCKET_MS: i64 = 10 * 24 * 3600 * 1000;
/// Most messages a read marker scans for their senders.
const READ_SCAN_LIMIT: i32 = 10_000;

/// How to reach the cluster and how to lay the data out.
#[derive(Clone, Debug)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication factor of a keyspace created here (NetworkTopologyStrategy). `None`:
    /// 3, or the node count when the cluster has fewer nodes.
    pub replication: Option<u32>,
    pub consistency: Consistency,
    /// Bound on every request.
    pub timeout: Duration,
    pub keys: Keyring,
    /// How long a send's idempotency record lives (at least 24 h, the protocol's promise).
    pub idempotency_ttl: Duration,
    /// How long an undelivered message waits in a pending queue, and a receipt for an
    /// offline sender.
    pub pending_ttl: Duration,
    /// Username and password for the nodes' authenticator (PasswordAuthenticator).
    pub credentials: Option<crate::tls::Credentials>,
    /// Client encryption: how to trust the nodes (see [`crate::tls::client_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ScyllaConfig {
    pub fn new(nodes: Vec<String>, keys: Keyring) -> Self {
        ScyllaConfig {
            nodes,
            keyspace: "chat".into(),
            replication: None,
            consistency: Consistency::LocalQuorum,
            timeout: Duration::from_secs(5),
            keys,
            idempotency_ttl: Duration::from_secs(48 * 3600),
            pending_ttl: Duration::from_secs(30 * 24 * 3600),
            credentials: None,
            tls: None,
        }
    }
}

/// Most statements, and bytes, of one batched write request: below ScyllaDB's and
/// Cassandra's default `batch_size_fail_threshold` (50 KiB).
const BATCH_STATEMENTS: usize = 128;
const BATCH_BYTES: usize = 32 * 1024;
/// Conversation buckets known to exist, remembered so their row is written once.
const KNOWN_BUCKETS: usize = 100_000;
/// Send records looked up by one read.
const SENDS_PER_READ: usize = 100;
/// Requests (other than the batched writes) outstanding at once: past that, callers wait
/// here rather than queue inside the cluster until their requests time out.
const MAX_REQUESTS: usize = 32;

/// Message rows a re-encryption pass reads per page.
const REENCRYPT_PAGE: i32 = 256;

/// A send record's key: user ids never contain `:`, so the split is unambiguous.
fn send_key(sender: &str, client_msg_id: &str) -> String {
    format!("{sender}:{client_msg_id}")
}

/// A cheap-clone handle to the ScyllaDB store.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("nodes", &self.inner.config.nodes)
            .field("keyspace", &self.inner.config.keyspace)
            .finish()
    }
}

struct Inner {
    config: ScyllaConfig,
    session: Arc<Session>,
    breaker: Breaker,
    s: Statements,
    writes: Batcher,
    /// `(conversation, bucket)` rows this process has written: a bucket row is written once
    /// per process, not once per message. Cleared when full.
    buckets: Mutex<HashSet<(String, i32)>>,
    /// Until when send records of schema version 1 may still answer a retry (48 hours
    /// after an upgrade from it), if the keyspace was upgraded.
    legacy_until: Option<std::time::SystemTime>,
    /// Bounds the requests in flight ([`MAX_REQUESTS`]).
    requests: tokio::sync::Semaphore,
}

fn bucket_of(id: Uuid) -> i32 {
    i32::try_from(ts_of(id) / BUCKET_MS).unwrap_or(i32::MAX)
}

fn ttl_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

pub(super) fn exec_error(e: ExecutionError) -> Error {
    match e {
        ExecutionError::BadQuery(e) => Error::Backend(format!("ScyllaDB refused a query: {e}")),
        ExecutionError::PrepareError(e) => Error::Backend(format!("ScyllaDB prepare: {e}")),
        e => Error::Unavailable(format!("ScyllaDB: {e}")),
    }
}

fn is_unavailable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_))
}

/// Runs a request (`once`, repeatable) under the breaker, retried while the cluster is
/// unavailable.
pub(super) async fn retried<T, F, Fut>(breaker: &Breaker, once: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    breaker
        .call(is_unavailable, retry(is_unavailable, once))
        .await
        .map_err(guarded)
}

fn guarded(e: Guarded<Error>) -> Error {
    match e {
        Guarded::Inner(e) => e,
        other => Error::Unavailable(other.to_string()),
    }
}

fn rows_error(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("ScyllaDB answer: {e}"))
}

fn validate_keyspace(ks: &str) -> Result<()> {
    let ok = !ks.is_empty()
        && ks.len() <= 48
        && ks
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && ks.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "keyspace {ks:?}: use 1-48 characters of a-z 0-9 _, starting with a letter"
        )))
    }
}

/// The `[applied]` column of an LWT's answer.
fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool> {
    let rows = result.into_rows_result().map_err(rows_error)?;
    let row: Option<Row> = rows.maybe_first_row::<Row>().map_err(rows_error)?;
    Ok(matches!(
        row.and_then(|r| r.columns.into_iter().next().flatten()),
        Some(CqlValue::Boolean(true))
    ))
}

/// Size of a sealed row for the batch bound.
fn row_bytes(parts: &[&str], blob: usize) -> usize {
    parts.iter().map(|p| p.len()).sum::<usize>() + blob + 16
}

impl ScyllaStore {
    /// The key ring the store seals and opens message bodies with.
    pub fn keys(&self) -> &Keyring {
        &self.inner.config.keys
    }

    /// Connects, creates the keyspace when missing, runs pending migrations (one process
    /// at a time, under an LWT lease) and prepares every statement.
    pub async fn connect(config: ScyllaConfig) -> Result<Self> {
        validate_keyspace(&config.keyspace)?;
        let profile = ExecutionProfile::builder()
            .consistency(config.consistency)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(config.timeout))
            .build()
            .into_handle();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.timeout)
            .default_execution_profile_handle(profile)
            .tls_context(config.tls.clone());
        if let Some(c) = &config.credentials {
            builder = builder.user(&c.username, &c.password);
        }
        let session = tokio::time::timeout(config.timeout * 3, builder.build())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no CQL node of {:?} answered within {:?}",
                    config.nodes,
                    config.timeout * 3
                ))
            })?
            .map_err(|e| {
                Error::Unavailable(format!(
                    "connecting to the CQL nodes {:?}: {e}",
                    config.nodes
                ))
            })?;
        let upgraded = schema::migrate(&session, &config).await?;
        let legacy_until = upgraded.map(|at| at + config.idempotency_ttl);
        let s = Statements::prepare(&session, &config).await?;
        tracing::info!(nodes = ?config.nodes, keyspace = %config.keyspace, "ScyllaDB store ready");
        let session = Arc::new(session);
        let breaker = Breaker::new("scylla", config.timeout + Duration::from_secs(1));
        let writes = Batcher::start(
            session.clone(),
            breaker.clone(),
            Limits {
                statements: BATCH_STATEMENTS,
                bytes: BATCH_BYTES,
            },
        );
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                breaker,
                config,
                session,
                s,
                writes,
                buckets: Mutex::new(HashSet::new()),
                legacy_until,
                requests: tokio::sync::Semaphore::new(MAX_REQUESTS),
            }),
        })
    }

    /// Runs a prepared statement under the breaker, retried (every statement is
    /// idempotent).
    async fn run(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow + Clone,
    ) -> Result<scylla::response::query_result::QueryResult> {
        let inner = &self.inner;
        let once = || {
            let values = values.clone();
            async move {
                inner
                    .session
                    .execute_unpaged(statement, values)
                    .await
                    .map_err(exec_error)
            }
        };
        self.guarded(once).await
    }

    /// Deletes what is kept for one device: its one-time keys, and its queue (pending
    /// end-to-end encrypted messages and kept notices, partitions of their own).
    async fn forget_device_queue(&self, user: &str, device: &str) -> Result<()> {
        let s = &self.inner.s;
        self.run(&s.keys_clear, (user, device)).await?;
        let queue = crate::model::device_address(user, device);
        self.run(&s.queue_clear, (queue.as_str(),)).await?;
        self.run(&s.notices_clear, (queue.as_str(),)).await?;
        Ok(())
    }

    /// One page of a paged statement, under the breaker and retried like [`Self::run`].
    async fn page(
        &self,
        statement: &PreparedStatement,
        paging: PagingState,
    ) -> Result<(
        scylla::response::query_result::QueryResult,
        scylla::response::PagingStateResponse,
    )> {
        let inner = &self.inner;
        let once = || {
            let paging = paging.clone();
            async move {
                inner
                    .session
                    .execute_single_page(statement, (), paging)
                    .await
                    .map_err(exec_error)
            }
        };
        self.guarded(once).await
    }

    /// Runs a request (`once`, repeatable) in a request slot, under the breaker, retried.
    async fn guarded<T, F, Fut>(&self, once: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        // The wait for a slot does not count against the request's timeout.
        let _slot = self
            .inner
            .requests
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the ScyllaDB store is closing".into()))?;
        retried(&self.inner.breaker, once).await
    }

    /// Rows of a result as typed tuples.
    async fn rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow + Clone,
    ) -> Result<Vec<R>>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let result = self.run(statement, values).await?;
        let rows = result.into_rows_result().map_err(rows_error)?;
        let typed = rows
            .rows::<R>()
            .map_err(rows_error)?
            .collect::<std::result::Result<Vec<R>, _>>()
            .map_err(rows_error)?;
        Ok(typed)
    }

    fn open(&self, id: Uuid, conversation: &str, from: String, sealed: &[u8]) -> Result<Message> {
        self.inner
            .config
            .keys
            .open_message(id, conversation, from, sealed)
    }

    /// A stored message, when its conversation is known.
    async fn load(&self, conversation: &str, id: Uuid) -> Result<Option<Message>> {
        let rows: Vec<(String, Vec<u8>)> = self
            .rows(&self.inner.s.message_get, (conversation, bucket_of(id), id))
            .await?;
        rows.into_iter()
            .next()
            .map(|(from, sealed)| self.open(id, conversation, from, &sealed))
            .transpose()
    }

    /// The message an earlier attempt of each send stored, if any: one read for the whole
    /// call (a multi-key read of the send records), plus, for a while after an upgrade
    /// from schema version 1, a read of the old records for each send not found.
    async fn stored_sends(
        &self,
        batch: &[NewMessage],
    ) -> Result<Vec<Option<(Uuid, Conversation)>>> {
        let s = &self.inner.s;
        let mut keys: Vec<String> = batch
            .iter()
            .filter_map(|new| {
                new.client_msg_id
                    .as_ref()
                    .map(|c| send_key(&new.message.from, c))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut found: HashMap<String, (Uuid, Option<String>)> = HashMap::new();
        for chunk in keys.chunks(SENDS_PER_READ) {
            let rows: Vec<(String, Uuid, Option<String>)> =
                self.rows(&s.sends_get, (chunk.to_vec(),)).await?;
            found.extend(rows.into_iter().map(|(key, id, c)| (key, (id, c))));
        }
        let legacy = self
            .inner
            .legacy_until
            .is_some_and(|until| std::time::SystemTime::now() < until);
        let lookups = batch.iter().map(|new| {
            let found = &found;
            async move {
                let message = &new.message;
                let Some(cmid) = &new.client_msg_id else {
                    // No key: the message id is the key (a replay of the same record).
                    let name = message.conversation.to_string();
                    let rows: Vec<(String, Vec<u8>)> = self
                        .rows(
                            &s.message_get,
                            (name.as_str(), bucket_of(message.id), message.id),
                        )
                        .await?;
                    return Ok(
                        (!rows.is_empty()).then(|| (message.id, message.conversation.clone()))
                    );
                };
                if let Some((id, conversation)) = found.get(&send_key(&message.from, cmid)) {
                    let conversation = match conversation {
                        Some(name) => name
                            .parse()
                            .map_err(|e| Error::Backend(format!("stored send record: {e}")))?,
                        None => message.conversation.clone(),
                    };
                    return Ok(Some((*id, conversation)));
                }
                if !legacy {
                    return Ok(None);
                }
                // A send of schema version 1 recorded no conversation: the retry names
                // the one it was meant for.
                let rows: Vec<(Uuid,)> = self
                    .rows(&s.legacy_send_get, (message.from.as_str(), cmid.as_str()))
                    .await?;
                Ok(rows
                    .into_iter()
                    .next()
                    .map(|(id,)| (id, message.conversation.clone())))
            }
        });
        try_join_all(lookups).await
    }

    /// The rows of a new message: the message, the bucket (unless this process has written
    /// it; a bucket written here is added to `fresh`), a pending entry per recipient.
    fn message_writes(
        &self,
        message: &Message,
        recipients: &[String],
        fresh: &mut HashSet<(String, i32)>,
    ) -> Result<Vec<Write>> {
        let s = &self.inner.s;
        let conversation = message.conversation.to_string();
        let sealed = self.inner.config.keys.seal(
            message.id,
            &conversation,
            &message.from,
            &message.content()?,
        )?;
        let bucket = bucket_of(message.id);
        let mut writes = Vec::with_capacity(recipients.len() + 2);
        let known = self
            .inner
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(conversation.clone(), bucket));
        if !known && fresh.insert((conversation.clone(), bucket)) {
            let bytes = conversation.len();
            writes.push(Write::new(
                &s.bucket_put,
                (conversation.clone(), bucket),
                bytes,
            ));
        }
        for user in recipients {
            let bytes = row_bytes(&[user, &conversation, &message.from], 16);
            writes.push(Write::new(
                &s.pending_put,
                (
                    user.clone(),
                    message.id,
                    conversation.clone(),
                    message.from.clone(),
                ),
                bytes,
            ));
        }
        let at = write_time(message.id);
        for user in inbox_users(&message.from, recipients) {
            let bytes = row_bytes(&[user, &conversation], 24);
            writes.push(Write::new(
                &s.inbox_put,
                (user.to_owned(), conversation.clone(), message.id, at),
                bytes,
            ));
        }
        let bytes = row_bytes(&[&conversation, &message.from], sealed.len());
        writes.push(Write::new(
            &s.message_put,
            (
                conversation,
                bucket,
                message.id,
                message.from.clone(),
                sealed,
            ),
            bytes,
        ));
        Ok(writes)
    }

    /// Enters the group in its members' inboxes (or removes it from the removed ones'),
    /// with `activity` as its latest.
    async fn touch_inboxes(&self, group: &Group, removed: &[String], activity: Uuid) -> Result<()> {
        let s = &self.inner.s;
        let name = group.conversation().to_string();
        let at = write_time(activity);
        let mut writes = Vec::with_capacity(group.members.len() + removed.len());
        for member in &group.members {
            writes.push(Write::new(
                &s.inbox_put,
                (member.clone(), name.clone(), activity, at),
                member.len() + name.len() + 24,
            ));
        }
        for gone in removed.iter().filter(|m| !group.members.contains(*m)) {
            writes.push(Write::new(
                &s.inbox_delete,
                (at, gone.clone(), name.clone()),
                gone.len() + name.len() + 8,
            ));
        }
        self.inner.writes.write(writes).await
    }
}

/// The write time (microseconds) of a row that records an activity: the activity's own
/// time, from its UUIDv7, so that of two writes the later activity wins.
pub(super) fn write_time(activity: Uuid) -> i64 {
    ts_of(activity).saturating_mul(1000)
}

fn limit_i32(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX).max(1)
}

impl MessageStore for ScyllaStore {
    /// Looks up every send's earlier attempt (concurrently), writes the new messages with
    /// their pending entries, and only then their send records: a send record therefore
    /// means "completely appended", and a crash in between makes the replay write the
    /// message again (the same rows) before recording it.
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        let s = &self.inner.s;
        let earlier = self.stored_sends(batch).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows = Vec::new();
        let mut records = Vec::new();
        let mut this_call = StoredThisCall::default();
        let mut fresh = HashSet::new();
        for (new, earlier) in batch.iter().zip(earlier) {
            if let Some(outcome) = this_call.earlier(new) {
                outcomes.push(outcome);
                continue;
            }
            if let Some((id, conversation)) = earlier {
                // A replay or a retry: report who still has it pending (not acked yet).
                let checks = new.recipients.iter().map(|user| async move {
                    let rows: Vec<(String,)> =
                        self.rows(&s.pending_get, (user.as_str(), id)).await?;
                    Ok::<_, Error>((!rows.is_empty()).then(|| user.clone()))
                });
                let still = try_join_all(checks).await?.into_iter().flatten().collect();
                outcomes.push(Appended {
                    id,
                    conversation,
                    inserted: false,
                    pending_for: still,
                });
                continue;
            }
            rows.extend(self.message_writes(&new.message, &new.recipients, &mut fresh)?);
            if let Some(cmid) = &new.client_msg_id {
                let conversation = new.message.conversation.to_string();
                let key = send_key(&new.message.from, cmid);
                let bytes = row_bytes(&[&key, &conversation], 16);
                records.push(Write::new(
                    &s.send_put,
                    (key, new.message.id, conversation),
                    bytes,
                ));
            }
            this_call.stored(new);
            outcomes.push(Appended {
                id: new.message.id,
                conversation: new.message.conversation.clone(),
                inserted: true,
                pending_for: new.recipients.clone(),
            });
        }
        self.inner.writes.write(rows).await?;
        // Remembered only once written: a failed write is retried with its bucket row.
        if !fresh.is_empty() {
            let mut known = self.inner.buckets.lock().unwrap_or_else(|e| e.into_inner());
            remember_written(&mut known, fresh, KNOWN_BUCKETS);
        }
        self.inner.writes.write(records).await?;
        Ok(outcomes)
    }

    async fn message(&self, c: &Conversation, id: Uuid) -> Result<Option<Message>> {
        self.load(&c.to_string(), id).await
    }

    async fn history(
        &self,
        c: &Conversation,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let s = &self.inner.s;
        let conversation = c.to_string();
        let top = before.map_or(i32::MAX, bucket_of);
        let buckets: Vec<(i32,)> = self
            .rows(&s.buckets_upto, (conversation.as_str(), top, i32::MIN))
            .await?;
        let mut page = Vec::with_capacity(limit.min(128));
        for (bucket,) in buckets {
            if page.len() >= limit {
                break;
            }
            let want = limit_i32(limit - page.len());
            let rows: Vec<(Uuid, String, Vec<u8>)> = match before {
                Some(b) if bucket == top => {
                    self.rows(&s.history_before, (conversation.as_str(), bucket, b, want))
                        .await?
                }
                _ => {
                    self.rows(&s.history_all, (conversation.as_str(), bucket, want))
                        .await?
                }
            };
            for (id, from, sealed) in rows {
                page.push(self.open(id, &conversation, from, &sealed)?);
            }
        }
        Ok(page)
    }

    async fn pending(&self, user: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Message>> {
        let after = after.unwrap_or(Uuid::nil());
        let rows: Vec<(Uuid, String)> = self
            .rows(&self.inner.s.pending_after, (user, after, limit_i32(limit)))
            .await?;
        let loaded = try_join_all(
            rows.iter()
                .map(|(id, conversation)| self.load(conversation, *id)),
        )
        .await?;
        Ok(loaded.into_iter().flatten().collect())
    }

    /// One read of the pending entries named (they carry conversation and sender) — none
    /// for those the caller knows — then one delete of those found. A user's acks are
    /// serialised by the inbound log (one partition per user), so no two acks of the same
    /// entry read it at once.
    async fn ack(&self, user: &str, ids: &[Uuid], known: Vec<AckedMessage>) -> Result<Vec<Acked>> {
        let s = &self.inner.s;
        // A device's queue moves its user's marker.
        let (queue, user) = (user, user_of(user));
        let mut wanted: Vec<Uuid> = ids
            .iter()
            .filter(|id| !known.iter().any(|k| k.id == **id))
            .copied()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let rows: Vec<(Uuid, String, Option<String>)> = if wanted.is_empty() {
            Vec::new()
        } else {
            self.rows(&s.pending_some, (queue, wanted)).await?
        };
        let mut acked = known;
        for (id, conversation, sender) in rows {
            let from = match sender {
                Some(from) => from,
                // An entry of schema version 1 does not name its sender: the message does.
                None => match self.load(&conversation, id).await? {
                    Some(message) => message.from,
                    None => continue,
                },
            };
            acked.push(AckedMessage {
                id,
                conversation: conversation
                    .parse()
                    .map_err(|e| Error::Backend(format!("pending entry: {e}")))?,
                from,
            });
        }
        if acked.is_empty() {
            return Ok(Vec::new());
        }
        let mut acked: Vec<Acked> = acked.into_iter().map(|a| Acked::new(a, queue)).collect();
        // The receipts go first: a batch across partitions is not atomic, so receipts
        // written with the removal could be lost while the removal holds, and a retried
        // ack would find nothing left to receipt. Written first, a failure at worst keeps
        // a receipt twice (under two ids) when the ack is retried.
        let receipts: Vec<(String, Uuid, Notice)> = acked
            .iter()
            .filter_map(|a| {
                let (id, receipt) = a.receipt.as_ref()?;
                Some((
                    a.message.from.clone(),
                    *id,
                    Notice::Receipt(receipt.clone()),
                ))
            })
            .collect();
        if !receipts.is_empty() {
            self.push_notices(receipts).await?;
        }
        let found: Vec<Uuid> = acked.iter().map(|a| a.message.id).collect();
        let mut writes = vec![Write::new(
            &s.pending_delete,
            (queue.to_owned(), found.clone()),
            queue.len() + 16 * found.len(),
        )];
        // The delivered marker of each conversation, at its newest acked message.
        let mut newest: HashMap<&Conversation, Uuid> = HashMap::new();
        for (_, receipt) in acked.iter().filter_map(|a| a.receipt.as_ref()) {
            let id = receipt.message_id;
            let at = newest.entry(&receipt.conversation).or_insert(id);
            *at = (*at).max(id);
        }
        for (conversation, id) in newest {
            let name = conversation.to_string();
            let bytes = row_bytes(&[user, &name], 24);
            writes.push(Write::new(
                &s.delivered_put,
                (write_time(id), id, name, user.to_owned()),
                bytes,
            ));
        }
        self.inner.writes.write(writes).await?;
        // Report in the order asked.
        acked.sort_by_key(|a| ids.iter().position(|id| *id == a.message.id));
        Ok(acked)
    }

    /// A reader's reads are serialised by the inbound log (one partition per user), so the
    /// read-then-write of the marker does not race with itself.
    async fn mark_read(
        &self,
        reader: &str,
        c: &Conversation,
        upto: Uuid,
    ) -> Result<Vec<(String, Uuid, Receipt)>> {
        let s = &self.inner.s;
        let conversation = c.to_string();
        // The message and the reader's marker (the row may hold only a delivered marker),
        // read at once.
        let (message, previous) = tokio::try_join!(
            self.load(&conversation, upto),
            self.rows::<(Option<Uuid>,)>(&s.marker_get, (conversation.as_str(), reader)),
        )?;
        if message.is_none() {
            return Err(Error::NotFound(format!("message {upto} in {conversation}")));
        }
        let previous = previous.into_iter().next().and_then(|(p,)| p);
        if previous.is_some_and(|p| p.as_u128() >= upto.as_u128()) {
            return Ok(Vec::new());
        }
        let floor = previous.unwrap_or(Uuid::nil());
        let lowest_bucket = previous.map_or(i32::MIN, bucket_of);
        // A read within the marker's bucket (most are: buckets span days) scans just that
        // one, which holds the message read: no need to ask which buckets there are.
        let buckets: Vec<(i32,)> = if lowest_bucket == bucket_of(upto) {
            vec![(lowest_bucket,)]
        } else {
            self.rows(
                &s.buckets_upto,
                (conversation.as_str(), bucket_of(upto), lowest_bucket),
            )
            .await?
        };
        let mut senders = BTreeSet::new();
        let mut scanned = 0;
        for (bucket,) in buckets {
            if scanned >= READ_SCAN_LIMIT {
                break;
            }
            let rows: Vec<(String,)> = self
                .rows(
                    &s.read_range,
                    (
                        conversation.as_str(),
                        bucket,
                        upto,
                        floor,
                        READ_SCAN_LIMIT - scanned,
                    ),
                )
                .await?;
            scanned += i32::try_from(rows.len()).unwrap_or(i32::MAX);
            senders.extend(rows.into_iter().map(|(from,)| from));
        }
        senders.remove(reader);
        // The receipts before the marker (see `ack`): a failure after them keeps them
        // again when the read is retried, never loses them.
        let receipts: Vec<(String, Uuid, Receipt)> = senders
            .into_iter()
            .map(|to| {
                let (id, receipt) = Receipt::now(upto, c, reader, ReceiptStatus::Read);
                (to, id, receipt)
            })
            .collect();
        if !receipts.is_empty() {
            let notices = receipts
                .iter()
                .map(|(to, id, r)| (to.clone(), *id, Notice::Receipt(r.clone())))
                .collect();
            self.push_notices(notices).await?;
        }
        self.run(&s.marker_put, (conversation.as_str(), reader, upto))
            .await?;
        Ok(receipts)
    }

    async fn push_notices(&self, notices: Vec<(String, Uuid, Notice)>) -> Result<()> {
        let s = &self.inner.s;
        let mut writes = Vec::with_capacity(notices.len());
        for (user, id, notice) in &notices {
            let bytes = notice.to_stored()?;
            let size = user.len() + bytes.len() + 16;
            writes.push(Write::new(
                &s.receipt_put,
                (user.to_owned(), *id, bytes),
                size,
            ));
        }
        self.inner.writes.write(writes).await
    }

    async fn notices(
        &self,
        user: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Notice)>> {
        let s = &self.inner.s;
        let rows: Vec<(Uuid, Vec<u8>)> = match after {
            Some(after) => {
                self.rows(&s.receipts_after, (user, after, limit_i32(limit)))
                    .await?
            }
            None => self.rows(&s.receipts_get, (user, limit_i32(limit))).await?,
        };
        rows.into_iter()
            .map(|(key, bytes)| Ok((key, Notice::from_stored(&bytes)?)))
            .collect()
    }

    async fn drop_notices(&self, notices: &[(String, Uuid)]) -> Result<()> {
        let s = &self.inner.s;
        let writes = notices
            .iter()
            .map(|(user, id)| Write::new(&s.receipt_drop, (user.clone(), *id), user.len() + 16))
            .collect();
        self.inner.writes.write(writes).await
    }

    /// One read of the user's inbox partition, sorted here: one user's conversations are
    /// few enough (thousands at most) for that.
    async fn conversations(
        &self,
        user: &str,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<InboxEntry>> {
        let rows: Vec<(String, Option<Uuid>)> = self.rows(&self.inner.s.inbox_get, (user,)).await?;
        let mut all = Vec::with_capacity(rows.len());
        for (name, activity) in rows {
            let Some(activity) = activity else { continue };
            all.push(InboxEntry {
                conversation: name
                    .parse()
                    .map_err(|e| Error::Backend(format!("inbox row: {e}")))?,
                activity,
            });
        }
        Ok(inbox_page(all, before, limit))
    }

    async fn markers(&self, c: &Conversation) -> Result<Vec<Marker>> {
        let rows: Vec<(String, Option<Uuid>, Option<Uuid>)> = self
            .rows(&self.inner.s.markers_get, (c.to_string(),))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(user, read, delivered)| Marker {
                user,
                read,
                delivered,
            })
            .collect())
    }

    async fn create_group(&self, group: Group) -> Result<()> {
        group.check_size()?;
        let members: Vec<&str> = group.members.iter().map(String::as_str).collect();
        let result = self
            .run(
                &self.inner.s.group_create,
                (group.id, group.name.as_str(), members),
            )
            .await?;
        if applied(result)? {
            self.touch_inboxes(&group, &[], Uuid::now_v7()).await
        } else {
            Err(Error::Invalid(format!("group {} already exists", group.id)))
        }
    }

    async fn group(&self, id: Uuid) -> Result<Option<Group>> {
        type Row = (
            Option<String>,
            Option<Vec<String>>,
            Option<BTreeMap<String, Uuid>>,
        );
        let rows: Vec<Row> = self.rows(&self.inner.s.group_get, (id,)).await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(name, members, joined)| Group {
                id,
                name: name.unwrap_or_default(),
                members: members.unwrap_or_default().into_iter().collect(),
                joined: joined.unwrap_or_default(),
            }))
    }

    /// Set additions and removals commute, so concurrent updates lose nothing; the size
    /// bound is checked against the state read just before.
    async fn update_members(
        &self,
        id: Uuid,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Group> {
        let s = &self.inner.s;
        let Some(mut group) = self.group(id).await? else {
            return Err(Error::NotFound(format!("group g:{id}")));
        };
        let at = Uuid::now_v7();
        let newcomers = group.change_members(&add, &remove, at);
        group.check_size()?;
        if !add.is_empty() {
            let joined: BTreeMap<&str, Uuid> = newcomers.iter().map(|m| (m.as_str(), at)).collect();
            self.run(&s.group_add, (add, joined, id)).await?;
        }
        if !remove.is_empty() {
            self.run(&s.group_remove, (&remove, &remove, id)).await?;
        }
        self.touch_inboxes(&group, &remove, at).await?;
        Ok(group)
    }

    async fn publish_keys(
        &self,
        user: &str,
        device: &str,
        keys: DeviceKeys,
        one_time: Vec<OneTimeKey>,
        fallback: Option<OneTimeKey>,
    ) -> Result<usize> {
        let s = &self.inner.s;
        let users = [user.to_owned()];
        let (devices, old) = tokio::try_join!(
            self.devices(&users),
            self.rows::<(String, Option<String>)>(&s.keys_get, (user, device)),
        )?;
        let current = devices.iter().find(|d| d.device == device);
        let renewed = current.is_some_and(|d| d.keys == keys);
        let mut held: BTreeSet<String> = if renewed {
            old.into_iter().map(|(id, _)| id).collect()
        } else {
            BTreeSet::new()
        };
        let fresh: Vec<&OneTimeKey> = one_time
            .iter()
            .filter(|k| held.insert(k.id.clone()))
            .collect();
        check_supply(devices.len() + usize::from(current.is_none()), held.len())?;
        if current.is_some() && !renewed {
            // A new identity under an old device id: what was kept for the old one (its
            // keys, and ciphertexts only it could read) is of no use to the new.
            self.forget_device_queue(user, device).await?;
            self.run(
                &s.device_fallback_put,
                (None::<String>, None::<String>, user, device),
            )
            .await?;
        }
        let mut writes = Vec::with_capacity(fresh.len() + 2);
        for k in fresh {
            writes.push(Write::new(
                &s.key_put,
                (
                    user.to_owned(),
                    device.to_owned(),
                    k.id.clone(),
                    k.key.clone(),
                ),
                user.len() + device.len() + k.id.len() + k.key.len(),
            ));
        }
        if let Some(f) = &fallback {
            writes.push(Write::new(
                &s.device_fallback_put,
                (
                    f.id.clone(),
                    f.key.clone(),
                    user.to_owned(),
                    device.to_owned(),
                ),
                user.len() + device.len() + f.id.len() + f.key.len(),
            ));
        }
        if !writes.is_empty() {
            self.inner.writes.write(writes).await?;
        }
        // The identity last: a device is listed once its keys are there.
        self.run(
            &s.device_put,
            (
                user,
                device,
                keys.identity_key.as_str(),
                keys.signing_key.as_str(),
            ),
        )
        .await?;
        Ok(held.len())
    }

    async fn devices(&self, users: &[String]) -> Result<Vec<Device>> {
        let s = &self.inner.s;
        let per_user = try_join_all(users.iter().map(|user| async move {
            let rows: Vec<(String, Option<String>, Option<String>)> =
                self.rows(&s.devices_get, (user.as_str(),)).await?;
            Ok::<_, Error>(
                rows.into_iter()
                    .map(|(device, identity_key, signing_key)| Device {
                        user: user.clone(),
                        device,
                        keys: DeviceKeys {
                            identity_key: identity_key.unwrap_or_default(),
                            signing_key: signing_key.unwrap_or_default(),
                        },
                    })
                    .collect::<Vec<_>>(),
            )
        }))
        .await?;
        Ok(per_user.into_iter().flatten().collect())
    }

    /// Tries the device's keys in order until its LWT delete of one applies: concurrent
    /// claimers race for the same first key, and each loser goes on to the next.
    async fn claim_key(&self, user: &str, device: &str) -> Result<Option<Claimed>> {
        let s = &self.inner.s;
        type Row = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (record, keys) = tokio::try_join!(
            self.rows::<Row>(&s.device_get, (user, device)),
            self.rows::<(String, Option<String>)>(&s.keys_get, (user, device)),
        )?;
        let Some((identity_key, signing_key, fallback_id, fallback_key)) =
            record.into_iter().next()
        else {
            return Ok(None);
        };
        let device = Device {
            user: user.to_owned(),
            device: device.to_owned(),
            keys: DeviceKeys {
                identity_key: identity_key.unwrap_or_default(),
                signing_key: signing_key.unwrap_or_default(),
            },
        };
        let total = keys.len();
        for (tried, (id, key)) in keys.into_iter().enumerate() {
            let result = self
                .run(&s.key_claim, (user, device.device.as_str(), id.as_str()))
                .await?;
            if applied(result)? {
                return Ok(Some(Claimed {
                    device,
                    key: Some(OneTimeKey {
                        id,
                        key: key.unwrap_or_default(),
                    }),
                    fallback: false,
                    remaining: total - tried - 1,
                }));
            }
        }
        let fallback = match (fallback_id, fallback_key) {
            (Some(id), Some(key)) => Some(OneTimeKey { id, key }),
            _ => None,
        };
        Ok(Some(Claimed {
            device,
            fallback: fallback.is_some(),
            key: fallback,
            remaining: 0,
        }))
    }

    async fn remove_device(&self, user: &str, device: &str) -> Result<()> {
        let s = &self.inner.s;
        self.run(&s.device_delete, (user, device)).await?;
        self.forget_device_queue(user, device).await
    }

    async fn ping(&self) -> Result<()> {
        self.run(&self.inner.s.ping, ()).await?;
        Ok(())
    }

    async fn reencrypt(&self, progress: &Reencryption) -> Result<()> {
        // The table a page at a time (token order, so a row written meanwhile may or may
        // not be seen: it is sealed with the primary anyway); each page's stale rows are
        // sealed again and written back concurrently. A rewrite replaces one sealed body
        // with another of the same plaintext, so a reader sees the old or the new, both
        // readable while both keys are in the ring.
        let s = &self.inner.s;
        let mut paging = PagingState::start();
        loop {
            let (result, next) = self.page(&s.messages_scan, paging).await?;
            let rows = result.into_rows_result().map_err(rows_error)?;
            let mut scanned = 0u64;
            let mut writes = Vec::new();
            for row in rows
                .rows::<(String, i32, Uuid, String, Vec<u8>)>()
                .map_err(rows_error)?
            {
                let (conversation, bucket, id, from, sealed) = row.map_err(rows_error)?;
                scanned += 1;
                if let Some(sealed) =
                    self.inner
                        .config
                        .keys
                        .reseal(id, &conversation, &from, &sealed)?
                {
                    writes.push(self.run(&s.message_reseal, (sealed, conversation, bucket, id)));
                }
            }
            let rewritten = writes.len() as u64;
            try_join_all(writes).await?;
            progress.add(scanned, rewritten);
            match next.into_paging_control_flow() {
                ControlFlow::Continue(state) => paging = state,
                ControlFlow::Break(()) => return Ok(()),
            }
        }
    }
}
