//! What every connection of this node shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dispatcher::startup::Backends;
use dispatcher::Log;
use metrics_exporter_prometheus::PrometheusHandle;
use presence::Presence;
use storage::blob::Blobs;
use storage::Store;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::hub::{Deadlines, Hub, Unlocated};
use crate::limits::{SendLimiter, UserBudget};
use crate::receipts::ReceiptDrops;

pub struct App {
    pub config: Config,
    pub node: String,
    pub auth: Auth,
    pub store: Store,
    pub presence: Presence,
    pub log: Log,
    /// Where attachments' bytes go; `None` in a cluster without a bucket.
    pub blobs: Option<Blobs>,
    pub hub: Hub,
    /// Sends waiting for the dispatcher's answer, to be refused when it is late.
    pub deadlines: Deadlines,
    pub sends: SendLimiter,
    /// One-time keys claimed, per user.
    pub claims: UserBudget,
    /// To-device messages sent, per user.
    pub to_device: UserBudget,
    /// Group notices caused (members told of a group's creation or change), per user.
    pub group_notices: UserBudget,
    /// Connections to catch up once presence knows of them.
    pub unlocated: Unlocated,
    /// Confirmed receipts, forgotten in batches.
    pub receipt_drops: ReceiptDrops,
    pub metrics: PrometheusHandle,
    /// The at-rest key re-encryption this node runs or ran last (admin port).
    pub reencryptions: crate::admin::Reencryptions,
    /// Every connection task, so that a drain can wait for them.
    pub tracker: TaskTracker,
    draining: AtomicBool,
    started: Instant,
}

impl App {
    pub fn new(
        config: Config,
        node: String,
        auth: Auth,
        backends: Backends,
        blobs: Option<Blobs>,
        metrics: PrometheusHandle,
    ) -> Self {
        let Backends {
            store,
            presence,
            log,
        } = backends;
        let sends = SendLimiter::new(config.rate_per_sec, config.rate_burst);
        let claims = UserBudget::new(config.key_claims_per_sec, config.key_claim_burst);
        let to_device = UserBudget::new(config.to_device_per_sec, config.to_device_burst);
        let group_notices =
            UserBudget::new(config.group_notices_per_sec, config.group_notices_burst);
        let receipt_drops = ReceiptDrops::start(store.clone());
        App {
            config,
            node,
            auth,
            store,
            presence,
            log,
            blobs,
            hub: Hub::default(),
            deadlines: Deadlines::default(),
            sends,
            claims,
            to_device,
            group_notices,
            unlocated: Unlocated::default(),
            receipt_drops,
            metrics,
            reencryptions: Default::default(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// The three backends (handles: cheap to clone), as `/readyz` checks them.
    pub fn backends(&self) -> Backends {
        Backends {
            store: self.store.clone(),
            presence: self.presence.clone(),
            log: self.log.clone(),
        }
    }

    /// Milliseconds since this node started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// tungstenite's settings for every connection: small read buffers (the 128 KiB
    /// default is reserved per connection), a bounded write buffer, the protocol's limits.
    pub fn ws_config(&self) -> WebSocketConfig {
        let max = self.config.max_frame_bytes;
        WebSocketConfig::default()
            .read_buffer_size(self.config.ws_read_buffer.max(256))
            .write_buffer_size(0)
            .max_write_buffer_size(2 * max + 64 * 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }
}
