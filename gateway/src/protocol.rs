//! The client protocol, version 1: the frames on the wire and nothing else (no I/O).
//!
//! Parsing is strict about what the contract names (types, required fields, lengths) and
//! lenient about what it does not (unknown extra fields are ignored, so clients can send
//! newer fields to older servers). A change here is a wire change.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::{
    Attachment, Claimed, Device, Group, GroupChange, GroupChangeKind, Marker, Message, Receipt,
    ReceiptStatus, ToDevice,
};

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
    /// An end-to-end encrypted send named other devices than its recipients have.
    DeviceMismatch,
    /// The user's media uploads of the day reached their quota.
    QuotaExceeded,
}

/// A device, as frames name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceRef {
    pub user: String,
    pub device: String,
}

/// A refused request: what the `error` frame says, and which request it answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<Value>,
    pub client_msg_id: Option<String>,
    /// For `device_mismatch`: which devices to encrypt for.
    pub devices: Option<Box<Mismatch>>,
}

/// What a `device_mismatch` says to fix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mismatch {
    /// Devices of the conversation the send did not name.
    pub missing: Vec<DeviceRef>,
    /// Devices it named that are not (or no longer) in the conversation.
    pub stale: Vec<DeviceRef>,
    /// Devices it named with an `identity_key` that is no longer theirs: the device was
    /// set up again under the same id.
    pub changed: Vec<DeviceRef>,
}

impl Mismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.stale.is_empty() && self.changed.is_empty()
    }
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            reference: None,
            client_msg_id: None,
            devices: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn into_frame(self) -> ServerFrame {
        let (missing, stale, changed) = match self.devices.map(|d| *d) {
            Some(m) => (Some(m.missing), Some(m.stale), Some(m.changed)),
            None => (None, None, None),
        };
        ServerFrame::Error {
            code: self.code,
            message: self.message,
            reference: self.reference,
            client_msg_id: self.client_msg_id,
            missing,
            stale,
            changed,
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
        /// A server-encrypted message's text; or `e2ee`.
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        e2ee: Option<E2eeSend>,
        /// Uploaded files the message carries.
        #[serde(default)]
        attachments: Vec<AttachmentSend>,
    },
    Ack {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        #[serde(default)]
        message_ids: Vec<String>,
        #[serde(default)]
        receipt_ids: Vec<String>,
        #[serde(default)]
        notice_ids: Vec<String>,
    },
    Read {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        conversation: String,
        message_id: String,
    },
    Typing {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
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
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
        users: Vec<String>,
    },
    UnsubscribePresence {
        #[serde(rename = "ref", default)]
        reference: Option<Value>,
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
    KeysUpload {
        #[serde(rename = "ref")]
        reference: Value,
        identity_key: String,
        signing_key: String,
        #[serde(default)]
        one_time_keys: Vec<KeyView>,
        #[serde(default)]
        fallback_key: Option<KeyView>,
    },
    Devices {
        #[serde(rename = "ref")]
        reference: Value,
        users: Vec<String>,
    },
    KeysClaim {
        #[serde(rename = "ref")]
        reference: Value,
        devices: Vec<DeviceRef>,
    },
    ToDevice {
        #[serde(rename = "ref")]
        reference: Value,
        messages: Vec<ToDeviceSend>,
    },
    RemoveDevice {
        #[serde(rename = "ref")]
        reference: Value,
        device: String,
    },
    /// Asks for an upload slot: where to PUT a file's bytes.
    MediaUpload {
        #[serde(rename = "ref")]
        reference: Value,
        content_type: String,
        size: u64,
        sha256: String,
    },
    /// Says the bytes were uploaded: the server checks their size and hash.
    MediaComplete {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
    },
    /// Asks for a download URL of a media id: the uploader's own, or one that a message of
    /// a conversation the user belongs to carries.
    MediaUrl {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        #[serde(default)]
        conversation: Option<String>,
        #[serde(default)]
        message_id: Option<String>,
    },
}

/// One attachment of a `send`: an uploaded file and what to show with it. The type, size
/// and hash come from the upload; when given here they must match it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AttachmentSend {
    pub media_id: String,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub thumbnail: Option<String>,
}

/// An attachment as frames show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AttachmentView {
    pub media_id: String,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
}

impl From<&Attachment> for AttachmentView {
    fn from(a: &Attachment) -> Self {
        AttachmentView {
            media_id: a.media_id.to_string(),
            content_type: a.content_type.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            name: a.name.clone(),
            caption: a.caption.clone(),
            thumbnail: a.thumbnail.clone(),
        }
    }
}

/// A one-time or fallback key, by its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    pub id: String,
    pub key: String,
}

/// The `e2ee` of an end-to-end encrypted `send`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct E2eeSend {
    /// Every device it is for; each with `type` and `ciphertext` (Olm), unless `group`.
    pub to: Vec<E2eeFor>,
    #[serde(default)]
    pub group: Option<GroupSend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct E2eeFor {
    pub user: String,
    pub device: String,
    #[serde(default, rename = "type")]
    pub kind: Option<u8>,
    #[serde(default)]
    pub ciphertext: Option<String>,
    /// The device's identity key as the sender knows it: refused (`changed`) when the
    /// device has published another one since.
    #[serde(default)]
    pub identity_key: Option<String>,
}

/// The one ciphertext of a group message, and its group session.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct GroupSend {
    pub session: String,
    pub ciphertext: String,
}

/// One message of a `to_device` frame.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ToDeviceSend {
    pub user: String,
    pub device: String,
    #[serde(rename = "type")]
    pub kind: u8,
    pub ciphertext: String,
    /// As in [`E2eeFor`].
    #[serde(default)]
    pub identity_key: Option<String>,
}

impl ClientFrame {
    /// The frame's `type` on the wire (the label of `gateway_frames_received_total`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::History { .. } => "history",
            ClientFrame::Conversations { .. } => "conversations",
            ClientFrame::GroupInfo { .. } => "group_info",
            ClientFrame::SubscribePresence { .. } => "subscribe_presence",
            ClientFrame::UnsubscribePresence { .. } => "unsubscribe_presence",
            ClientFrame::CreateGroup { .. } => "create_group",
            ClientFrame::AddMembers { .. } => "add_members",
            ClientFrame::RemoveMembers { .. } => "remove_members",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::KeysUpload { .. } => "keys_upload",
            ClientFrame::Devices { .. } => "devices",
            ClientFrame::KeysClaim { .. } => "keys_claim",
            ClientFrame::ToDevice { .. } => "to_device",
            ClientFrame::RemoveDevice { .. } => "remove_device",
            ClientFrame::MediaUpload { .. } => "media_upload",
            ClientFrame::MediaComplete { .. } => "media_complete",
            ClientFrame::MediaUrl { .. } => "media_url",
        }
    }

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
    /// markers; `None` when there is nobody else (a note to self). In a group, members
    /// added after `m` do not count: they never see it.
    pub fn of(
        m: &Message,
        me: &str,
        members: &[String],
        group: Option<&Group>,
        markers: &[Marker],
    ) -> Option<Self> {
        let others: Vec<&String> = members
            .iter()
            .filter(|u| *u != me && group.is_none_or(|g| g.shows(u, m.id)))
            .collect();
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
    /// A server-encrypted message's text (absent for an end-to-end encrypted one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    pub ts: i64,
    /// An end-to-end encrypted message's ciphertext for the reading device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2ee: Option<E2eeView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentView>,
    /// For the reader's own messages only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<MessageStatus>,
}

/// What a device is shown of an end-to-end encrypted message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct E2eeView {
    /// The sending device.
    pub device: String,
    /// Olm message type (0 pre-key, 1 normal), in a direct message.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<u8>,
    /// The group session, in a group message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Absent when the message was not encrypted for this device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
}

impl MessageView {
    /// `m` as the device `device` of `user` sees it.
    pub fn of(m: &Message, user: &str, device: &str) -> Self {
        let e2ee = m.e2ee.as_ref().map(|e| {
            let mine = e.for_device(user, device);
            E2eeView {
                device: mine.device,
                kind: mine.kind,
                session: mine.session,
                ciphertext: mine.ciphertext,
            }
        });
        MessageView {
            kind: "message",
            message_id: m.id.to_string(),
            conversation: m.conversation.to_string(),
            from: m.from.clone(),
            body: m.e2ee.is_none().then(|| m.body.clone()),
            ts: m.ts,
            e2ee,
            attachments: m.attachments.iter().map(AttachmentView::from).collect(),
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
    /// A group's members added after its creation, and since when they see it.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub joined: std::collections::BTreeMap<String, uuid::Uuid>,
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
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        ts: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        e2ee: Option<E2eeView>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<AttachmentView>,
    },
    Receipt {
        receipt_id: String,
        message_id: String,
        conversation: String,
        by: String,
        /// The device that stored an end-to-end encrypted message.
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        status: ReceiptStatus,
        ts: i64,
    },
    /// Answer to `keys_upload`: how many one-time keys the device has now.
    Keys {
        #[serde(rename = "ref")]
        reference: Value,
        one_time_keys: usize,
    },
    Devices {
        #[serde(rename = "ref")]
        reference: Value,
        devices: Vec<DeviceView>,
    },
    KeysClaimed {
        #[serde(rename = "ref")]
        reference: Value,
        keys: Vec<ClaimedView>,
    },
    ToDeviceSent {
        #[serde(rename = "ref")]
        reference: Value,
    },
    DeviceRemoved {
        #[serde(rename = "ref")]
        reference: Value,
        device: String,
    },
    /// A to-device message, kept for this device until confirmed (`notice_ids`).
    ToDevice {
        notice_id: String,
        from: String,
        ts: i64,
        e2ee: E2eeView,
    },
    /// This device's one-time keys are running out: upload more.
    KeysLow {
        notice_id: String,
        one_time_keys: usize,
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
        /// Members added after the creation, and since when they see the group (answers
        /// only; notices leave it out).
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        joined: std::collections::BTreeMap<String, uuid::Uuid>,
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
    /// An upload slot: PUT the bytes to `url` with `headers` before `expires_at`.
    MediaUpload {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        url: String,
        method: &'static str,
        headers: std::collections::BTreeMap<&'static str, String>,
        expires_at: i64,
    },
    /// The upload is complete and checked: the media id may go into a `send`.
    MediaComplete {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        content_type: String,
        size: u64,
        sha256: String,
    },
    /// A download URL (ranges work) valid until `expires_at`.
    MediaUrl {
        #[serde(rename = "ref")]
        reference: Value,
        media_id: String,
        url: String,
        content_type: String,
        size: u64,
        expires_at: i64,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        missing: Option<Vec<DeviceRef>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stale: Option<Vec<DeviceRef>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        changed: Option<Vec<DeviceRef>>,
    },
}

/// A device with published keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceView {
    pub user: String,
    pub device: String,
    pub identity_key: String,
    pub signing_key: String,
}

impl From<&Device> for DeviceView {
    fn from(d: &Device) -> Self {
        DeviceView {
            user: d.user.clone(),
            device: d.device.clone(),
            identity_key: d.keys.identity_key.clone(),
            signing_key: d.keys.signing_key.clone(),
        }
    }
}

/// One device's claimed key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClaimedView {
    #[serde(flatten)]
    pub device: DeviceView,
    /// A one-time key, or the fallback key, or null if the device published neither.
    pub one_time_key: Option<KeyView>,
    pub fallback: bool,
}

impl From<&Claimed> for ClaimedView {
    fn from(c: &Claimed) -> Self {
        ClaimedView {
            device: DeviceView::from(&c.device),
            one_time_key: c.key.as_ref().map(|k| KeyView {
                id: k.id.clone(),
                key: k.key.clone(),
            }),
            fallback: c.fallback,
        }
    }
}

impl ServerFrame {
    /// `m` as the device `device` of `user` sees it.
    pub fn message(m: &Message, user: &str, device: &str) -> Self {
        let view = MessageView::of(m, user, device);
        ServerFrame::Message {
            message_id: view.message_id,
            conversation: view.conversation,
            from: view.from,
            body: view.body,
            ts: view.ts,
            e2ee: view.e2ee,
            attachments: view.attachments,
        }
    }

    pub fn receipt(id: uuid::Uuid, r: &Receipt) -> Self {
        ServerFrame::Receipt {
            receipt_id: id.to_string(),
            message_id: r.message_id.to_string(),
            conversation: r.conversation.to_string(),
            by: storage::user_of(&r.by).to_owned(),
            device: storage::device_of(&r.by).map(str::to_owned),
            status: r.status,
            ts: r.ts,
        }
    }

    pub fn to_device(id: uuid::Uuid, m: &ToDevice) -> Self {
        ServerFrame::ToDevice {
            notice_id: id.to_string(),
            from: m.from.clone(),
            ts: m.ts,
            e2ee: E2eeView {
                device: m.from_device.clone(),
                kind: Some(m.olm.kind),
                session: None,
                ciphertext: Some(m.olm.ciphertext.clone()),
            },
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
            joined: group.joined.clone(),
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
            joined: Default::default(),
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
            storage::Notice::ToDevice(m) => Self::to_device(id, m),
            storage::Notice::KeysLow { remaining } => ServerFrame::KeysLow {
                notice_id: id.to_string(),
                one_time_keys: *remaining,
            },
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
            json!({"type":"subscribe_presence","ref":"s","users":["a"]}),
            json!({"type":"ack","ref":"a","message_ids":["x"]}),
            json!({"type":"read","ref":2,"conversation":"dm:a:b","message_id":"x"}),
            json!({"type":"typing","ref":"t","conversation":"dm:a:b"}),
            json!({"type":"unsubscribe_presence","users":["a"]}),
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
        let e = ClientFrame::parse(r#"{"type":"send","client_msg_id":"c7","to":"bob","body":7}"#)
            .expect_err("body of the wrong type");
        assert!(e.message.contains("invalid type"), "{}", e.message);
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
                devices: None,
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
