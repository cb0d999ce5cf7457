//! Consume a partition in order: persist, route, commit.

use std::collections::{BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use presence::{ConnRef, Location, NodeDelivery, Payload, Presence, PresenceService};
use storage::{
    AckedMessage, Appended, Conversation, Message, MessageStore, NewMessage, Receipt,
    ReceiptStatus, Store,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Bus, Commit, InboundLog, Partition, Record};
use crate::envelope::{Envelope, PushEvent};
use crate::error::Result;

/// Most records taken from a partition at once; consecutive messages among them are
/// persisted in one store call, and everything they cause is routed together.
const MAX_BATCH: usize = 256;

/// The dispatcher: a cheap-clone handle over the three backends.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    store: Store,
    presence: Presence,
    bus: Bus,
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
    /// Receipts for the sender of the messages they name.
    Receipts { to: String, receipts: Vec<Receipt> },
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
    /// A record failed that the log delivers again: the rest of the batch is left
    /// uncommitted, to be read again after it, so that nothing overtakes it.
    stopped: bool,
}

impl Dispatcher {
    pub fn new(store: Store, presence: Presence, bus: Bus) -> Self {
        Dispatcher {
            store,
            presence,
            bus,
        }
    }

    /// Consumes every partition assigned to this dispatcher until `shutdown`, one ordered
    /// task per partition.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut assigned = self.bus.subscribe().await?;
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                partition = assigned.recv() => match partition {
                    Some(partition) => {
                        let span = tracing::info_span!("partition", id = partition.id);
                        tracker.spawn(self.clone().consume(partition, shutdown.clone()).instrument(span));
                    }
                    None => break,
                },
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    async fn consume(self, mut partition: Partition, shutdown: CancellationToken) {
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                batch = partition.next_batch(MAX_BATCH) => batch,
            };
            let Some(batch) = batch else { return };
            metrics::histogram!("dispatcher_batch_size").record(batch.len() as f64);
            self.handle(batch).await;
        }
    }

    /// Handles records in log order, in three steps: store what they say (a run of
    /// consecutive messages in one store call; a run of acks merged per user, so that a
    /// message acked twice in the run is reported once); route everything the batch caused
    /// (one presence lookup, one publish per node with its deliveries in log order); then
    /// commit each record. Nothing is routed before it is stored, and nothing is committed
    /// before it is routed: a dispatcher that dies in between has the records read again
    /// (a duplicate delivery at worst, never a lost one).
    pub async fn handle(&self, batch: Vec<Record>) {
        let mut outcome = Outcome::default();
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        for record in batch {
            if outcome.stopped {
                break;
            }
            match &record.envelope {
                Envelope::Message { .. } => {
                    self.apply_acks(std::mem::take(&mut acks), &mut outcome)
                        .await;
                    messages.push(record);
                }
                Envelope::Ack { .. } => {
                    self.persist_messages(std::mem::take(&mut messages), &mut outcome)
                        .await;
                    acks.push(record);
                }
                Envelope::Read { .. } => {
                    self.persist_messages(std::mem::take(&mut messages), &mut outcome)
                        .await;
                    self.apply_acks(std::mem::take(&mut acks), &mut outcome)
                        .await;
                    if !outcome.stopped {
                        self.read(record, &mut outcome).await;
                    }
                }
            }
        }
        self.persist_messages(messages, &mut outcome).await;
        self.apply_acks(acks, &mut outcome).await;
        self.route(outcome.events).await;
        for (commit, result) in outcome.commits {
            commit(result);
        }
    }

    async fn persist_messages(&self, records: Vec<Record>, outcome: &mut Outcome) {
        if records.is_empty() || outcome.stopped {
            return;
        }
        let mut batch = Vec::with_capacity(records.len());
        let mut pending = Vec::with_capacity(records.len());
        let mut groups: HashMap<Uuid, Vec<String>> = HashMap::new();
        for record in records {
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
                message: message.clone(),
                recipients,
                client_msg_id: client_msg_id.clone(),
            });
            pending.push((message, origin, client_msg_id, commit, redelivered));
        }
        if batch.is_empty() {
            return;
        }
        match self.store.append(batch).await {
            Ok(appended) => {
                for ((message, origin, client_msg_id, commit), appended) in pending
                    .into_iter()
                    .map(|(m, o, c, commit, _)| (m, o, c, commit))
                    .zip(appended)
                {
                    let kind = if appended.inserted {
                        "inserted"
                    } else {
                        "duplicate"
                    };
                    metrics::counter!("dispatcher_messages_total", "outcome" => kind).increment(1);
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
                for (message, origin, client_msg_id, commit, redelivered) in pending {
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

    /// Who gets a message in their pending queue: the other party of a direct
    /// conversation (the sender for a note to self), or every other group member.
    async fn recipients(
        &self,
        message: &Message,
        groups: &mut HashMap<Uuid, Vec<String>>,
    ) -> Result<Vec<String>> {
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

    async fn apply_acks(&self, records: Vec<Record>, outcome: &mut Outcome) {
        if records.is_empty() || outcome.stopped {
            return;
        }
        // One store call per user: a message acked by two devices in this run is removed
        // (and receipted) once.
        let mut users: Vec<(String, Vec<Uuid>, Vec<Commit>)> = Vec::new();
        for record in records {
            let (envelope, commit) = record.into_parts();
            let Envelope::Ack { user, message_ids } = envelope else {
                outcome.commits.push((commit, Ok(())));
                continue;
            };
            match users.iter_mut().find(|(u, _, _)| *u == user) {
                Some((_, ids, commits)) => {
                    ids.extend(message_ids);
                    commits.push(commit);
                }
                None => users.push((user, message_ids, vec![commit])),
            }
        }
        let results = futures_util::future::join_all(
            users.iter().map(|(user, ids, _)| self.store.ack(user, ids)),
        )
        .await;
        let ts = now_ms();
        for ((user, _, commits), result) in users.into_iter().zip(results) {
            let result = match result {
                Ok(acked) => {
                    let mut by_sender: Vec<(String, Vec<Receipt>)> = Vec::new();
                    for AckedMessage {
                        id,
                        conversation,
                        from,
                    } in acked
                    {
                        if from == user {
                            continue;
                        }
                        let receipt = Receipt {
                            message_id: id,
                            conversation,
                            by: user.clone(),
                            status: ReceiptStatus::Delivered,
                            ts,
                        };
                        match by_sender.iter_mut().find(|(s, _)| *s == from) {
                            Some((_, receipts)) => receipts.push(receipt),
                            None => by_sender.push((from, vec![receipt])),
                        }
                    }
                    for (to, receipts) in by_sender {
                        outcome.events.push(Event::Receipts { to, receipts });
                    }
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, %user, "applying acks failed");
                    Err(e.to_string())
                }
            };
            for commit in commits {
                outcome.commits.push((commit, result.clone()));
            }
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
            Ok(senders) => {
                let ts = now_ms();
                for to in senders {
                    let receipt = Receipt {
                        message_id,
                        conversation: conversation.clone(),
                        by: user.clone(),
                        status: ReceiptStatus::Read,
                        ts,
                    };
                    outcome.events.push(Event::Receipts {
                        to,
                        receipts: vec![receipt],
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
    /// recipients with no device online, receipts to their senders' devices (kept in the
    /// store for a sender with none), and answers to the sending connections.
    async fn route(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut wanted = BTreeSet::new();
        for event in &events {
            match event {
                Event::Message {
                    message, appended, ..
                } => {
                    wanted.extend(appended.pending_for.iter().cloned());
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
        let located = if wanted.is_empty() {
            Some(HashMap::new())
        } else {
            match self.presence.locate(&wanted).await {
                Ok(located) => Some(located),
                Err(e) => {
                    // Messages stay pending (they reach their recipients on the next
                    // connect); receipts are kept for their senders' next connect.
                    tracing::warn!(error = %e, "locating recipients failed");
                    None
                }
            }
        };

        let mut out = NodeBatches::default();
        let mut pushes = Vec::new();
        let mut keep: Vec<(String, Vec<Receipt>)> = Vec::new();
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
                    let mut reach = |user: &str, at: &[Location]| {
                        for location in at {
                            match by_node.iter_mut().find(|(n, _)| *n == location.node) {
                                Some((_, users)) if users.iter().any(|u| u == user) => {}
                                Some((_, users)) => users.push(user.to_owned()),
                                None => {
                                    by_node.push((location.node.clone(), vec![user.to_owned()]))
                                }
                            }
                        }
                    };
                    for user in &appended.pending_for {
                        match located.get(user) {
                            Some(at) => reach(user, at),
                            None if appended.inserted => pushes.push(PushEvent {
                                user: user.clone(),
                                message_id: message.id,
                                conversation: message.conversation.clone(),
                                from: message.from.clone(),
                                ts: message.ts,
                            }),
                            None => {}
                        }
                    }
                    // The sender's other devices (guarantee 8), for a new message only.
                    let sender_is_recipient = appended.pending_for.contains(&message.from);
                    if appended.inserted && !sender_is_recipient {
                        if let Some(at) = located.get(&message.from) {
                            reach(&message.from, at);
                        }
                    }
                    if appended.inserted && !by_node.is_empty() {
                        let age = (now_ms() - message.ts).max(0) as f64 / 1000.0;
                        metrics::histogram!("dispatcher_route_latency_seconds").record(age);
                    }
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
                    let at = located.as_ref().and_then(|l| l.get(&to));
                    let Some(at) = at else {
                        keep.push((to, receipts));
                        continue;
                    };
                    let mut nodes: Vec<&str> = at.iter().map(|l| l.node.as_str()).collect();
                    nodes.sort_unstable();
                    nodes.dedup();
                    for node in nodes {
                        for receipt in &receipts {
                            out.push(
                                node,
                                NodeDelivery {
                                    users: vec![to.clone()],
                                    except: None,
                                    payload: Payload::Receipt(receipt.clone()),
                                },
                            );
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
            if let Err(e) = self.presence.publish(&node, deliveries).await {
                // What it carried is stored: pending messages come on the next connect.
                tracing::warn!(error = %e, %node, "delivery to a node failed");
            }
        });
        let pushes = pushes.into_iter().map(|event| async move {
            if let Err(e) = self.bus.publish_push(event).await {
                tracing::warn!(error = %e, "push event failed");
            }
        });
        let kept = keep.into_iter().map(|(to, receipts)| async move {
            if let Err(e) = self.store.push_receipts(&to, receipts).await {
                tracing::warn!(error = %e, %to, "keeping receipts failed");
            }
        });
        tokio::join!(
            futures_util::future::join_all(publishes),
            futures_util::future::join_all(pushes),
            futures_util::future::join_all(kept),
        );
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
