//! The message store: what a conversation contains and what each user still has to receive.
//!
//! `storage` owns the message model (ids, conversations, messages, receipts, groups), the
//! store contract ([`MessageStore`]) with its backends behind one enum ([`Store`]), and
//! encryption of message bodies at rest ([`crypto`]). It knows nothing of WebSockets,
//! of the inbound log or of presence: callers decide *when* to write, the store decides
//! *how* so that every write is idempotent and durable once it returns.

pub mod blob;
pub mod crypto;
pub mod error;
pub mod model;
pub mod resilience;
pub mod store;
pub mod tls;
pub mod watch;

/// The CQL consistency levels, for [`ScyllaConfig::consistency`].
pub use ::scylla::statement::Consistency;
pub use error::{Error, Result};
pub use model::{
    device_address, device_of, is_valid_id, ts_of, user_of, Acked, AckedMessage, Appended,
    Attachment, Claimed, Conversation, Device, DeviceCiphertext, DeviceKeys, E2ee, ForDevice,
    Group, GroupChange, GroupChangeKind, GroupCiphertext, InboxEntry, Marker, Message, NewMessage,
    Notice, OlmCiphertext, OneTimeKey, Receipt, ReceiptStatus, ToDevice, MAX_DEVICES_PER_USER,
    MAX_GROUP_MEMBERS, MAX_ONE_TIME_KEYS,
};
pub use store::{
    EmbeddedConfig, EmbeddedStore, MessageStore, Reencryption, ScyllaConfig, ScyllaStore, Store,
};
