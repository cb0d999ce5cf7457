//! Group commit for CQL writes: what concurrent callers write goes to the cluster together.
//!
//! Each caller hands over the statements of one logical write and waits for them. A task
//! keeps at most [`MAX_IN_FLIGHT`] requests outstanding; whatever arrives meanwhile is sent
//! as one unlogged batch as soon as a request slot frees up. Under light load every write
//! goes out at once; under heavy load each request carries many writes, which is what a CQL
//! node spends its CPU on (per request, far more than per row). Batches are bounded in
//! statements and bytes (below the server's `batch_size_fail_threshold`); a write too large
//! for a batch runs as single statements.
//!
//! A caller's write larger than one request is split into requests that fit, and a
//! statement too large for any batch goes alone; either way at most [`MAX_IN_FLIGHT`]
//! requests are outstanding, so a large write (a backlog being worked off) queues here
//! instead of flooding the cluster into timeouts.
//!
//! A batch is not atomic: each write is idempotent and its caller orders what must be
//! ordered by awaiting one write before handing over the next.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use scylla::client::session::Session;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::{mpsc, oneshot};

use super::{exec_error, retried};
use crate::error::{Error, Result};
use crate::resilience::Breaker;

/// Requests outstanding at once.
const MAX_IN_FLIGHT: usize = 2;

/// Bound values of one statement.
pub(super) type Values = Box<dyn SerializeRow + Send + Sync>;

/// One statement to run, with its values and their approximate size.
pub(super) struct Write {
    statement: PreparedStatement,
    values: Values,
    bytes: usize,
}

impl Write {
    pub(super) fn new(
        statement: &PreparedStatement,
        values: impl SerializeRow + Send + Sync + 'static,
        bytes: usize,
    ) -> Self {
        Write {
            statement: statement.clone(),
            values: Box::new(values),
            bytes: bytes + 32,
        }
    }
}

/// How big one request may get.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) statements: usize,
    pub(super) bytes: usize,
}

struct Job {
    writes: Vec<Write>,
    bytes: usize,
    done: oneshot::Sender<Result<()>>,
}

/// A handle to the batching task; it stops when the last handle is dropped.
pub(super) struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
    limits: Limits,
}

impl Batcher {
    pub(super) fn start(session: Arc<Session>, breaker: Breaker, limits: Limits) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, session, breaker, limits));
        Batcher { jobs, limits }
    }

    /// Runs `writes` and resolves once all of them are applied.
    pub(super) async fn write(&self, writes: Vec<Write>) -> Result<()> {
        let mut pieces = Vec::new();
        let mut piece: Vec<Write> = Vec::new();
        let mut bytes = 0;
        for write in writes {
            let full =
                piece.len() >= self.limits.statements || bytes + write.bytes > self.limits.bytes;
            if full && !piece.is_empty() {
                pieces.push(self.submit(std::mem::take(&mut piece), bytes)?);
                bytes = 0;
            }
            bytes += write.bytes;
            piece.push(write);
        }
        if !piece.is_empty() {
            pieces.push(self.submit(piece, bytes)?);
        }
        let stopped = || Error::Unavailable("the ScyllaDB write batcher has stopped".into());
        for answer in pieces {
            answer.await.map_err(|_| stopped())??;
        }
        Ok(())
    }

    fn submit(&self, writes: Vec<Write>, bytes: usize) -> Result<oneshot::Receiver<Result<()>>> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                writes,
                bytes,
                done,
            })
            .map_err(|_| Error::Unavailable("the ScyllaDB write batcher has stopped".into()))?;
        Ok(answer)
    }
}

async fn run(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    session: Arc<Session>,
    breaker: Breaker,
    limits: Limits,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !waiting.is_empty() || !in_flight.is_empty() {
        tokio::select! {
            job = jobs.recv(), if open => match job {
                Some(job) => waiting.push_back(job),
                None => open = false,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        while in_flight.len() < MAX_IN_FLIGHT && !waiting.is_empty() {
            let group = take_group(&mut waiting, limits);
            in_flight.push(send(group, &session, &breaker, limits));
        }
    }
}

/// The next jobs that fit one request (always at least one).
fn take_group(waiting: &mut VecDeque<Job>, limits: Limits) -> Vec<Job> {
    let mut group = Vec::new();
    let (mut statements, mut bytes) = (0, 0);
    while let Some(job) = waiting.front() {
        let fits =
            statements + job.writes.len() <= limits.statements && bytes + job.bytes <= limits.bytes;
        if !group.is_empty() && !fits {
            break;
        }
        statements += job.writes.len();
        bytes += job.bytes;
        if let Some(job) = waiting.pop_front() {
            group.push(job);
        }
    }
    group
}

async fn send(group: Vec<Job>, session: &Session, breaker: &Breaker, limits: Limits) {
    let statements: usize = group.iter().map(|j| j.writes.len()).sum();
    let bytes: usize = group.iter().map(|j| j.bytes).sum();
    metrics::histogram!("storage_batch_statements").record(statements as f64);
    // One statement needs no batch; a lone job too large for one runs statement by statement.
    let alone = statements == 1 || bytes > limits.bytes;
    let outcome = if alone {
        singly(&group, session, breaker).await
    } else {
        batched(&group, session, breaker).await
    };
    for job in group {
        let _ = job.done.send(match &outcome {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::Unavailable(e.clone())),
        });
    }
}

async fn batched(group: &[Job], session: &Session, breaker: &Breaker) -> Result<(), String> {
    let mut batch = Batch::new(BatchType::Unlogged);
    batch.set_is_idempotent(true);
    let mut values: Vec<&(dyn SerializeRow + Send + Sync)> = Vec::new();
    for write in group.iter().flat_map(|j| &j.writes) {
        batch.append_statement(write.statement.clone());
        values.push(write.values.as_ref());
    }
    retried(breaker, || async {
        session
            .batch(&batch, &values)
            .await
            .map(|_| ())
            .map_err(exec_error)
    })
    .await
    .map_err(|e| e.to_string())
}

/// A piece that is one statement (or one too large for a batch): its statements one after
/// the other (a piece holds more than one only when each fits a batch on its own).
async fn singly(group: &[Job], session: &Session, breaker: &Breaker) -> Result<(), String> {
    for write in group.iter().flat_map(|j| &j.writes) {
        retried(breaker, || async {
            session
                .execute_unpaged(&write.statement, write.values.as_ref())
                .await
                .map(|_| ())
                .map_err(exec_error)
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
