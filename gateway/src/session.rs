//! One connection's requests: validate, authorize, call the backends, answer.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::{Envelope, Failed, InboundLog};
use governor::DefaultDirectRateLimiter;
use presence::{ConnRef, NodeDelivery, Payload, PresenceService};
use serde_json::Value;
use storage::{
    ts_of, Conversation, Group, GroupChange, GroupChangeKind, Marker, Message, MessageStore,
    Notice, MAX_GROUP_MEMBERS,
};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::App;
use crate::e2ee;
use crate::hub::{Class, ConnHandle};
use crate::limits::frame_limiter;
use crate::media;
use crate::protocol::{
    AttachmentSend, ClientFrame, DeviceView, E2eeSend, ErrorCode, InboxView, MarkerView,
    MessageStatus, MessageView, Refusal, ServerFrame,
};

/// Most users one connection may watch the presence of.
const MAX_WATCHED: usize = 5000;

impl From<storage::Error> for Refusal {
    fn from(e: storage::Error) -> Self {
        use storage::Error as E;
        let code = match &e {
            E::NotFound(_) => ErrorCode::NotFound,
            E::Invalid(_) => ErrorCode::BadRequest,
            E::Quota(_) => ErrorCode::QuotaExceeded,
            E::UnknownKey(..) | E::Decrypt(_) | E::Keys(_) => ErrorCode::Internal,
            E::Backend(_) | E::Unavailable(_) | E::Io { .. } => ErrorCode::Unavailable,
        };
        if code == ErrorCode::Internal {
            tracing::error!(error = %e, "storage integrity error");
        }
        Refusal::new(code, e.to_string())
    }
}

impl From<dispatcher::Error> for Refusal {
    fn from(e: dispatcher::Error) -> Self {
        match e {
            dispatcher::Error::Store(e) => e.into(),
            other => Refusal::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

impl From<presence::Error> for Refusal {
    fn from(e: presence::Error) -> Self {
        Refusal::new(ErrorCode::Unavailable, e.to_string())
    }
}

pub struct Session {
    pub(crate) conn: Arc<ConnHandle>,
    pub(crate) app: Arc<App>,
    frames: DefaultDirectRateLimiter,
    /// The conversations this connection's `typing` was last relayed to, and when.
    typed: std::sync::Mutex<Vec<(String, Instant)>>,
}

/// A connection's `typing` in one conversation is relayed at most once per this interval;
/// the others are dropped (a `typing` fans out to every member's devices).
pub const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// Conversations a connection may be typing in within one [`TYPING_INTERVAL`].
const TYPING_CONVERSATIONS: usize = 16;

pub(crate) fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Forbidden, message)
}

pub(crate) fn parse_id(value: &str, field: &str) -> Result<Uuid, Refusal> {
    Uuid::try_parse(value)
        .map_err(|_| Refusal::bad_request(format!("`{field}` is not a message id: {value:?}")))
}

fn check_users(users: &[String], field: &str, max: usize) -> Result<(), Refusal> {
    if users.is_empty() || users.len() > max {
        return Err(Refusal::bad_request(format!(
            "`{field}` takes 1-{max} user ids"
        )));
    }
    if let Some(bad) = users.iter().find(|u| !storage::is_valid_id(u)) {
        return Err(Refusal::bad_request(format!(
            "`{field}`: {bad:?} is not a user id (1-64 characters of A-Z a-z 0-9 _ . @ -)"
        )));
    }
    Ok(())
}

/// Most messages counted for an inbox entry's `unread` (more show as this many).
const UNREAD_CAP: usize = 100;

/// The members of a conversation: a group's, or the one or two users of a direct one.
fn members_of(conversation: &Conversation, group: Option<&Group>) -> Vec<String> {
    match (conversation, group) {
        (_, Some(group)) => group.members.iter().cloned().collect(),
        (Conversation::Direct(a, b), None) if a == b => vec![a.clone()],
        (Conversation::Direct(a, b), None) => vec![a.clone(), b.clone()],
        (Conversation::Group(_), None) => Vec::new(),
    }
}

/// A page of messages as a device of `user` sees them: their own with a status.
fn views(
    page: &[Message],
    (user, device): (&str, &str),
    members: &[String],
    group: Option<&Group>,
    markers: &[Marker],
) -> Vec<MessageView> {
    page.iter()
        .map(|m| MessageView {
            status: MessageStatus::of(m, user, members, group, markers),
            ..MessageView::of(m, user, device)
        })
        .collect()
}

impl Session {
    pub fn new(conn: Arc<ConnHandle>, app: Arc<App>) -> Self {
        let frames = frame_limiter(app.config.frame_rate_per_sec);
        Session {
            conn,
            app,
            frames,
            typed: Default::default(),
        }
    }

    /// Whether a `typing` in `conversation` is to be relayed now (and if so, it counts as
    /// relayed): not within [`TYPING_INTERVAL`] of the last one relayed there, nor past
    /// [`TYPING_CONVERSATIONS`] conversations in that time.
    fn typing_due(&self, conversation: &str) -> bool {
        let now = Instant::now();
        let mut typed = self.typed.lock().unwrap_or_else(|e| e.into_inner());
        typed.retain(|(_, at)| now.duration_since(*at) < TYPING_INTERVAL);
        if typed.len() >= TYPING_CONVERSATIONS || typed.iter().any(|(c, _)| c == conversation) {
            return false;
        }
        typed.push((conversation.to_owned(), now));
        true
    }

    fn user(&self) -> &str {
        &self.conn.user
    }

    /// This connection's user and device.
    fn me(&self) -> (&str, &str) {
        (&self.conn.user, &self.conn.device)
    }

    pub fn reply(&self, frame: ServerFrame) {
        self.conn
            .deliver(Utf8Bytes::from(frame.to_json()), Class::Reliable);
    }

    pub fn refuse(&self, refusal: Refusal) {
        let code = serde_json::to_value(refusal.code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        metrics::counter!("gateway_errors_total", "code" => code).increment(1);
        self.reply(refusal.into_frame());
    }

    /// Handles one text frame from the client.
    pub async fn on_text(&self, text: &str) {
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(refusal) => {
                metrics::counter!("gateway_frames_received_total", "type" => "invalid")
                    .increment(1);
                return self.refuse(refusal);
            }
        };
        metrics::counter!("gateway_frames_received_total", "type" => frame.kind()).increment(1);
        let (reference, client_msg_id) = match &frame {
            ClientFrame::Send { client_msg_id, .. } => (None, Some(client_msg_id.clone())),
            ClientFrame::History { reference, .. }
            | ClientFrame::KeysUpload { reference, .. }
            | ClientFrame::Devices { reference, .. }
            | ClientFrame::KeysClaim { reference, .. }
            | ClientFrame::ToDevice { reference, .. }
            | ClientFrame::RemoveDevice { reference, .. }
            | ClientFrame::CreateGroup { reference, .. }
            | ClientFrame::Conversations { reference, .. }
            | ClientFrame::GroupInfo { reference, .. }
            | ClientFrame::AddMembers { reference, .. }
            | ClientFrame::RemoveMembers { reference, .. }
            | ClientFrame::MediaUpload { reference, .. }
            | ClientFrame::MediaComplete { reference, .. }
            | ClientFrame::MediaUrl { reference, .. } => (Some(reference.clone()), None),
            ClientFrame::Ping { reference }
            | ClientFrame::Ack { reference, .. }
            | ClientFrame::Read { reference, .. }
            | ClientFrame::Typing { reference, .. }
            | ClientFrame::SubscribePresence { reference, .. }
            | ClientFrame::UnsubscribePresence { reference, .. } => (reference.clone(), None),
        };
        if !matches!(frame, ClientFrame::Send { .. }) && self.frames.check().is_err() {
            let mut refusal = Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} frames/s on this connection",
                    self.app.config.frame_rate_per_sec
                ),
            );
            refusal.reference = reference;
            return self.refuse(refusal);
        }
        if let Err(mut refusal) = self.handle(frame).await {
            refusal.reference = refusal.reference.or(reference);
            refusal.client_msg_id = refusal.client_msg_id.or(client_msg_id);
            self.refuse(refusal);
        }
    }

    /// Awaits a backend call within the backend timeout.
    pub(crate) async fn call<T, E: Into<Refusal>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Refusal> {
        match tokio::time::timeout(self.app.config.backend_timeout(), call).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(Refusal::new(
                ErrorCode::Unavailable,
                "a backend did not answer in time; retry later",
            )),
        }
    }

    /// Parses a conversation name and checks that this user belongs to it.
    pub(crate) async fn member_of(
        &self,
        name: &str,
    ) -> Result<(Conversation, Option<Group>), Refusal> {
        let conversation: Conversation = name
            .parse()
            .map_err(|e: storage::model::BadConversation| Refusal::bad_request(e.to_string()))?;
        match &conversation {
            Conversation::Direct(..) => {
                if !conversation.is_party(self.user()) {
                    return Err(forbidden(format!("you are not part of {conversation}")));
                }
                Ok((conversation, None))
            }
            Conversation::Group(id) => match self.call(self.app.store.group(*id)).await? {
                None => Err(Refusal::new(
                    ErrorCode::NotFound,
                    format!("no group {conversation}"),
                )),
                Some(group) if !group.members.contains(self.user()) => {
                    Err(forbidden(format!("you are not a member of {conversation}")))
                }
                Some(group) => Ok((conversation, Some(group))),
            },
        }
    }

    async fn handle(&self, frame: ClientFrame) -> Result<(), Refusal> {
        match frame {
            ClientFrame::Send {
                client_msg_id,
                to,
                conversation,
                body,
                e2ee,
                attachments,
            } => {
                self.send(client_msg_id, to, conversation, body, e2ee, attachments)
                    .await
            }
            ClientFrame::Ack {
                message_ids,
                receipt_ids,
                notice_ids,
                ..
            } => {
                if message_ids.len() > 100 || receipt_ids.len() > 100 || notice_ids.len() > 100 {
                    return Err(Refusal::bad_request(
                        "`message_ids`, `receipt_ids` and `notice_ids` take at most 100 ids each",
                    ));
                }
                if message_ids.is_empty() && receipt_ids.is_empty() && notice_ids.is_empty() {
                    return Err(Refusal::bad_request(
                        "give `message_ids`, `receipt_ids` or `notice_ids` (1-100 ids each)",
                    ));
                }
                let ids = message_ids
                    .iter()
                    .map(|id| parse_id(id, "message_ids"))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut notices = receipt_ids
                    .iter()
                    .map(|id| parse_id(id, "receipt_ids"))
                    .collect::<Result<Vec<_>, _>>()?;
                for id in &notice_ids {
                    notices.push(parse_id(id, "notice_ids")?);
                }
                if !notices.is_empty() {
                    // Confirmed: no longer kept for this user's next connect.
                    self.call(self.app.receipt_drops.confirm(self.user(), notices))
                        .await?;
                }
                if !notice_ids.is_empty() {
                    // Notices kept for this device alone (to-device messages, low keys).
                    let ids = notice_ids
                        .iter()
                        .map(|id| parse_id(id, "notice_ids"))
                        .collect::<Result<Vec<_>, _>>()?;
                    let queue = storage::device_address(self.user(), &self.conn.device);
                    self.call(self.app.receipt_drops.confirm(&queue, ids))
                        .await?;
                }
                if ids.is_empty() {
                    return Ok(());
                }
                let envelope = Envelope::Ack {
                    user: self.user().to_owned(),
                    message_ids: ids,
                    device: Some(self.conn.device.clone()),
                };
                self.publish(envelope).await
            }
            ClientFrame::Read {
                conversation,
                message_id,
                ..
            } => {
                let (conversation, _) = self.member_of(&conversation).await?;
                let id = parse_id(&message_id, "message_id")?;
                if self
                    .call(self.app.store.message(&conversation, id))
                    .await?
                    .is_none()
                {
                    return Err(Refusal::new(
                        ErrorCode::NotFound,
                        format!("no message {id} in {conversation}"),
                    ));
                }
                let envelope = Envelope::Read {
                    user: self.user().to_owned(),
                    conversation,
                    message_id: id,
                };
                self.publish(envelope).await
            }
            ClientFrame::Typing { conversation, .. } => self.typing(&conversation).await,
            ClientFrame::History {
                reference,
                conversation,
                before,
                limit,
            } => {
                let (conversation, group) = self.member_of(&conversation).await?;
                let before = before.map(|b| parse_id(&b, "before")).transpose()?;
                let limit = match limit {
                    None => 50,
                    Some(l @ 1..=100) => l as usize,
                    Some(_) => return Err(Refusal::bad_request("`limit` must be 1-100")),
                };
                let (mut page, markers) = self
                    .call(async {
                        tokio::try_join!(
                            self.app.store.history(&conversation, before, limit + 1),
                            self.app.store.markers(&conversation),
                        )
                    })
                    .await?;
                // A member added later sees what came after they joined (all older too is
                // before it, so `more` stays exact).
                if let Some(group) = &group {
                    page.retain(|m| group.shows(self.user(), m.id));
                }
                let more = page.len() > limit;
                page.truncate(limit);
                let members = members_of(&conversation, group.as_ref());
                self.reply(ServerFrame::History {
                    reference,
                    conversation: conversation.to_string(),
                    messages: views(&page, self.me(), &members, group.as_ref(), &markers),
                    more,
                    markers: markers.iter().map(MarkerView::from).collect(),
                });
                Ok(())
            }
            ClientFrame::Conversations {
                reference,
                before,
                limit,
            } => {
                let before = before.map(|b| parse_id(&b, "before")).transpose()?;
                let limit = match limit {
                    None => 20,
                    Some(l @ 1..=100) => l as usize,
                    Some(_) => return Err(Refusal::bad_request("`limit` must be 1-100")),
                };
                let mut entries = self
                    .call(self.app.store.conversations(self.user(), before, limit + 1))
                    .await?;
                let more = entries.len() > limit;
                entries.truncate(limit);
                let views = self
                    .call(futures_util::future::try_join_all(
                        entries.iter().map(|e| self.inbox_view(e)),
                    ))
                    .await?;
                self.reply(ServerFrame::Conversations {
                    reference,
                    conversations: views.into_iter().flatten().collect(),
                    more,
                });
                Ok(())
            }
            ClientFrame::GroupInfo {
                reference,
                conversation,
            } => {
                let (conversation, group) = self.member_of(&conversation).await?;
                let Some(group) = group else {
                    return Err(Refusal::bad_request(format!(
                        "{conversation} is not a group"
                    )));
                };
                self.reply(ServerFrame::group(reference, &group));
                Ok(())
            }
            ClientFrame::SubscribePresence { users, .. } => {
                check_users(&users, "users", 500)?;
                // A user named twice is watched, and answered, once.
                let mut seen = HashSet::with_capacity(users.len());
                let users: Vec<String> = users
                    .into_iter()
                    .filter(|u| seen.insert(u.clone()))
                    .collect();
                // Watch first, then read: a change in between is sent twice, never missed.
                if !self.conn.watch(&users, MAX_WATCHED) {
                    return Err(Refusal::bad_request(format!(
                        "a connection may watch at most {MAX_WATCHED} users \
                         (unsubscribe_presence from some first)"
                    )));
                }
                self.app.hub.add_watches(&self.conn, &users);
                // Up to 500 frames, more than the queue may hold: sent as the client takes
                // them (a connection closed meanwhile needs none).
                for status in self.call(self.app.presence.status(&users)).await? {
                    let frame = Utf8Bytes::from(ServerFrame::presence(&status).to_json());
                    if !self.conn.send_waiting(frame).await {
                        break;
                    }
                }
                Ok(())
            }
            ClientFrame::UnsubscribePresence { users, .. } => {
                check_users(&users, "users", 500)?;
                let watched = self.conn.unwatch(&users);
                self.app.hub.remove_watches(&self.conn, &watched);
                Ok(())
            }
            ClientFrame::CreateGroup {
                reference,
                name,
                members,
            } => {
                let name = name.trim().to_owned();
                if name.is_empty() || name.chars().count() > 100 {
                    return Err(Refusal::bad_request(
                        "`name` must be 1-100 characters, not counting surrounding whitespace",
                    ));
                }
                if !members.is_empty() {
                    check_users(&members, "members", MAX_GROUP_MEMBERS - 1)?;
                }
                let mut members: std::collections::BTreeSet<String> = members.into_iter().collect();
                members.insert(self.user().to_owned());
                self.take_group_notices(members.len())?;
                let group = Group {
                    id: Uuid::now_v7(),
                    name,
                    members,
                    joined: Default::default(),
                };
                self.call(self.app.store.create_group(group.clone()))
                    .await?;
                let added = group
                    .members
                    .iter()
                    .filter(|m| *m != self.user())
                    .cloned()
                    .collect();
                // Answered once the members' notices are kept.
                self.tell_members(GroupChangeKind::Created, group.clone(), added, Vec::new())
                    .await;
                self.reply(ServerFrame::group(reference, &group));
                Ok(())
            }
            ClientFrame::AddMembers {
                reference,
                conversation,
                members,
            } => {
                self.change_members(reference, &conversation, members, true)
                    .await
            }
            ClientFrame::RemoveMembers {
                reference,
                conversation,
                members,
            } => {
                self.change_members(reference, &conversation, members, false)
                    .await
            }
            ClientFrame::Ping { reference } => {
                self.reply(ServerFrame::Pong { reference });
                Ok(())
            }
            ClientFrame::KeysUpload {
                reference,
                identity_key,
                signing_key,
                one_time_keys,
                fallback_key,
            } => {
                let count = Box::pin(e2ee::upload(
                    self,
                    identity_key,
                    signing_key,
                    one_time_keys,
                    fallback_key,
                ))
                .await?;
                self.reply(ServerFrame::Keys {
                    reference,
                    one_time_keys: count,
                });
                Ok(())
            }
            ClientFrame::Devices { reference, users } => {
                check_users(&users, "users", 100)?;
                let devices = self.call(self.app.store.devices(&users)).await?;
                self.reply(ServerFrame::Devices {
                    reference,
                    devices: devices.iter().map(DeviceView::from).collect(),
                });
                Ok(())
            }
            ClientFrame::KeysClaim { reference, devices } => {
                let keys = Box::pin(e2ee::claim(self, devices)).await?;
                self.reply(ServerFrame::KeysClaimed { reference, keys });
                Ok(())
            }
            ClientFrame::ToDevice {
                reference,
                messages,
            } => {
                Box::pin(e2ee::to_devices(self, messages)).await?;
                self.reply(ServerFrame::ToDeviceSent { reference });
                Ok(())
            }
            ClientFrame::MediaUpload {
                reference,
                content_type,
                size,
                sha256,
            } => Box::pin(media::upload(self, reference, content_type, size, sha256)).await,
            ClientFrame::MediaComplete {
                reference,
                media_id,
            } => Box::pin(media::complete(self, reference, media_id)).await,
            ClientFrame::MediaUrl {
                reference,
                media_id,
                conversation,
                message_id,
            } => {
                Box::pin(media::url(
                    self,
                    reference,
                    media_id,
                    conversation,
                    message_id,
                ))
                .await
            }
            ClientFrame::RemoveDevice { reference, device } => {
                if !storage::is_valid_id(&device) {
                    return Err(Refusal::bad_request(format!(
                        "`device`: {device:?} is not a device id"
                    )));
                }
                self.call(self.app.store.remove_device(self.user(), &device))
                    .await?;
                self.reply(ServerFrame::DeviceRemoved { reference, device });
                Ok(())
            }
        }
    }

    async fn send(
        &self,
        client_msg_id: String,
        to: Option<String>,
        conversation: Option<String>,
        body: Option<String>,
        e2ee: Option<E2eeSend>,
        attachments: Vec<AttachmentSend>,
    ) -> Result<(), Refusal> {
        let length = client_msg_id.chars().count();
        if length == 0 || length > 64 {
            return Err(Refusal::bad_request(
                "`client_msg_id` must be 1-64 characters",
            ));
        }
        let max = self.app.config.max_body_bytes;
        let body = match (body, &e2ee) {
            (Some(body), None) => {
                if body.trim().is_empty() {
                    return Err(Refusal::bad_request(
                        "`body` is empty: a message needs some text",
                    ));
                }
                if body.len() > max {
                    return Err(Refusal::new(
                        ErrorCode::TooLarge,
                        format!("`body` is {} bytes, the limit is {max}", body.len()),
                    ));
                }
                body
            }
            (None, Some(_)) => String::new(),
            (None, None) if !attachments.is_empty() => String::new(),
            (None, None) => {
                return Err(Refusal::bad_request(
                    "missing field `body` (or `e2ee` for an end-to-end encrypted message, or \
                     `attachments`)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Refusal::bad_request(
                    "give `body` or `e2ee`, not both: an end-to-end encrypted message has no \
                     text the server can read",
                ))
            }
        };
        let (conversation, group) = match (to, conversation) {
            (Some(to), None) => {
                if !storage::is_valid_id(&to) {
                    return Err(Refusal::bad_request(format!(
                        "`to`: {to:?} is not a user id"
                    )));
                }
                (Conversation::direct(self.user(), &to), None)
            }
            (None, Some(name)) => self.member_of(&name).await?,
            _ => {
                return Err(Refusal::bad_request(
                    "give exactly one of `to` (a user id) or `conversation` (a group)",
                ))
            }
        };
        let budget = &self.app.sends;
        let wait = self.app.config.backend_timeout();
        if !budget.allow(&self.app.presence, self.user(), wait).await {
            metrics::counter!("gateway_messages_total", "outcome" => "rate_limited").increment(1);
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages/s (burst {}): wait and send this client_msg_id again",
                    self.app.config.rate_per_sec, self.app.config.rate_burst
                ),
            ));
        }
        // After the budget: the check reads the device lists, and a refused send (a
        // `device_mismatch`) costs a token like any other.
        let e2ee = match e2ee {
            // Boxed, as the other end-to-end encryption requests are: `handle`'s future
            // (and its poll frame, which a debug build keeps on the stack) stays small.
            Some(e2ee) => {
                Some(Box::pin(e2ee::check_send(self, &conversation, group.as_ref(), e2ee)).await?)
            }
            None => None,
        };
        let attachments = if attachments.is_empty() {
            Vec::new()
        } else {
            Box::pin(media::check_attachments(self, attachments)).await?
        };

        // The dispatcher that stores the message answers `sent` (or, for a retry, the
        // message stored first) to this connection; until then the send waits here, and the
        // connection goes on reading.
        let id = Uuid::now_v7();
        let message = Message {
            id,
            conversation,
            from: self.user().to_owned(),
            body,
            ts: ts_of(id),
            e2ee,
            attachments,
        };
        let origin = ConnRef {
            node: self.app.node.clone(),
            conn: self.conn.id,
        };
        let envelope = Envelope::Message {
            message: Box::new(message),
            origin: Some(origin),
            client_msg_id: Some(client_msg_id.clone()),
        };
        self.app.deadlines.watch(
            &self.conn,
            client_msg_id.clone(),
            self.app.config.backend_timeout(),
        );
        let failed: Failed = {
            let (conn, client_msg_id) = (self.conn.clone(), client_msg_id.clone());
            Box::new(move |e| conn.fail_send(&client_msg_id, &e.to_string()))
        };
        // The message id on the span of its way into the log (the dispatcher's events
        // carry it too: `persisted`, `routed`). Debug level: at the default level a send
        // pays for no span; a refusal is logged with the id either way.
        let span = tracing::debug_span!("send", message_id = %id, %client_msg_id);
        if let Err(refusal) = self
            .call(self.app.log.publish(envelope, Some(failed)))
            .instrument(span)
            .await
        {
            tracing::info!(message_id = %id, code = ?refusal.code, "send refused");
            self.conn.take_answer(&client_msg_id);
            return Err(refusal);
        }
        tracing::debug!(message_id = %id, "published");
        Ok(())
    }

    /// Publishes an ack or a read: answered only when refused, also when the log fails to
    /// take it after it was queued.
    async fn publish(&self, envelope: Envelope) -> Result<(), Refusal> {
        let failed: Failed = {
            let conn = self.conn.clone();
            Box::new(move |e| {
                metrics::counter!("gateway_errors_total", "code" => "unavailable").increment(1);
                let frame = Refusal::from(e).into_frame().to_json();
                conn.deliver(Utf8Bytes::from(frame), Class::Reliable);
            })
        };
        self.call(self.app.log.publish(envelope, Some(failed)))
            .await
    }

    async fn typing(&self, name: &str) -> Result<(), Refusal> {
        let (conversation, group) = self.member_of(name).await?;
        if !self.typing_due(&conversation.to_string()) {
            return Ok(());
        }
        let others: Vec<String> = match &group {
            Some(group) => group
                .members
                .iter()
                .filter(|m| *m != self.user())
                .cloned()
                .collect(),
            None => conversation
                .peer_of(self.user())
                .filter(|peer| *peer != self.user())
                .map(|peer| vec![peer.to_owned()])
                .unwrap_or_default(),
        };
        if others.is_empty() {
            return Ok(());
        }
        let payload = Payload::Typing {
            conversation,
            user: self.user().to_owned(),
        };
        self.push_to_devices(&others, payload).await
    }

    /// Pushes `payload` to the devices of `users` that are online now, one delivery per
    /// node that holds any of them.
    async fn push_to_devices(&self, users: &[String], payload: Payload) -> Result<(), Refusal> {
        Box::pin(self.push_to_queues(vec![(users.to_vec(), payload)])).await
    }

    /// Pushes each payload to the connected devices of its queues (users, or devices'
    /// queues `user/device`): one publish per node that holds any of them.
    pub(crate) async fn push_to_queues(
        &self,
        items: Vec<(Vec<String>, Payload)>,
    ) -> Result<(), Refusal> {
        let mut users: Vec<String> = items
            .iter()
            .flat_map(|(queues, _)| queues.iter().map(|q| storage::user_of(q).to_owned()))
            .collect();
        users.sort_unstable();
        users.dedup();
        let located = self.call(self.app.presence.locate(&users)).await?;
        let mut by_node: std::collections::HashMap<String, Vec<NodeDelivery>> = Default::default();
        for (queues, payload) in items {
            let mut here: std::collections::HashMap<&str, Vec<String>> = Default::default();
            for queue in queues {
                let device = storage::device_of(&queue);
                let at = located.get(storage::user_of(&queue)).into_iter().flatten();
                for location in at.filter(|l| device.is_none_or(|d| d == l.device)) {
                    let list = here.entry(location.node.as_str()).or_default();
                    if !list.contains(&queue) {
                        list.push(queue.clone());
                    }
                }
            }
            for (node, users) in here {
                by_node
                    .entry(node.to_owned())
                    .or_default()
                    .push(NodeDelivery {
                        users,
                        except: None,
                        payload: payload.clone(),
                    });
            }
        }
        for (node, deliveries) in by_node {
            self.call(self.app.presence.publish(&node, deliveries))
                .await?;
        }
        Ok(())
    }

    async fn change_members(
        &self,
        reference: Value,
        name: &str,
        members: Vec<String>,
        add: bool,
    ) -> Result<(), Refusal> {
        let (conversation, before) = self.member_of(name).await?;
        let (Some(id), Some(before)) = (conversation.group_id(), before) else {
            return Err(Refusal::bad_request(format!(
                "{conversation} is not a group"
            )));
        };
        check_users(&members, "members", MAX_GROUP_MEMBERS)?;
        // At most every member before and everyone added is told.
        self.take_group_notices(before.members.len() + if add { members.len() } else { 0 })?;
        let (adding, removing) = if add {
            (members, Vec::new())
        } else {
            (Vec::new(), members)
        };
        let group = self
            .call(self.app.store.update_members(id, adding, removing))
            .await?;
        let added: Vec<String> = group.members.difference(&before.members).cloned().collect();
        let removed: Vec<String> = before.members.difference(&group.members).cloned().collect();
        if !added.is_empty() || !removed.is_empty() {
            // Answered once the members' notices are kept.
            self.tell_members(GroupChangeKind::Members, group.clone(), added, removed)
                .await;
        }
        self.reply(ServerFrame::group(reference, &group));
        Ok(())
    }

    /// Takes the notices a group change may cause from this user's budget: refused whole
    /// (`rate_limited`, nothing changed) beyond it.
    fn take_group_notices(&self, notices: usize) -> Result<(), Refusal> {
        let notices = u32::try_from(notices).unwrap_or(u32::MAX);
        if self.app.group_notices.allow(self.user(), notices) {
            return Ok(());
        }
        let config = &self.app.config;
        Err(Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "group changes telling more than {} members per second (burst {}): nothing \
                 was changed; try again later",
                config.group_notices_per_sec, config.group_notices_burst
            ),
        ))
    }

    /// Tells a group's members (and those it removed) of a change: a notice kept for each
    /// of them until a device confirms it (so the offline hear of it on their next
    /// connect), pushed to the devices online now. Kept before they are looked up, as
    /// receipts are. The change itself is done: a failure here is logged, and members
    /// still find the group in their inbox.
    async fn tell_members(
        &self,
        change: GroupChangeKind,
        group: Group,
        added: Vec<String>,
        removed: Vec<String>,
    ) {
        let id = Uuid::now_v7();
        let mut users: Vec<String> = group.members.iter().cloned().collect();
        users.extend(removed.iter().cloned());
        let change = GroupChange {
            group,
            change,
            by: self.user().to_owned(),
            added,
            removed,
            ts: ts_of(id),
        };
        let notices = users
            .iter()
            .map(|u| (u.clone(), id, Notice::Group(change.clone())))
            .collect();
        let told = async {
            self.call(self.app.store.push_notices(notices)).await?;
            self.push_to_devices(&users, Payload::Group { id, change })
                .await
        };
        if let Err(e) = told.await {
            metrics::counter!("gateway_group_notices_failed_total").increment(1);
            tracing::warn!(error = %e.message, "telling a group's members of a change failed");
        }
    }

    /// One inbox entry: the conversation's latest message, the reader's unread count and
    /// every member's markers. `None` for a group the user has left meanwhile.
    async fn inbox_view(
        &self,
        entry: &storage::InboxEntry,
    ) -> Result<Option<InboxView>, storage::Error> {
        let store = &self.app.store;
        let conversation = &entry.conversation;
        let group = async {
            match conversation.group_id() {
                Some(id) => store.group(id).await,
                None => Ok(None),
            }
        };
        let (mut recent, markers, group) = tokio::try_join!(
            store.history(conversation, None, UNREAD_CAP),
            store.markers(conversation),
            group,
        )?;
        if conversation.group_id().is_some()
            && !group
                .as_ref()
                .is_some_and(|g| g.members.contains(self.user()))
        {
            return Ok(None);
        }
        if let Some(group) = &group {
            recent.retain(|m| group.shows(self.user(), m.id));
        }
        let members = members_of(conversation, group.as_ref());
        let read_upto = markers
            .iter()
            .find(|m| m.user == self.user())
            .and_then(|m| m.read)
            .map_or(0, |id| id.as_u128());
        let unread = recent
            .iter()
            .filter(|m| m.from != self.user() && m.id.as_u128() > read_upto)
            .count();
        let last_message = views(
            &recent[..recent.len().min(1)],
            self.me(),
            &members,
            group.as_ref(),
            &markers,
        )
        .pop();
        Ok(Some(InboxView {
            conversation: conversation.to_string(),
            activity: entry.activity.to_string(),
            ts: ts_of(entry.activity),
            name: group.as_ref().map(|g| g.name.clone()),
            members,
            joined: group.map(|g| g.joined).unwrap_or_default(),
            last_message,
            unread,
            markers: markers.iter().map(MarkerView::from).collect(),
        }))
    }
}
