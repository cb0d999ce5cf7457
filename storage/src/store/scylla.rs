//! The distributed store on ScyllaDB (or Apache Cassandra: same CQL, same driver).
//!
//! Tables, in the configured keyspace (see ARCHITECTURE.md "Data layout"):
//!
//! | table | partition key | clustering | what |
//! |---|---|---|---|
//! | `messages` | `(conversation, bucket)` | `id DESC` | sealed bodies; a bucket is 10 days of a conversation, so no partition grows without bound |
//! | `conversation_buckets` | `conversation` | `bucket DESC` | which buckets hold messages, for paging across them |
//! | `message_index` | `id` | — | a message's conversation; written last by `append`, so it marks a complete append |
//! | `pending` | `user` | `id ASC` | each user's undelivered messages, 30-day TTL, short `gc_grace_seconds` (deleted often) |
//! | `idempotency` | `(sender, client_msg_id)` | — | the first message id of a send, LWT at claim time, 48 h TTL |
//! | `receipt_outbox` | `user` | `key ASC` | receipts kept for an offline sender, 30-day TTL |
//! | `read_markers` | `conversation` | `reader` | how far each member has read |
//! | `groups` | `id` | — | name and members (a set of at most 1024) |
//! | `schema_migrations` | `version` | — | which migrations ran |
//!
//! Every statement is prepared, routed token-aware by the driver, run at the configured
//! consistency (LOCAL_QUORUM by default; LOCAL_SERIAL for LWTs), under a timeout and the
//! backend's circuit breaker; idempotent statements are marked so and retried with
//! backoff. Message bodies are sealed exactly as in the embedded store ([`Keyring`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use futures_util::FutureExt as _;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::ExecutionError;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use uuid::Uuid;

use super::MessageStore;
use crate::crypto::Keyring;
use crate::error::{Error, Result};
use crate::model::{
    ts_of, AckedMessage, Appended, Conversation, Group, Message, NewMessage, Receipt,
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
        }
    }
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
    session: Session,
    breaker: Breaker,
    s: Statements,
}

struct Statements {
    claim: PreparedStatement,
    index_get: PreparedStatement,
    index_put: PreparedStatement,
    message_put: PreparedStatement,
    message_get: PreparedStatement,
    bucket_put: PreparedStatement,
    buckets_upto: PreparedStatement,
    history_before: PreparedStatement,
    history_all: PreparedStatement,
    read_range: PreparedStatement,
    pending_put: PreparedStatement,
    pending_get: PreparedStatement,
    pending_after: PreparedStatement,
    pending_delete: PreparedStatement,
    marker_get: PreparedStatement,
    marker_put: PreparedStatement,
    receipt_put: PreparedStatement,
    receipts_get: PreparedStatement,
    receipts_clear: PreparedStatement,
    group_create: PreparedStatement,
    group_get: PreparedStatement,
    group_add: PreparedStatement,
    group_remove: PreparedStatement,
    ping: PreparedStatement,
}

/// The schema, in order. A migration's statements are idempotent (`IF NOT EXISTS`), so
/// one interrupted half-way is simply run again; its version row is written last.
fn migrations(ks: &str) -> Vec<(i32, &'static str, Vec<String>)> {
    vec![(
        1,
        "initial schema",
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.messages (conversation text, bucket int, \
                 id uuid, sender text, sealed blob, PRIMARY KEY ((conversation, bucket), id)) \
                 WITH CLUSTERING ORDER BY (id DESC)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.conversation_buckets (conversation text, \
                 bucket int, PRIMARY KEY (conversation, bucket)) \
                 WITH CLUSTERING ORDER BY (bucket DESC)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.message_index (id uuid PRIMARY KEY, \
                 conversation text)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.pending (user text, id uuid, \
                 conversation text, PRIMARY KEY (user, id)) \
                 WITH CLUSTERING ORDER BY (id ASC) AND gc_grace_seconds = 10800"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.idempotency (sender text, cmid text, \
                 id uuid, PRIMARY KEY ((sender, cmid)))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.receipt_outbox (user text, key uuid, \
                 receipt blob, PRIMARY KEY (user, key)) \
                 WITH CLUSTERING ORDER BY (key ASC) AND gc_grace_seconds = 10800"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.read_markers (conversation text, \
                 reader text, upto uuid, PRIMARY KEY (conversation, reader))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.groups (id uuid PRIMARY KEY, name text, \
                 members set<text>)"
            ),
        ],
    )]
}

fn bucket_of(id: Uuid) -> i32 {
    i32::try_from(ts_of(id) / BUCKET_MS).unwrap_or(i32::MAX)
}

fn ttl_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

fn exec_error(e: ExecutionError) -> Error {
    match e {
        ExecutionError::BadQuery(e) => Error::Backend(format!("ScyllaDB refused a query: {e}")),
        ExecutionError::PrepareError(e) => Error::Backend(format!("ScyllaDB prepare: {e}")),
        e => Error::Unavailable(format!("ScyllaDB: {e}")),
    }
}

fn is_unavailable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_))
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

impl ScyllaStore {
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
        let session = tokio::time::timeout(
            config.timeout * 3,
            SessionBuilder::new()
                .known_nodes(&config.nodes)
                .connection_timeout(config.timeout)
                .default_execution_profile_handle(profile)
                .build(),
        )
        .await
        .map_err(|_| {
            Error::Unavailable(format!(
                "no CQL node of {:?} answered within {:?}",
                config.nodes,
                config.timeout * 3
            ))
        })?
        .map_err(|e| Error::Unavailable(format!("connecting to {:?}: {e}", config.nodes)))?;
        migrate(&session, &config).await?;
        let s = Statements::prepare(&session, &config).await?;
        tracing::info!(nodes = ?config.nodes, keyspace = %config.keyspace, "ScyllaDB store ready");
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                breaker: Breaker::new("scylla", config.timeout + Duration::from_secs(1)),
                config,
                session,
                s,
            }),
        })
    }

    /// Runs a prepared statement under the breaker; idempotent ones are retried.
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
        let call = async {
            if statement.get_is_idempotent() {
                retry(is_unavailable, once).await
            } else {
                once().await
            }
        };
        inner
            .breaker
            .call(is_unavailable, call)
            .await
            .map_err(guarded)
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

    async fn conversation_of(&self, id: Uuid) -> Result<Option<String>> {
        let rows: Vec<(String,)> = self.rows(&self.inner.s.index_get, (id,)).await?;
        Ok(rows.into_iter().next().map(|(c,)| c))
    }

    async fn insert_new(&self, message: &Message, recipients: &[String]) -> Result<()> {
        let s = &self.inner.s;
        let conversation = message.conversation.to_string();
        let sealed = self.inner.config.keys.seal(
            message.id,
            &conversation,
            &message.from,
            message.body.as_bytes(),
        )?;
        let bucket = bucket_of(message.id);
        let pending_ttl = ttl_secs(self.inner.config.pending_ttl);
        let mut writes = Vec::with_capacity(recipients.len() + 2);
        writes.push(
            self.run(
                &s.message_put,
                (
                    conversation.as_str(),
                    bucket,
                    message.id,
                    message.from.as_str(),
                    sealed.as_slice(),
                ),
            )
            .boxed(),
        );
        writes.push(
            self.run(&s.bucket_put, (conversation.as_str(), bucket))
                .boxed(),
        );
        for user in recipients {
            writes.push(
                self.run(
                    &s.pending_put,
                    (
                        user.as_str(),
                        message.id,
                        conversation.as_str(),
                        pending_ttl,
                    ),
                )
                .boxed(),
            );
        }
        try_join_all(writes).await?;
        // Last: the index marks the append as complete (a replay finds it and changes
        // nothing; a crash before it makes the replay write everything again).
        self.run(&s.index_put, (message.id, conversation.as_str()))
            .await?;
        Ok(())
    }

    async fn append_one(&self, new: NewMessage) -> Result<Appended> {
        let s = &self.inner.s;
        let NewMessage {
            message,
            recipients,
            ..
        } = new;
        if self.conversation_of(message.id).await?.is_some() {
            let checks = recipients.iter().map(|user| async move {
                let rows: Vec<(String,)> = self
                    .rows(&s.pending_get, (user.as_str(), message.id))
                    .await?;
                Ok::<_, Error>((!rows.is_empty()).then(|| user.clone()))
            });
            let still = try_join_all(checks).await?.into_iter().flatten().collect();
            return Ok(Appended {
                inserted: false,
                pending_for: still,
            });
        }
        self.insert_new(&message, &recipients).await?;
        Ok(Appended {
            inserted: true,
            pending_for: recipients,
        })
    }
}

async fn migrate(session: &Session, config: &ScyllaConfig) -> Result<()> {
    let ks = &config.keyspace;
    let ddl = |cql: String| async move {
        // Schema changes are slow on a busy node: they get a minute, not the request timeout.
        let mut statement = scylla::statement::Statement::new(cql.as_str());
        statement.set_request_timeout(Some(Duration::from_secs(60)));
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| Error::Backend(format!("schema: {e}: {cql}")))
    };
    let replication = config.replication.unwrap_or_else(|| {
        let nodes = session.get_cluster_state().get_nodes_info().len();
        u32::try_from(nodes.clamp(1, 3)).unwrap_or(1)
    });
    ddl(format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
        replication.max(1)
    ))
    .await?;
    ddl(format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (version int PRIMARY KEY, \
         description text, applied_at timestamp)"
    ))
    .await?;
    ddl(format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_lock (id int PRIMARY KEY, owner uuid)"
    ))
    .await?;
    let _ = session.await_schema_agreement().await;

    // One migrator at a time: an LWT lease that expires by itself if its holder dies.
    let me = Uuid::new_v4();
    let lease = session
        .prepare(format!(
            "INSERT INTO {ks}.schema_lock (id, owner) VALUES (0, ?) IF NOT EXISTS USING TTL 60"
        ))
        .await
        .map_err(|e| Error::Backend(format!("schema lock: {e}")))?;
    let release = session
        .prepare(format!(
            "DELETE FROM {ks}.schema_lock WHERE id = 0 IF owner = ?"
        ))
        .await
        .map_err(|e| Error::Backend(format!("schema lock: {e}")))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let result = session
            .execute_unpaged(&lease, (me,))
            .await
            .map_err(exec_error)?;
        if applied(result)? {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Unavailable(
                "another process has held the schema lock for 90 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let outcome = run_migrations(session, ks, &ddl).await;
    let _ = session.execute_unpaged(&release, (me,)).await;
    outcome
}

async fn run_migrations<F, Fut>(session: &Session, ks: &str, ddl: &F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<scylla::response::query_result::QueryResult>>,
{
    let done: BTreeSet<i32> = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(rows_error)?
        .rows::<(i32,)>()
        .map_err(rows_error)?
        .filter_map(|r| r.ok().map(|(v,)| v))
        .collect();
    for (version, description, statements) in migrations(ks) {
        if done.contains(&version) {
            continue;
        }
        tracing::info!(version, description, "applying schema migration");
        for cql in statements {
            ddl(cql).await?;
        }
        let _ = session.await_schema_agreement().await;
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_migrations (version, description, applied_at) \
                     VALUES (?, ?, toTimestamp(now()))"
                ),
                (version, description),
            )
            .await
            .map_err(exec_error)?;
    }
    Ok(())
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

impl Statements {
    async fn prepare(session: &Session, config: &ScyllaConfig) -> Result<Self> {
        let ks = &config.keyspace;
        let prepare = |cql: String, idempotent: bool| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| Error::Backend(format!("preparing {cql}: {e}")))?;
            statement.set_is_idempotent(idempotent);
            Ok::<_, Error>(statement)
        };
        Ok(Statements {
            claim: prepare(
                format!(
                    "INSERT INTO {ks}.idempotency (sender, cmid, id) VALUES (?, ?, ?) \
                     IF NOT EXISTS USING TTL {}",
                    ttl_secs(config.idempotency_ttl)
                ),
                // Repeating it answers the same id: the first insert won either way.
                true,
            )
            .await?,
            index_get: prepare(
                format!("SELECT conversation FROM {ks}.message_index WHERE id = ?"),
                true,
            )
            .await?,
            index_put: prepare(
                format!("INSERT INTO {ks}.message_index (id, conversation) VALUES (?, ?)"),
                true,
            )
            .await?,
            message_put: prepare(
                format!(
                    "INSERT INTO {ks}.messages (conversation, bucket, id, sender, sealed) \
                     VALUES (?, ?, ?, ?, ?)"
                ),
                true,
            )
            .await?,
            message_get: prepare(
                format!(
                    "SELECT sender, sealed FROM {ks}.messages \
                     WHERE conversation = ? AND bucket = ? AND id = ?"
                ),
                true,
            )
            .await?,
            bucket_put: prepare(
                format!(
                    "INSERT INTO {ks}.conversation_buckets (conversation, bucket) VALUES (?, ?)"
                ),
                true,
            )
            .await?,
            buckets_upto: prepare(
                format!(
                    "SELECT bucket FROM {ks}.conversation_buckets \
                     WHERE conversation = ? AND bucket <= ? AND bucket >= ?"
                ),
                true,
            )
            .await?,
            history_before: prepare(
                format!(
                    "SELECT id, sender, sealed FROM {ks}.messages \
                     WHERE conversation = ? AND bucket = ? AND id < ? LIMIT ?"
                ),
                true,
            )
            .await?,
            history_all: prepare(
                format!(
                    "SELECT id, sender, sealed FROM {ks}.messages \
                     WHERE conversation = ? AND bucket = ? LIMIT ?"
                ),
                true,
            )
            .await?,
            read_range: prepare(
                format!(
                    "SELECT sender FROM {ks}.messages WHERE conversation = ? AND bucket = ? \
                     AND id <= ? AND id > ? LIMIT ?"
                ),
                true,
            )
            .await?,
            pending_put: prepare(
                format!(
                    "INSERT INTO {ks}.pending (user, id, conversation) VALUES (?, ?, ?) \
                     USING TTL ?"
                ),
                true,
            )
            .await?,
            pending_get: prepare(
                format!("SELECT conversation FROM {ks}.pending WHERE user = ? AND id = ?"),
                true,
            )
            .await?,
            pending_after: prepare(
                format!(
                    "SELECT id, conversation FROM {ks}.pending WHERE user = ? AND id > ? \
                     LIMIT ?"
                ),
                true,
            )
            .await?,
            pending_delete: prepare(
                format!("DELETE FROM {ks}.pending WHERE user = ? AND id = ?"),
                true,
            )
            .await?,
            marker_get: prepare(
                format!("SELECT upto FROM {ks}.read_markers WHERE conversation = ? AND reader = ?"),
                true,
            )
            .await?,
            marker_put: prepare(
                format!(
                    "INSERT INTO {ks}.read_markers (conversation, reader, upto) VALUES (?, ?, ?)"
                ),
                true,
            )
            .await?,
            receipt_put: prepare(
                format!(
                    "INSERT INTO {ks}.receipt_outbox (user, key, receipt) VALUES (?, ?, ?) \
                     USING TTL {}",
                    ttl_secs(config.pending_ttl)
                ),
                true,
            )
            .await?,
            receipts_get: prepare(
                format!("SELECT key, receipt FROM {ks}.receipt_outbox WHERE user = ? LIMIT ?"),
                true,
            )
            .await?,
            receipts_clear: prepare(
                format!("DELETE FROM {ks}.receipt_outbox WHERE user = ? AND key <= ?"),
                true,
            )
            .await?,
            group_create: prepare(
                format!(
                    "INSERT INTO {ks}.groups (id, name, members) VALUES (?, ?, ?) IF NOT EXISTS"
                ),
                true,
            )
            .await?,
            group_get: prepare(
                format!("SELECT name, members FROM {ks}.groups WHERE id = ?"),
                true,
            )
            .await?,
            group_add: prepare(
                format!("UPDATE {ks}.groups SET members = members + ? WHERE id = ?"),
                true,
            )
            .await?,
            group_remove: prepare(
                format!("UPDATE {ks}.groups SET members = members - ? WHERE id = ?"),
                true,
            )
            .await?,
            ping: prepare("SELECT release_version FROM system.local".into(), true).await?,
        })
    }
}

fn limit_i32(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX).max(1)
}

impl MessageStore for ScyllaStore {
    /// An LWT at claim time: the record is durable before any message carries the id.
    async fn claim_send(&self, sender: &str, client_msg_id: &str, proposed: Uuid) -> Result<Uuid> {
        let result = self
            .run(&self.inner.s.claim, (sender, client_msg_id, proposed))
            .await?;
        let rows = result.into_rows_result().map_err(rows_error)?;
        let row: Option<Row> = rows.maybe_first_row::<Row>().map_err(rows_error)?;
        let Some(row) = row else {
            return Err(Error::Backend("an LWT answered no row".into()));
        };
        let mut columns = row.columns.into_iter().flatten();
        match columns.next() {
            Some(CqlValue::Boolean(true)) => Ok(proposed),
            Some(CqlValue::Boolean(false)) => columns
                .find_map(|c| match c {
                    CqlValue::Uuid(id) => Some(id),
                    _ => None,
                })
                .ok_or_else(|| Error::Backend("an LWT did not return the existing id".into())),
            other => Err(Error::Backend(format!("unexpected LWT answer {other:?}"))),
        }
    }

    /// Messages of one batch are appended concurrently (each is idempotent by id); the
    /// outcomes keep the batch's order.
    async fn append(&self, batch: Vec<NewMessage>) -> Result<Vec<Appended>> {
        try_join_all(batch.into_iter().map(|new| self.append_one(new))).await
    }

    async fn message(&self, id: Uuid) -> Result<Option<Message>> {
        match self.conversation_of(id).await? {
            Some(conversation) => self.load(&conversation, id).await,
            None => Ok(None),
        }
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

    async fn ack(&self, user: &str, ids: &[Uuid]) -> Result<Vec<AckedMessage>> {
        let s = &self.inner.s;
        let acks = ids.iter().map(|id| async move {
            // The pending row names the conversation: no index lookup.
            let rows: Vec<(String,)> = self.rows(&s.pending_get, (user, *id)).await?;
            let Some((conversation,)) = rows.into_iter().next() else {
                return Ok::<_, Error>(None);
            };
            self.run(&s.pending_delete, (user, *id)).await?;
            let sender: Vec<(String, Vec<u8>)> = self
                .rows(&s.message_get, (conversation.as_str(), bucket_of(*id), *id))
                .await?;
            let Some((from, _)) = sender.into_iter().next() else {
                return Ok(None);
            };
            Ok(Some(AckedMessage {
                id: *id,
                conversation: conversation
                    .parse()
                    .map_err(|e| Error::Backend(format!("pending entry: {e}")))?,
                from,
            }))
        });
        Ok(try_join_all(acks).await?.into_iter().flatten().collect())
    }

    /// A reader's reads are serialised by the inbound log (one partition per user), so the
    /// read-then-write of the marker does not race with itself.
    async fn mark_read(&self, reader: &str, c: &Conversation, upto: Uuid) -> Result<Vec<String>> {
        let s = &self.inner.s;
        let conversation = c.to_string();
        if self.conversation_of(upto).await?.as_deref() != Some(conversation.as_str()) {
            return Err(Error::NotFound(format!("message {upto} in {conversation}")));
        }
        let previous: Vec<(Uuid,)> = self
            .rows(&s.marker_get, (conversation.as_str(), reader))
            .await?;
        let previous = previous.into_iter().next().map(|(p,)| p);
        if previous.is_some_and(|p| p.as_u128() >= upto.as_u128()) {
            return Ok(Vec::new());
        }
        let floor = previous.unwrap_or(Uuid::nil());
        let lowest_bucket = previous.map_or(i32::MIN, bucket_of);
        let buckets: Vec<(i32,)> = self
            .rows(
                &s.buckets_upto,
                (conversation.as_str(), bucket_of(upto), lowest_bucket),
            )
            .await?;
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
        self.run(&s.marker_put, (conversation.as_str(), reader, upto))
            .await?;
        Ok(senders.into_iter().collect())
    }

    async fn push_receipts(&self, user: &str, receipts: Vec<Receipt>) -> Result<()> {
        let s = &self.inner.s;
        let writes = receipts.iter().map(|r| async move {
            let bytes = postcard::to_allocvec(r).map_err(|e| Error::Backend(e.to_string()))?;
            self.run(&s.receipt_put, (user, Uuid::now_v7(), bytes))
                .await
        });
        try_join_all(writes).await?;
        Ok(())
    }

    async fn receipts(&self, user: &str, limit: usize) -> Result<Vec<(Uuid, Receipt)>> {
        let rows: Vec<(Uuid, Vec<u8>)> = self
            .rows(&self.inner.s.receipts_get, (user, limit_i32(limit)))
            .await?;
        rows.into_iter()
            .map(|(key, bytes)| {
                let receipt = postcard::from_bytes(&bytes)
                    .map_err(|e| Error::Backend(format!("stored receipt: {e}")))?;
                Ok((key, receipt))
            })
            .collect()
    }

    async fn clear_receipts(&self, user: &str, upto: Uuid) -> Result<()> {
        self.run(&self.inner.s.receipts_clear, (user, upto)).await?;
        Ok(())
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
            Ok(())
        } else {
            Err(Error::Invalid(format!("group {} already exists", group.id)))
        }
    }

    async fn group(&self, id: Uuid) -> Result<Option<Group>> {
        let rows: Vec<(Option<String>, Option<Vec<String>>)> =
            self.rows(&self.inner.s.group_get, (id,)).await?;
        Ok(rows.into_iter().next().map(|(name, members)| Group {
            id,
            name: name.unwrap_or_default(),
            members: members.unwrap_or_default().into_iter().collect(),
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
        group.members.extend(add.iter().cloned());
        for member in &remove {
            group.members.remove(member);
        }
        group.check_size()?;
        if !add.is_empty() {
            self.run(&s.group_add, (add, id)).await?;
        }
        if !remove.is_empty() {
            self.run(&s.group_remove, (remove, id)).await?;
        }
        Ok(group)
    }

    async fn ping(&self) -> Result<()> {
        self.run(&self.inner.s.ping, ()).await?;
        Ok(())
    }
}
