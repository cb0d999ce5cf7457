//! The embedded store's rows: their types and encoding (postcard), the key layout
//! (`hash(name) name ␀ rest`), and the compaction filter that drops expired idempotency
//! records.

use std::time::{SystemTime, UNIX_EPOCH};

use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Conversation, DeviceKeys, Group, OneTimeKey};

/// A message row: the sender in clear, the body sealed by [`Keyring::seal`].
#[derive(Serialize, Deserialize)]
pub(super) struct StoredMessage {
    pub(super) from: String,
    pub(super) sealed: Vec<u8>,
}

/// A pending entry names its message's conversation and sender, so an ack needs no other
/// read.
#[derive(Serialize, Deserialize)]
pub(super) struct PendingEntry {
    pub(super) conversation: String,
    pub(super) from: String,
}

/// A device with published keys: its identity and its fallback key. Its one-time keys are
/// rows of their own (`one_time_keys`, under its queue's address).
#[derive(Serialize, Deserialize)]
pub(super) struct DeviceRecord {
    pub(super) keys: DeviceKeys,
    pub(super) fallback: Option<OneTimeKey>,
}

/// `(sender, client_msg_id) →` the message a send stored.
#[derive(Serialize, Deserialize)]
pub(super) struct SendRecord {
    pub(super) id: u128,
    pub(super) conversation: String,
    pub(super) created_ms: u64,
}

pub(super) fn backend(e: fjall::Error) -> Error {
    Error::Backend(format!("embedded store: {e}"))
}

impl From<fjall::Error> for Error {
    fn from(e: fjall::Error) -> Self {
        backend(e)
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Backend(format!("encoding a record: {e}")))
}

pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Backend(format!("decoding a record: {e}")))
}

/// A group's row: the group, then when its later members joined ([`Group::joined`], which
/// the group's own encoding leaves out). Rows written before joins were kept end after
/// the group, and decode with none.
pub(super) fn encode_group(group: &Group) -> Result<Vec<u8>> {
    let mut bytes = encode(group)?;
    bytes.extend(encode(&group.joined)?);
    Ok(bytes)
}

pub(super) fn decode_group(bytes: &[u8]) -> Result<Group> {
    let (mut group, rest): (Group, _) = postcard::take_from_bytes(bytes)
        .map_err(|e| Error::Backend(format!("decoding a group: {e}")))?;
    if !rest.is_empty() {
        group.joined = decode(rest)?;
    }
    Ok(group)
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `hash(prefix) prefix ␀ rest`. The 8-byte hash first (xxh3, stable across builds and
/// platforms) makes keys of different names differ in their first bytes: the memtables'
/// skip lists compare keys all the time, and names share long prefixes (`dm:…`). Keys of
/// one name still sort together, by `rest`.
pub(super) fn key(prefix: &str, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + prefix.len() + 1 + rest.len());
    key.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(prefix.as_bytes()).to_be_bytes());
    key.extend_from_slice(prefix.as_bytes());
    key.push(0);
    key.extend_from_slice(rest);
    key
}

pub(super) fn id_key(prefix: &str, id: u128) -> Vec<u8> {
    key(prefix, &id.to_be_bytes())
}

/// The name in a `hash prefix ␀ id` key.
pub(super) fn name_of(key: &[u8]) -> Result<&str> {
    key.get(8..key.len().saturating_sub(17))
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| Error::Backend("a stored message key is malformed".into()))
}

/// The id at the end of a `prefix ␀ id` key.
pub(super) fn id_of(key: &[u8]) -> Result<u128> {
    key.len()
        .checked_sub(16)
        .and_then(|at| key.get(at..))
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .map(u128::from_be_bytes)
        .ok_or_else(|| Error::Backend("a stored key is too short".into()))
}

pub(super) fn id_value(bytes: &[u8]) -> Result<u128> {
    <[u8; 16]>::try_from(bytes)
        .map(u128::from_be_bytes)
        .map_err(|_| Error::Backend("a stored id is not 16 bytes".into()))
}

pub(super) fn parse_conversation(name: &str) -> Result<Conversation> {
    name.parse()
        .map_err(|e| Error::Backend(format!("stored conversation: {e}")))
}

/// Drops idempotency records past their time during compactions (reads ignore expired
/// ones that are still there), so no scan is ever needed to prune them.
pub(super) struct ExpireSends {
    pub(super) ttl_ms: u64,
}

impl Factory for ExpireSends {
    fn name(&self) -> &str {
        "expire-send-records"
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpireSendsFilter {
            cutoff_ms: now_ms().saturating_sub(self.ttl_ms),
        })
    }
}

pub(super) struct ExpireSendsFilter {
    cutoff_ms: u64,
}

impl CompactionFilter for ExpireSendsFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _: &Context) -> CompactionFilterResult {
        let value = item.value()?;
        Ok(match decode::<SendRecord>(&value) {
            Ok(record) if record.created_ms < self.cutoff_ms => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}
