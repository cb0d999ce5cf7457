//! The node's connections: who is connected here, and how a frame reaches them.
//!
//! Every connection has a bounded outbound queue drained by its writer task. What happens
//! when that queue fills depends on what is being delivered ([`Class`]): typing and
//! presence frames are shed once it is half full; an answer that does not fit closes the
//! connection with 1008, and the messages it missed stay pending in the store and are
//! pushed again on reconnect. Nothing reliable is dropped silently.
//!
//! Messages, receipts and group notices are in the store until a device takes them, and
//! come in bursts (a recipient that acks a backlog makes a receipt per message at once; a
//! `to_device` frame may carry 2,048 messages for one device). One that finds the queue
//! half full is left to a catch-up ([`Hub::dispatch`] returns the connection), which sends
//! what is pending and kept at the pace the client reads, the other half left free for the
//! answers to the client's own requests. A receipt is dropped (the catch-up sends it from
//! the store); a message is held like the live messages of a replay, so that nothing
//! overtakes it, and released after it unless the catch-up sent it. The held messages are
//! bounded ([`MAX_HELD`], [`MAX_HELD_BYTES`]): a client that does not read at all is closed
//! with 1008 once they are full.
//!
//! What queues many frames at once waits for room instead: a replay (the pending queue
//! pushed on connect) and the statuses that answer a presence subscription (up to 500).
//! They fill at most a quarter of the queue, so the answers, receipts and live frames that
//! come meanwhile find the rest free. Filled to the brim, a backlog larger than the
//! socket's buffers closed any client that sent a request meanwhile, and a subscription to
//! more users than the queue holds closed its own connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use presence::{NodeDelivery, Payload, Status};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::protocol::{ErrorCode, Refusal, ServerFrame};

/// How a frame may be treated when the connection is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Typing and presence: dropped when the queue is half full.
    Sheddable,
    /// Answers and receipts: if they do not fit, the connection is closed with 1008.
    Reliable,
    /// A message (or a to-device notice): held back while the pending queue is replayed so
    /// that live messages never overtake older pending ones; when the queue is half full,
    /// held, and the connection wants a catch-up ([`ConnHandle::deliver_message`]).
    Message(Uuid),
}

/// What became of a live message ([`ConnHandle::deliver_message`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Queued, or held while a replay runs (or dropped as a copy of one it sent).
    Queued,
    /// Held because the queue was half full: the connection wants a catch-up.
    Behind,
    /// The connection is closing (closed now if the held messages were full).
    Closed,
}

/// The shared half of one connection: what the hub and the router need to reach it.
pub struct ConnHandle {
    pub id: u64,
    pub user: String,
    pub device: String,
    /// flume rather than tokio's mpsc: its queue is allocated lazily, so an idle
    /// connection's queue costs a few dozen bytes instead of a block of slots.
    out: flume::Sender<Utf8Bytes>,
    /// `u32`: with a `usize` the handle's allocation would be 232 bytes, in jemalloc's
    /// 256-byte class (see `watching`).
    capacity: u32,
    /// Signalled by the writer each time it takes frames: what waits for room (see
    /// [`ConnHandle::send_waiting`]) looks again.
    room: Notify,
    closed: CancellationToken,
    close_code: AtomicU16,
    /// Live messages held during a replay, and what the last replay sent.
    replay: Mutex<ReplayState>,
    /// A catch-up was asked for while a replay ran: it reads the queue again.
    replay_again: AtomicBool,
    /// The reader stopped: no new send starts (a drain waits for the last answers).
    reader_stopped: AtomicBool,
    /// Users whose presence this connection subscribed to. Boxed: most connections
    /// subscribe to none, and an empty set is 48 bytes (the handle's allocation stays in
    /// jemalloc's 224-byte class).
    #[allow(
        clippy::box_collection,
        reason = "the box is the point: 8 bytes in every handle instead of 48"
    )]
    watching: Mutex<Option<Box<HashSet<String>>>>,
    /// Milliseconds (monotonic, from the hub's clock) of the last frame from the client.
    last_heard: AtomicU64,
    /// Sends waiting for the dispatcher's answer: number, `client_msg_id`, when received.
    sends: Mutex<Vec<(u64, String, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most live messages held back during a replay before the connection counts as too slow.
const MAX_HELD: usize = 4096;

/// Most bytes of live messages held back during a replay before the connection counts as
/// too slow: a client that reads nothing must not make the node hold every message sent to
/// it.
const MAX_HELD_BYTES: usize = 4 << 20;

/// How long live copies of what a replay sent are dropped after it ends.
///
/// A message stored for a device that was not connected yet reaches it twice when the
/// device connects between the dispatcher storing the message and the dispatcher looking
/// its recipients up: the replay finds it pending, and the lookup finds the device and
/// delivers it live. A live copy that comes while the replay runs is held and dropped; one
/// that comes after it ends is dropped here. It comes within one batch's routing (a
/// presence lookup and a publish, each bounded by the store's and Redis's timeouts), or
/// within a few backoffs when a batch whose routing failed is read again.
pub const REPLAYED_KEPT: Duration = Duration::from_secs(30);

/// Most ids a connection keeps of its last replay: the newest (ids grow with time), as
/// the messages being routed while the device connected are the newest it was sent. A
/// connect storm after a restart must not hold whole pending queues in memory.
const REPLAYED_KEPT_IDS: usize = 64;

/// A connection's replay state.
struct ReplayState {
    /// `Some` while pending messages are being replayed: live messages wait here.
    held: Option<Vec<(Uuid, Utf8Bytes)>>,
    /// The bytes of the frames in `held` (at most [`MAX_HELD_BYTES`]; `u32` keeps the
    /// connection handle in jemalloc's 224-byte class).
    held_bytes: u32,
    /// A live message found the queue half full and started holding: the next
    /// [`ConnHandle::begin_replay`] runs the catch-up for it.
    owed: bool,
    /// What the last replay sent, kept a while after it ended (see [`REPLAYED_KEPT`]).
    /// Boxed: most connections replay nothing and keep nothing.
    replayed: Option<Box<Replayed>>,
}

struct Replayed {
    ids: HashSet<Uuid>,
    until: Instant,
}

/// The `n` highest ids of `ids`.
fn newest(ids: HashSet<Uuid>, n: usize) -> HashSet<Uuid> {
    if ids.len() <= n {
        return ids;
    }
    let mut all: Vec<Uuid> = ids.into_iter().collect();
    all.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
    all.truncate(n);
    all.into_iter().collect()
}

impl ReplayState {
    /// Holds a live frame until the replay ends; `false` (and not held) when as many frames
    /// or bytes as allowed are held already.
    fn hold(&mut self, id: Uuid, frame: Utf8Bytes) -> bool {
        let bytes = self.held_bytes as usize + frame.len();
        let held = self.held.get_or_insert_with(Vec::new);
        if held.len() >= MAX_HELD || bytes > MAX_HELD_BYTES {
            return false;
        }
        held.push((id, frame));
        self.held_bytes = bytes as u32;
        true
    }

    /// Whether a live message is a copy of one the last replay sent (forgets that replay
    /// once its time is up).
    fn sent_by_replay(&mut self, id: Uuid, now: Instant) -> bool {
        match &self.replayed {
            None => false,
            Some(replayed) if replayed.until <= now => {
                self.replayed = None;
                false
            }
            Some(replayed) => replayed.ids.contains(&id),
        }
    }
}

impl ConnHandle {
    pub fn new(
        id: u64,
        user: String,
        device: String,
        capacity: usize,
    ) -> (Arc<Self>, flume::Receiver<Utf8Bytes>) {
        let (out, rx) = flume::bounded(capacity);
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        let handle = ConnHandle {
            id,
            user,
            device,
            out,
            capacity,
            room: Notify::new(),
            closed: CancellationToken::new(),
            close_code: AtomicU16::new(0),
            replay: Mutex::new(ReplayState {
                held: Some(Vec::new()),
                held_bytes: 0,
                owed: false,
                replayed: None,
            }),
            replay_again: AtomicBool::new(false),
            reader_stopped: AtomicBool::new(false),
            watching: Mutex::new(None),
            last_heard: AtomicU64::new(0),
            sends: Mutex::new(Vec::new()),
        };
        (Arc::new(handle), rx)
    }

    /// Queues a frame for the client according to its class (see the module doc).
    /// Returns whether the connection took it: `false` once it is closing.
    pub fn deliver(&self, frame: Utf8Bytes, class: Class) -> bool {
        // A draining connection (1012) still takes frames: its writer sends what the
        // client is owed (the answers to its last sends) before the close frame.
        if self.closed.is_cancelled() && self.close_code() != Some(CloseCode::Restart) {
            return false;
        }
        match class {
            Class::Sheddable => {
                if self.half_full() || self.out.try_send(frame).is_err() {
                    metrics::counter!("gateway_frames_shed_total").increment(1);
                }
                true
            }
            Class::Reliable => self.push(frame),
            Class::Message(id) => self.deliver_message(id, frame) != Delivered::Closed,
        }
    }

    /// Queues a live message (see the module doc): held while a replay runs; held too when
    /// the queue is half full, and then [`Delivered::Behind`]: the caller starts a catch-up
    /// ([`ConnHandle::begin_replay`] runs it), after which the held messages are released.
    pub fn deliver_message(&self, id: Uuid, frame: Utf8Bytes) -> Delivered {
        if self.closed.is_cancelled() && self.close_code() != Some(CloseCode::Restart) {
            return Delivered::Closed;
        }
        let mut replay = lock(&self.replay);
        // Not held yet: queued while the queue is less than half full.
        let behind = replay.held.is_none();
        if behind {
            if replay.sent_by_replay(id, Instant::now()) {
                metrics::counter!("gateway_replayed_repeats_dropped_total").increment(1);
                return Delivered::Queued;
            }
            if !self.half_full() {
                return match self.push(frame) {
                    true => Delivered::Queued,
                    false => Delivered::Closed,
                };
            }
            metrics::counter!("gateway_messages_deferred_total").increment(1);
            replay.held = Some(Vec::new());
            replay.owed = true;
        }
        if !replay.hold(id, frame) {
            metrics::counter!("gateway_slow_consumer_disconnects_total").increment(1);
            tracing::info!(user = %self.user, conn = self.id, held = replay.held.as_ref().map_or(0, Vec::len), "too many live messages held, closing with 1008");
            self.close(CloseCode::Policy);
            return Delivered::Closed;
        }
        match behind {
            true => Delivered::Behind,
            false => Delivered::Queued,
        }
    }

    fn push(&self, frame: Utf8Bytes) -> bool {
        match self.out.try_send(frame) {
            Ok(()) => true,
            Err(flume::TrySendError::Full(_)) => {
                metrics::counter!("gateway_slow_consumer_disconnects_total").increment(1);
                tracing::info!(user = %self.user, conn = self.id, "outbound queue full, closing with 1008");
                self.close(CloseCode::Policy);
                false
            }
            Err(flume::TrySendError::Disconnected(_)) => false,
        }
    }

    /// Whether the queue is at least half full: where typing and presence are shed, and
    /// messages and receipts are left to a catch-up (see the module doc).
    fn half_full(&self) -> bool {
        self.out.len() * 2 >= self.capacity as usize
    }

    /// The most frames a producer that waits for room leaves queued: a quarter of the
    /// queue (see the module doc).
    fn waiting_share(&self) -> usize {
        (self.capacity as usize / 4).max(1)
    }

    /// The writer took frames from the queue.
    pub fn took_frames(&self) {
        self.room.notify_waiters();
    }

    /// Waits until the queue holds fewer than [`ConnHandle::waiting_share`] frames (or the
    /// connection closes: `false`).
    async fn room(&self) -> bool {
        let mut waited = false;
        loop {
            let taken = self.room.notified();
            tokio::pin!(taken);
            // Enabled before the check: frames taken in between wake this task.
            taken.as_mut().enable();
            if self.out.len() < self.waiting_share() {
                return true;
            }
            if !waited {
                waited = true;
                metrics::counter!("gateway_queue_waits_total").increment(1);
            }
            tokio::select! {
                _ = taken => {}
                _ = self.closed.cancelled() => return false,
            }
        }
    }

    /// Queues a receipt or group notice (kept in the store until a device of the user
    /// confirms it; see the module doc). While a replay runs it is held like a live
    /// message, and dropped at the replay's end if the replay sent it from the store; a
    /// copy of one the last replay sent is dropped. `false` when the queue is half full
    /// (or too much is held): the frame is dropped, and the caller starts a catch-up, which
    /// sends it again from the store.
    pub fn deliver_kept(&self, id: Uuid, frame: Utf8Bytes) -> bool {
        if self.closed.is_cancelled() && self.close_code() != Some(CloseCode::Restart) {
            return true;
        }
        // Pushed under the lock, as a live message is: a replay cannot begin in between.
        let mut replay = lock(&self.replay);
        if replay.held.is_some() {
            if replay.hold(id, frame) {
                return true;
            }
            metrics::counter!("gateway_kept_deferred_total").increment(1);
            return false;
        }
        if replay.sent_by_replay(id, Instant::now()) {
            metrics::counter!("gateway_replayed_repeats_dropped_total").increment(1);
            return true;
        }
        if self.half_full() {
            metrics::counter!("gateway_kept_deferred_total").increment(1);
            return false;
        }
        self.push(frame);
        true
    }

    /// Queues a frame once the queue holds fewer than a quarter of its capacity, waiting
    /// for the client to take earlier frames until then: for what queues many frames at
    /// once (see the module doc), in a task that may wait. `false` if the connection
    /// closed meanwhile.
    pub async fn send_waiting(&self, frame: Utf8Bytes) -> bool {
        self.room().await && self.push(frame)
    }

    /// Starts another replay of the pending queue on a live connection (a catch-up): live
    /// messages wait again until it ends. `false` when a replay is running already: that
    /// one then reads the queue once more before it ends ([`ConnHandle::finish_replay`]).
    pub fn begin_replay(&self) -> bool {
        let mut replay = lock(&self.replay);
        if replay.held.is_some() {
            if std::mem::take(&mut replay.owed) {
                // Held since a message found the queue half full: this is its catch-up.
                return true;
            }
            self.replay_again.store(true, Ordering::Release);
            return false;
        }
        replay.held = Some(Vec::new());
        true
    }

    /// What this connection's last replay sent, if it ended less than [`REPLAYED_KEPT`]
    /// ago: a catch-up starts from it and does not send those again (they went out on this
    /// connection, in order, before anything the catch-up sends).
    pub fn recently_replayed(&self) -> HashSet<Uuid> {
        let mut replay = lock(&self.replay);
        match replay.replayed.take() {
            Some(replayed) if replayed.until > Instant::now() => replayed.ids,
            _ => HashSet::new(),
        }
    }

    /// Ends the replay: releases held live messages, except those the replay sent (or
    /// skipped as sent before), oldest first and within the replay's share of the queue
    /// (live messages that come meanwhile are held behind them), and keeps those ids for
    /// [`REPLAYED_KEPT`] (see [`ReplayState::replayed`]). `false` when a catch-up was asked
    /// for meanwhile: the replay reads the queue again first, and then releases the rest;
    /// `true` when done, or once the connection closed (nothing is left to do).
    pub async fn finish_replay(&self, replayed: &mut HashSet<Uuid>) -> bool {
        loop {
            if !self.room().await {
                return true;
            }
            let mut replay = lock(&self.replay);
            if self.replay_again.swap(false, Ordering::AcqRel) {
                return false;
            }
            let mut room = self.waiting_share().saturating_sub(self.out.len());
            let held = replay.held.get_or_insert_with(Vec::new);
            let mut released = 0;
            while room > 0 && released < held.len() {
                let (id, frame) = &held[released];
                released += 1;
                if !replayed.contains(id) {
                    self.push(frame.clone());
                    room -= 1;
                }
            }
            let freed: usize = held.drain(..released).map(|(_, frame)| frame.len()).sum();
            replay.held_bytes -= freed as u32;
            if replay.held.as_ref().is_some_and(Vec::is_empty) {
                // Under the same lock: a live message from now on is pushed, not held.
                replay.held = None;
                replay.held_bytes = 0;
                let sent = std::mem::take(replayed);
                replay.replayed = (!sent.is_empty()).then(|| {
                    Box::new(Replayed {
                        ids: newest(sent, REPLAYED_KEPT_IDS),
                        until: Instant::now() + REPLAYED_KEPT,
                    })
                });
                return true;
            }
        }
    }

    /// Forgets what the last replay sent once its time is up (a connection that gets no
    /// live message would otherwise keep it until it closes).
    fn forget_old_replay(&self, now: Instant) {
        let mut replay = lock(&self.replay);
        if replay.replayed.as_ref().is_some_and(|r| r.until <= now) {
            replay.replayed = None;
        }
    }

    /// Asks the connection to close with `code` (tungstenite's names: `Policy` for a client
    /// that does not keep up, `Size` for a frame over the limit, `Restart` for a draining
    /// gateway, `Away` for a heartbeat timeout…); the first code asked for wins.
    pub fn close(&self, code: CloseCode) {
        let _ = self.close_code.compare_exchange(
            0,
            u16::from(code),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.closed.cancel();
    }

    /// Ends the connection without a close frame (its socket failed).
    pub fn drop_connection(&self) {
        self.closed.cancel();
    }

    /// The code the connection was asked to close with, if any.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(CloseCode::from(code)),
        }
    }

    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    pub fn heard(&self, now_ms: u64) {
        self.last_heard.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_heard(&self) -> u64 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// Adds these users to those the connection watches, unless that would make more than
    /// `max` (users watched already do not count twice): then it changes nothing and says
    /// `false`.
    pub fn watch(&self, users: &[String], max: usize) -> bool {
        let mut watching = lock(&self.watching);
        let watching = watching.get_or_insert_default();
        let new = users.iter().filter(|u| !watching.contains(*u)).count();
        if watching.len() + new > max {
            return false;
        }
        watching.extend(users.iter().cloned());
        true
    }

    /// Takes these users out of those the connection watches; answers those it watched.
    pub fn unwatch(&self, users: &[String]) -> Vec<String> {
        let mut watching = lock(&self.watching);
        let Some(set) = watching.as_mut() else {
            return Vec::new();
        };
        let removed: Vec<String> = users.iter().filter(|u| set.remove(*u)).cloned().collect();
        if set.is_empty() {
            *watching = None;
        }
        removed
    }

    /// Notes a send that now waits for the dispatcher's answer.
    pub fn await_answer(&self, number: u64, client_msg_id: String) {
        lock(&self.sends).push((number, client_msg_id, Instant::now()));
    }

    /// Takes the oldest send waiting under this `client_msg_id` without answering it (the
    /// caller answers); `None` when none waits (answered already, or given up on).
    pub fn take_answer(&self, client_msg_id: &str) -> Option<Instant> {
        let mut sends = lock(&self.sends);
        let at = sends.iter().position(|(_, c, _)| c == client_msg_id)?;
        Some(sends.remove(at).2)
    }

    /// Answers the oldest send waiting under this `client_msg_id` with `frame`; when it
    /// was received, or `None` (and nothing queued) when none waits. The frame is queued
    /// before the send stops counting as waiting: a draining connection that finds no
    /// send waiting finds every answer in its queue ([`ConnHandle::sends_waiting`]).
    pub fn answer(
        &self,
        client_msg_id: &str,
        frame: impl FnOnce() -> Utf8Bytes,
    ) -> Option<Instant> {
        let mut sends = lock(&self.sends);
        let at = sends.iter().position(|(_, c, _)| c == client_msg_id)?;
        self.deliver(frame(), Class::Reliable);
        Some(sends.remove(at).2)
    }

    /// Whether any send still waits for its answer.
    pub fn sends_waiting(&self) -> bool {
        !lock(&self.sends).is_empty()
    }

    /// Notes that the reader stopped: no new send can start on this connection.
    pub fn reader_stopped(&self) {
        self.reader_stopped.store(true, Ordering::Release);
    }

    /// Whether the reader stopped and no send waits for its answer: a draining connection
    /// has queued everything it owes the client.
    pub fn settled(&self) -> bool {
        self.reader_stopped.load(Ordering::Acquire) && !self.sends_waiting()
    }

    /// Gives up on one send, answering it `unavailable` if it was still waiting.
    fn expire(&self, number: u64, message: &str) {
        let mut sends = lock(&self.sends);
        let Some(at) = sends.iter().position(|(n, _, _)| *n == number) else {
            return;
        };
        self.deliver(refusal_of_send(&sends[at].1, message), Class::Reliable);
        sends.remove(at);
    }

    /// Answers a send that will not get an answer from the dispatcher: `unavailable`.
    pub fn fail_send(&self, client_msg_id: &str, message: &str) {
        self.answer(client_msg_id, || refusal_of_send(client_msg_id, message));
    }
}

/// The `unavailable` answer to a send that was not confirmed, counted in the metrics.
fn refusal_of_send(client_msg_id: &str, message: &str) -> Utf8Bytes {
    metrics::counter!("gateway_messages_total", "outcome" => "unavailable").increment(1);
    metrics::counter!("gateway_errors_total", "code" => "unavailable").increment(1);
    let mut refusal = Refusal::new(ErrorCode::Unavailable, message);
    refusal.client_msg_id = Some(client_msg_id.to_owned());
    Utf8Bytes::from(refusal.into_frame().to_json())
}

/// Sends waiting for their answer, oldest first: all wait the same time, so the queue's
/// front is always the next to expire.
#[derive(Default)]
pub struct Deadlines {
    queue: Mutex<VecDeque<(Instant, Weak<ConnHandle>, u64)>>,
    next: AtomicU64,
}

impl Deadlines {
    /// Registers a send of `conn` that must be answered within `wait`.
    pub fn watch(&self, conn: &Arc<ConnHandle>, client_msg_id: String, wait: Duration) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        conn.await_answer(number, client_msg_id);
        lock(&self.queue).push_back((Instant::now() + wait, Arc::downgrade(conn), number));
    }

    /// Answers `unavailable` to every send whose time is up and that is still waiting.
    pub fn expire(&self, now: Instant) {
        loop {
            let (conn, number) = {
                let mut queue = lock(&self.queue);
                match queue.front() {
                    Some((deadline, _, _)) if *deadline <= now => {}
                    _ => return,
                }
                match queue.pop_front() {
                    Some((_, conn, number)) => (conn, number),
                    None => return,
                }
            };
            let Some(conn) = conn.upgrade() else { continue };
            conn.expire(
                number,
                "the message was not confirmed in time; it may be stored: send it again \
                 with the same client_msg_id",
            );
        }
    }
}

/// Every connection on this node, by user, and presence watchers, by watched user.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<HashMap<String, Vec<Arc<ConnHandle>>>>,
    /// Connections per user, from the handshake's reservation to the connection's end.
    slots: Arc<Mutex<HashMap<String, usize>>>,
    watchers: Mutex<HashMap<String, Vec<Arc<ConnHandle>>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Reserves one of `user`'s `cap` connection slots on this node, until the returned
    /// slot is dropped; `None` when all are taken.
    pub fn reserve(&self, user: &str, cap: usize) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        let taken = slots.entry(user.to_owned()).or_default();
        if *taken >= cap {
            return None;
        }
        *taken += 1;
        Some(Slot {
            slots: self.slots.clone(),
            user: user.to_owned(),
        })
    }

    pub fn register(&self, conn: &Arc<ConnHandle>) {
        lock(&self.conns)
            .entry(conn.user.clone())
            .or_default()
            .push(conn.clone());
    }

    pub fn unregister(&self, conn: &Arc<ConnHandle>) {
        {
            let mut conns = lock(&self.conns);
            if let Some(list) = conns.get_mut(&conn.user) {
                list.retain(|c| c.id != conn.id);
                if list.is_empty() {
                    conns.remove(&conn.user);
                }
            }
        }
        let watched: Vec<String> = lock(&conn.watching)
            .take()
            .map(|w| w.into_iter().collect())
            .unwrap_or_default();
        self.remove_watches(conn, &watched);
    }

    pub fn remove_watches(&self, conn: &ConnHandle, users: &[String]) {
        let mut watchers = lock(&self.watchers);
        for user in users {
            if let Some(list) = watchers.get_mut(user) {
                list.retain(|c| c.id != conn.id);
                if list.is_empty() {
                    watchers.remove(user);
                }
            }
        }
    }

    pub fn add_watches(&self, conn: &Arc<ConnHandle>, users: &[String]) {
        let mut watchers = lock(&self.watchers);
        for user in users {
            let list = watchers.entry(user.clone()).or_default();
            if !list.iter().any(|c| c.id == conn.id) {
                list.push(conn.clone());
            }
        }
    }

    /// Users with at least one connection here (for presence heartbeats).
    pub fn users(&self) -> Vec<String> {
        lock(&self.conns).keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        lock(&self.conns).values().flatten().cloned().collect()
    }

    /// The connections of these users here.
    pub fn of(&self, users: &[String]) -> Vec<Arc<ConnHandle>> {
        let conns = lock(&self.conns);
        users
            .iter()
            .filter_map(|user| conns.get(user))
            .flatten()
            .cloned()
            .collect()
    }

    pub fn count(&self) -> usize {
        lock(&self.conns).values().map(Vec::len).sum()
    }

    /// One pass over this node's connections every few seconds: drops what they keep of
    /// replays that ended more than [`REPLAYED_KEPT`] ago, and counts the frames waiting in
    /// their outbound queues, in all and in the fullest one (sampled for
    /// `gateway_outbound_queued_frames`).
    pub fn sweep(&self) -> (usize, usize) {
        let now = Instant::now();
        lock(&self.conns)
            .values()
            .flatten()
            .map(|conn| {
                conn.forget_old_replay(now);
                conn.out.len()
            })
            .fold((0, 0), |(all, fullest), n| (all + n, fullest.max(n)))
    }

    /// Hands a delivery from the node channel to the local connections it names. (A
    /// receipt or group notice that reaches none is not lost: it is kept in the store until
    /// confirmed.) Adds to `behind` the connections a message, receipt or group notice found
    /// behind (see [`ConnHandle::deliver_message`], [`ConnHandle::deliver_kept`]): each
    /// wants a catch-up.
    pub fn dispatch(&self, node: &str, delivery: NodeDelivery, behind: &mut Vec<Arc<ConnHandle>>) {
        // Answers go to the one connection that sent the message.
        // An end-to-end encrypted message is framed per device (each sees its own
        // ciphertext); anything else is serialized once, shared by every device it goes to.
        let per_device = match &delivery.payload {
            Payload::Message(m) if m.e2ee.is_some() => Some(m),
            _ => None,
        };
        let (frame, class, only) = match &delivery.payload {
            Payload::Message(m) => (ServerFrame::message(m, "", ""), Class::Message(m.id), None),
            // Held during a replay like messages: a to-device message may start the
            // session a replayed message needs, or need the one a replayed message starts.
            Payload::Notice { id, notice } => {
                (ServerFrame::notice(*id, notice), Class::Message(*id), None)
            }
            Payload::Receipt { id, receipt } => {
                (ServerFrame::receipt(*id, receipt), Class::Reliable, None)
            }
            Payload::Group { id, change } => (
                ServerFrame::group_notice(*id, change),
                Class::Reliable,
                None,
            ),
            Payload::Typing { conversation, user } => (
                ServerFrame::Typing {
                    conversation: conversation.to_string(),
                    user: user.clone(),
                },
                Class::Sheddable,
                None,
            ),
            Payload::Sent {
                conn,
                client_msg_id,
                message_id,
                conversation,
                ts,
            } => (
                ServerFrame::Sent {
                    client_msg_id: client_msg_id.clone(),
                    message_id: message_id.to_string(),
                    conversation: conversation.to_string(),
                    ts: *ts,
                },
                Class::Reliable,
                Some(*conn),
            ),
            Payload::Refused {
                conn,
                client_msg_id,
                reason,
            } => {
                let mut refusal = Refusal::new(
                    ErrorCode::Unavailable,
                    format!("the message could not be stored ({reason}): send it again"),
                );
                refusal.client_msg_id = Some(client_msg_id.clone());
                (refusal.into_frame(), Class::Reliable, Some(*conn))
            }
        };
        let frame = match per_device {
            Some(_) => Utf8Bytes::default(),
            None => Utf8Bytes::from(frame.to_json()),
        };
        let (kept, kept_id) = match &delivery.payload {
            Payload::Receipt { id, .. } | Payload::Group { id, .. } => (true, *id),
            _ => (false, Uuid::nil()),
        };
        let except = delivery
            .except
            .as_ref()
            .filter(|e| e.node == node)
            .map(|e| e.conn);
        let conns = lock(&self.conns);
        for queue in &delivery.users {
            // A device's queue reaches that device's connections only.
            let device = storage::device_of(queue);
            for conn in conns.get(storage::user_of(queue)).into_iter().flatten() {
                if Some(conn.id) == except
                    || only.is_some_and(|only| only != conn.id)
                    || device.is_some_and(|d| d != conn.device)
                {
                    continue;
                }
                if let Payload::Sent { client_msg_id, .. }
                | Payload::Refused { client_msg_id, .. } = &delivery.payload
                {
                    // Once per send: the answer to a record read twice (a rebalance, a
                    // retry) finds nothing waiting, and neither does one for a send that
                    // was already refused as late (the client sends that one again).
                    answered(conn, client_msg_id, &delivery.payload, frame.clone());
                    continue;
                }
                let frame = match per_device {
                    Some(m) => {
                        Utf8Bytes::from(ServerFrame::message(m, &conn.user, &conn.device).to_json())
                    }
                    None => frame.clone(),
                };
                let wants_catch_up = match class {
                    _ if kept => !conn.deliver_kept(kept_id, frame),
                    Class::Message(id) => conn.deliver_message(id, frame) == Delivered::Behind,
                    _ => {
                        conn.deliver(frame, class);
                        false
                    }
                };
                if wants_catch_up && !behind.iter().any(|b| b.id == conn.id) {
                    behind.push(conn.clone());
                }
            }
        }
    }

    /// Tells this node's subscribers about a presence change.
    pub fn presence_changed(&self, status: &Status) {
        let watchers = lock(&self.watchers);
        let Some(list) = watchers.get(&status.user) else {
            return;
        };
        let frame = Utf8Bytes::from(ServerFrame::presence(status).to_json());
        for conn in list {
            conn.deliver(frame.clone(), Class::Sheddable);
        }
    }
}

/// Answers a waiting send with `frame` and records how it ended; nothing when no send was
/// waiting.
fn answered(conn: &ConnHandle, client_msg_id: &str, payload: &Payload, frame: Utf8Bytes) {
    let Some(since) = conn.answer(client_msg_id, || frame) else {
        return;
    };
    match payload {
        Payload::Sent { .. } => {
            metrics::counter!("gateway_messages_total", "outcome" => "sent").increment(1);
            metrics::histogram!("gateway_send_seconds").record(since.elapsed().as_secs_f64());
        }
        _ => {
            metrics::counter!("gateway_messages_total", "outcome" => "refused").increment(1);
            metrics::counter!("gateway_errors_total", "code" => "unavailable").increment(1);
        }
    }
}

/// Connections whose registration with presence failed: until the node's next successful
/// heartbeat registers them, messages to them are not delivered live.
#[derive(Default)]
pub struct Unlocated(Mutex<Vec<Weak<ConnHandle>>>);

impl Unlocated {
    pub fn push(&self, conn: &Arc<ConnHandle>) {
        lock(&self.0).push(Arc::downgrade(conn));
    }

    /// The ones still open, forgetting them all.
    pub fn take(&self) -> Vec<Arc<ConnHandle>> {
        std::mem::take(&mut *lock(&self.0))
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| !c.closed().is_cancelled())
            .collect()
    }
}

/// One of a user's connection slots on this node ([`Hub::reserve`]); freed when dropped.
pub struct Slot {
    slots: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        if let Some(taken) = slots.get_mut(&self.user) {
            *taken = taken.saturating_sub(1);
            if *taken == 0 {
                slots.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: Uuid) -> Utf8Bytes {
        Utf8Bytes::from(id.to_string())
    }

    #[tokio::test]
    async fn a_live_copy_of_a_replayed_message_is_dropped_during_and_after_the_replay() {
        let (conn, rx) = ConnHandle::new(1, "u".into(), "d".into(), 16);
        let (early, late, fresh) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        // A connection starts replaying: live messages wait.
        assert!(conn.deliver(frame(early), Class::Message(early)));
        assert!(rx.is_empty());
        let mut replayed: HashSet<Uuid> = [early, late].into();
        assert!(conn.finish_replay(&mut replayed).await);
        assert!(
            rx.is_empty(),
            "the held copy of a replayed message is dropped"
        );
        // The dispatcher's live copy of a message the replay sent comes after it ended.
        assert!(conn.deliver(frame(late), Class::Message(late)));
        assert!(conn.deliver(frame(fresh), Class::Message(fresh)));
        let got: Vec<_> = rx.drain().map(|f| f.to_string()).collect();
        assert_eq!(got, vec![fresh.to_string()]);
    }

    #[tokio::test]
    async fn a_catch_up_starts_from_what_the_replay_before_it_sent() {
        let (conn, rx) = ConnHandle::new(1, "u".into(), "d".into(), 16);
        let (first, second) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(conn.finish_replay(&mut [first].into()).await);
        assert!(conn.begin_replay());
        let mut replayed = conn.recently_replayed();
        assert_eq!(replayed, [first].into());
        replayed.insert(second);
        assert!(conn.deliver(frame(first), Class::Message(first)));
        assert!(conn.finish_replay(&mut replayed).await);
        assert!(conn.deliver(frame(second), Class::Message(second)));
        assert!(
            rx.is_empty(),
            "copies of both replays' messages are dropped"
        );
    }

    #[tokio::test]
    async fn held_messages_are_released_in_order_within_the_replay_share() {
        let (conn, rx) = ConnHandle::new(1, "u".into(), "d".into(), 8);
        let share = conn.waiting_share();
        let held: Vec<Uuid> = (1..=6).map(Uuid::from_u128).collect();
        for id in &held {
            assert!(conn.deliver(frame(*id), Class::Message(*id)));
        }
        let finish = tokio::spawn({
            let conn = conn.clone();
            async move { conn.finish_replay(&mut HashSet::new()).await }
        });
        let late = Uuid::from_u128(7);
        let mut got = Vec::new();
        while got.len() < held.len() + 1 {
            let next = rx.recv_async().await.expect("a frame");
            assert!(
                rx.len() < share,
                "{} queued, the share is {share}",
                rx.len() + 1
            );
            got.push(next.to_string());
            conn.took_frames();
            if got.len() == 2 {
                // Comes while the held ones are being released: behind them.
                assert!(conn.deliver(frame(late), Class::Message(late)));
            }
        }
        assert!(finish.await.expect("finish"));
        let expected: Vec<String> = held
            .iter()
            .chain([&late])
            .map(|id| id.to_string())
            .collect();
        assert_eq!(got, expected);
        // Released: a live message goes straight to the queue.
        let fresh = Uuid::from_u128(8);
        assert!(conn.deliver(frame(fresh), Class::Message(fresh)));
        assert_eq!(rx.try_recv().map(|f| f.to_string()), Ok(fresh.to_string()));
    }

    #[tokio::test]
    async fn a_message_that_finds_the_queue_half_full_is_held_for_a_catch_up() {
        let (conn, rx) = ConnHandle::new(1, "u".into(), "d".into(), 8);
        assert!(conn.finish_replay(&mut HashSet::new()).await);
        let ids: Vec<Uuid> = (1..=7).map(Uuid::from_u128).collect();
        for id in &ids[..4] {
            assert_eq!(conn.deliver_message(*id, frame(*id)), Delivered::Queued);
        }
        // Half full: held, and the connection wants a catch-up (once).
        assert_eq!(
            conn.deliver_message(ids[4], frame(ids[4])),
            Delivered::Behind
        );
        assert_eq!(
            conn.deliver_message(ids[5], frame(ids[5])),
            Delivered::Queued
        );
        assert_eq!(rx.len(), 4);
        assert!(conn.begin_replay(), "the catch-up it asked for runs");
        assert!(
            !conn.begin_replay(),
            "another one reads the queue again instead"
        );
        // The catch-up sent the first held one (it is pending in the store).
        let mut replayed: HashSet<Uuid> = [ids[4]].into();
        let finish = tokio::spawn({
            let conn = conn.clone();
            async move {
                // Asked for meanwhile: read the queue again, then done.
                assert!(!conn.finish_replay(&mut replayed).await);
                conn.finish_replay(&mut replayed).await
            }
        });
        let mut got = Vec::new();
        while got.len() < 5 {
            got.push(rx.recv_async().await.expect("a frame").to_string());
            conn.took_frames();
        }
        assert!(finish.await.expect("finish"));
        let expected: Vec<String> = [0, 1, 2, 3, 5]
            .iter()
            .map(|&i| ids[i].to_string())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            conn.deliver_message(ids[6], frame(ids[6])),
            Delivered::Queued
        );
        assert_eq!(rx.try_recv().map(|f| f.to_string()), Ok(ids[6].to_string()));
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_is_closed_once_the_held_messages_are_full() {
        let (conn, _rx) = ConnHandle::new(1, "u".into(), "d".into(), 8);
        let big = Utf8Bytes::from("x".repeat(64 << 10));
        let mut held = 0;
        for n in 0.. {
            match conn.deliver_message(Uuid::from_u128(n), big.clone()) {
                Delivered::Queued | Delivered::Behind => held += big.len(),
                Delivered::Closed => break,
            }
        }
        assert!(held <= MAX_HELD_BYTES, "{held} bytes held");
        assert!(
            held + big.len() > MAX_HELD_BYTES,
            "closed early, at {held} bytes"
        );
        assert_eq!(conn.close_code(), Some(CloseCode::Policy));
    }

    #[test]
    fn what_a_replay_sent_is_forgotten_once_its_time_is_up() {
        let now = Instant::now();
        let (sent, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut state = ReplayState {
            held: None,
            held_bytes: 0,
            owed: false,
            replayed: Some(Box::new(Replayed {
                ids: [sent].into(),
                until: now + REPLAYED_KEPT,
            })),
        };
        assert!(state.sent_by_replay(sent, now));
        assert!(!state.sent_by_replay(other, now));
        assert!(!state.sent_by_replay(sent, now + REPLAYED_KEPT));
        assert!(state.replayed.is_none(), "forgotten");
    }

    #[tokio::test]
    async fn a_connection_keeps_only_the_newest_ids_of_a_long_replay() {
        let (conn, _rx) = ConnHandle::new(1, "u".into(), "d".into(), 16);
        let mut replayed: HashSet<Uuid> = (0..1000u128).map(Uuid::from_u128).collect();
        assert!(conn.finish_replay(&mut replayed).await);
        let kept = conn.recently_replayed();
        let expected: HashSet<Uuid> = (1000 - REPLAYED_KEPT_IDS as u128..1000)
            .map(Uuid::from_u128)
            .collect();
        assert_eq!(kept, expected);
    }
}
