//! Every statement the ScyllaDB store runs, prepared once at start. All of them are
//! idempotent (upserts, deletes of named rows, reads, and LWTs whose repetition answers the
//! same) and marked so, which lets the driver and [`crate::resilience::retry`] repeat them.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::{ttl_secs, ScyllaConfig};
use crate::error::{Error, Result};

pub(super) struct Statements {
    pub(super) sends_get: PreparedStatement,
    pub(super) send_put: PreparedStatement,
    pub(super) legacy_send_get: PreparedStatement,
    pub(super) message_put: PreparedStatement,
    pub(super) message_get: PreparedStatement,
    pub(super) messages_scan: PreparedStatement,
    pub(super) message_reseal: PreparedStatement,
    pub(super) bucket_put: PreparedStatement,
    pub(super) buckets_upto: PreparedStatement,
    pub(super) history_before: PreparedStatement,
    pub(super) history_all: PreparedStatement,
    pub(super) read_range: PreparedStatement,
    pub(super) pending_put: PreparedStatement,
    pub(super) pending_get: PreparedStatement,
    pub(super) pending_some: PreparedStatement,
    pub(super) pending_after: PreparedStatement,
    pub(super) pending_delete: PreparedStatement,
    pub(super) marker_get: PreparedStatement,
    pub(super) marker_put: PreparedStatement,
    pub(super) receipt_put: PreparedStatement,
    pub(super) receipts_get: PreparedStatement,
    pub(super) receipts_after: PreparedStatement,
    pub(super) receipt_drop: PreparedStatement,
    pub(super) group_create: PreparedStatement,
    pub(super) group_get: PreparedStatement,
    pub(super) group_add: PreparedStatement,
    pub(super) group_remove: PreparedStatement,
    pub(super) inbox_put: PreparedStatement,
    pub(super) inbox_delete: PreparedStatement,
    pub(super) inbox_get: PreparedStatement,
    pub(super) delivered_put: PreparedStatement,
    pub(super) markers_get: PreparedStatement,
    pub(super) device_put: PreparedStatement,
    pub(super) device_fallback_put: PreparedStatement,
    pub(super) device_get: PreparedStatement,
    pub(super) devices_get: PreparedStatement,
    pub(super) device_delete: PreparedStatement,
    pub(super) key_put: PreparedStatement,
    pub(super) keys_get: PreparedStatement,
    pub(super) key_claim: PreparedStatement,
    pub(super) keys_clear: PreparedStatement,
    pub(super) queue_clear: PreparedStatement,
    pub(super) notices_clear: PreparedStatement,
    pub(super) ping: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session, config: &ScyllaConfig) -> Result<Self> {
        let ks = &config.keyspace;
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| Error::Backend(format!("preparing {cql}: {e}")))?;
            statement.set_is_idempotent(true);
            Ok::<_, Error>(statement)
        };
        let pending_ttl = ttl_secs(config.pending_ttl);
        Ok(Statements {
            sends_get: prepare(format!(
                "SELECT key, id, conversation FROM {ks}.sends WHERE key IN ?"
            ))
            .await?,
            send_put: prepare(format!(
                "INSERT INTO {ks}.sends (key, id, conversation) VALUES (?, ?, ?) USING TTL {}",
                ttl_secs(config.idempotency_ttl)
            ))
            .await?,
            legacy_send_get: prepare(format!(
                "SELECT id FROM {ks}.idempotency WHERE sender = ? AND cmid = ?"
            ))
            .await?,
            message_put: prepare(format!(
                "INSERT INTO {ks}.messages (conversation, bucket, id, sender, sealed) \
                 VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            message_get: prepare(format!(
                "SELECT sender, sealed FROM {ks}.messages \
                 WHERE conversation = ? AND bucket = ? AND id = ?"
            ))
            .await?,
            // Every message row, a page at a time (re-encryption).
            messages_scan: {
                let mut scan = prepare(format!(
                    "SELECT conversation, bucket, id, sender, sealed FROM {ks}.messages"
                ))
                .await?;
                scan.set_page_size(super::REENCRYPT_PAGE);
                scan
            },
            // Message rows are never deleted, so this cannot bring one back.
            message_reseal: prepare(format!(
                "UPDATE {ks}.messages SET sealed = ? \
                 WHERE conversation = ? AND bucket = ? AND id = ?"
            ))
            .await?,
            bucket_put: prepare(format!(
                "INSERT INTO {ks}.conversation_buckets (conversation, bucket) VALUES (?, ?)"
            ))
            .await?,
            buckets_upto: prepare(format!(
                "SELECT bucket FROM {ks}.conversation_buckets \
                 WHERE conversation = ? AND bucket <= ? AND bucket >= ?"
            ))
            .await?,
            history_before: prepare(format!(
                "SELECT id, sender, sealed FROM {ks}.messages \
                 WHERE conversation = ? AND bucket = ? AND id < ? LIMIT ?"
            ))
            .await?,
            history_all: prepare(format!(
                "SELECT id, sender, sealed FROM {ks}.messages \
                 WHERE conversation = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            read_range: prepare(format!(
                "SELECT sender FROM {ks}.messages WHERE conversation = ? AND bucket = ? \
                 AND id <= ? AND id > ? LIMIT ?"
            ))
            .await?,
            pending_put: prepare(format!(
                "INSERT INTO {ks}.pending (user, id, conversation, sender) VALUES (?, ?, ?, ?) \
                 USING TTL {pending_ttl}"
            ))
            .await?,
            pending_get: prepare(format!(
                "SELECT conversation FROM {ks}.pending WHERE user = ? AND id = ?"
            ))
            .await?,
            pending_some: prepare(format!(
                "SELECT id, conversation, sender FROM {ks}.pending WHERE user = ? AND id IN ?"
            ))
            .await?,
            pending_after: prepare(format!(
                "SELECT id, conversation FROM {ks}.pending WHERE user = ? AND id > ? LIMIT ?"
            ))
            .await?,
            pending_delete: prepare(format!(
                "DELETE FROM {ks}.pending WHERE user = ? AND id IN ?"
            ))
            .await?,
            marker_get: prepare(format!(
                "SELECT upto FROM {ks}.read_markers WHERE conversation = ? AND reader = ?"
            ))
            .await?,
            marker_put: prepare(format!(
                "INSERT INTO {ks}.read_markers (conversation, reader, upto) VALUES (?, ?, ?)"
            ))
            .await?,
            receipt_put: prepare(format!(
                "INSERT INTO {ks}.receipt_outbox (user, key, receipt) VALUES (?, ?, ?) \
                 USING TTL {pending_ttl}"
            ))
            .await?,
            receipts_get: prepare(format!(
                "SELECT key, receipt FROM {ks}.receipt_outbox WHERE user = ? LIMIT ?"
            ))
            .await?,
            receipts_after: prepare(format!(
                "SELECT key, receipt FROM {ks}.receipt_outbox WHERE user = ? AND key > ? LIMIT ?"
            ))
            .await?,
            receipt_drop: prepare(format!(
                "DELETE FROM {ks}.receipt_outbox WHERE user = ? AND key = ?"
            ))
            .await?,
            group_create: prepare(format!(
                "INSERT INTO {ks}.groups (id, name, members) VALUES (?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            group_get: prepare(format!(
                "SELECT name, members, joined FROM {ks}.groups WHERE id = ?"
            ))
            .await?,
            group_add: prepare(format!(
                "UPDATE {ks}.groups SET members = members + ?, joined = joined + ? WHERE id = ?"
            ))
            .await?,
            group_remove: prepare(format!(
                "UPDATE {ks}.groups SET members = members - ?, joined = joined - ? WHERE id = ?"
            ))
            .await?,
            // Inbox rows and delivered markers carry their activity's time as their write
            // time, so that the latest activity wins whatever order the writes land in.
            inbox_put: prepare(format!(
                "INSERT INTO {ks}.inbox (user, conversation, activity) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?"
            ))
            .await?,
            inbox_delete: prepare(format!(
                "DELETE FROM {ks}.inbox USING TIMESTAMP ? WHERE user = ? AND conversation = ?"
            ))
            .await?,
            inbox_get: prepare(format!(
                "SELECT conversation, activity FROM {ks}.inbox WHERE user = ?"
            ))
            .await?,
            delivered_put: prepare(format!(
                "UPDATE {ks}.read_markers USING TIMESTAMP ? SET delivered = ? \
                 WHERE conversation = ? AND reader = ?"
            ))
            .await?,
            markers_get: prepare(format!(
                "SELECT reader, upto, delivered FROM {ks}.read_markers WHERE conversation = ?"
            ))
            .await?,
            device_put: prepare(format!(
                "INSERT INTO {ks}.devices (user, device, identity_key, signing_key) \
                 VALUES (?, ?, ?, ?)"
            ))
            .await?,
            device_fallback_put: prepare(format!(
                "UPDATE {ks}.devices SET fallback_id = ?, fallback_key = ? \
                 WHERE user = ? AND device = ?"
            ))
            .await?,
            device_get: prepare(format!(
                "SELECT identity_key, signing_key, fallback_id, fallback_key FROM {ks}.devices \
                 WHERE user = ? AND device = ?"
            ))
            .await?,
            devices_get: prepare(format!(
                "SELECT device, identity_key, signing_key FROM {ks}.devices WHERE user = ?"
            ))
            .await?,
            device_delete: prepare(format!(
                "DELETE FROM {ks}.devices WHERE user = ? AND device = ?"
            ))
            .await?,
            key_put: prepare(format!(
                "INSERT INTO {ks}.one_time_keys (user, device, key_id, key) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            keys_get: prepare(format!(
                "SELECT key_id, key FROM {ks}.one_time_keys WHERE user = ? AND device = ?"
            ))
            .await?,
            // Whoever's delete applies has the key: a repetition answers "not applied", so
            // a key whose answer was lost is skipped, never handed out twice.
            key_claim: prepare(format!(
                "DELETE FROM {ks}.one_time_keys WHERE user = ? AND device = ? AND key_id = ? \
                 IF EXISTS"
            ))
            .await?,
            keys_clear: prepare(format!(
                "DELETE FROM {ks}.one_time_keys WHERE user = ? AND device = ?"
            ))
            .await?,
            queue_clear: prepare(format!("DELETE FROM {ks}.pending WHERE user = ?")).await?,
            notices_clear: prepare(format!("DELETE FROM {ks}.receipt_outbox WHERE user = ?"))
                .await?,
            ping: prepare("SELECT release_version FROM system.local".into()).await?,
        })
    }
}
