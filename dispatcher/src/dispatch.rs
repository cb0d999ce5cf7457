//! Consume a partition in order: persist, route, commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use presence::{ConnRef, Location, NodeDelivery, Payload, Presence, PresenceService};
use storage::{
    device_address, device_of, user_of, Acked, AckedMessage, Appended, Conversation, Message,
    MessageStore, NewMessage, Receipt, Store,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::envelope::{Envelope, PushEvent};
use crate::error::Result;
use crate::log::{Commit, InboundLog, Log, Partition, Record};
use crate::startup::Backends;

/// Most records taken from a partition at once.
const MAX_BATCH: usize = 256;
/// Most records handled together, from all partitions: consecutive messages among them
/// are persisted in one store call, and everything they cause is routed together.
const MAX_COMBINED: usize = 1024;

/// Groups read at once (see [`Dispatcher::groups_of`]).
const GROUPS_AT_ONCE: usize = 32;

/// Reads handled at once (see [`Dispatcher::read_all`]).
const READS_AT_ONCE: usize = 32;

/// Pending entries remembered per partition assignment, most.
const RECENT_PER_ASSIGNMENT: usize = 65_536;

/// What a partition's task hands over to the combining task.
enum Handoff {
    /// A batch, to be handled with the others'; `done` fires once it is handled (stored,
    /// routed and committed).
    Batch {
        assignment: u64,
        records: Vec<Record>,
        done: oneshot::Sender<()>,
    },
    /// The partition was taken away (or the log closed): forget what was remembered of it.
    Ended { assignment: u64 },
}

/// Feeds one partition's records, in order, to the combining task. `assignment` tells this
/// assignment of the partition from earlier and later ones.
async fn consume(
    mut partition: Partition,
    assignment: u64,
    handoff: mpsc::Sender<Handoff>,
    shutdown: CancellationToken,
) {
    loop {
        let records = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            records = partition.next_batch(MAX_BATCH) => records,
        };
        let Some(records) = records else { break };
        let (done, handled) = oneshot::channel();
        let batch = Handoff::Batch {
            assignment,
            records,
            done,
        };
        if handoff.send(batch).await.is_err() {
            return;
        }
        // The next batch waits for this one: a partition's records are handled in order.
        let _ = handled.await;
    }
    let _ = handoff.send(Handoff::Ended { assignment }).await;
}

/// Pending entries this dispatcher appended for direct messages, by the assignment of the
/// recipient's partition (a direct message and its recipient's acks share a partition), so
/// that acking them needs no read. True only while that assignment lasts: once the
/// partition goes, another dispatcher may ack them, so they are forgotten.
#[derive(Default)]
struct Recent(HashMap<u64, HashMap<(String, Uuid), AckedMessage>>);

impl Recent {
    fn remember(&mut self, assignment: u64, user: &str, message: AckedMessage) {
        let entries = self.0.entry(assignment).or_default();
        if entries.len() >= RECENT_PER_ASSIGNMENT {
            // Forgetting costs a read per ack, nothing more.
            entries.clear();
        }
        entries.insert((user.to_owned(), message.id), message);
    }

    fn take(&mut self, assignment: u64, user: &str, id: Uuid) -> Option<AckedMessage> {
        self.0.get_mut(&assignment)?.remove(&(user.to_owned(), id))
    }

    fn forget(&mut self, assignment: u64) {
        self.0.remove(&assignment);
    }
}

/// The dispatcher: a cheap-clone handle over the three backends.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    store: Store,
    presence: Presence,
    log: Log,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What a batch's records caused, in log order, to be routed once they are all stored.
enum Event {
    /// A stored message (or a replay or retry of one: `appended.inserted` is false).
    Message {
        message: Message,
        origin: Option<ConnRef>,
        appended: Appended,
    },
    /// Receipts for the sender of the messages they name, each with the id the store
    /// keeps it under (written with the ack or read marker that made it) until one of the
    /// sender's devices confirms it.
    Receipts {
        to: String,
        receipts: Vec<(Uuid, Receipt)>,
    },
    /// An answer to the connection that sent a message.
    Answer {
        sender: String,
        origin: ConnRef,
        payload: Payload,
    },
}

/// A batch in the making: the events to route and how each record is to be committed.
#[derive(Default)]
struct Outcome {
    events: Vec<Event>,
    commits: Vec<(Commit, std::result::Result<(), String>)>,
    /// A record failed that the log delivers again: the rest of the batch is not handled
    /// but committed as failed, to be read again after it, so that nothing overtakes it.
    stopped: bool,
    /// Records set aside for a run that was not handled because the batch stopped.
    unhandled: Vec<Record>,
    /// Messages acked in this batch, by user: a replayed message (read again after a
    /// crash) is not delivered again to whom acked it meanwhile.
    acked: HashSet<(String, Uuid)>,
}

impl Outcome {
    /// A run of records to handle: none if it is empty, or if the batch has stopped (then
    /// they are set aside, committed as failed and read again).
    fn admit(&mut self, records: Vec<(u64, Record)>) -> Option<Vec<(u64, Record)>> {
        if self.stopped {
            self.unhandled.extend(records.into_iter().map(|(_, r)| r));
            return None;
        }
        (!records.is_empty()).then_some(records)
    }
}

impl Dispatcher {
    pub fn new(backends: Backends) -> Self {
        let Backends {
            store,
            presence,
            log,
        } = backends;
        Dispatcher {
            store,
            presence,
            log,
        }
    }

    /// Consumes every partition assigned to this dispatcher until `shutdown`: one task per
    /// partition keeps its order (it hands over its next batch only once the previous one
    /// is done), and one task handles what all partitions handed over meanwhile as a
    /// single batch, so that the backends see few, large requests instead of many small
    /// ones (group commit across partitions).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut assigned = self.log.subscribe().await?;
        let tracker = TaskTracker::new();
        let (handoff, batches) = mpsc::channel::<Handoff>(1024);
        tracker.spawn(self.clone().combine(batches).in_current_span());
        let mut assignments = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                partition = assigned.recv() => match partition {
                    Some(partition) => {
                        assignments += 1;
                        let span = tracing::info_span!("partition", id = partition.id);
                        let feed = consume(partition, assignments, handoff.clone(), shutdown.clone());
                        tracker.spawn(feed.instrument(span));
                    }
                    None => break,
                },
            }
        }
        drop(handoff);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Handles the batches handed over by the partitions, as many together as are waiting.
    async fn combine(self, mut handoffs: mpsc::Receiver<Handoff>) {
        let mut recent = Recent::default();
        while let Some(first) = handoffs.recv().await {
            let mut records = Vec::new();
            let mut done = Vec::new();
            let mut next = Some(first);
            while let Some(handoff) = next.take() {
                match handoff {
                    Handoff::Batch {
                        assignment,
                        records: batch,
                        done: fired,
                    } => {
                        records.extend(batch.into_iter().map(|r| (assignment, r)));
                        done.push(fired);
                    }
                    Handoff::Ended { assignment } => recent.forget(assignment),
                }
                if records.len() < MAX_COMBINED {
                    next = handoffs.try_recv().ok();
                }
            }
            if records.is_empty() {
                continue;
            }
            metrics::histogram!("dispatcher_batch_size").record(records.len() as f64);
            self.handle(records, &mut recent).await;
            for done in done {
                let _ = done.send(());
            }
            // The partitions just released hand over their next batches before the next
            // cycle gathers what waits, instead of missing it.
            tokio::task::yield_now().await;
        }
    }

    /// Handles a batch of records (from one partition or several) in three steps: store
    /// what they say — all messages in one store call (in log order), then all acks merged
    /// per user (so that a message acked twice is reported once), then the reads; route
    /// everything the batch caused (one presence lookup, one publish per node with its
    /// deliveries in log order); then commit each record. Acks and reads may be taken after
    /// later messages of their partition: they concern messages their user has received,
    /// which were stored by an earlier batch. Nothing is routed before it is stored, and
    /// nothing is committed before it is routed: a dispatcher that dies in between, or a
    /// batch whose routing failed (presence unreachable), has the records read again (a
    /// duplicate delivery at worst, never a lost one).
    async fn handle(&self, batch: Vec<(u64, Record)>, recent: &mut Recent) {
        let mut outcome = Outcome::default();
        let (mut messages, mut acks, mut reads) = (Vec::new(), Vec::new(), Vec::new());
        for (assignment, record) in batch {
            match &record.envelope {
                Envelope::Message { .. } => messages.push((assignment, record)),
                Envelope::Ack { .. } => acks.push((assignment, record)),
                Envelope::Read { .. } => reads.push(record),
            }
        }
        self.persist_messages(messages, &mut outcome, recent).await;
        self.apply_acks(acks, &mut outcome, recent).await;
        if !outcome.acked.is_empty() {
            let acked = std::mem::take(&mut outcome.acked);
            for event in &mut outcome.events {
                if let Event::Message { appended, .. } = event {
                    let id = appended.id;
                    appended
                        .pending_for
                        .retain(|user| !acked.contains(&(user.clone(), id)));
                }
            }
        }
        if outcome.stopped {
            outcome.unhandled.extend(reads);
        } else {
            self.read_all(reads, &mut outcome).await;
        }
        for record in outcome.unhandled.drain(..) {
            // A record failed that the log delivers again: every partition with a record
            // here reads it again, in order.
            outcome.commits.push((
                record.into_parts().1,
                Err("an earlier record failed".into()),
            ));
        }
        // A batch not routed in full is read again (its messages are stored: the second
        // time they are only routed): a recipient connected all along would otherwise
        // have them only on a catch-up or its next connect.
        let routed = self.route(outcome.events).await;
        for (commit, result) in outcome.commits {
            commit(match (result, &routed) {
                (Ok(()), Err(e)) => Err(e.clone()),
                (result, _) => result,
            });
        }
    }

    async fn persist_messages(
        &self,
        records: Vec<(u64, Record)>,
        outcome: &mut Outcome,
        recent: &mut Recent,
    ) {
        let Some(records) = outcome.admit(records) else {
            return;
        };
        let mut batch = Vec::with_capacity(records.len());
        let mut pending = Vec::with_capacity(records.len());
        let ids = group_ids(&records);
        let mut groups = self.groups_of(ids).await;
        for (assignment, record) in records {
            let redelivered = record.is_redelivered();
            let (envelope, commit) = record.into_parts();
            let Envelope::Message {
                message,
                origin,
                client_msg_id,
            } = envelope
            else {
                outcome.commits.push((commit, Ok(())));
                continue;
            };
            let recipients = match self.recipients(&message, &mut groups).await {
                Ok(r) => r,
                Err(e) => {
                    self.failed(
                        outcome,
                        commit,
                        redelivered,
                        &message,
                        &origin,
                        &client_msg_id,
                        &e.to_string(),
                    );
                    continue;
                }
            };
            batch.push(NewMessage {
                message: *message,
                recipients,
                client_msg_id,
            });
            pending.push((origin, commit, redelivered, assignment));
        }
        if batch.is_empty() {
            return;
        }
        match self.store.append(&batch).await {
            Ok(appended) => {
                for ((new, (origin, commit, _, assignment)), appended) in
                    batch.into_iter().zip(pending).zip(appended)
                {
                    let NewMessage {
                        message,
                        client_msg_id,
                        ..
                    } = new;
                    if appended.inserted {
                        if let Conversation::Direct(..) = &appended.conversation {
                            for user in &appended.pending_for {
                                let entry = AckedMessage {
                                    id: appended.id,
                                    conversation: appended.conversation.clone(),
                                    from: message.from.clone(),
                                };
                                recent.remember(assignment, user, entry);
                            }
                        }
                    }
                    let kind = if appended.inserted {
                        "inserted"
                    } else {
                        "duplicate"
                    };
                    metrics::counter!("dispatcher_messages_total", "outcome" => kind).increment(1);
                    tracing::debug!(message_id = %appended.id, outcome = kind, "persisted");
                    if let (Some(origin), Some(client_msg_id)) = (&origin, client_msg_id) {
                        outcome.events.push(Event::Answer {
                            sender: message.from.clone(),
                            origin: origin.clone(),
                            payload: Payload::Sent {
                                conn: origin.conn,
                                client_msg_id,
                                message_id: appended.id,
                                conversation: appended.conversation.clone(),
                                ts: appended.ts(),
                            },
                        });
                    }
                    outcome.events.push(Event::Message {
                        message,
                        origin,
                        appended,
                    });
                    outcome.commits.push((commit, Ok(())));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "persisting messages failed");
                let reason = e.to_string();
                for (new, (origin, commit, redelivered, _)) in batch.into_iter().zip(pending) {
                    let (message, client_msg_id) = (new.message, new.client_msg_id);
                    self.failed(
                        outcome,
                        commit,
                        redelivered,
                        &message,
                        &origin,
                        &client_msg_id,
                        &reason,
                    );
                }
            }
        }
    }

    /// A message that could not be stored: read again where the log can (and nothing after
    /// it in this batch is committed), else its sender is told.
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &self,
        outcome: &mut Outcome,
        commit: Commit,
        redelivered: bool,
        message: &Message,
        origin: &Option<ConnRef>,
        client_msg_id: &Option<String>,
        reason: &str,
    ) {
        metrics::counter!("dispatcher_messages_total", "outcome" => "failed").increment(1);
        tracing::warn!(message_id = %message.id, %reason, redelivered, "a message could not be persisted");
        if redelivered {
            outcome.stopped = true;
        } else if let (Some(origin), Some(client_msg_id)) = (origin, client_msg_id) {
            outcome.events.push(Event::Answer {
                sender: message.from.clone(),
                origin: origin.clone(),
                payload: Payload::Refused {
                    conn: origin.conn,
                    client_msg_id: client_msg_id.clone(),
                    reason: reason.to_owned(),
                },
            });
        }
        outcome.commits.push((commit, Err(reason.to_owned())));
    }

    /// The members of the groups the batch's messages go to, [`GROUPS_AT_ONCE`] read at a
    /// time: one after the other, each a store round trip, they held up the whole batch. A
    /// group that could not be read, or is not there, is left out ([`Self::recipients`] reads
    /// it again, and fails or warns for its message).
    async fn groups_of(&self, ids: HashSet<Uuid>) -> HashMap<Uuid, Vec<String>> {
        futures_util::stream::iter(ids)
            .map(|id| async move { (id, self.store.group(id).await) })
            .buffer_unordered(GROUPS_AT_ONCE)
            .filter_map(|(id, group)| async move {
                let members = group.ok()??.members.into_iter().collect();
                Some((id, members))
            })
            .collect()
            .await
    }

    /// Who gets a message in their pending queue: the other party of a direct
    /// conversation (the sender for a note to self), or every other group member; for an
    /// end-to-end encrypted message, each device it carries a ciphertext for (the gateway
    /// checked them against the device lists).
    async fn recipients(
        &self,
        message: &Message,
        groups: &mut HashMap<Uuid, Vec<String>>,
    ) -> Result<Vec<String>> {
        if message.e2ee.is_some() {
            return Ok(message.queues(Vec::new()));
        }
        let members = match &message.conversation {
            c @ Conversation::Direct(..) => {
                return Ok(vec![c
                    .peer_of(&message.from)
                    .unwrap_or(&message.from)
                    .to_owned()]);
            }
            Conversation::Group(id) => match groups.get(id) {
                Some(members) => members.clone(),
                None => {
                    let members: Vec<String> = match self.store.group(*id).await? {
                        Some(group) => group.members.into_iter().collect(),
                        None => {
                            tracing::warn!(group = %id, "message for an unknown group");
                            Vec::new()
                        }
                    };
                    groups.insert(*id, members.clone());
                    members
                }
            },
        };
        Ok(members.into_iter().filter(|m| *m != message.from).collect())
    }

    async fn apply_acks(
        &self,
        records: Vec<(u64, Record)>,
        outcome: &mut Outcome,
        recent: &mut Recent,
    ) {
        let Some(records) = outcome.admit(records) else {
            return;
        };
        // One store call per queue: a message acked by two devices in this batch is removed
        // (and receipted) once. Each ack is taken from its user's queue first; what was not
        // pending there, from the acking device's own queue (end-to-end encrypted
        // messages), so that plain traffic costs one call per user. Entries remembered from
        // their append need no read.
        let mut users: Vec<QueueAcks> = Vec::new();
        let mut devices: Vec<QueueAcks> = Vec::new();
        for (assignment, record) in records {
            let (envelope, commit) = record.into_parts();
            let Envelope::Ack {
                user,
                message_ids,
                device,
            } = envelope
            else {
                outcome.commits.push((commit, Ok(())));
                continue;
            };
            let address = device.map(|d| device_address(&user, &d));
            let at = QueueAcks::find(&mut users, &user);
            for id in &message_ids {
                users[at].take(*id, assignment, recent);
            }
            users[at].commits.push(commit);
            if let Some(address) = address {
                let at = QueueAcks::find(&mut devices, &address);
                for id in message_ids {
                    devices[at].take(id, assignment, recent);
                }
            }
        }
        let results =
            futures_util::future::join_all(users.iter_mut().map(|q| q.ack(&self.store))).await;
        let mut failed: HashMap<String, String> = HashMap::new();
        for (queue, result) in users.iter_mut().zip(results) {
            match result {
                Ok(acked) => queue.acked = acked,
                Err(e) => {
                    tracing::warn!(error = %e, user = %queue.queue, "applying acks failed");
                    failed.insert(queue.queue.clone(), e.to_string());
                }
            }
        }
        // What the users' queues did not have, from the devices' queues.
        for device in &mut devices {
            let user = user_of(&device.queue);
            let Some(of_user) = users.iter().find(|u| u.queue == user) else {
                continue;
            };
            if failed.contains_key(user) {
                device.ids.clear();
                device.known.clear();
                continue;
            }
            device
                .ids
                .retain(|id| !of_user.acked.iter().any(|a| a.message.id == *id));
        }
        devices.retain(|d| !d.ids.is_empty() || !d.known.is_empty());
        let results =
            futures_util::future::join_all(devices.iter_mut().map(|q| q.ack(&self.store))).await;
        for (queue, result) in devices.iter_mut().zip(results) {
            match result {
                Ok(acked) => queue.acked = acked,
                Err(e) => {
                    let user = user_of(&queue.queue).to_owned();
                    tracing::warn!(error = %e, queue = %queue.queue, "applying acks failed");
                    failed.entry(user).or_insert_with(|| e.to_string());
                }
            }
        }
        for queue in users.iter_mut().chain(devices.iter_mut()) {
            // The store kept a delivered receipt for each message someone else sent (per
            // user for a user's queue, per device for a device's), in the ack's own write.
            let mut by_sender: Vec<(String, Vec<(Uuid, Receipt)>)> = Vec::new();
            for Acked { message, receipt } in std::mem::take(&mut queue.acked) {
                outcome.acked.insert((queue.queue.clone(), message.id));
                let Some(receipt) = receipt else { continue };
                match by_sender.iter_mut().find(|(s, _)| *s == message.from) {
                    Some((_, receipts)) => receipts.push(receipt),
                    None => by_sender.push((message.from, vec![receipt])),
                }
            }
            for (to, receipts) in by_sender {
                outcome.events.push(Event::Receipts { to, receipts });
            }
        }
        for queue in users {
            // A user's acks are committed (or read again) together, whichever queue
            // failed.
            let result = match failed.get(&queue.queue) {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
            for commit in queue.commits {
                outcome.commits.push((commit, result.clone()));
            }
        }
    }

    /// Takes a batch's reads, [`READS_AT_ONCE`] at a time: each is a few store round trips
    /// (the marker, the messages it covers, the receipts, the marker again), and one after
    /// the other they held up the whole batch, messages and all. A user's reads of one
    /// conversation still go one after the other, in log order: each starts from the marker
    /// the one before it left.
    async fn read_all(&self, reads: Vec<Record>, outcome: &mut Outcome) {
        let runs = in_runs(reads, |record| match &record.envelope {
            Envelope::Read {
                user, conversation, ..
            } => Some((user.clone(), conversation.clone())),
            _ => None,
        });
        let done: Vec<Outcome> = futures_util::stream::iter(runs)
            .map(|run| async move {
                let mut part = Outcome::default();
                for record in run {
                    self.read(record, &mut part).await;
                }
                part
            })
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
        for part in done {
            outcome.events.extend(part.events);
            outcome.commits.extend(part.commits);
        }
    }

    async fn read(&self, record: Record, outcome: &mut Outcome) {
        let (envelope, commit) = record.into_parts();
        let Envelope::Read {
            user,
            conversation,
            message_id,
        } = envelope
        else {
            outcome.commits.push((commit, Ok(())));
            return;
        };
        let result = match self.store.mark_read(&user, &conversation, message_id).await {
            Ok(receipts) => {
                // Kept by the store with the marker.
                for (to, id, receipt) in receipts {
                    outcome.events.push(Event::Receipts {
                        to,
                        receipts: vec![(id, receipt)],
                    });
                }
                Ok(())
            }
            Err(storage::Error::NotFound(what)) => {
                tracing::debug!(%what, "read marker for an unknown message");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        outcome.commits.push((commit, result));
    }

    /// Routes what a batch caused: every message to the online devices of those it is
    /// pending for (and, when new, to the sender's other devices), push events for
    /// recipients with no device online, receipts to their senders' online devices (the
    /// store keeps them for every sender, online or not), and answers to the sending connections. Fails when
    /// the recipients could not be located or a node's deliveries not published.
    async fn route(&self, events: Vec<Event>) -> std::result::Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let mut wanted = BTreeSet::new();
        for event in &events {
            match event {
                Event::Message {
                    message, appended, ..
                } => {
                    wanted.extend(appended.pending_for.iter().map(|q| user_of(q).to_owned()));
                    if appended.inserted {
                        wanted.insert(message.from.clone());
                    }
                }
                Event::Receipts { to, .. } => {
                    wanted.insert(to.clone());
                }
                Event::Answer { .. } => {}
            }
        }
        let wanted: Vec<String> = wanted.into_iter().collect();
        let mut unrouted = None;
        let located = if wanted.is_empty() {
            Some(HashMap::new())
        } else {
            match self.presence.locate(&wanted).await {
                Ok(located) => Some(located),
                Err(e) => {
                    // Messages stay pending, and the batch is read again; receipts are
                    // kept for their senders' next connect. Answers go out all the same.
                    tracing::warn!(error = %e, "locating recipients failed");
                    unrouted = Some(format!("locating recipients failed: {e}"));
                    None
                }
            }
        };

        let mut out = NodeBatches::default();
        let mut pushes = Vec::new();
        for event in events {
            match event {
                Event::Message {
                    message,
                    origin,
                    appended,
                } => {
                    let Some(located) = &located else { continue };
                    let message = match self.stored_form(message, &appended).await {
                        Some(message) => message,
                        None => continue,
                    };
                    let mut by_node: Vec<(String, Vec<String>)> = Vec::new();
                    // Reaches a queue where it is connected (a device's queue: where that
                    // device is); false when it is nowhere.
                    let mut reach = |queue: &str, at: &[Location]| {
                        let device = device_of(queue);
                        let mut reached = false;
                        for location in at {
                            if device.is_some_and(|d| d != location.device) {
                                continue;
                            }
                            reached = true;
                            match by_node.iter_mut().find(|(n, _)| *n == location.node) {
                                Some((_, queues)) if queues.iter().any(|q| q == queue) => {}
                                Some((_, queues)) => queues.push(queue.to_owned()),
                                None => {
                                    by_node.push((location.node.clone(), vec![queue.to_owned()]))
                                }
                            }
                        }
                        reached
                    };
                    let mut offline: Vec<&str> = Vec::new();
                    for queue in &appended.pending_for {
                        let user = user_of(queue);
                        let at = located.get(user).map_or(&[][..], Vec::as_slice);
                        let reached = reach(queue, at);
                        if !reached && appended.inserted && !offline.contains(&user) {
                            offline.push(user);
                            pushes.push(PushEvent {
                                user: user.to_owned(),
                                message_id: message.id,
                                conversation: message.conversation.clone(),
                                from: message.from.clone(),
                                ts: message.ts,
                            });
                        }
                    }
                    // The sender's other devices (guarantee 8), for a new message only (an
                    // end-to-end encrypted one is pending for each of them).
                    let sender_is_recipient = appended.pending_for.contains(&message.from);
                    if appended.inserted && message.e2ee.is_none() && !sender_is_recipient {
                        if let Some(at) = located.get(&message.from) {
                            reach(&message.from, at);
                        }
                    }
                    if appended.inserted && !by_node.is_empty() {
                        let age = (now_ms() - message.ts).max(0) as f64 / 1000.0;
                        metrics::histogram!("dispatcher_route_latency_seconds").record(age);
                    }
                    tracing::debug!(
                        message_id = %message.id,
                        nodes = by_node.len(),
                        offline = offline.len(),
                        "routed"
                    );
                    for (node, users) in by_node {
                        out.push(
                            &node,
                            NodeDelivery {
                                users,
                                except: origin.clone(),
                                payload: Payload::Message(message.clone()),
                            },
                        );
                    }
                }
                Event::Receipts { to, receipts } => {
                    // Kept by the store already (until a device of `to` confirms them),
                    // and pushed to the devices online now.
                    if let Some(at) = located.as_ref().and_then(|l| l.get(&to)) {
                        let mut nodes: Vec<&str> = at.iter().map(|l| l.node.as_str()).collect();
                        nodes.sort_unstable();
                        nodes.dedup();
                        for node in nodes {
                            for (id, receipt) in &receipts {
                                out.push(
                                    node,
                                    NodeDelivery {
                                        users: vec![to.clone()],
                                        except: None,
                                        payload: Payload::Receipt {
                                            id: *id,
                                            receipt: receipt.clone(),
                                        },
                                    },
                                );
                            }
                        }
                    }
                }
                Event::Answer {
                    sender,
                    origin,
                    payload,
                } => out.push(
                    &origin.node,
                    NodeDelivery {
                        users: vec![sender],
                        except: None,
                        payload,
                    },
                ),
            }
        }

        let publishes = out.0.into_iter().map(|(node, deliveries)| async move {
            let published = self.presence.publish(&node, deliveries).await;
            if let Err(e) = &published {
                // What it carried is stored, and the batch is read again.
                tracing::warn!(error = %e, %node, "delivery to a node failed");
            }
            published.map_err(|e| format!("delivery to node {node} failed: {e}"))
        });
        let pushes = pushes.into_iter().map(|event| async move {
            if let Err(e) = self.log.publish_push(event).await {
                tracing::warn!(error = %e, "push event failed");
            }
        });
        let (published, _) = tokio::join!(
            futures_util::future::join_all(publishes),
            futures_util::future::join_all(pushes),
        );
        match unrouted {
            Some(e) => Err(e),
            None => published.into_iter().collect(),
        }
    }

    /// The message as stored: a retried send carries a body of its own, but what was
    /// stored first is what everyone sees.
    async fn stored_form(&self, message: Message, appended: &Appended) -> Option<Message> {
        if appended.id == message.id {
            return Some(message);
        }
        match self
            .store
            .message(&appended.conversation, appended.id)
            .await
        {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, id = %appended.id, "reading a retried message failed");
                None
            }
        }
    }
}

/// The acks of one queue (a user's, or a device's) in a batch.
struct QueueAcks {
    queue: String,
    /// Ids to look up.
    ids: Vec<Uuid>,
    /// Entries remembered from their append.
    known: Vec<AckedMessage>,
    commits: Vec<Commit>,
    /// What the store call removed.
    acked: Vec<Acked>,
}

impl QueueAcks {
    /// The position of `queue`'s acks, added if new.
    fn find(all: &mut Vec<QueueAcks>, queue: &str) -> usize {
        match all.iter().position(|q| q.queue == queue) {
            Some(at) => at,
            None => {
                all.push(QueueAcks {
                    queue: queue.to_owned(),
                    ids: Vec::new(),
                    known: Vec::new(),
                    commits: Vec::new(),
                    acked: Vec::new(),
                });
                all.len() - 1
            }
        }
    }

    fn take(&mut self, id: Uuid, assignment: u64, recent: &mut Recent) {
        match recent.take(assignment, &self.queue, id) {
            Some(entry) => self.known.push(entry),
            None if !self.ids.contains(&id) && !self.known.iter().any(|k| k.id == id) => {
                self.ids.push(id)
            }
            None => {}
        }
    }

    async fn ack(&mut self, store: &Store) -> storage::Result<Vec<Acked>> {
        if self.ids.is_empty() && self.known.is_empty() {
            return Ok(Vec::new());
        }
        store
            .ack(&self.queue, &self.ids, std::mem::take(&mut self.known))
            .await
    }
}

/// Deliveries per node, nodes in the order first reached, deliveries in log order.
#[derive(Default)]
struct NodeBatches(Vec<(String, Vec<NodeDelivery>)>);

impl NodeBatches {
    fn push(&mut self, node: &str, delivery: NodeDelivery) {
        match self.0.iter_mut().find(|(n, _)| n == node) {
            Some((_, deliveries)) => deliveries.push(delivery),
            None => self.0.push((node.to_owned(), vec![delivery])),
        }
    }
}

/// The groups messages among `records` go to (those end-to-end encrypted name their
/// devices instead).
fn group_ids(records: &[(u64, Record)]) -> HashSet<Uuid> {
    records
        .iter()
        .filter_map(|(_, record)| match &record.envelope {
            Envelope::Message { message, .. } if message.e2ee.is_none() => {
                match message.conversation {
                    Conversation::Group(id) => Some(id),
                    Conversation::Direct(..) => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// `items` in runs that share a key, in the order each key first came, each run in the
/// order of `items`; an item without a key is a run of its own.
fn in_runs<T, K: std::hash::Hash + Eq>(
    items: Vec<T>,
    key: impl Fn(&T) -> Option<K>,
) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut at: HashMap<K, usize> = HashMap::new();
    for item in items {
        match key(&item) {
            Some(k) => match at.get(&k) {
                Some(&i) => runs[i].push(item),
                None => {
                    at.insert(k, runs.len());
                    runs.push(vec![item]);
                }
            },
            None => runs.push(vec![item]),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::in_runs;

    #[test]
    fn runs_keep_each_key_in_order_and_keyless_items_apart() {
        let items = vec![
            ("bob", 1),
            ("amy", 2),
            ("", 3),
            ("bob", 4),
            ("", 5),
            ("amy", 6),
            ("bob", 7),
        ];
        let runs = in_runs(items, |(k, _)| (!k.is_empty()).then_some(*k));
        let numbers: Vec<Vec<i32>> = runs
            .into_iter()
            .map(|run| run.into_iter().map(|(_, n)| n).collect())
            .collect();
        assert_eq!(numbers, vec![vec![1, 4, 7], vec![2, 6], vec![3], vec![5]]);
    }
}
