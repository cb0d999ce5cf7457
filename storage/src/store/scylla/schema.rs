//! The schema of the ScyllaDB store: versioned migrations, run by the binaries
//! themselves, one process at a time under an LWT lease.

use std::collections::BTreeSet;
use std::time::Duration;

use scylla::client::session::Session;
use uuid::Uuid;

use super::{applied, exec_error, rows_error, ScyllaConfig};
use crate::error::{Error, Result};

/// The schema, in order. A migration's statements are idempotent (`IF NOT EXISTS`; an
/// `ADD` of a column that is there already counts as done), so one interrupted half-way is
/// simply run again; its version row is written last.
fn migrations(ks: &str) -> Vec<(i32, &'static str, Vec<String>)> {
    vec![
        (
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
        ),
        (
            2,
            "sends resolved by the dispatcher: one send record per key, read many at a time; \
             pending entries name their sender (message_index and idempotency are no longer \
             written)",
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.sends (key text PRIMARY KEY, id uuid, \
                     conversation text)"
                ),
                format!("ALTER TABLE {ks}.pending ADD sender text"),
            ],
        ),
        (
            3,
            "inboxes (each user's conversations by latest activity) and delivered markers",
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.inbox (user text, conversation text, \
                     activity uuid, PRIMARY KEY (user, conversation))"
                ),
                format!("ALTER TABLE {ks}.read_markers ADD delivered uuid"),
            ],
        ),
        (
            4,
            "device keys for end-to-end encryption: each user's devices, each device's \
             one-time keys",
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.devices (user text, device text, \
                     identity_key text, signing_key text, fallback_id text, fallback_key text, \
                     PRIMARY KEY (user, device))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.one_time_keys (user text, device text, \
                     key_id text, key text, PRIMARY KEY ((user, device), key_id))"
                ),
            ],
        ),
        (
            5,
            "when each member added to a group later joined: they see its messages from then",
            vec![format!(
                "ALTER TABLE {ks}.groups ADD joined map<text, uuid>"
            )],
        ),
    ]
}

/// Runs the migrations; returns when version 2 was applied to a keyspace that version 1
/// had been using (an upgrade), `None` for a keyspace that started at version 2 or later.
pub(super) async fn migrate(
    session: &Session,
    config: &ScyllaConfig,
) -> Result<Option<std::time::SystemTime>> {
    let ks = &config.keyspace;
    let ddl = |cql: String| async move {
        // Schema changes are slow on a busy node: they get a minute, not the request timeout.
        let mut statement = scylla::statement::Statement::new(cql.as_str());
        statement.set_request_timeout(Some(Duration::from_secs(60)));
        match session.query_unpaged(statement, ()).await {
            Ok(result) => Ok(Some(result)),
            // An interrupted migration runs again: a column it added is there already.
            Err(e) if cql.contains(" ADD ") && column_exists(&e.to_string()) => Ok(None),
            Err(e) => Err(Error::Backend(format!("schema: {e}: {cql}"))),
        }
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
    outcome?;
    upgraded_at(session, ks).await
}

/// When version 2 followed version 1 by more than a minute (version 1 was in use), the
/// time of version 2.
async fn upgraded_at(session: &Session, ks: &str) -> Result<Option<std::time::SystemTime>> {
    let rows: Vec<(i32, Option<scylla::value::CqlTimestamp>)> = session
        .query_unpaged(
            format!(
                "SELECT version, applied_at FROM {ks}.schema_migrations WHERE version IN (1, 2)"
            ),
            (),
        )
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(rows_error)?
        .rows::<(i32, Option<scylla::value::CqlTimestamp>)>()
        .map_err(rows_error)?
        .collect::<std::result::Result<_, _>>()
        .map_err(rows_error)?;
    let at = |v: i32| {
        rows.iter()
            .find(|(version, _)| *version == v)
            .and_then(|(_, at)| at.map(|t| t.0))
    };
    Ok(match (at(1), at(2)) {
        (Some(v1), Some(v2)) if v2 - v1 > 60_000 => {
            let ms = u64::try_from(v2).unwrap_or_default();
            Some(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        }
        _ => None,
    })
}

async fn run_migrations<F, Fut>(session: &Session, ks: &str, ddl: &F) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<scylla::response::query_result::QueryResult>>>,
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
        if version == 3 {
            fill_inboxes(session, ks).await?;
        }
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

/// Version 3's data step: every conversation enters its members' inboxes with its latest
/// message (a group with none, with its creation). One pass over the conversations and the
/// groups (paged), a read of each conversation's newest message; every write is an upsert at
/// the activity's own time, so running it again (an interrupted migration) changes nothing
/// and a newer activity written meanwhile wins. Returns how many conversations it filled.
async fn fill_inboxes(session: &Session, ks: &str) -> Result<usize> {
    use futures_util::TryStreamExt;
    let put = session
        .prepare(format!(
            "INSERT INTO {ks}.inbox (user, conversation, activity) VALUES (?, ?, ?) \
             USING TIMESTAMP ?"
        ))
        .await
        .map_err(|e| Error::Backend(format!("schema: {e}")))?;
    let newest_bucket = session
        .prepare(format!(
            "SELECT bucket FROM {ks}.conversation_buckets WHERE conversation = ? LIMIT 1"
        ))
        .await
        .map_err(|e| Error::Backend(format!("schema: {e}")))?;
    let newest_message = session
        .prepare(format!(
            "SELECT id FROM {ks}.messages WHERE conversation = ? AND bucket = ? LIMIT 1"
        ))
        .await
        .map_err(|e| Error::Backend(format!("schema: {e}")))?;
    let first = |result: scylla::response::query_result::QueryResult| -> Result<Option<_>> {
        Ok(result
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(scylla::value::CqlValue,)>()
            .map_err(rows_error)?
            .map(|(v,)| v))
    };
    let mut members: std::collections::HashMap<Uuid, Vec<String>> = Default::default();
    let mut latest: Vec<(String, Uuid)> = Vec::new();
    let mut groups = session
        .query_iter(format!("SELECT id, members FROM {ks}.groups"), ())
        .await
        .map_err(scan_error)?
        .rows_stream::<(Uuid, Option<Vec<String>>)>()
        .map_err(rows_error)?;
    while let Some((id, group)) = groups.try_next().await.map_err(scan_error)? {
        members.insert(id, group.unwrap_or_default());
        latest.push((format!("g:{}", id.hyphenated()), id));
    }
    let mut conversations = session
        .query_iter(
            format!("SELECT DISTINCT conversation FROM {ks}.conversation_buckets"),
            (),
        )
        .await
        .map_err(scan_error)?
        .rows_stream::<(String,)>()
        .map_err(rows_error)?;
    while let Some((name,)) = conversations.try_next().await.map_err(scan_error)? {
        let bucket = session
            .execute_unpaged(&newest_bucket, (name.as_str(),))
            .await
            .map_err(exec_error)?;
        let Some(scylla::value::CqlValue::Int(bucket)) = first(bucket)? else {
            continue;
        };
        let newest = session
            .execute_unpaged(&newest_message, (name.as_str(), bucket))
            .await
            .map_err(exec_error)?;
        if let Some(scylla::value::CqlValue::Uuid(id)) = first(newest)? {
            match latest.iter_mut().find(|(n, _)| *n == name) {
                Some((_, at)) => *at = (*at).max(id),
                None => latest.push((name, id)),
            }
        }
    }
    for (name, activity) in &latest {
        let users: Vec<String> = match name.parse() {
            Ok(crate::model::Conversation::Direct(a, b)) => vec![a, b],
            Ok(crate::model::Conversation::Group(id)) => members.remove(&id).unwrap_or_default(),
            Err(_) => continue,
        };
        let at = super::write_time(*activity);
        for user in users {
            session
                .execute_unpaged(&put, (user, name.as_str(), *activity, at))
                .await
                .map_err(exec_error)?;
        }
    }
    if !latest.is_empty() {
        tracing::warn!(
            conversations = latest.len(),
            "schema version 3: inboxes filled"
        );
    }
    Ok(latest.len())
}

fn scan_error(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("schema version 3, filling inboxes: {e}"))
}

/// Whether a refused `ALTER TABLE … ADD` says the column is there already (Cassandra and
/// ScyllaDB word it differently).
fn column_exists(error: &str) -> bool {
    error.contains("conflicts with an existing column") || error.contains("already exist")
}
