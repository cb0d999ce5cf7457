//! In-memory presence for a single process (the embedded default).
//!
//! It serves one node: state lives in this process and is gone on restart (users simply
//! reconnect). TTLs are enforced by a sweeper task so that the contract matches the Redis
//! backend, where a node that stops heartbeating loses its users.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, watch};

use governor::{DefaultKeyedRateLimiter, RateLimiter};

use super::{Location, NodeDelivery, PresenceService, Quota, Status};
use crate::error::Result;

/// A cheap-clone handle to the in-memory presence state.
#[derive(Clone)]
pub struct MemoryPresence {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPresence")
            .field("ttl", &self.shared.ttl)
            .finish()
    }
}

struct Shared {
    ttl: Duration,
    // A std mutex: every critical section is a few map operations and never awaits.
    state: Mutex<State>,
    changes: broadcast::Sender<Status>,
    /// Never moves: this state is never lost while the process lives.
    restorations: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    users: HashMap<String, UserEntry>,
    nodes: HashMap<String, mpsc::UnboundedSender<Vec<NodeDelivery>>>,
    /// Send budgets per user, one limiter per quota asked for (in practice, one).
    sends: HashMap<Quota, DefaultKeyedRateLimiter<String>>,
}

#[derive(Default)]
struct UserEntry {
    /// Each connected device and when it expires. A `Vec`, not a map: a user has one to a
    /// few devices, and this is kept for every online user.
    devices: Vec<(Location, Instant)>,
    last_seen: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl MemoryPresence {
    /// Presence whose devices expire `ttl` after their last heartbeat. Must be called
    /// within a tokio runtime: it starts the expiry sweeper, which stops when the last
    /// handle is dropped.
    pub fn new(ttl: Duration) -> Self {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            ttl,
            state: Mutex::new(State::default()),
            changes,
            restorations: watch::Sender::new(0),
        });
        let weak = Arc::downgrade(&shared);
        let every = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(sweep(weak, every));
        MemoryPresence { shared }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still consistent.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self, status: Status) {
        let _ = self.shared.changes.send(status);
    }
}

async fn sweep(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut offline = Vec::new();
        {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            for (user, entry) in state.users.iter_mut() {
                let had = !entry.devices.is_empty();
                entry.devices.retain(|(_, expires)| *expires > now);
                if had && entry.devices.is_empty() {
                    entry.last_seen = Some(now_ms());
                    offline.push(Status {
                        user: user.clone(),
                        online: false,
                        last_seen: entry.last_seen,
                    });
                }
            }
        }
        {
            // Budgets that are full again cost nothing.
            let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            for limiter in state.sends.values() {
                limiter.retain_recent();
            }
        }
        for status in offline {
            tracing::info!(user = %status.user, "presence expired");
            let _ = shared.changes.send(status);
        }
    }
}

impl PresenceService for MemoryPresence {
    async fn connect(&self, user: &str, at: &Location) -> Result<bool> {
        let expires = Instant::now() + self.shared.ttl;
        let came_online = {
            let mut state = self.state();
            let entry = state.users.entry(user.to_owned()).or_default();
            let was_online = !entry.devices.is_empty();
            entry
                .devices
                .retain(|(l, _)| !(l.node == at.node && l.conn == at.conn));
            // Most users have one device: do not let the first push reserve four.
            entry.devices.reserve_exact(1);
            entry.devices.push((at.clone(), expires));
            !was_online
        };
        if came_online {
            self.announce(Status {
                user: user.to_owned(),
                online: true,
                last_seen: None,
            });
        }
        Ok(came_online)
    }

    async fn disconnect(&self, user: &str, at: &Location) -> Result<bool> {
        let went_offline = {
            let mut state = self.state();
            let Some(entry) = state.users.get_mut(user) else {
                return Ok(false);
            };
            let before = entry.devices.len();
            entry
                .devices
                .retain(|(l, _)| !(l.node == at.node && l.conn == at.conn));
            let removed = entry.devices.len() < before;
            if removed && entry.devices.is_empty() {
                entry.last_seen = Some(now_ms());
                Some(entry.last_seen)
            } else {
                None
            }
        };
        if let Some(last_seen) = went_offline {
            self.announce(Status {
                user: user.to_owned(),
                online: false,
                last_seen,
            });
        }
        Ok(went_offline.is_some())
    }

    async fn heartbeat(&self, node: &str, users: &[String]) -> Result<Vec<String>> {
        let now = Instant::now();
        let expires = now + self.shared.ttl;
        let mut state = self.state();
        // A device that expired is swept away (its user announced offline) and not
        // written again here: this process holds it, so only a stalled node loses one.
        // One caught between its expiry and the sweep was lost, and is back.
        let mut lost = Vec::new();
        for user in users {
            if let Some(entry) = state.users.get_mut(user) {
                for (l, e) in entry.devices.iter_mut() {
                    if l.node == node {
                        if *e <= now && lost.last() != Some(user) {
                            lost.push(user.clone());
                        }
                        *e = expires;
                    }
                }
            }
        }
        Ok(lost)
    }

    async fn status(&self, users: &[String]) -> Result<Vec<Status>> {
        let now = Instant::now();
        let state = self.state();
        Ok(users
            .iter()
            .map(|user| match state.users.get(user) {
                Some(entry) => {
                    let online = entry.devices.iter().any(|(_, e)| *e > now);
                    Status {
                        user: user.clone(),
                        online,
                        last_seen: if online { None } else { entry.last_seen },
                    }
                }
                None => Status {
                    user: user.clone(),
                    online: false,
                    last_seen: None,
                },
            })
            .collect())
    }

    async fn locate(&self, users: &[String]) -> Result<HashMap<String, Vec<Location>>> {
        let now = Instant::now();
        let state = self.state();
        let mut found = HashMap::new();
        for user in users {
            let Some(entry) = state.users.get(user) else {
                continue;
            };
            let here: Vec<Location> = entry
                .devices
                .iter()
                .filter(|(_, e)| *e > now)
                .map(|(l, _)| l.clone())
                .collect();
            if !here.is_empty() {
                found.insert(user.clone(), here);
            }
        }
        Ok(found)
    }

    async fn publish(&self, node: &str, deliveries: Vec<NodeDelivery>) -> Result<()> {
        let state = self.state();
        if let Some(channel) = state.nodes.get(node) {
            // A closed channel means the node is gone: the delivery is dropped on purpose.
            let _ = channel.send(deliveries);
        }
        Ok(())
    }

    async fn deliveries(&self, node: &str) -> Result<mpsc::UnboundedReceiver<Vec<NodeDelivery>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().nodes.insert(node.to_owned(), tx);
        Ok(rx)
    }

    fn changes(&self) -> broadcast::Receiver<Status> {
        self.shared.changes.subscribe()
    }

    fn restorations(&self) -> watch::Receiver<u64> {
        self.shared.restorations.subscribe()
    }

    async fn take_send(&self, user: &str, quota: Quota) -> Result<bool> {
        let mut state = self.state();
        let limiter = state.sends.entry(quota).or_insert_with(|| {
            let per_second = NonZeroU32::new(quota.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst))
        });
        Ok(limiter.check_key(&user.to_owned()).is_ok())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
