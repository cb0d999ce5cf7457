//! The correctness ledger: which generated messages were accepted (`sent`), which arrived
//! where, and so what was lost, duplicated or reordered.
//!
//! Every generated message is identified by its sender's index and the sender's sequence
//! number, carried in the message body ([`Body`]). A recipient's arrivals are checked where
//! they happen (order, duplicates); loss needs both sides, so ledgers from several
//! processes merge before the verdict.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// `sender << 32 | seq`.
pub type Key = u64;

pub fn key(sender: u32, seq: u32) -> Key {
    (u64::from(sender) << 32) | u64::from(seq)
}

pub fn split(key: Key) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// What the load generator writes into each message body, followed by padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Body {
    pub sender: u32,
    pub seq: u32,
    /// When the message was meant to be sent, microseconds since the Unix epoch. Latency
    /// is measured from here, not from when it actually went out: no coordinated omission.
    pub intended_us: u64,
}

impl Body {
    const TAG: &'static str = "lt1";

    pub fn encode(&self, size: usize) -> String {
        let mut body = format!(
            "{} {} {} {} ",
            Self::TAG,
            self.sender,
            self.seq,
            self.intended_us
        );
        if body.len() < size {
            body.extend(std::iter::repeat_n('.', size - body.len()));
        }
        body
    }

    pub fn decode(body: &str) -> Option<Body> {
        let mut parts = body.split(' ');
        if parts.next()? != Self::TAG {
            return None;
        }
        Some(Body {
            sender: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            intended_us: parts.next()?.parse().ok()?,
        })
    }
}

/// The ledger of one process; [`Ledger::merge`] combines several.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Accepted by the server (`sent` received), with the recipients that must get it.
    accepted: HashMap<Key, Vec<u32>>,
    /// First arrivals: `(recipient, key)`.
    delivered: HashSet<(u32, Key)>,
    /// Arrivals of something this recipient already had.
    duplicated: u64,
    /// First arrivals that came after a later message of the same sender.
    reordered: u64,
    /// Highest sequence number seen per `(recipient, sender)`.
    #[serde(skip)]
    highest: HashMap<(u32, u32), u32>,
}

/// The ledger's conclusions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Messages the server accepted.
    pub accepted: u64,
    /// Deliveries owed: accepted messages × their recipients.
    pub expected: u64,
    /// Owed deliveries that happened.
    pub delivered: u64,
    /// Owed deliveries that never happened.
    pub lost: u64,
    /// Deliveries of a message the recipient already had (clients drop these by id).
    pub duplicated: u64,
    /// First deliveries that overtook a later message of the same sender.
    pub reordered: u64,
    /// Deliveries of messages whose `sent` the sender never saw (its connection dropped
    /// first): allowed, since the message was stored; not counted as owed.
    pub unconfirmed: u64,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.reordered == 0
    }
}

impl Ledger {
    pub fn accept(&mut self, key: Key, recipients: Vec<u32>) {
        self.accepted.insert(key, recipients);
    }

    /// Records an arrival at `recipient`; `true` if it is the first of that message there.
    pub fn arrive(&mut self, recipient: u32, key: Key) -> bool {
        if !self.delivered.insert((recipient, key)) {
            self.duplicated += 1;
            return false;
        }
        let (sender, seq) = split(key);
        let highest = self.highest.entry((recipient, sender)).or_insert(seq);
        if seq < *highest {
            self.reordered += 1;
        } else {
            *highest = seq;
        }
        true
    }

    pub fn merge(&mut self, other: Ledger) {
        self.accepted.extend(other.accepted);
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.delivered.extend(other.delivered);
    }

    /// Owed deliveries that have not happened yet.
    pub fn outstanding(&self) -> u64 {
        self.accepted
            .iter()
            .map(|(key, recipients)| {
                recipients
                    .iter()
                    .filter(|r| !self.delivered.contains(&(**r, *key)))
                    .count() as u64
            })
            .sum()
    }

    pub fn verdict(&self) -> Verdict {
        let expected: u64 = self.accepted.values().map(|r| r.len() as u64).sum();
        let lost = self.outstanding();
        let owed_and_delivered = expected - lost;
        let unconfirmed = self
            .delivered
            .iter()
            .filter(|(_, key)| !self.accepted.contains_key(key))
            .count() as u64;
        Verdict {
            accepted: self.accepted.len() as u64,
            expected,
            delivered: owed_and_delivered,
            lost,
            duplicated: self.duplicated,
            reordered: self.reordered,
            unconfirmed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_with_padding() {
        let body = Body {
            sender: 7,
            seq: 42,
            intended_us: 1_700_000_000_000_000,
        };
        let text = body.encode(100);
        assert_eq!(text.len(), 100);
        assert_eq!(Body::decode(&text), Some(body));
        assert_eq!(Body::decode("hello"), None);
    }

    #[test]
    fn the_ledger_catches_loss_duplicates_and_reordering() {
        let mut l = Ledger::default();
        for seq in 0..5 {
            l.accept(key(1, seq), vec![2]);
        }
        l.accept(key(3, 0), vec![2, 4]);
        assert!(l.arrive(2, key(1, 0)));
        assert!(l.arrive(2, key(1, 2)));
        assert!(l.arrive(2, key(1, 1)), "late but first");
        assert!(!l.arrive(2, key(1, 1)), "duplicate");
        assert!(l.arrive(2, key(1, 4)));
        assert!(l.arrive(2, key(3, 0)));
        assert!(l.arrive(9, key(8, 0)), "not accepted: unconfirmed");
        let v = l.verdict();
        assert_eq!((v.accepted, v.expected, v.delivered), (6, 7, 5));
        assert_eq!(
            (v.lost, v.duplicated, v.reordered, v.unconfirmed),
            (2, 1, 1, 1)
        );
        assert!(!v.clean());
    }

    #[test]
    fn ledgers_from_several_processes_merge() {
        let mut senders = Ledger::default();
        senders.accept(key(1, 0), vec![2]);
        let mut recipients = Ledger::default();
        recipients.arrive(2, key(1, 0));
        assert_eq!(senders.verdict().lost, 1);
        senders.merge(recipients);
        assert_eq!(senders.verdict().lost, 0);
        assert!(senders.verdict().clean());
    }
}
