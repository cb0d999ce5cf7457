//! Confirmed notices (receipts and group changes), forgotten in batches: the confirmations
//! of every connection that arrive while one store write is out go together in the next
//! one, so that a busy node spends one request on many `ack`s with `receipt_ids` or
//! `notice_ids`, not one each.

use storage::{MessageStore, Store};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

type Waiter = oneshot::Sender<Result<(), String>>;

/// A handle to the task that drops confirmed notices from the store.
pub struct ReceiptDrops {
    requests: mpsc::UnboundedSender<(Vec<(String, Uuid)>, Waiter)>,
}

impl ReceiptDrops {
    /// Starts the task (it ends when the handle is dropped). Needs a tokio runtime.
    pub fn start(store: Store) -> Self {
        let (requests, mut waiting) = mpsc::unbounded_channel::<(Vec<(String, Uuid)>, Waiter)>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while waiting.recv_many(&mut batch, 1024).await > 0 {
                let (receipts, waiters): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                let receipts: Vec<(String, Uuid)> = receipts.into_iter().flatten().collect();
                let result = store
                    .drop_notices(&receipts)
                    .await
                    .map_err(|e| e.to_string());
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        ReceiptDrops { requests }
    }

    /// Forgets these notices of `user`; resolves once the store has.
    pub async fn confirm(&self, user: &str, ids: Vec<Uuid>) -> Result<(), storage::Error> {
        let (done, result) = oneshot::channel();
        let receipts = ids.into_iter().map(|id| (user.to_owned(), id)).collect();
        let gone = || storage::Error::Unavailable("the receipt writer stopped".into());
        self.requests.send((receipts, done)).map_err(|_| gone())?;
        result
            .await
            .map_err(|_| gone())?
            .map_err(storage::Error::Unavailable)
    }
}
