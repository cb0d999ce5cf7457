//! The presence contract and the enum of backends that is what actually runs.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use storage::{Conversation, GroupChange, Message, Notice, Receipt};
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use crate::error::Result;

mod memory;
mod redis;

pub use memory::MemoryPresence;
pub use redis::{RedisConfig, RedisPresence};

/// One connected device: the gateway node holding it and that node's connection number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub node: String,
    pub device: String,
    pub conn: u64,
}

/// A user's presence as subscribers see it. `last_seen` is the time the user's last device
/// left, `None` while online or when unknown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub user: String,
    pub online: bool,
    pub last_seen: Option<i64>,
}

/// One connection on one node, to leave out of a delivery (the sender's own device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRef {
    pub node: String,
    pub conn: u64,
}

/// What a node is asked to deliver to every local connection of some users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDelivery {
    /// Users (every connection of theirs), or devices' queues (`user/device`: that
    /// device's connections only).
    pub users: Vec<String>,
    pub except: Option<ConnRef>,
    pub payload: Payload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    Message(Message),
    /// A receipt for the delivery's user, kept in the store under `id` until one of their
    /// devices confirms it.
    Receipt {
        id: Uuid,
        receipt: Receipt,
    },
    /// A change of a group, for the delivery's users, kept in the store under `id` for
    /// each of them until one of their devices confirms it.
    Group {
        id: Uuid,
        change: GroupChange,
    },
    /// A notice kept in the store under `id` for the delivery's queues (a device's, for a
    /// to-device message), until confirmed.
    Notice {
        id: Uuid,
        notice: Notice,
    },
    Typing {
        conversation: Conversation,
        user: String,
    },
    /// To the one connection (`conn` on this node, of the delivery's only user) that sent a
    /// message: it is stored, under this id.
    Sent {
        conn: u64,
        client_msg_id: String,
        message_id: Uuid,
        conversation: Conversation,
        ts: i64,
    },
    /// To the one connection that sent a message: it could not be stored and will not be
    /// (the client may send it again).
    Refused {
        conn: u64,
        client_msg_id: String,
        reason: String,
    },
}

/// A send budget: `per_second` sends on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    pub per_second: u32,
    pub burst: u32,
}

/// What every presence backend does. Exactly two implementations exist:
/// [`MemoryPresence`] (one process) and the Redis one; one conformance suite
/// (`tests/conformance.rs`) runs against both.
pub trait PresenceService: Send + Sync + 'static {
    /// Records a connected device. `true` when the user has just come online (their first
    /// device), which is also announced on [`PresenceService::changes`].
    fn connect(&self, user: &str, at: &Location) -> impl Future<Output = Result<bool>> + Send;

    /// Forgets a device. `true` when it was the user's last one: the user is offline now,
    /// `last_seen` is set, and the change is announced.
    fn disconnect(&self, user: &str, at: &Location) -> impl Future<Output = Result<bool>> + Send;

    /// Keeps a node's devices alive for another TTL. A node that stops calling this (it
    /// died) has its users go offline when the TTL runs out. Answers the users of whom
    /// presence had lost a device and has it again (a Redis that came back empty, or the
    /// node reaped as dead while it ran): messages stored meanwhile found that device
    /// offline, and the node catches those users' connections up.
    fn heartbeat(
        &self,
        node: &str,
        users: &[String],
    ) -> impl Future<Output = Result<Vec<String>>> + Send;

    fn status(&self, users: &[String]) -> impl Future<Output = Result<Vec<Status>>> + Send;

    /// Where each of these users is connected; users with no live device are absent.
    fn locate(
        &self,
        users: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Vec<Location>>>> + Send;

    /// Sends deliveries to a node's channel, in order, as one message. Best effort: a node
    /// that is gone loses them, and the messages they carried are still pending in the store.
    fn publish(
        &self,
        node: &str,
        deliveries: Vec<NodeDelivery>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Opens a node's delivery channel (replacing an earlier one for the same node).
    fn deliveries(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<mpsc::UnboundedReceiver<Vec<NodeDelivery>>>> + Send;

    /// Every online/offline transition of every user, from now on.
    fn changes(&self) -> broadcast::Receiver<Status>;

    /// Counts the times this process registered its devices again after the backend had
    /// lost them (Redis restarted, or was unreachable), and renewed its delivery
    /// subscriptions after losing them. Messages stored meanwhile found their recipients
    /// offline, or were published to nobody: a node catches its connections up when this
    /// moves.
    fn restorations(&self) -> watch::Receiver<u64>;

    /// Takes one send from `user`'s budget, which every node shares: `true` when the
    /// budget had one (the generic cell rate algorithm: a burst of `quota.burst`, then one
    /// every `1/quota.per_second` s). One round trip; a user who stops sending costs
    /// nothing once the budget is full again.
    fn take_send(&self, user: &str, quota: Quota) -> impl Future<Output = Result<bool>> + Send;

    /// Answers when the backend is reachable (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The presence backend that runs, chosen from configuration; its one `match` also counts
/// and times every operation.
#[derive(Clone, Debug)]
pub enum Presence {
    Memory(MemoryPresence),
    Redis(RedisPresence),
}

macro_rules! observed {
    ($self:ident, $op:literal, |$backend:ident| $call:expr) => {{
        let started = Instant::now();
        let result = match $self {
            Presence::Memory($backend) => $call.await,
            // Boxed: the client's futures run to tens of KiB, and inline they would make
            // every caller's future (a connection's request handler) that large.
            Presence::Redis($backend) => Box::pin($call).await,
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("presence_ops_total", "op" => $op, "outcome" => outcome).increment(1);
        metrics::histogram!("presence_op_seconds", "op" => $op)
            .record(started.elapsed().as_secs_f64());
        result
    }};
}

impl Presence {
    pub fn backend(&self) -> &'static str {
        match self {
            Presence::Memory(_) => "memory",
            Presence::Redis(_) => "redis",
        }
    }
}

impl PresenceService for Presence {
    async fn connect(&self, user: &str, at: &Location) -> Result<bool> {
        observed!(self, "connect", |p| p.connect(user, at))
    }
    async fn disconnect(&self, user: &str, at: &Location) -> Result<bool> {
        observed!(self, "disconnect", |p| p.disconnect(user, at))
    }
    async fn heartbeat(&self, node: &str, users: &[String]) -> Result<Vec<String>> {
        observed!(self, "heartbeat", |p| p.heartbeat(node, users))
    }
    async fn status(&self, users: &[String]) -> Result<Vec<Status>> {
        observed!(self, "status", |p| p.status(users))
    }
    async fn locate(&self, users: &[String]) -> Result<HashMap<String, Vec<Location>>> {
        observed!(self, "locate", |p| p.locate(users))
    }
    async fn publish(&self, node: &str, deliveries: Vec<NodeDelivery>) -> Result<()> {
        observed!(self, "publish", |p| p.publish(node, deliveries))
    }
    async fn deliveries(&self, node: &str) -> Result<mpsc::UnboundedReceiver<Vec<NodeDelivery>>> {
        observed!(self, "deliveries", |p| p.deliveries(node))
    }
    async fn take_send(&self, user: &str, quota: Quota) -> Result<bool> {
        observed!(self, "take_send", |p| p.take_send(user, quota))
    }
    fn changes(&self) -> broadcast::Receiver<Status> {
        match self {
            Presence::Memory(p) => p.changes(),
            Presence::Redis(p) => p.changes(),
        }
    }
    fn restorations(&self) -> watch::Receiver<u64> {
        match self {
            Presence::Memory(p) => p.restorations(),
            Presence::Redis(p) => p.restorations(),
        }
    }
    async fn ping(&self) -> Result<()> {
        observed!(self, "ping", |p| p.ping())
    }
}
