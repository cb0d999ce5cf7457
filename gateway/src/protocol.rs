//! The client protocol, version 1: the frames on the wire and nothing else (no I/O).
//!
//! Parsing is strict about what the contract names (types, required fields, lengths) and
//! lenient about what it does not (unknown extra fields are ignored, so clients can send
//! newer fields to older servers). A change here is a wire change.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::{Group, GroupChange, GroupChangeKind, Marker, Message, Receipt, ReceiptStatus};

/// Error codes of the `error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

/// A refused request: what the `error` frame says, and which request it answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<Value>,
    pub client_msg_id: Option<String>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            reference: None,
            client_msg_id: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::Error {
            code: self.code,
            message: self.message,
            reference: self.reference,
            client_msg_id: self.client_msg_id,
        }
    }
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        client_msg_id: String,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        conversation: Option<String>,
        body: String,
    },
    Ack {
        #[serde(default)]
        message_ids: Vec<String>,
        #[serde(default)]
        receipt_ids: Vec<String>,
        #[serde(default)]
        notice_ids: Vec<String>,
    },
    Read {
        conversation: String,
        message_id: String,
    },
    Typing {
        conversation: String,
    },
    History {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        #[serde(default)]
        before: Option<String>,
        #[serde(default)]
        limit: Option<i64>,
    },
    Conversations {
        #[serde(rename = "ref")]
        reference: Value,
        #[serde(default)]
        before: Option<String>,
        #[serde(default)]
        limit: Option<i64>,
    },
    GroupInfo {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
    },
    SubscribePresence {
        users: Vec<String>,
    },
    CreateGroup {
        #[serde(rename = "ref")]
        reference: Value,
        name: String,
        members: Vec<String>,
    },
    AddMembers {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        members: Vec<String>,
    },
    RemoveMembers {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        members: Vec<String>,
    },
    Ping {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
    },
}

impl ClientFrame {
    /// Parses one text frame. A refusal carries the request's `ref` or `client_msg_id`
    /// whenever the frame had one, even if the rest of it was wrong.
    pub fn parse(text: &str) -> Result<ClientFrame, Refusal> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Refusal::bad_request(format!("malformed JSON: {e}")))?;
        let Value::Object(object) = &value else {
            return Err(Refusal::bad_request("a frame must be a JSON object"));
        };
        let reference = object.get("ref").filter(|r| is_reference(r)).cloned();
        let client_msg_id = object
            .get("client_msg_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let with_context = |mut refusal: Refusal| {
            refusal.reference = reference.clone();
            refusal.client_msg_id = client_msg_id.clone();
            refusal
        };
        match object.get("type") {
            None => return Err(with_context(Refusal::bad_request("missing field `type`"))),
            Some(Value::String(_)) => {}
            Some(_) => {
                return Err(with_context(Refusal::bad_request(
                    "`type` must be a string",
                )))
            }
        }
        if let Some(r) = object.get("ref") {
            if !is_reference(r) {
                return Err(with_context(Refusal::bad_request(
                    "`ref` must be a string (at most 128 characters) or a number",
                )));
            }
        }
        ClientFrame::deserialize(value)
            .map_err(|e| with_context(Refusal::bad_request(e.to_string())))
    }
}

fn is_reference(value: &Value) -> bool {
    match value {
        Value::String(s) => s.chars().count() <= 128,
        Value::Number(_) => true,
        _ => false,
    }
}

/// Where one of the reader's own messages has got, for every other member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Stored, not yet on a device of every other member.
    Sent,
    /// On a device of every other member.
    Delivered,
    /// Read by every other member.
    Read,
}

impl MessageStatus {
    /// The status of `m`, sent by `me`, given the conversation's other members and their
    /// markers; `None` when there is nobody else (a note to self).
    pub fn of(m: &Message, me: &str, members: &[String], markers: &[Marker]) -> Option<Self> {
        let others: Vec<&String> = members.iter().filter(|u| *u != me).collect();
        if m.from != me || others.is_empty() {
            return None;
        }
        let marker = |user: &str| markers.iter().find(|k| k.user == user);
        let reached = |at: Option<uuid::Uuid>| at.is_some_and(|at| at.as_u128() >= m.id.as_u128());
        let read = |u: &&String| marker(u).is_some_and(|k| reached(k.read));
        let delivered =
            |u: &&String| marker(u).is_some_and(|k| reached(k.read) || reached(k.delivered));
        Some(if others.iter().all(read) {
            MessageStatus::Read
        } else if others.iter().all(delivered) {
            MessageStatus::Delivered
        } else {
            MessageStatus::Sent
        })
    }
}

/// A message as it appears in `message` frames, `history` pages and inbox entries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MessageView {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub message_id: String,
    pub conversation: String,
    pub from: String,
    pub body: String,
    pub ts: i64,
    /// For the reader's own messages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<MessageStatus>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        MessageView {
            kind: "message",
            message_id: m.id.to_string(),
            conversation: m.conversation.to_string(),
            from: m.from.clone(),
            body: m.body.clone(),
            ts: m.ts,
            status: None,
        }
    }
}

/// One member's markers in a conversation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MarkerView {
    pub user: String,
    pub read: Option<String>,
    pub delivered: Option<String>,
}

impl From<&Marker> for MarkerView {
    fn from(m: &Marker) -> Self {
        MarkerView {
            user: m.user.clone(),
            read: m.read.map(|id| id.to_string()),
            delivered: m.delivered.map(|id| id.to_string()),
        }
    }
}

/// One conversation of a `conversations` answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InboxView {
    pub conversation: String,
    /// The id of its latest activity (a message, or a change of the group): the cursor for
    /// the next page.
    pub activity: String,
    /// The time of that activity.
    pub ts: i64,
    /// A group's name; absent for a direct conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub members: Vec<String>,
    pub last_message: Option<MessageView>,
    pub unread: usize,
    pub markers: Vec<MarkerView>,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: String,
        device: String,
        node: String,
        heartbeat_s: u64,
    },
    Sent {
        client_msg_id: String,
        message_id: String,
        conversation: String,
        ts: i64,
    },
    Message {
        message_id: String,
        conversation: String,
        from: String,
        body: String,
        ts: i64,
    },
    Receipt {
        receipt_id: String,
        message_id: String,
        conversation: String,
        by: String,
        status: ReceiptStatus,
        ts: i64,
    },
    Presence {
        user: String,
        status: &'static str,
        last_seen: Option<i64>,
    },
    Typing {
        conversation: String,
        user: String,
    },
    History {
        #[serde(rename = "ref")]
        reference: Value,
        conversation: String,
        messages: Vec<MessageView>,
        more: bool,
        markers: Vec<MarkerView>,
    },
    Conversations {
        #[serde(rename = "ref")]
        reference: Value,
        conversations: Vec<InboxView>,
        more: bool,
    },
    /// An answer (with `ref`), or a notice of a change (with `notice_id` and what changed).
    Group {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        notice_id: Option<String>,
        conversation: String,
        name: String,
        members: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        change: Option<GroupChangeKind>,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        added: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        removed: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ts: Option<i64>,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
}

impl ServerFrame {
    pub fn message(m: &Message) -> Self {
        ServerFrame::Message {
            message_id: m.id.to_string(),
            conversation: m.conversation.to_string(),
            from: m.from.clone(),
            body: m.body.clone(),
            ts: m.ts,
        }
    }

    pub fn receipt(id: uuid::Uuid, r: &Receipt) -> Self {
        ServerFrame::Receipt {
            receipt_id: id.to_string(),
            message_id: r.message_id.to_string(),
            conversation: r.conversation.to_string(),
            by: r.by.clone(),
            status: r.status,
            ts: r.ts,
        }
    }

    /// The answer to a group request.
    pub fn group(reference: Value, group: &Group) -> Self {
        ServerFrame::Group {
            reference: Some(reference),
            notice_id: None,
            conversation: group.conversation().to_string(),
            name: group.name.clone(),
            members: group.members.iter().cloned().collect(),
            change: None,
            by: None,
            added: None,
            removed: None,
            ts: None,
        }
    }

    /// The notice of a group's creation or change, kept under `id` until confirmed.
    pub fn group_notice(id: uuid::Uuid, c: &GroupChange) -> Self {
        ServerFrame::Group {
            reference: None,
            notice_id: Some(id.to_string()),
            conversation: c.group.conversation().to_string(),
            name: c.group.name.clone(),
            members: c.group.members.iter().cloned().collect(),
            change: Some(c.change),
            by: Some(c.by.clone()),
            added: Some(c.added.clone()),
            removed: Some(c.removed.clone()),
            ts: Some(c.ts),
        }
    }

    /// A kept notice as its frame.
    pub fn notice(id: uuid::Uuid, notice: &storage::Notice) -> Self {
        match notice {
            storage::Notice::Receipt(r) => Self::receipt(id, r),
            storage::Notice::Group(c) => Self::group_notice(id, c),
        }
    }

    pub fn presence(s: &presence::Status) -> Self {
        ServerFrame::Presence {
            user: s.user.clone(),
            status: if s.online { "online" } else { "offline" },
            last_seen: s.last_seen,
        }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"encoding a frame: {e}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_client_frame() {
        let frames = [
            json!({"type":"send","client_msg_id":"c1","to":"bob","body":"hi"}),
            json!({"type":"send","client_msg_id":"c1","conversation":"g:0190c0c8-0000-7000-8000-000000000000","body":"hi"}),
            json!({"type":"ack","message_ids":["x"]}),
            json!({"type":"read","conversation":"dm:a:b","message_id":"x"}),
            json!({"type":"typing","conversation":"dm:a:b"}),
            json!({"type":"history","ref":"h1","conversation":"dm:a:b","before":"x","limit":10}),
            json!({"type":"subscribe_presence","users":["a"]}),
            json!({"type":"create_group","ref":1,"name":"n","members":["a"]}),
            json!({"type":"add_members","ref":"r","conversation":"g:x","members":["a"]}),
            json!({"type":"remove_members","ref":"r","conversation":"g:x","members":["a"]}),
            json!({"type":"ping"}),
            json!({"type":"ping","ref":"p","extra":"ignored"}),
        ];
        for frame in frames {
            ClientFrame::parse(&frame.to_string()).unwrap_or_else(|e| panic!("{frame}: {e:?}"));
        }
    }

    #[test]
    fn refusals_name_the_problem_and_keep_the_reference() {
        let e = ClientFrame::parse("{not json").expect_err("malformed");
        assert!(e.message.contains("malformed JSON"));
        let e = ClientFrame::parse(r#"{"type":"nope","ref":"r9"}"#).expect_err("unknown type");
        assert!(
            e.message.contains("unknown variant `nope`"),
            "{}",
            e.message
        );
        assert_eq!(e.reference, Some(json!("r9")));
        let e = ClientFrame::parse(r#"{"type":"send","client_msg_id":"c7","to":"bob"}"#)
            .expect_err("missing body");
        assert!(e.message.contains("missing field `body`"), "{}", e.message);
        assert_eq!(e.client_msg_id.as_deref(), Some("c7"));
        let e = ClientFrame::parse(r#"[1,2]"#).expect_err("not an object");
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = ClientFrame::parse(r#"{"type":"history","ref":{"a":1},"conversation":"dm:a:b"}"#)
            .expect_err("bad ref");
        assert!(e.message.contains("`ref`"));
    }

    #[test]
    fn server_frames_serialize_as_the_contract_says() {
        let v: Value =
            serde_json::from_str(&ServerFrame::Pong { reference: None }.to_json()).expect("json");
        assert_eq!(v, json!({"type":"pong"}));
        let v: Value = serde_json::from_str(
            &ServerFrame::Presence {
                user: "a".into(),
                status: "offline",
                last_seen: None,
            }
            .to_json(),
        )
        .expect("json");
        assert_eq!(
            v,
            json!({"type":"presence","user":"a","status":"offline","last_seen":null})
        );
        let v: Value = serde_json::from_str(
            &Refusal {
                code: ErrorCode::RateLimited,
                message: "slow".into(),
                reference: None,
                client_msg_id: Some("c".into()),
            }
            .into_frame()
            .to_json(),
        )
        .expect("json");
        assert_eq!(
            v,
            json!({"type":"error","code":"rate_limited","message":"slow","client_msg_id":"c"})
        );
    }
}
