//! Frees flushed memtables away from the writer's path.
//!
//! fjall lets go of a flushed memtable when it prunes a keyspace's version history, which
//! it does while holding that keyspace's version lock, each time any memtable is rotated;
//! the store writer takes the same lock for every write into that keyspace. Freeing a
//! memtable means walking its whole skip list (every node, key and value), and for a
//! 32 MiB memtable that took 30-80 ms on two busy cores, with every write waiting behind it
//! (docs/benchmarks.md, "Where the time goes": the embedded mode's item 10).
//!
//! This thread keeps its own reference to each keyspace's active memtable, so that fjall's
//! pruning only lowers a count; once this thread holds the last reference, the memtable is
//! flushed and pruned, and the thread frees it with no lock held. It holds no memtable for
//! longer than fjall itself would, plus at most one tick.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fjall::{AbstractTree, Keyspace};

use crate::error::{Error, Result};

/// How often the thread looks at the active memtables and frees the ones it alone holds. A
/// memtable active for less than a tick is not caught; at the sizes the store uses, that
/// takes tens of thousands of writes a second to one keyspace, and it is then freed the
/// way fjall frees it.
const TICK: Duration = Duration::from_millis(25);

/// The reclaiming thread; dropping the handle stops it (and frees what it holds).
pub(crate) struct Reclaimer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    #[cfg_attr(not(test), expect(dead_code))]
    counts: Arc<Counts>,
}

/// What the thread has done so far.
#[derive(Default)]
struct Counts {
    /// Looks at the active memtables.
    ticks: AtomicU64,
    /// Memtables freed here.
    freed: AtomicU64,
}

impl Reclaimer {
    pub(crate) fn start(keyspaces: Vec<Keyspace>) -> Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let counted = counts.clone();
        let thread = std::thread::Builder::new()
            .name("store-reclaim".into())
            .spawn(move || run(&keyspaces, &stopped, &counted))
            .map_err(|source| Error::Io {
                path: "store-reclaim thread".into(),
                source,
            })?;
        Ok(Reclaimer {
            stop: Some(stop),
            thread: Some(thread),
            counts,
        })
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            // Joined so that no handle to the database outlives the store.
            let _ = thread.join();
        }
    }
}

fn run(keyspaces: &[Keyspace], stopped: &mpsc::Receiver<()>, counts: &Counts) {
    let mut held = Vec::new();
    loop {
        for keyspace in keyspaces {
            let active = keyspace.tree.active_memtable();
            if !held.iter().any(|h| Arc::ptr_eq(h, &active)) {
                held.push(active);
            }
        }
        // Only this thread refers to it: flushed, and pruned from the version history.
        let before = held.len();
        held.retain(|memtable| Arc::strong_count(memtable) > 1);
        let freed = (before - held.len()) as u64;
        counts.freed.fetch_add(freed, Ordering::Relaxed);
        counts.ticks.fetch_add(1, Ordering::Release);
        match stopped.recv_timeout(TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use fjall::{Database, KeyspaceCreateOptions};

    use super::*;

    /// Waits (up to 10 s) until `done` holds.
    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn flushed_memtables_are_freed_by_the_reclaimer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::builder(dir.path()).open().expect("open");
        let keyspace = db
            .keyspace("k", KeyspaceCreateOptions::default)
            .expect("keyspace");
        let reclaimer = Reclaimer::start(vec![keyspace.clone()]).expect("start");
        let counts = reclaimer.counts.clone();
        let mut memtables = Vec::new();
        for round in 0..3u32 {
            keyspace
                .insert(round.to_be_bytes(), "value")
                .expect("insert");
            memtables.push(Arc::downgrade(&keyspace.tree.active_memtable()));
            // The thread has seen this memtable active once it ticked after the insert.
            let seen = counts.ticks.load(Ordering::Acquire) + 2;
            wait_for("a tick", || counts.ticks.load(Ordering::Acquire) >= seen);
            keyspace
                .rotate_memtable_and_wait()
                .expect("rotate and flush");
        }
        // Rotating prunes the flushed memtables from the version history; the thread then
        // holds the last reference and lets go of it.
        wait_for("the flushed memtables to be freed", || {
            memtables[..2].iter().all(|m| m.strong_count() == 0)
        });
        // Counted by the end of the tick that freed them.
        let next = counts.ticks.load(Ordering::Acquire) + 1;
        wait_for("a tick", || counts.ticks.load(Ordering::Acquire) >= next);
        let freed = counts.freed.load(Ordering::Acquire);
        assert!(
            freed >= 2,
            "the reclaimer freed {freed} memtables, not these two"
        );
    }
}
