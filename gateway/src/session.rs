//! One connection's requests: validate, authorize, call the backends, answer.

use std::future::Future;
use std::sync::Arc;

use dispatcher::{Envelope, Failed, InboundLog};
use governor::DefaultDirectRateLimiter;
use presence::{ConnRef, NodeDelivery, Payload, PresenceService};
use serde_json::Value;
use storage::{ts_of, Conversation, Group, Message, MessageStore, MAX_GROUP_MEMBERS};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::app::App;
use crate::hub::{Class, ConnHandle};
use crate::limits::frame_limiter;
use crate::protocol::{ClientFrame, ErrorCode, MessageView, Refusal, ServerFrame};

/// Most users one connection may watch the presence of.
const MAX_WATCHED: usize = 5000;

impl From<storage::Error> for Refusal {
    fn from(e: storage::Error) -> Self {
        use storage::Error as E;
        let code = match &e {
            E::NotFound(_) => ErrorCode::NotFound,
            E::Invalid(_) => ErrorCode::BadRequest,
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
    conn: Arc<ConnHandle>,
    app: Arc<App>,
    frames: DefaultDirectRateLimiter,
}

fn forbidden(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::Forbidden, message)
}

fn parse_id(value: &str, field: &str) -> Result<Uuid, Refusal> {
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

fn group_frame(reference: Option<Value>, group: &Group) -> ServerFrame {
    ServerFrame::Group {
        reference,
        conversation: group.conversation().to_string(),
        name: group.name.clone(),
        members: group.members.iter().cloned().collect(),
    }
}

impl Session {
    pub fn new(conn: Arc<ConnHandle>, app: Arc<App>) -> Self {
        let frames = frame_limiter(app.config.frame_rate_per_sec);
        Session { conn, app, frames }
    }

    fn user(&self) -> &str {
        &self.conn.user
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
            Err(refusal) => return self.refuse(refusal),
        };
        let (reference, client_msg_id) = match &frame {
            ClientFrame::Send { client_msg_id, .. } => (None, Some(client_msg_id.clone())),
            ClientFrame::History { reference, .. }
            | ClientFrame::CreateGroup { reference, .. }
            | ClientFrame::AddMembers { reference, .. }
            | ClientFrame::RemoveMembers { reference, .. } => (Some(reference.clone()), None),
            ClientFrame::Ping { reference } => (reference.clone(), None),
            _ => (None, None),
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
    async fn call<T, E: Into<Refusal>>(
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
    async fn member_of(&self, name: &str) -> Result<(Conversation, Option<Group>), Refusal> {
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
            } => self.send(client_msg_id, to, conversation, body).await,
            ClientFrame::Ack {
                message_ids,
                receipt_ids,
            } => {
                if message_ids.len() > 100 || receipt_ids.len() > 100 {
                    return Err(Refusal::bad_request(
                        "`message_ids` and `receipt_ids` take at most 100 ids each",
                    ));
                }
                if message_ids.is_empty() && receipt_ids.is_empty() {
                    return Err(Refusal::bad_request(
                        "give `message_ids`, `receipt_ids` or both (1-100 ids each)",
                    ));
                }
                let ids = message_ids
                    .iter()
                    .map(|id| parse_id(id, "message_ids"))
                    .collect::<Result<Vec<_>, _>>()?;
                let receipts = receipt_ids
                    .iter()
                    .map(|id| parse_id(id, "receipt_ids"))
                    .collect::<Result<Vec<_>, _>>()?;
                if !receipts.is_empty() {
                    // Confirmed: no longer kept for this user's next connect.
                    self.call(self.app.receipt_drops.confirm(self.user(), receipts))
                        .await?;
                }
                if ids.is_empty() {
                    return Ok(());
                }
                let envelope = Envelope::Ack {
                    user: self.user().to_owned(),
                    message_ids: ids,
                };
                self.publish(envelope).await
            }
            ClientFrame::Read {
                conversation,
                message_id,
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
            ClientFrame::Typing { conversation } => self.typing(&conversation).await,
            ClientFrame::History {
                reference,
                conversation,
                before,
                limit,
            } => {
                let (conversation, _) = self.member_of(&conversation).await?;
                let before = before.map(|b| parse_id(&b, "before")).transpose()?;
                let limit = match limit {
                    None => 50,
                    Some(l @ 1..=100) => l as usize,
                    Some(_) => return Err(Refusal::bad_request("`limit` must be 1-100")),
                };
                let mut page = self
                    .call(self.app.store.history(&conversation, before, limit + 1))
                    .await?;
                let more = page.len() > limit;
                page.truncate(limit);
                self.reply(ServerFrame::History {
                    reference,
                    conversation: conversation.to_string(),
                    messages: page.iter().map(MessageView::from).collect(),
                    more,
                });
                Ok(())
            }
            ClientFrame::SubscribePresence { users } => {
                check_users(&users, "users", 500)?;
                if self.conn.watching_count() + users.len() > MAX_WATCHED {
                    return Err(Refusal::bad_request(format!(
                        "a connection may watch at most {MAX_WATCHED} users"
                    )));
                }
                // Watch first, then read: a change in between is sent twice, never missed.
                self.conn.watch(&users);
                self.app.hub.add_watches(&self.conn, &users);
                for status in self.call(self.app.presence.status(&users)).await? {
                    self.reply(ServerFrame::presence(&status));
                }
                Ok(())
            }
            ClientFrame::CreateGroup {
                reference,
                name,
                members,
            } => {
                let name = name.trim().to_owned();
                if name.is_empty() || name.chars().count() > 100 {
                    return Err(Refusal::bad_request("`name` must be 1-100 characters"));
                }
                if !members.is_empty() {
                    check_users(&members, "members", MAX_GROUP_MEMBERS - 1)?;
                }
                let mut members: std::collections::BTreeSet<String> = members.into_iter().collect();
                members.insert(self.user().to_owned());
                let group = Group {
                    id: Uuid::now_v7(),
                    name,
                    members,
                };
                self.call(self.app.store.create_group(group.clone()))
                    .await?;
                self.reply(group_frame(Some(reference), &group));
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
        }
    }

    async fn send(
        &self,
        client_msg_id: String,
        to: Option<String>,
        conversation: Option<String>,
        body: String,
    ) -> Result<(), Refusal> {
        let length = client_msg_id.chars().count();
        if length == 0 || length > 64 {
            return Err(Refusal::bad_request(
                "`client_msg_id` must be 1-64 characters",
            ));
        }
        let max = self.app.config.max_body_bytes;
        if body.len() > max {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("`body` is {} bytes, the limit is {max}", body.len()),
            ));
        }
        let conversation = match (to, conversation) {
            (Some(to), None) => {
                if !storage::is_valid_id(&to) {
                    return Err(Refusal::bad_request(format!(
                        "`to`: {to:?} is not a user id"
                    )));
                }
                Conversation::direct(self.user(), &to)
            }
            (None, Some(name)) => self.member_of(&name).await?.0,
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
        };
        let origin = ConnRef {
            node: self.app.node.clone(),
            conn: self.conn.id,
        };
        let envelope = Envelope::Message {
            message,
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
        if let Err(refusal) = self
            .call(self.app.bus.publish(envelope, Some(failed)))
            .await
        {
            self.conn.take_answer(&client_msg_id);
            return Err(refusal);
        }
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
        self.call(self.app.bus.publish(envelope, Some(failed)))
            .await
    }

    async fn typing(&self, name: &str) -> Result<(), Refusal> {
        let (conversation, group) = self.member_of(name).await?;
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
        let located = self.call(self.app.presence.locate(&others)).await?;
        let mut by_node: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (user, locations) in located {
            for location in locations {
                let users = by_node.entry(location.node).or_default();
                if !users.contains(&user) {
                    users.push(user.clone());
                }
            }
        }
        for (node, users) in by_node {
            let delivery = NodeDelivery {
                users,
                except: None,
                payload: Payload::Typing {
                    conversation: conversation.clone(),
                    user: self.user().to_owned(),
                },
            };
            self.call(self.app.presence.publish(&node, vec![delivery]))
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
        let (conversation, _) = self.member_of(name).await?;
        let Some(id) = conversation.group_id() else {
            return Err(Refusal::bad_request(format!(
                "{conversation} is not a group"
            )));
        };
        check_users(&members, "members", MAX_GROUP_MEMBERS)?;
        let (adding, removing) = if add {
            (members, Vec::new())
        } else {
            (Vec::new(), members)
        };
        let group = self
            .call(self.app.store.update_members(id, adding, removing))
            .await?;
        self.reply(group_frame(Some(reference), &group));
        Ok(())
    }
}
