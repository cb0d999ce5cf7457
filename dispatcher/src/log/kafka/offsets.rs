//! Which records of one partition are out with the dispatcher, and which offset may be
//! stored for commit: the one below which every record is persisted.

use std::collections::BTreeSet;
use std::time::Duration;

use storage::resilience::Backoff;

/// The longest wait before a partition is read again after a failed record.
const REWIND_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Offsets of one partition (of one assignment of it).
#[derive(Debug)]
pub(super) struct Offsets {
    /// Bumped whenever the partition is read again from an earlier offset (a seek back):
    /// verdicts on records handed out before belong to an older generation and move
    /// nothing.
    generation: u64,
    /// Handed to the dispatcher and not yet persisted (or failed: kept until redone).
    open: BTreeSet<i64>,
    /// Highest offset handed out in this generation.
    highest: i64,
    /// Highest offset stored for commit (the next read starts after it).
    stored: i64,
    /// The wait before reading a failed record again: longer after each consecutive
    /// failure, from the start after a success.
    backoff: Backoff,
    /// A seek back is scheduled.
    rewinding: bool,
}

/// What a verdict on a record asks of the consumer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settled {
    Nothing,
    /// Store this offset for commit; call [`Offsets::stored`] once it is.
    Store(i64),
    /// Read the partition again from `to` after `wait`; call [`Offsets::rewound`] once
    /// the seek is done.
    Rewind {
        to: i64,
        wait: Duration,
    },
}

impl Offsets {
    pub(super) fn new() -> Self {
        Offsets {
            generation: 0,
            open: BTreeSet::new(),
            highest: -1,
            stored: -1,
            // 200 ms doubling: the first wait is at most 200 ms, the sixth at most 5 s.
            backoff: Backoff::new(Duration::from_millis(200), REWIND_BACKOFF_MAX),
            rewinding: false,
        }
    }

    /// Notes a record handed to the dispatcher; returns its generation.
    pub(super) fn hand_out(&mut self, offset: i64) -> u64 {
        if offset <= self.highest {
            // Read again from an earlier offset: what is still out is superseded.
            self.generation += 1;
            self.open.clear();
            self.highest = offset - 1;
            self.stored = self.stored.min(offset - 1);
        }
        self.open.insert(offset);
        self.highest = offset;
        self.generation
    }

    /// The dispatcher's verdict on a record handed out in `generation`: persisted (`true`)
    /// or not.
    pub(super) fn settle(&mut self, offset: i64, generation: u64, persisted: bool) -> Settled {
        if self.generation != generation {
            // Handed out before a seek back: the record comes (came) again.
            return Settled::Nothing;
        }
        if persisted {
            self.open.remove(&offset);
            self.backoff.reset();
            let safe = match self.open.first() {
                Some(first) => first - 1,
                None => self.highest,
            };
            return if safe > self.stored {
                Settled::Store(safe)
            } else {
                Settled::Nothing
            };
        }
        if self.rewinding {
            return Settled::Nothing;
        }
        self.rewinding = true;
        Settled::Rewind {
            to: self.open.first().copied().unwrap_or(offset).min(offset),
            wait: self.backoff.next().unwrap_or(REWIND_BACKOFF_MAX),
        }
    }

    /// The offset asked for by [`Settled::Store`] is stored.
    pub(super) fn stored(&mut self, offset: i64) {
        self.stored = self.stored.max(offset);
    }

    /// The seek asked for by [`Settled::Rewind`] is done (or failed).
    pub(super) fn rewound(&mut self) {
        self.rewinding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_partition_again_starts_a_new_generation() {
        let mut o = Offsets::new();
        assert_eq!(o.hand_out(10), 0);
        assert_eq!(o.hand_out(11), 0);
        assert_eq!(o.hand_out(12), 0);
        o.stored = 11;
        // A seek back to 11: verdicts on what was out before no longer count.
        assert_eq!(o.hand_out(11), 1);
        assert_eq!(o.open.iter().copied().collect::<Vec<_>>(), vec![11]);
        assert_eq!((o.highest, o.stored), (11, 10));
        assert_eq!(o.hand_out(12), 1);
        assert_eq!(o.settle(12, 0, true), Settled::Nothing, "an old generation");
    }

    #[test]
    fn an_offset_is_stored_only_below_every_record_still_out() {
        let mut o = Offsets::new();
        for offset in 0..3 {
            o.hand_out(offset);
        }
        // 1 and 2 are persisted, 0 is not yet: nothing may be committed.
        assert_eq!(o.settle(1, 0, true), Settled::Nothing);
        assert_eq!(o.settle(2, 0, true), Settled::Nothing);
        assert_eq!(o.settle(0, 0, true), Settled::Store(2));
        o.stored(2);
        o.hand_out(3);
        assert_eq!(o.settle(3, 0, true), Settled::Store(3));
    }

    #[test]
    fn a_failed_record_is_read_again_from_the_lowest_one_out() {
        let mut o = Offsets::new();
        for offset in 5..8 {
            o.hand_out(offset);
        }
        assert_eq!(o.settle(5, 0, true), Settled::Store(5));
        o.stored(5);
        match o.settle(7, 0, false) {
            Settled::Rewind { to, wait } => {
                assert_eq!(to, 6, "6 is still out, so the seek goes back to it");
                assert!(wait <= Duration::from_millis(200));
            }
            other => panic!("expected a rewind, got {other:?}"),
        }
        // One seek at a time.
        assert_eq!(o.settle(6, 0, false), Settled::Nothing);
        o.rewound();
        assert_eq!(o.hand_out(6), 1, "the seek starts a new generation");
    }
}
