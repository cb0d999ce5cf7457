//! Consume a partition in order, persist, commit, then deliver or queue.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use presence::{ConnRef, NodeDelivery, Payload, Presence, PresenceService};
use storage::{
    AckedMessage, Appended, Conversation, Message, MessageStore, NewMessage, Receipt,
    ReceiptStatus, Store,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Bus, InboundLog, Partition, Record};
use crate::envelope::{Envelope, PushEvent};
use crate::error::Result;

/// Most records taken from a partition at once; consecutive messages among them are
/// persisted in one store call.
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

    /// Handles records in log order. Runs of consecutive messages are persisted in one
    /// store call; runs of consecutive acks, which commute, are applied concurrently so
    /// that they share a group commit. A run is finished before the next kind starts.
    pub async fn handle(&self, batch: Vec<Record>) {
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        for record in batch {
            match &record.envelope {
                Envelope::Message { .. } => {
                    self.apply_acks(std::mem::take(&mut acks)).await;
                    messages.push(record);
                }
                Envelope::Ack { .. } => {
                    self.persist_messages(std::mem::take(&mut messages)).await;
                    acks.push(record);
                }
                Envelope::Read { .. } => {
                    self.persist_messages(std::mem::take(&mut messages)).await;
                    self.apply_acks(std::mem::take(&mut acks)).await;
                    let (envelope, commit) = record.into_parts();
                    let outcome = match envelope {
                        Envelope::Read {
                            user,
                            conversation,
                            message_id,
                        } => self.read(&user, &conversation, message_id).await,
                        _ => Ok(()),
                    };
                    commit(outcome.map_err(|e| e.to_string()));
                }
            }
        }
        self.persist_messages(messages).await;
        self.apply_acks(acks).await;
    }

    async fn apply_acks(&self, records: Vec<Record>) {
        futures_util::future::join_all(records.into_iter().map(|record| async move {
            let (envelope, commit) = record.into_parts();
            let outcome = match envelope {
                Envelope::Ack { user, message_ids } => self.ack(&user, &message_ids).await,
                _ => Ok(()),
            };
            commit(outcome.map_err(|e| e.to_string()));
        }))
        .await;
    }

    async fn persist_messages(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let mut batch = Vec::with_capacity(records.len());
        let mut commits = Vec::with_capacity(records.len());
        let mut origins = Vec::with_capacity(records.len());
        for record in records {
            let (envelope, commit) = record.into_parts();
            let Envelope::Message {
                message,
                origin,
                client_msg_id,
            } = envelope
            else {
                commit(Ok(()));
                continue;
            };
            let recipients = match self.recipients(&message).await {
                Ok(r) => r,
                Err(e) => {
                    commit(Err(e.to_string()));
                    continue;
                }
            };
            batch.push(NewMessage {
                message,
                recipients,
                client_msg_id,
            });
            commits.push(commit);
            origins.push(origin);
        }
        let messages: Vec<Message> = batch.iter().map(|n| n.message.clone()).collect();
        match self.store.append(batch).await {
            Ok(outcomes) => {
                // Stored: route, then commit. A dispatcher that dies in between has its
                // records read again (at worst a duplicate delivery, never a lost one);
                // committing first could lose the live delivery of what was in flight.
                for (((message, origin), appended), commit) in
                    messages.into_iter().zip(origins).zip(outcomes).zip(commits)
                {
                    let outcome = if appended.inserted {
                        "inserted"
                    } else {
                        "duplicate"
                    };
                    metrics::counter!("dispatcher_messages_total", "outcome" => outcome)
                        .increment(1);
                    if let Err(e) = self.route(message, origin, appended).await {
                        // The message is stored and pending: it reaches its recipients on
                        // their next connect.
                        tracing::warn!(error = %e, "live delivery failed");
                    }
                    commit(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "persisting messages failed");
                metrics::counter!("dispatcher_messages_total", "outcome" => "failed")
                    .increment(commits.len() as u64);
                for commit in commits {
                    commit(Err(e.to_string()));
                }
            }
        }
    }

    /// Who gets a message in their pending queue: the other party of a direct
    /// conversation (the sender for a note to self), or every other group member.
    async fn recipients(&self, message: &Message) -> Result<Vec<String>> {
        Ok(match &message.conversation {
            c @ Conversation::Direct(..) => {
                vec![c.peer_of(&message.from).unwrap_or(&message.from).to_owned()]
            }
            Conversation::Group(id) => match self.store.group(*id).await? {
                Some(group) => group
                    .members
                    .into_iter()
                    .filter(|m| *m != message.from)
                    .collect(),
                None => {
                    tracing::warn!(group = %id, "message for an unknown group");
                    Vec::new()
                }
            },
        })
    }

    /// Delivers a stored message to the online devices of those it is pending for, echoes
    /// a new one to the sender's other devices, and emits push events for the offline.
    async fn route(
        &self,
        message: Message,
        origin: Option<ConnRef>,
        appended: Appended,
    ) -> Result<()> {
        let sender_is_recipient = appended.pending_for.contains(&message.from);
        let mut wanted = appended.pending_for.clone();
        if appended.inserted && !sender_is_recipient {
            wanted.push(message.from.clone());
        }
        let located = self.presence.locate(&wanted).await?;

        let mut by_node: HashMap<&str, Vec<String>> = HashMap::new();
        for user in &appended.pending_for {
            match located.get(user) {
                Some(locations) => {
                    for location in locations {
                        let users = by_node.entry(location.node.as_str()).or_default();
                        if !users.contains(user) {
                            users.push(user.clone());
                        }
                    }
                }
                None if appended.inserted => {
                    let event = PushEvent {
                        user: user.clone(),
                        message_id: message.id,
                        conversation: message.conversation.clone(),
                        from: message.from.clone(),
                        ts: message.ts,
                    };
                    self.bus.publish_push(event).await?;
                }
                None => {}
            }
        }
        if appended.inserted && !sender_is_recipient {
            if let Some(locations) = located.get(&message.from) {
                for location in locations {
                    let users = by_node.entry(location.node.as_str()).or_default();
                    if !users.contains(&message.from) {
                        users.push(message.from.clone());
                    }
                }
            }
        }
        if !by_node.is_empty() {
            let age = (now_ms() - message.ts).max(0) as f64 / 1000.0;
            metrics::histogram!("dispatcher_route_latency_seconds").record(age);
        }
        for (node, users) in by_node {
            let delivery = NodeDelivery {
                users,
                except: origin.clone(),
                payload: Payload::Message(message.clone()),
            };
            self.presence.publish(node, delivery).await?;
        }
        Ok(())
    }

    async fn ack(&self, user: &str, ids: &[Uuid]) -> Result<()> {
        let acked = self.store.ack(user, ids).await?;
        let mut by_sender: HashMap<String, Vec<Receipt>> = HashMap::new();
        let ts = now_ms();
        for AckedMessage {
            id,
            conversation,
            from,
        } in acked
        {
            if from == user {
                continue;
            }
            by_sender.entry(from).or_default().push(Receipt {
                message_id: id,
                conversation,
                by: user.to_owned(),
                status: ReceiptStatus::Delivered,
                ts,
            });
        }
        for (sender, receipts) in by_sender {
            self.send_receipts(&sender, receipts).await?;
        }
        Ok(())
    }

    async fn read(&self, user: &str, conversation: &Conversation, upto: Uuid) -> Result<()> {
        let senders = match self.store.mark_read(user, conversation, upto).await {
            Ok(senders) => senders,
            Err(storage::Error::NotFound(what)) => {
                tracing::debug!(%what, "read marker for an unknown message");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let ts = now_ms();
        for sender in senders {
            let receipt = Receipt {
                message_id: upto,
                conversation: conversation.clone(),
                by: user.to_owned(),
                status: ReceiptStatus::Read,
                ts,
            };
            self.send_receipts(&sender, vec![receipt]).await?;
        }
        Ok(())
    }

    /// Delivers receipts to a sender's online devices, or keeps them for the sender's next
    /// connect when none is online.
    async fn send_receipts(&self, sender: &str, receipts: Vec<Receipt>) -> Result<()> {
        let located = self.presence.locate(&[sender.to_owned()]).await?;
        let Some(locations) = located.get(sender) else {
            self.store.push_receipts(sender, receipts).await?;
            return Ok(());
        };
        let mut nodes: Vec<&str> = locations.iter().map(|l| l.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for receipt in receipts {
            for node in &nodes {
                let delivery = NodeDelivery {
                    users: vec![sender.to_owned()],
                    except: None,
                    payload: Payload::Receipt(receipt.clone()),
                };
                self.presence.publish(node, delivery).await?;
            }
        }
        Ok(())
    }
}
