//! Group commit: one thread applies every write and makes a whole group durable with one
//! sync.
//!
//! Callers hand the writer a job; the thread takes whatever jobs are waiting (up to
//! [`MAX_GROUP`]), runs each against the shared context (each job commits its own changes,
//! not yet durably), then syncs once — durably if any job of the group asked for
//! durability, else only as far as the operating system — and only then completes the
//! jobs. While one group syncs, the next one gathers, so under load one
//! sync covers many writes and the cost of a sync is shared.
//!
//! A job's own error concerns that job only. A failed sync fails every durable job of its
//! group: their changes may be visible but are not known to be on disk.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Most jobs run between two syncs.
pub(crate) const MAX_GROUP: usize = 1024;

/// A durable sync that took at least this long is logged.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(100);

/// Called once the job's group is finished, with the sync's outcome (`Ok` for a job that
/// did not ask for durability).
type Finish = Box<dyn FnOnce(Result<()>) + Send>;
/// Runs on the writer thread: applies the job, says whether it needs the group's sync, and
/// hands back its completion.
type Job<C> = Box<dyn FnOnce(&C) -> (bool, Finish) + Send>;

/// A handle to the writer thread; dropping it lets the thread finish the queued jobs and
/// stop.
pub(crate) struct GroupCommit<C> {
    jobs: Option<mpsc::Sender<Job<C>>>,
    thread: Option<JoinHandle<()>>,
}

impl<C> std::fmt::Debug for GroupCommit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl<C: Send + 'static> GroupCommit<C> {
    /// Starts the writer thread over `context`; `sync(context, durable)` hands everything
    /// the jobs committed to the operating system, and makes it durable when asked.
    pub(crate) fn start(
        name: &str,
        context: C,
        sync: impl Fn(&C, bool) -> Result<()> + Send + 'static,
    ) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job<C>>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&context, &rx, &sync))
            .map_err(|source| Error::Io {
                path: format!("{name} thread"),
                source,
            })?;
        Ok(GroupCommit {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the writer thread and resolves once its group is finished: after the
    /// group's sync when `durable`, else as soon as the group is.
    pub(crate) async fn run<T, F>(&self, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&C) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job<C> = Box::new(move |context| match f(context) {
            Ok(value) => (
                durable,
                Box::new(move |synced: Result<()>| {
                    let _ = reply.send(synced.map(|()| value));
                }),
            ),
            Err(e) => (
                false,
                Box::new(move |_| {
                    let _ = reply.send(Err(e));
                }),
            ),
        });
        let stopped = || Error::Unavailable("the embedded store writer has stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl<C> Drop for GroupCommit<C> {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            // Joining lets the last group finish before the files are closed.
            let _ = thread.join();
        }
    }
}

fn run<C>(context: &C, jobs: &mpsc::Receiver<Job<C>>, sync: &impl Fn(&C, bool) -> Result<()>) {
    let mut finishes: Vec<(bool, Finish)> = Vec::new();
    while let Ok(first) = jobs.recv() {
        finishes.push(first(context));
        while finishes.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => finishes.push(job(context)),
                Err(_) => break,
            }
        }
        metrics::histogram!("storage_group_commit_size").record(finishes.len() as f64);
        let durable = finishes.iter().any(|(durable, _)| *durable);
        let started = Instant::now();
        let synced = sync(context, durable).map_err(|e| e.to_string());
        if durable {
            let took = started.elapsed();
            metrics::histogram!("storage_commit_seconds").record(took.as_secs_f64());
            if took >= SLOW_SYNC {
                // Every write of the group, and of the groups gathering behind it, waited
                // this long: worth a line that can be set beside the disk's other work.
                tracing::warn!(
                    ms = took.as_millis() as u64,
                    jobs = finishes.len(),
                    "a sync of the embedded store was slow"
                );
            }
        }
        for (durable, finish) in finishes.drain(..) {
            finish(match (&synced, durable) {
                (Err(e), true) => Err(Error::Backend(format!(
                    "embedded store sync failed, the write may be lost: {e}"
                ))),
                _ => Ok(()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A context that records what the jobs wrote and what the syncs made durable.
    #[derive(Default)]
    struct Log {
        written: Mutex<Vec<u32>>,
        durable: Mutex<Vec<u32>>,
        syncs: AtomicUsize,
        fail_sync: AtomicBool,
    }

    fn start(log: Arc<Log>) -> GroupCommit<Arc<Log>> {
        GroupCommit::start("test-writer", log, |log: &Arc<Log>, durable: bool| {
            if !durable {
                return Ok(());
            }
            log.syncs.fetch_add(1, Ordering::SeqCst);
            if log.fail_sync.load(Ordering::SeqCst) {
                return Err(Error::Backend("disk on fire".into()));
            }
            let written = log.written.lock().expect("lock").clone();
            *log.durable.lock().expect("lock") = written;
            Ok(())
        })
        .expect("start")
    }

    fn write(n: u32) -> impl FnOnce(&Arc<Log>) -> Result<u32> + Send + 'static {
        move |log: &Arc<Log>| {
            log.written.lock().expect("lock").push(n);
            Ok(n)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_write_resolves_only_after_a_sync_covering_it() {
        let log = Arc::new(Log::default());
        let writer = Arc::new(start(log.clone()));
        let mut tasks = Vec::new();
        for n in 0..200 {
            let writer = writer.clone();
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                assert_eq!(writer.run(true, write(n)).await.expect("write"), n);
                assert!(
                    log.durable.lock().expect("lock").contains(&n),
                    "{n} resolved before a sync covered it"
                );
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
    }

    #[tokio::test]
    async fn writes_that_need_no_durability_need_no_sync() {
        let log = Arc::new(Log::default());
        let writer = start(log.clone());
        for n in 0..10 {
            writer.run(false, write(n)).await.expect("write");
        }
        assert_eq!(log.syncs.load(Ordering::SeqCst), 0);
        writer.run(true, write(10)).await.expect("write");
        assert_eq!(log.syncs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_durable_writes_and_a_failed_job_only_itself() {
        let log = Arc::new(Log::default());
        let writer = start(log.clone());
        let refused = writer
            .run(true, |_: &Arc<Log>| -> Result<()> {
                Err(Error::Invalid("no".into()))
            })
            .await;
        assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
        writer.run(true, write(1)).await.expect("unaffected");

        log.fail_sync.store(true, Ordering::SeqCst);
        let lost = writer.run(true, write(2)).await;
        assert!(matches!(lost, Err(Error::Backend(_))), "{lost:?}");
        writer
            .run(false, write(3))
            .await
            .expect("a write that asked for no sync does not wait for one");
    }
}
