//! What travels through the inbound log. A change here is a wire change.

use presence::ConnRef;
use serde::{Deserialize, Serialize};
use storage::{Conversation, Message};
use uuid::Uuid;

/// One record of the inbound log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    /// A new message; `origin` is the sending connection, left out when echoing the message
    /// to the sender's other devices.
    Message {
        /// Boxed: a message is several times larger than the other records.
        message: Box<Message>,
        origin: Option<ConnRef>,
        /// The sender's idempotency key, stored with the message (see
        /// `MessageStore::claim_send`).
        client_msg_id: Option<String>,
    },
    /// A device of `user` received these messages: from its user's queue, or (end-to-end
    /// encrypted ones) from the device's own.
    Ack {
        user: String,
        message_ids: Vec<Uuid>,
        /// The acking device; records written before devices had queues have none.
        #[serde(default)]
        device: Option<String>,
    },
    /// `user` read `conversation` up to and including `message_id`.
    Read {
        user: String,
        conversation: Conversation,
        message_id: Uuid,
    },
}

impl Envelope {
    /// The partition key: the recipient for a direct message, the conversation for a group
    /// message, the acting user for acks and reads. One key is one ordered partition, so a
    /// user's acks and reads are processed after the direct messages they refer to.
    pub fn key(&self) -> String {
        match self {
            Envelope::Message { message, .. } => match &message.conversation {
                c @ Conversation::Direct(..) => {
                    c.peer_of(&message.from).unwrap_or(&message.from).to_owned()
                }
                c @ Conversation::Group(_) => c.to_string(),
            },
            Envelope::Ack { user, .. } | Envelope::Read { user, .. } => user.clone(),
        }
    }
}

/// A push-notification event for a recipient with no device online.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent {
    pub user: String,
    pub message_id: Uuid,
    pub conversation: Conversation,
    pub from: String,
    pub ts: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from: &str, conversation: Conversation) -> Envelope {
        let id = Uuid::now_v7();
        Envelope::Message {
            message: Box::new(Message {
                id,
                conversation,
                from: from.into(),
                body: String::new(),
                ts: 0,
                e2ee: None,
                attachments: Vec::new(),
            }),
            origin: None,
            client_msg_id: None,
        }
    }

    #[test]
    fn keys_follow_the_architecture() {
        assert_eq!(
            message("alice", Conversation::direct("alice", "bob")).key(),
            "bob"
        );
        assert_eq!(
            message("bob", Conversation::direct("alice", "bob")).key(),
            "alice"
        );
        assert_eq!(
            message("alice", Conversation::direct("alice", "alice")).key(),
            "alice"
        );
        let g = Conversation::Group(Uuid::now_v7());
        assert_eq!(message("alice", g.clone()).key(), g.to_string());
        assert_eq!(
            Envelope::Ack {
                user: "bob".into(),
                message_ids: vec![],
                device: None,
            }
            .key(),
            "bob"
        );
    }
}
