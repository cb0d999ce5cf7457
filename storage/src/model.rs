//! The message model: identifiers, conversations, messages, receipts and groups.
//!
//! These types cross process boundaries (the inbound log carries them), so they derive
//! `Serialize`; changing them is a wire change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Longest user id, device id or client message id, in characters (all ASCII).
pub const MAX_ID_LEN: usize = 64;

/// Largest group, creator included. Fan-out is on write (one pending entry per member),
/// so the size is bounded.
pub const MAX_GROUP_MEMBERS: usize = 1024;

/// A user or device id: 1–64 characters of `A–Z a–z 0–9 _ . @ -`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// The server timestamp of a message: the millisecond time inside its UUIDv7 id, so that a
/// retried send answers with the same `ts` as the first one.
pub fn ts_of(id: Uuid) -> i64 {
    match id.get_timestamp() {
        Some(ts) => {
            let (secs, nanos) = ts.to_unix();
            (secs as i64) * 1000 + i64::from(nanos / 1_000_000)
        }
        None => 0,
    }
}

/// A conversation: a direct one between two users, named by both ids sorted, or a group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversation {
    /// `dm:<a>:<b>` with `a <= b` (byte order).
    Direct(String, String),
    /// `g:<uuid>`.
    Group(Uuid),
}

impl Conversation {
    /// The direct conversation of two users, whichever side names it.
    pub fn direct(a: &str, b: &str) -> Self {
        if a <= b {
            Conversation::Direct(a.to_owned(), b.to_owned())
        } else {
            Conversation::Direct(b.to_owned(), a.to_owned())
        }
    }

    /// Whether `user` may read and write this direct conversation. Groups answer from their
    /// membership, which lives in the store.
    pub fn is_party(&self, user: &str) -> bool {
        match self {
            Conversation::Direct(a, b) => a == user || b == user,
            Conversation::Group(_) => false,
        }
    }

    /// The other party of a direct conversation (the user themself for a note to self).
    pub fn peer_of(&self, user: &str) -> Option<&str> {
        match self {
            Conversation::Direct(a, b) if a == user => Some(b),
            Conversation::Direct(a, b) if b == user => Some(a),
            _ => None,
        }
    }

    pub fn group_id(&self) -> Option<Uuid> {
        match self {
            Conversation::Group(id) => Some(*id),
            Conversation::Direct(..) => None,
        }
    }
}

impl fmt::Display for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conversation::Direct(a, b) => write!(f, "dm:{a}:{b}"),
            Conversation::Group(id) => write!(f, "g:{}", id.hyphenated()),
        }
    }
}

/// Why a conversation name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid conversation {0:?}: expected dm:<user>:<user> or g:<uuid>")]
pub struct BadConversation(pub String);

impl FromStr for Conversation {
    type Err = BadConversation;

    /// Accepts `dm:a:b` in either order (it is normalised to sorted order) and `g:<uuid>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadConversation(s.chars().take(80).collect());
        if let Some(rest) = s.strip_prefix("dm:") {
            let (a, b) = rest.split_once(':').ok_or_else(bad)?;
            if !is_valid_id(a) || !is_valid_id(b) {
                return Err(bad());
            }
            Ok(Conversation::direct(a, b))
        } else if let Some(g) = s.strip_prefix("g:") {
            Uuid::try_parse(g)
                .map(Conversation::Group)
                .map_err(|_| bad())
        } else {
            Err(bad())
        }
    }
}

impl Serialize for Conversation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Conversation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A stored message, decrypted (of an end-to-end encrypted one, the server holds only the
/// ciphertexts its devices sent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: Uuid,
    pub conversation: Conversation,
    pub from: String,
    /// The text of a server-encrypted message; empty for an end-to-end encrypted one.
    pub body: String,
    /// Milliseconds since the Unix epoch; always `ts_of(id)`.
    pub ts: i64,
    /// The ciphertexts of an end-to-end encrypted message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2ee: Option<E2ee>,
    /// Files the message carries: references to blobs, checked when it was sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

/// A file a message carries. Its bytes live in the blob store (uploaded before the send);
/// the message keeps the reference and what a client shows before downloading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub media_id: Uuid,
    pub content_type: String,
    /// Bytes of the stored blob.
    pub size: u64,
    /// SHA-256 of the stored blob, lowercase hex (of the ciphertext, for a file encrypted
    /// end to end).
    pub sha256: String,
    /// The file's name, as the sender gave it.
    pub name: Option<String>,
    pub caption: Option<String>,
    /// A small preview (base64, e.g. a JPEG thumbnail), shown before the download.
    pub thumbnail: Option<String>,
}

/// What a store keeps of a message with attachments (postcard, after [`RICH_CONTENT`]).
#[derive(Serialize, Deserialize)]
struct RichContent {
    body: String,
    e2ee: Option<E2ee>,
    attachments: Vec<Attachment>,
}

/// The first byte of the stored content of an end-to-end encrypted message: a text body is
/// UTF-8, in which 0xFF never occurs, so the two cannot be mistaken for each other.
const E2EE_CONTENT: u8 = 0xFF;

/// The first byte of the stored content of a message with attachments (0xFE never occurs in
/// UTF-8 either).
const RICH_CONTENT: u8 = 0xFE;

impl Message {
    /// The message without its body (which may be large), for bookkeeping.
    pub fn clone_header(&self) -> Message {
        Message {
            id: self.id,
            conversation: self.conversation.clone(),
            from: self.from.clone(),
            body: String::new(),
            ts: self.ts,
            e2ee: None,
            attachments: Vec::new(),
        }
    }

    /// What a store seals at rest: the body's UTF-8 bytes; for an end-to-end encrypted
    /// message a marker byte and its ciphertexts (postcard); for a message with attachments
    /// another marker byte and all of it (postcard).
    pub fn content(&self) -> Result<Vec<u8>, crate::Error> {
        fn encoded<T: Serialize>(marker: u8, value: &T, id: Uuid) -> crate::Result<Vec<u8>> {
            let mut out = vec![marker];
            postcard::to_io(value, &mut out)
                .map_err(|e| crate::Error::Backend(format!("encoding message {id}: {e}")))?;
            Ok(out)
        }
        match (&self.e2ee, self.attachments.is_empty()) {
            (None, true) => Ok(self.body.as_bytes().to_vec()),
            (Some(e2ee), true) => encoded(E2EE_CONTENT, e2ee, self.id),
            (_, false) => encoded(
                RICH_CONTENT,
                &RichContent {
                    body: self.body.clone(),
                    e2ee: self.e2ee.clone(),
                    attachments: self.attachments.clone(),
                },
                self.id,
            ),
        }
    }

    /// The message whose stored content ([`Message::content`]) is `content`.
    pub fn from_content(
        id: Uuid,
        conversation: Conversation,
        from: String,
        content: Vec<u8>,
    ) -> Result<Message, crate::Error> {
        let undecodable = |_| crate::Error::Decrypt(id);
        let (body, e2ee, attachments) = match content.split_first() {
            Some((&E2EE_CONTENT, rest)) => (
                String::new(),
                Some(postcard::from_bytes(rest).map_err(undecodable)?),
                Vec::new(),
            ),
            Some((&RICH_CONTENT, rest)) => {
                let rich: RichContent = postcard::from_bytes(rest).map_err(undecodable)?;
                (rich.body, rich.e2ee, rich.attachments)
            }
            _ => (
                String::from_utf8(content).map_err(|_| crate::Error::Decrypt(id))?,
                None,
                Vec::new(),
            ),
        };
        Ok(Message {
            id,
            conversation,
            from,
            body,
            ts: ts_of(id),
            e2ee,
            attachments,
        })
    }

    /// Who the message is pending for, given the members it goes to: for an end-to-end
    /// encrypted message, each device it carries a ciphertext for (by its
    /// [`device_address`]), else the users.
    pub fn queues(&self, members: Vec<String>) -> Vec<String> {
        match &self.e2ee {
            Some(e2ee) => e2ee.addresses().collect(),
            None => members,
        }
    }
}

/// The queue of one device, `user/device`, beside its user's own queue (`user`): ids never
/// contain `/`. A device's queue holds what only that device can read (end-to-end
/// encrypted messages, to-device messages) and is acked by that device alone.
pub fn device_address(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

/// The user of a queue: `user` for a user's queue, the part before `/` for a device's.
pub fn user_of(queue: &str) -> &str {
    queue.split_once('/').map_or(queue, |(user, _)| user)
}

/// The device of a device's queue (`None` for a user's queue).
pub fn device_of(queue: &str) -> Option<&str> {
    queue.split_once('/').map(|(_, device)| device)
}

/// An end-to-end encrypted message as the server keeps it: opaque ciphertexts, each for
/// the devices named. The server checks who they are for, never what they say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2ee {
    /// The sending device.
    pub device: String,
    /// Every device the message is for (the recipients', and the sender's other ones),
    /// each with its own ciphertext (Olm) unless `group` is given.
    pub to: Vec<ForDevice>,
    /// One ciphertext for all of `to` (Megolm, in groups).
    pub group: Option<GroupCiphertext>,
}

impl E2ee {
    /// The queues of the devices it is for.
    pub fn addresses(&self) -> impl Iterator<Item = String> + '_ {
        self.to.iter().map(|d| device_address(&d.user, &d.device))
    }

    /// What one device of the recipients may see: its own ciphertext (none if the message
    /// was not encrypted for it), or the group ciphertext.
    pub fn for_device(&self, user: &str, device: &str) -> DeviceCiphertext {
        let mine = self
            .to
            .iter()
            .find(|d| d.user == user && d.device == device);
        match &self.group {
            Some(group) => DeviceCiphertext {
                device: self.device.clone(),
                kind: None,
                session: Some(group.session.clone()),
                ciphertext: mine.map(|_| group.ciphertext.clone()),
            },
            None => {
                let olm = mine.and_then(|d| d.olm.as_ref());
                DeviceCiphertext {
                    device: self.device.clone(),
                    kind: olm.map(|o| o.kind),
                    session: None,
                    ciphertext: olm.map(|o| o.ciphertext.clone()),
                }
            }
        }
    }
}

/// A device an end-to-end encrypted message is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForDevice {
    pub user: String,
    pub device: String,
    /// Its own ciphertext; `None` in a group message (which has one for all).
    pub olm: Option<OlmCiphertext>,
}

/// An Olm message: `kind` 0 is a pre-key message (it starts a session), 1 a normal one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OlmCiphertext {
    pub kind: u8,
    pub ciphertext: String,
}

/// A Megolm message and the id of the group session it was encrypted in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCiphertext {
    pub session: String,
    pub ciphertext: String,
}

/// What one device is given of an end-to-end encrypted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCiphertext {
    /// The sending device.
    pub device: String,
    /// The Olm message type, for a direct message.
    pub kind: Option<u8>,
    /// The group session, for a group message.
    pub session: Option<String>,
    /// `None` when the message was not encrypted for this device (it joined later).
    pub ciphertext: Option<String>,
}

/// A device's published identity: its Curve25519 identity key and Ed25519 signing key
/// (unpadded base64, as Olm writes them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    pub identity_key: String,
    pub signing_key: String,
}

/// A one-time (or fallback) Curve25519 key, by the id its device gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKey {
    pub id: String,
    pub key: String,
}

/// A device with published keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub user: String,
    pub device: String,
    pub keys: DeviceKeys,
}

/// What a claim of one device's keys handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub device: Device,
    /// A one-time key, never handed out before; else the device's fallback key (`fallback`
    /// is then true), or none if it published neither.
    pub key: Option<OneTimeKey>,
    pub fallback: bool,
    /// One-time keys the device has left.
    pub remaining: usize,
}

/// Most devices with keys a user may have.
pub const MAX_DEVICES_PER_USER: usize = 16;
/// Most unclaimed one-time keys a device may have published.
pub const MAX_ONE_TIME_KEYS: usize = 200;

/// A message to append, with the users whose pending queues receive it.
#[derive(Clone, Debug)]
pub struct NewMessage {
    /// The message as sent; its id is the one proposed for it (a UUIDv7 of the send).
    pub message: Message,
    pub recipients: Vec<String>,
    /// The sender's idempotency key. The store keeps `(sender, client_msg_id) → message`
    /// for at least 24 hours, so a retried send resolves to the message stored first.
    pub client_msg_id: Option<String>,
}

/// The outcome of appending one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The stored message's id: the proposed one when it was inserted now; for a retried
    /// send (same sender and `client_msg_id`), the id stored by the first attempt.
    pub id: Uuid,
    /// The stored message's conversation (for a retry, the first attempt's).
    pub conversation: Conversation,
    /// False when the message was already stored (a replay of the same record, or a retried
    /// send): nothing was written.
    pub inserted: bool,
    /// The recipients for whom the message is pending now. For a replay or retry, only
    /// those who have not acked it yet, so a replay never re-delivers an acked message.
    pub pending_for: Vec<String>,
}

impl Appended {
    /// The server timestamp of the stored message.
    pub fn ts(&self) -> i64 {
        ts_of(self.id)
    }
}

/// A message that was pending for a user and has just been acked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckedMessage {
    pub id: Uuid,
    pub conversation: Conversation,
    pub from: String,
}

/// What an ack did to one message: removed it from the queue and, when someone else sent
/// it, kept a delivered receipt for its sender (under the receipt's notice id) in the same
/// write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acked {
    pub message: AckedMessage,
    pub receipt: Option<(Uuid, Receipt)>,
}

impl Acked {
    /// `message` acked from `queue` now, with its delivered receipt for the sender unless
    /// `queue` belongs to the sender.
    pub fn new(message: AckedMessage, queue: &str) -> Self {
        let receipt = (message.from != user_of(queue)).then(|| {
            Receipt::now(
                message.id,
                &message.conversation,
                queue,
                ReceiptStatus::Delivered,
            )
        });
        Acked { message, receipt }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStatus {
    Delivered,
    Read,
}

/// A delivery or read receipt, addressed to the sender of `message_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub message_id: Uuid,
    pub conversation: Conversation,
    /// The reader, or the recipient: a user, or for the delivery of an end-to-end
    /// encrypted message the device's queue ([`device_address`]).
    pub by: String,
    pub status: ReceiptStatus,
    pub ts: i64,
}

impl Receipt {
    /// A receipt stamped now, with the new (time-ordered) id it is kept under.
    pub fn now(
        message_id: Uuid,
        conversation: &Conversation,
        by: &str,
        status: ReceiptStatus,
    ) -> (Uuid, Receipt) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let receipt = Receipt {
            message_id,
            conversation: conversation.clone(),
            by: by.to_owned(),
            status,
            ts,
        };
        (Uuid::now_v7(), receipt)
    }
}

/// What a change did to a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupChangeKind {
    Created,
    Members,
}

/// A group's creation or a change of its members, as told to everyone it concerns (the
/// members after it, and those it removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupChange {
    /// The group as the change left it.
    pub group: Group,
    pub change: GroupChangeKind,
    /// Who made the change.
    pub by: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub ts: i64,
}

/// What a user is told and keeps being told, on every connect, until one of their devices
/// confirms it: a receipt for one of their messages, or a change of one of their groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    Receipt(Receipt),
    Group(GroupChange),
    /// For one device (kept under its [`device_address`]): a to-device message.
    ToDevice(ToDevice),
    /// For one device: its supply of one-time keys ran low (`remaining` left).
    KeysLow {
        remaining: usize,
    },
}

/// An end-to-end encrypted message from one device to another, outside any conversation
/// (a group session key being shared, for one): kept for the receiving device until it
/// confirms it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToDevice {
    pub from: String,
    pub from_device: String,
    pub olm: OlmCiphertext,
    pub ts: i64,
}

impl Notice {
    /// The stored form (postcard).
    pub fn to_stored(&self) -> Result<Vec<u8>, crate::Error> {
        postcard::to_allocvec(self)
            .map_err(|e| crate::Error::Backend(format!("encoding a notice: {e}")))
    }

    /// Reads a stored notice. Rows written before notices existed hold a bare receipt;
    /// its first byte (16, the length of its message id) is no notice variant, so the two
    /// forms cannot be mistaken for each other.
    pub fn from_stored(bytes: &[u8]) -> Result<Self, crate::Error> {
        postcard::from_bytes(bytes)
            .or_else(|_| postcard::from_bytes(bytes).map(Notice::Receipt))
            .map_err(|e| crate::Error::Backend(format!("stored notice: {e}")))
    }
}

/// A user's conversation in their inbox, by its latest activity (a message, or a change of
/// the group): a time-ordered id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxEntry {
    pub conversation: Conversation,
    pub activity: Uuid,
}

/// How far one member of a conversation has got: the newest message of it they have read,
/// and the newest one a device of theirs has stored (acked).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marker {
    pub user: String,
    pub read: Option<Uuid>,
    pub delivered: Option<Uuid>,
}

/// A group conversation and its members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: Uuid,
    pub name: String,
    pub members: BTreeSet<String>,
    /// When each member added after the group's creation joined (a UUIDv7 taken as they
    /// were added): they see the group's messages from then on. The creation's members
    /// are not here, and see it all. Kept by the stores beside the group's row; records
    /// that carry a copy of the group (its notices) leave it out.
    #[serde(skip)]
    pub joined: BTreeMap<String, Uuid>,
}

impl Group {
    pub fn conversation(&self) -> Conversation {
        Conversation::Group(self.id)
    }

    /// Whether `member` sees the group's message `id`: one sent after they joined.
    pub fn shows(&self, member: &str, id: Uuid) -> bool {
        self.joined.get(member).is_none_or(|joined| id > *joined)
    }

    /// Applies a change of members made at `at` (a fresh UUIDv7): who was not a member
    /// joins then; who is removed is forgotten, and joins anew if added again. Answers
    /// who joined.
    pub fn change_members(&mut self, add: &[String], remove: &[String], at: Uuid) -> Vec<String> {
        let mut joined = Vec::new();
        for member in add {
            if self.members.insert(member.clone()) {
                self.joined.insert(member.clone(), at);
                joined.push(member.clone());
            }
        }
        for member in remove {
            if self.members.remove(member) {
                self.joined.remove(member);
            }
        }
        joined.retain(|m| self.members.contains(m));
        joined
    }

    /// `Invalid` past [`MAX_GROUP_MEMBERS`].
    pub fn check_size(&self) -> Result<(), crate::Error> {
        if self.members.len() > MAX_GROUP_MEMBERS {
            return Err(crate::Error::Invalid(format!(
                "a group has at most {MAX_GROUP_MEMBERS} members"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversations_are_named_the_same_by_both_sides() {
        let a = Conversation::direct("bob", "alice");
        let b = Conversation::direct("alice", "bob");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "dm:alice:bob");
        assert_eq!("dm:bob:alice".parse::<Conversation>(), Ok(a));
    }

    #[test]
    fn conversation_names_are_checked() {
        for bad in [
            "",
            "dm:alice",
            "dm::bob",
            "dm:al ice:bob",
            "g:nope",
            "x:alice:bob",
        ] {
            assert!(bad.parse::<Conversation>().is_err(), "{bad} was accepted");
        }
        let id = Uuid::now_v7();
        let g: Conversation = format!("g:{id}").parse().expect("group parses");
        assert_eq!(g.group_id(), Some(id));
    }

    #[test]
    fn ids_follow_the_protocol_alphabet() {
        assert!(is_valid_id("a.b@c-d_9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a:b"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn ts_comes_from_the_uuid_v7() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let ts = ts_of(Uuid::now_v7());
        assert!(ts >= before && ts < before + 5_000, "{ts} vs {before}");
    }
}
