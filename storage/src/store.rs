//! The store contract and the enum of backends that is what actually runs.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use uuid::Uuid;

use crate::crypto::Keyring;
use crate::error::Result;
use crate::model::{
    Acked, AckedMessage, Appended, Claimed, Conversation, Device, DeviceKeys, Group, InboxEntry,
    Marker, Message, NewMessage, Notice, OneTimeKey, Receipt,
};

mod embedded;
mod scylla;

pub use self::scylla::{ScyllaConfig, ScyllaStore};
pub use embedded::{EmbeddedConfig, EmbeddedStore};

/// What every message store does. Each operation is durable when it returns `Ok` and
/// idempotent where the doc says so, because callers retry and the inbound log replays.
///
/// Exactly two implementations exist: [`EmbeddedStore`] (one process, on disk) and the
/// distributed one on ScyllaDB. One conformance suite (`tests/conformance.rs`) holds both
/// to this contract.
pub trait MessageStore: Send + Sync + 'static {
    /// Appends messages and their recipients' pending entries, in order, and resolves each
    /// send's idempotency key: a message whose `(sender, client_msg_id)` is already stored
    /// (a retried send, or the same record read again) resolves to the stored message,
    /// reported with `inserted: false`, and changes nothing. Without a `client_msg_id` the
    /// message id is the key. Within one call, a later message with the key of an earlier
    /// one resolves to the earlier one.
    ///
    /// Each inserted message is also the latest activity of its conversation in the
    /// inboxes of its sender and recipients ([`MessageStore::conversations`]).
    ///
    /// Callers that append the same key concurrently from two places get no such promise:
    /// the inbound log routes every message of a conversation through one ordered
    /// partition, so a retry meets its first attempt there.
    fn append(&self, batch: &[NewMessage]) -> impl Future<Output = Result<Vec<Appended>>> + Send;

    /// One message of a conversation by id.
    fn message(
        &self,
        conversation: &Conversation,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// A page of a conversation, newest first, strictly older than `before` when given.
    fn history(
        &self,
        conversation: &Conversation,
        before: Option<Uuid>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// A user's pending messages, oldest first, strictly newer than `after` when given.
    fn pending(
        &self,
        user: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Removes messages from a user's pending queue and returns those that were pending
    /// (ids that were not are ignored, so a repeated ack returns nothing), and moves the
    /// user's delivered marker in each conversation up to the newest message acked there
    /// that someone else sent (it never moves back). Acks of one
    /// user must not run concurrently with each other (the inbound log orders them) for
    /// each message to be reported once.
    ///
    /// `known` are entries the caller knows to be pending (it appended them, and nothing
    /// else acks this user's messages meanwhile): a backend may remove and report them
    /// without reading them first. They are reported with the others.
    ///
    /// For each acked message someone else sent, a delivered receipt (by `user`, the
    /// queue) is kept for its sender as [`MessageStore::push_notices`] would, and it is
    /// kept before or together with the removal: an ack that fails may have kept receipts
    /// (keeping one again when retried), but a removed entry always has its receipt.
    fn ack(
        &self,
        user: &str,
        ids: &[Uuid],
        known: Vec<AckedMessage>,
    ) -> impl Future<Output = Result<Vec<Acked>>> + Send;

    /// Moves `reader`'s read marker in a conversation up to `upto` (a message of that
    /// conversation, else `NotFound`), keeps a read receipt (for `upto`, by `reader`) for
    /// each sender other than the reader of the messages it newly covers, and returns
    /// them as (sender, id, receipt). A marker never moves back. As with
    /// [`MessageStore::ack`], the receipts are kept before or together with the marker.
    fn mark_read(
        &self,
        reader: &str,
        conversation: &Conversation,
        upto: Uuid,
    ) -> impl Future<Output = Result<Vec<(String, Uuid, Receipt)>>> + Send;

    /// Keeps notices, each for its user under its id (time-ordered), until a device of
    /// the user confirms it ([`MessageStore::drop_notices`]). Keeping one again is
    /// harmless. One call for many users: the writes go together.
    fn push_notices(
        &self,
        notices: Vec<(String, Uuid, Notice)>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// A user's kept notices with ids after `after`, oldest first.
    fn notices(
        &self,
        user: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Uuid, Notice)>>> + Send;

    /// Forgets kept notices by user and id (a device confirmed them). Unknown ids are
    /// ignored.
    fn drop_notices(&self, notices: &[(String, Uuid)]) -> impl Future<Output = Result<()>> + Send;

    /// A user's conversations, latest activity first, those with activity strictly older
    /// than `before` when given.
    fn conversations(
        &self,
        user: &str,
        before: Option<Uuid>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<InboxEntry>>> + Send;

    /// The read and delivered markers of a conversation's members (those who have one).
    fn markers(
        &self,
        conversation: &Conversation,
    ) -> impl Future<Output = Result<Vec<Marker>>> + Send;

    /// Creates a group; its id must be new. It enters its members' inboxes.
    fn create_group(&self, group: Group) -> impl Future<Output = Result<()>> + Send;

    fn group(&self, id: Uuid) -> impl Future<Output = Result<Option<Group>>> + Send;

    /// Adds then removes members; `NotFound` for an unknown group, `Invalid` past
    /// [`crate::MAX_GROUP_MEMBERS`]. Who was not a member joins now ([`Group::joined`]);
    /// who is removed is forgotten. The change is the group's latest activity in its
    /// members' inboxes; the removed lose it from theirs.
    fn update_members(
        &self,
        id: Uuid,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> impl Future<Output = Result<Group>> + Send;

    /// Publishes a device's keys for end-to-end encryption: its identity (which enters it
    /// in its user's device list), more one-time keys (ids already there are ignored) and,
    /// when given, a new fallback key. A device that publishes a different identity is a
    /// new device under the same id: its old one-time keys and fallback key are forgotten,
    /// and so is its own queue (what was encrypted for the old identity, as
    /// [`Self::remove_device`] drops it).
    /// `Invalid` past [`crate::MAX_DEVICES_PER_USER`] devices or
    /// [`crate::MAX_ONE_TIME_KEYS`] unclaimed keys (nothing is stored then). Returns how
    /// many one-time keys the device has.
    fn publish_keys(
        &self,
        user: &str,
        device: &str,
        keys: DeviceKeys,
        one_time: Vec<OneTimeKey>,
        fallback: Option<OneTimeKey>,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// The devices with published keys of these users, by user then device.
    fn devices(&self, users: &[String]) -> impl Future<Output = Result<Vec<Device>>> + Send;

    /// Hands out one of a device's one-time keys, removing it: no key is ever handed out
    /// twice, also to concurrent callers on other nodes. With none left, the fallback key
    /// (which stays). `None` for a device without published keys.
    fn claim_key(
        &self,
        user: &str,
        device: &str,
    ) -> impl Future<Output = Result<Option<Claimed>>> + Send;

    /// Forgets a device's keys and its own queue (pending end-to-end encrypted messages and
    /// kept notices): it leaves its user's device list. Idempotent.
    fn remove_device(&self, user: &str, device: &str) -> impl Future<Output = Result<()>> + Send;

    /// Answers when the backend can serve reads (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// Seals every stored message body that its key ring's primary key did not seal again
    /// with the primary key, counting in `progress` as it goes, while the store keeps
    /// serving: every row stays readable throughout (it is rewritten whole, in place). Run
    /// it after every process has the new primary (messages written meanwhile by a process
    /// that has not would be left behind; a second pass finds them). Idempotent.
    fn reencrypt(&self, progress: &Reencryption) -> impl Future<Output = Result<()>> + Send;
}

/// How far a [`MessageStore::reencrypt`] pass has got.
#[derive(Debug, Default)]
pub struct Reencryption {
    /// Message rows read.
    pub scanned: AtomicU64,
    /// Of those, rows sealed again with the primary key.
    pub rewritten: AtomicU64,
}

impl Reencryption {
    pub(crate) fn add(&self, scanned: u64, rewritten: u64) {
        self.scanned.fetch_add(scanned, Ordering::Relaxed);
        self.rewritten.fetch_add(rewritten, Ordering::Relaxed);
        metrics::counter!("storage_reencrypted_rows_total").increment(rewritten);
    }
}

/// The store that runs: one variant per backend, chosen from configuration. Its single
/// `match` is also where every operation is counted and timed.
#[derive(Clone, Debug)]
pub enum Store {
    Embedded(EmbeddedStore),
    Scylla(ScyllaStore),
}

macro_rules! observed {
    ($self:ident, $op:literal, |$backend:ident| $call:expr) => {{
        let started = Instant::now();
        let result = match $self {
            Store::Embedded($backend) => $call.await,
            // Boxed: the driver's futures run to tens of KiB, and inline they would make
            // every caller's future (a connection's request handler) that large.
            Store::Scylla($backend) => Box::pin($call).await,
        };
        record($op, started, result.is_ok());
        result
    }};
}

fn record(op: &'static str, started: Instant, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("storage_ops_total", "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!("storage_op_seconds", "op" => op).record(started.elapsed().as_secs_f64());
}

impl Store {
    /// The key ring the store seals and opens message bodies with; reloading it changes
    /// the store's keys.
    pub fn keys(&self) -> &Keyring {
        match self {
            Store::Embedded(s) => s.keys(),
            Store::Scylla(s) => s.keys(),
        }
    }

    /// The backend's name, for logs and `/readyz`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Scylla(_) => "scylla",
        }
    }
}

impl MessageStore for Store {
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        observed!(self, "append", |s| s.append(batch))
    }
    async fn message(&self, c: &Conversation, id: Uuid) -> Result<Option<Message>> {
        observed!(self, "message", |s| s.message(c, id))
    }
    async fn history(
        &self,
        c: &Conversation,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        observed!(self, "history", |s| s.history(c, before, limit))
    }
    async fn pending(&self, user: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<Message>> {
        observed!(self, "pending", |s| s.pending(user, after, limit))
    }
    async fn ack(&self, user: &str, ids: &[Uuid], known: Vec<AckedMessage>) -> Result<Vec<Acked>> {
        observed!(self, "ack", |s| s.ack(user, ids, known))
    }
    async fn mark_read(
        &self,
        reader: &str,
        c: &Conversation,
        upto: Uuid,
    ) -> Result<Vec<(String, Uuid, Receipt)>> {
        observed!(self, "mark_read", |s| s.mark_read(reader, c, upto))
    }
    async fn push_notices(&self, notices: Vec<(String, Uuid, Notice)>) -> Result<()> {
        observed!(self, "push_notices", |s| s.push_notices(notices))
    }
    async fn notices(
        &self,
        user: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Notice)>> {
        observed!(self, "notices", |s| s.notices(user, after, limit))
    }
    async fn drop_notices(&self, notices: &[(String, Uuid)]) -> Result<()> {
        observed!(self, "drop_notices", |s| s.drop_notices(notices))
    }
    async fn conversations(
        &self,
        user: &str,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<InboxEntry>> {
        observed!(self, "conversations", |s| s
            .conversations(user, before, limit))
    }
    async fn markers(&self, c: &Conversation) -> Result<Vec<Marker>> {
        observed!(self, "markers", |s| s.markers(c))
    }
    async fn create_group(&self, group: Group) -> Result<()> {
        observed!(self, "create_group", |s| s.create_group(group))
    }
    async fn group(&self, id: Uuid) -> Result<Option<Group>> {
        observed!(self, "group", |s| s.group(id))
    }
    async fn update_members(
        &self,
        id: Uuid,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Group> {
        observed!(self, "update_members", |s| s
            .update_members(id, add, remove))
    }
    async fn publish_keys(
        &self,
        user: &str,
        device: &str,
        keys: DeviceKeys,
        one_time: Vec<OneTimeKey>,
        fallback: Option<OneTimeKey>,
    ) -> Result<usize> {
        observed!(self, "publish_keys", |s| s
            .publish_keys(user, device, keys, one_time, fallback))
    }
    async fn devices(&self, users: &[String]) -> Result<Vec<Device>> {
        observed!(self, "devices", |s| s.devices(users))
    }
    async fn claim_key(&self, user: &str, device: &str) -> Result<Option<Claimed>> {
        observed!(self, "claim_key", |s| s.claim_key(user, device))
    }
    async fn remove_device(&self, user: &str, device: &str) -> Result<()> {
        observed!(self, "remove_device", |s| s.remove_device(user, device))
    }
    async fn ping(&self) -> Result<()> {
        observed!(self, "ping", |s| s.ping())
    }
    async fn reencrypt(&self, progress: &Reencryption) -> Result<()> {
        // Not timed with the operations: a pass over every row is no request.
        match self {
            Store::Embedded(s) => s.reencrypt(progress).await,
            Store::Scylla(s) => Box::pin(s.reencrypt(progress)).await,
        }
    }
}

/// The users whose inboxes a message enters: its sender and the users it is pending for
/// (a device's queue counts for its user), each once.
pub(crate) fn inbox_users<'a>(from: &'a str, queues: &'a [String]) -> Vec<&'a str> {
    let mut users: Vec<&str> = std::iter::once(from)
        .chain(queues.iter().map(|q| crate::model::user_of(q)))
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// Checks what a device publishes against what it has: `Invalid` past the limits.
pub(crate) fn check_supply(devices_after: usize, keys_after: usize) -> Result<()> {
    if devices_after > crate::MAX_DEVICES_PER_USER {
        return Err(crate::Error::Invalid(format!(
            "a user has at most {} devices with keys: remove one first",
            crate::MAX_DEVICES_PER_USER
        )));
    }
    if keys_after > crate::MAX_ONE_TIME_KEYS {
        return Err(crate::Error::Invalid(format!(
            "a device has at most {} unclaimed one-time keys ({keys_after} with these)",
            crate::MAX_ONE_TIME_KEYS
        )));
    }
    Ok(())
}

/// Adds rows a write has just stored to those its process remembers having written (so as
/// not to write them again), forgetting all of them first when they would number more than
/// `most`: a forgotten row is only written once more.
pub(crate) fn remember_written<T: Eq + Hash>(
    known: &mut HashSet<T>,
    fresh: HashSet<T>,
    most: usize,
) {
    if known.len() + fresh.len() > most {
        known.clear();
    }
    known.extend(fresh);
}

/// A page of a user's whole inbox, as both backends read it: latest activity first, only
/// activity strictly older than `before`, at most `limit` entries.
pub(crate) fn inbox_page(
    mut all: Vec<InboxEntry>,
    before: Option<Uuid>,
    limit: usize,
) -> Vec<InboxEntry> {
    if let Some(before) = before {
        all.retain(|e| e.activity.as_u128() < before.as_u128());
    }
    all.sort_by_key(|e| std::cmp::Reverse(e.activity.as_u128()));
    all.truncate(limit);
    all
}

/// What one `append` call has stored so far, so that a later message of the same call with
/// the same idempotency key resolves to the earlier one (the backends' reads do not see
/// writes of the call they are part of).
#[derive(Default)]
pub(crate) struct StoredThisCall<'a>(HashMap<SendKey<'a>, (Uuid, &'a Conversation, &'a [String])>);

/// The key a send is resolved by: its sender's `client_msg_id`, else its id.
#[derive(PartialEq, Eq, Hash)]
struct SendKey<'a>(&'a str, Result<&'a str, Uuid>);

impl<'a> SendKey<'a> {
    fn of(new: &'a NewMessage) -> Self {
        SendKey(
            &new.message.from,
            new.client_msg_id.as_deref().ok_or(new.message.id),
        )
    }
}

impl<'a> StoredThisCall<'a> {
    /// The outcome for `new` if this call already stored its key.
    pub(crate) fn earlier(&self, new: &'a NewMessage) -> Option<Appended> {
        let (id, conversation, queued) = self.0.get(&SendKey::of(new))?;
        Some(Appended {
            id: *id,
            conversation: (*conversation).clone(),
            inserted: false,
            pending_for: new
                .recipients
                .iter()
                .filter(|u| queued.contains(u))
                .cloned()
                .collect(),
        })
    }

    pub(crate) fn stored(&mut self, new: &'a NewMessage) {
        self.0.insert(
            SendKey::of(new),
            (new.message.id, &new.message.conversation, &new.recipients),
        );
    }
}
