//! Presence on Redis, shared by every gateway and dispatcher of a cluster.
//!
//! Keys (every key of one user, or of one node, shares a hash tag, so Redis Cluster works):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{P:u:<user>}:devs` | sorted set | one member `node|conn|device` per connected device, scored by its expiry (ms); the key's own TTL is the presence TTL |
//! | `{P:u:<user>}:seen` | string | last seen (ms), 30 days |
//! | `{P:n:<node>}:alive` | string | the node's liveness key, a few seconds of TTL, refreshed while the node runs |
//! | `{P:n:<node>}:users` | set | users with a device on the node, so a dead node's users can be found |
//! | `{P:n:<node>}:reap` | string | lock: one process reaps a dead node |
//! | `{P}:nodes` | set | nodes that marked themselves alive and were not reaped since |
//!
//! Channels: `P:deliver:<node>` (a node's deliveries), `P:changes` (presence changes).
//!
//! Redis is a cache here: losing it loses who is online, never a message. Each process
//! remembers the devices it registered itself and writes them again after Redis comes
//! back, so presence recovers without clients reconnecting.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::clients::SubscriberClient;
use fred::interfaces::ConfigInterface;
use fred::prelude::{
    Builder, ClientLike, Config, Error as RedisError, ErrorKind, EventInterface, Expiration,
    KeysInterface, PubsubInterface, ReconnectPolicy, SetOptions, SetsInterface,
    SortedSetsInterface,
};
use fred::types::scripts::Script;
use fred::types::Value;
use tokio::sync::{broadcast, mpsc, watch};

use storage::resilience::{Backoff, Breaker, Guarded};

use super::{Location, NodeDelivery, PresenceService, Quota, Status};
use keys::{member, parse_member, Keys};

mod keys;
#[cfg(test)]
mod tests;
use crate::error::{Error, Result};

/// How long a reconnect keeps retrying to write this process's devices again.
const REASSERT_FOR: Duration = Duration::from_secs(60);
/// How to reach Redis and how long things live there.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, `rediss://…` for TLS, or `redis-cluster://h1:p1,h2:p2`.
    pub url: String,
    /// Prepended to every key and channel, so several clusters (or tests) share a server.
    pub prefix: String,
    /// A device expires this long after its last heartbeat.
    pub ttl: Duration,
    /// A node's liveness key expires this long after the node stops refreshing it; its
    /// users then go offline.
    pub node_ttl: Duration,
    /// The longest any one Redis command may take.
    pub timeout: Duration,
    /// An ACL user and password (`AUTH`), over any given in the URL.
    pub credentials: Option<storage::tls::Credentials>,
    /// TLS, with how to trust the server (see [`storage::tls::client_config`]); a
    /// `rediss://` URL without it trusts the system's roots.
    pub tls: Option<fred::rustls::ClientConfig>,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "chat".into(),
            ttl: Duration::from_secs(300),
            node_ttl: Duration::from_secs(6),
            timeout: Duration::from_secs(2),
            credentials: None,
            tls: None,
        }
    }
}

/// A cheap-clone handle to Redis presence.
#[derive(Clone)]
pub struct RedisPresence {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("prefix", &self.shared.config.prefix)
            .finish()
    }
}

struct Shared {
    config: RedisConfig,
    /// The names of every key and channel, under `config.prefix`.
    keys: Keys,
    client: fred::clients::Client,
    subscriber: SubscriberClient,
    changes: broadcast::Sender<Status>,
    /// Bumped after each rewrite of what this process registered, and after each renewal
    /// of the delivery subscriptions (deliveries published in between were lost).
    restorations: watch::Sender<u64>,
    local: Mutex<Local>,
    /// Fails fast while Redis is down; bounds every guarded operation.
    breaker: Breaker,
    /// Renews subscriptions after reconnects; stopped with the last handle.
    resubscriber: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.resubscriber.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// What this process registered itself, to write again after Redis lost it.
#[derive(Default)]
struct Local {
    /// In a Redis Cluster, one connection per primary, subscribed to its expiry
    /// notifications.
    shards: Vec<fred::clients::Client>,
    /// node → user → devices.
    devices: HashMap<String, HashMap<String, Vec<Location>>>,
    /// node → its delivery channel in this process.
    channels: HashMap<String, mpsc::UnboundedSender<Vec<NodeDelivery>>>,
}

// The scripts run by their SHA-1 (`EVALSHA`); one that finds Redis without it (a restart
// emptied its script cache) is loaded and run again (`evalsha_with_reload`).

/// Adds a device and answers 1 when the user had no live device before.
/// KEYS: devs · ARGV: member, expires, now, ttl
static CONNECT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("redis/scripts/connect.lua")));

/// Removes a device and answers 1 when it was the user's last live one (last seen is set).
/// KEYS: devs, seen · ARGV: member, now, seen ttl (s)
static DISCONNECT: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("redis/scripts/disconnect.lua")));

/// Re-adds a device (heartbeat, or after Redis lost it) and pushes the key's TTL out;
/// answers 1 when it could not be located before (gone or expired).
/// KEYS: devs · ARGV: member, expires, ttl
static REFRESH: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("redis/scripts/refresh.lua")));

/// Removes every device of a dead node from one user; answers 1 when the user has no live
/// device left (last seen is set).
/// KEYS: devs, seen · ARGV: node, now, seen ttl (s)
static REAP_USER: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("redis/scripts/reap_user.lua")));

/// GCRA on the server's clock (every gateway shares it): KEYS[1] holds the theoretical
/// arrival time in µs; ARGV: µs per send, burst. Returns 1 when the send may go.
static TAKE_SEND: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("redis/scripts/take_send.lua")));

const SEEN_TTL_SECS: i64 = 30 * 24 * 3600;
/// Users reaped, or devices written again after a reconnect, at once (the client pipelines
/// what is issued together): one after the other, at a network's round trip, a node of
/// 100,000 took longer than the reap lock lives, and a shard that refused writes cost each
/// device the command timeout in turn.
const PIPELINED: usize = 1_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The URL without the password it may carry, for errors and logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:…{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn fail(e: RedisError) -> Error {
    match e.kind() {
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled => {
            Error::Unavailable(e.to_string())
        }
        _ => Error::Backend(e.to_string()),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl RedisPresence {
    /// Connects both clients (commands, and subscriptions that are renewed after every
    /// reconnect), enables expiry notifications and starts listening. Fails when Redis
    /// cannot be reached within the timeout.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let shown = redacted(&config.url);
        let mut redis = Config::from_url(&config.url)
            .map_err(|e| Error::Backend(format!("redis url {shown:?}: {e}")))?;
        if let Some(c) = &config.credentials {
            redis.username = Some(c.username.clone());
            redis.password = Some(c.password.clone());
        }
        if let Some(tls) = &config.tls {
            redis.tls = Some(fred::types::config::TlsConnector::from(tls.clone()).into());
        } else if redis.tls.is_some() {
            let tls = storage::tls::client_config("redis", None).map_err(Error::Backend)?;
            redis.tls = Some(fred::types::config::TlsConnector::from(tls).into());
        }
        let mut builder = Builder::from_config(redis);
        let timeout = config.timeout;
        builder
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                c.max_command_attempts = 2;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                // Pub/sub messages reach our listener through this channel; a burst larger
                // than it (fred's default is 32) would drop deliveries and changes.
                p.broadcast_channel_capacity = 1 << 16;
            })
            // Reconnect forever, 100 ms doubling to 2 s: Redis coming back must heal us.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let client = builder.build().map_err(fail)?;
        let subscriber = builder.build_subscriber_client().map_err(fail)?;
        let connect = async {
            client.init().await?;
            subscriber.init().await?;
            Ok::<_, RedisError>(())
        };
        tokio::time::timeout(timeout * 3, connect)
            .await
            .map_err(|_| Error::Unavailable(format!("redis at {shown} did not answer")))?
            .map_err(|e| match fail(e) {
                Error::Unavailable(e) => Error::Unavailable(format!("redis at {shown}: {e}")),
                Error::Backend(e) => Error::Backend(format!("redis at {shown}: {e}")),
            })?;
        enable_expiry_events(&client).await;

        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            keys: Keys::new(&config.prefix),
            config,
            client,
            subscriber,
            changes,
            restorations: watch::Sender::new(0),
            local: Mutex::new(Local::default()),
            resubscriber: Mutex::new(None),
            breaker: Breaker::new("redis", timeout * 2),
        });
        *shared
            .resubscriber
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tokio::spawn(resubscribe(
            Arc::downgrade(&shared),
            shared.subscriber.reconnect_rx(),
        )));
        let weak = Arc::downgrade(&shared);
        tokio::spawn(listen(weak.clone(), shared.subscriber.message_rx()));
        tokio::spawn(expiries(
            weak.clone(),
            shared.subscriber.keyspace_event_rx(),
        ));
        tokio::spawn(reassert_on_reconnect(
            weak.clone(),
            shared.client.reconnect_rx(),
        ));
        tokio::spawn(sweep(weak));
        shared
            .subscriber
            .subscribe(shared.keys.changes_channel())
            .await
            .map_err(fail)?;
        if shared.client.is_clustered() {
            // Keyspace notifications are per shard: one connection to each primary hears
            // its shard's.
            for shard in shared.client.split_cluster().map_err(fail)? {
                let _connection = shard.init().await.map_err(fail)?;
                tokio::spawn(expiries(Arc::downgrade(&shared), shard.keyspace_event_rx()));
                tokio::spawn(resubscribe_shard(shard.clone()));
                let _: () = shard
                    .psubscribe("__keyevent@*__:expired")
                    .await
                    .map_err(fail)?;
                shared.local().shards.push(shard);
            }
        } else {
            shared
                .subscriber
                .psubscribe("__keyevent@*__:expired")
                .await
                .map_err(fail)?;
        }
        Ok(RedisPresence { shared })
    }
}

/// Renews the subscriber's subscriptions after each reconnect of it, then announces a
/// restoration: what was published to a delivery channel while its subscription was gone
/// (the subscriber's Redis, or Cluster primary, restarted) reached nobody, and the
/// catch-up that the announcement starts comes after the subscription is back, so it
/// replays every message stored before that. (fred's `manage_subscriptions` renews them
/// too, but tells nobody when it is done.)
async fn resubscribe(
    shared: Weak<Shared>,
    mut rx: broadcast::Receiver<fred::types::config::Server>,
) {
    loop {
        match rx.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let give_up = tokio::time::Instant::now() + REASSERT_FOR;
        loop {
            match shared.subscriber.resubscribe_all().await {
                Ok(()) => {
                    tracing::info!(
                        "presence: delivery subscriptions renewed after a Redis reconnect"
                    );
                    break;
                }
                Err(e) if tokio::time::Instant::now() > give_up => {
                    // The next reconnect tries again; the catch-up below still replays
                    // what was stored until now.
                    tracing::warn!(error = %e, "presence: subscriptions not renewed");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "presence: subscriptions not renewed yet");
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(2))).await;
                }
            }
        }
        shared.restorations.send_modify(|n| *n += 1);
    }
}

/// Subscribes a shard's connection to expiry notifications again after each reconnect
/// (a plain client does not renew its subscriptions); ends when the connection is closed.
async fn resubscribe_shard(shard: fred::clients::Client) {
    let mut reconnects = shard.reconnect_rx();
    loop {
        match reconnects.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        if let Err(e) = shard.psubscribe("__keyevent@*__:expired").await {
            tracing::warn!(error = %e, "presence: expiry notifications of a shard not renewed");
        }
    }
}

/// Keyspace notifications for expired keys tell every process that a device or a node
/// timed out. A managed Redis may refuse CONFIG SET; it must then be configured with
/// `notify-keyspace-events Ex` by its operator (without it, users of a dead node go
/// offline when their own TTL runs out instead of within seconds).
async fn enable_expiry_events(client: &fred::clients::Client) {
    let current: HashMap<String, String> = client
        .config_get("notify-keyspace-events")
        .await
        .unwrap_or_default();
    let flags = current
        .get("notify-keyspace-events")
        .cloned()
        .unwrap_or_default();
    let has = |c: char| flags.contains(c) || (c == 'x' && flags.contains('A'));
    if has('E') && has('x') {
        return;
    }
    let mut wanted = flags.clone();
    for c in ['E', 'x'] {
        if !has(c) {
            wanted.push(c);
        }
    }
    if let Err(e) = client.config_set("notify-keyspace-events", wanted).await {
        tracing::warn!(error = %e, "cannot enable Redis expiry notifications; set notify-keyspace-events Ex on the server");
    }
}

impl Shared {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Tells every process (this one included, through the subscription) of a change.
    async fn announce(&self, status: &Status) -> Result<()> {
        let payload = serde_json::to_string(status).map_err(|e| Error::Backend(e.to_string()))?;
        let _: i64 = self
            .client
            .publish(self.keys.changes_channel(), payload)
            .await
            .map_err(fail)?;
        Ok(())
    }

    /// Writes a device again; `true` when presence had lost it.
    async fn refresh(&self, user: &str, at: &Location) -> Result<bool> {
        let ttl = millis(self.config.ttl);
        let lost: i64 = REFRESH
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.devs_key(user)],
                vec![
                    Value::from(member(at)),
                    Value::from(now_ms() + ttl),
                    Value::from(ttl),
                ],
            )
            .await
            .map_err(fail)?;
        let _: i64 = self
            .client
            .sadd(self.keys.node_key(&at.node, "users"), user)
            .await
            .map_err(fail)?;
        Ok(lost == 1)
    }

    /// Sets a node's liveness key and lists the node; `true` when it was not listed (its
    /// first call, or another process reaped it since the last: it looked dead).
    async fn mark_alive(&self, node: &str) -> Result<bool> {
        let _: Value = self
            .client
            .set(
                self.keys.node_key(node, "alive"),
                1,
                Some(Expiration::PX(millis(self.config.node_ttl))),
                None,
                false,
            )
            .await
            .map_err(fail)?;
        // After the liveness key: a sweep never finds a listed node without one.
        let added: i64 = self
            .client
            .sadd(self.keys.nodes_key(), node)
            .await
            .map_err(fail)?;
        Ok(added == 1)
    }

    /// Reaps every listed node whose liveness key is gone: the path that needs no keyspace
    /// notification (in a Redis Cluster those are per shard, and a subscriber hears only
    /// its own shard's), and that catches a notification missed while disconnected.
    async fn sweep_dead_nodes(&self) -> Result<()> {
        let nodes: Vec<String> = self
            .client
            .smembers(self.keys.nodes_key())
            .await
            .map_err(fail)?;
        let checks = nodes.iter().map(|node| async move {
            let alive: i64 = self
                .client
                .exists(self.keys.node_key(node, "alive"))
                .await
                .map_err(fail)?;
            Ok::<_, Error>((alive == 0).then_some(node))
        });
        for node in futures_util::future::try_join_all(checks)
            .await?
            .into_iter()
            .flatten()
        {
            self.reap(node, true).await?;
        }
        Ok(())
    }

    /// Takes a dead node's devices out of presence; its users with no device elsewhere go
    /// offline. One process does it (a lock), every process hears the changes. With
    /// `only_if_dead`, a node whose liveness key is back by the time the lock is taken
    /// (found dead by a sweep or an expiry, then refreshed) is left alone.
    async fn reap(&self, node: &str, only_if_dead: bool) -> Result<()> {
        let locked: Option<String> = self
            .client
            .set(
                self.keys.node_key(node, "reap"),
                1,
                Some(Expiration::EX(30)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(fail)?;
        if locked.is_none() {
            return Ok(());
        }
        if only_if_dead {
            let alive: i64 = self
                .client
                .exists(self.keys.node_key(node, "alive"))
                .await
                .map_err(fail)?;
            if alive == 1 {
                let _: i64 = self
                    .client
                    .del(self.keys.node_key(node, "reap"))
                    .await
                    .map_err(fail)?;
                return Ok(());
            }
        }
        let users: Vec<String> = self
            .client
            .smembers(self.keys.node_key(node, "users"))
            .await
            .map_err(fail)?;
        tracing::info!(node, users = users.len(), "reaping a dead node's presence");
        for chunk in users.chunks(PIPELINED) {
            let reaped = chunk.iter().map(|user| async move {
                let now = now_ms();
                let gone: i64 = REAP_USER
                    .evalsha_with_reload(
                        &self.client,
                        vec![self.keys.devs_key(user), self.keys.seen_key(user)],
                        vec![
                            Value::from(node),
                            Value::from(now),
                            Value::from(SEEN_TTL_SECS),
                        ],
                    )
                    .await
                    .map_err(fail)?;
                if gone == 1 {
                    self.announce(&Status {
                        user: user.clone(),
                        online: false,
                        last_seen: Some(now),
                    })
                    .await?;
                }
                Ok::<_, Error>(())
            });
            futures_util::future::try_join_all(reaped).await?;
        }
        let _: i64 = self
            .client
            .del(vec![
                self.keys.node_key(node, "users"),
                self.keys.node_key(node, "reap"),
            ])
            .await
            .map_err(fail)?;
        let _: i64 = self
            .client
            .srem(self.keys.nodes_key(), node)
            .await
            .map_err(fail)?;
        Ok(())
    }

    /// Removes a device this process no longer holds from Redis (and its user from its
    /// node's set when it was the user's last device there); answers whether the user went
    /// offline, which is announced.
    async fn unregister(&self, user: &str, at: &Location) -> Result<bool> {
        let last_on_node = !self
            .local()
            .devices
            .get(&at.node)
            .is_some_and(|users| users.contains_key(user));
        let now = now_ms();
        let went_offline: i64 = DISCONNECT
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.devs_key(user), self.keys.seen_key(user)],
                vec![
                    Value::from(member(at)),
                    Value::from(now),
                    Value::from(SEEN_TTL_SECS),
                ],
            )
            .await
            .map_err(fail)?;
        if last_on_node {
            let _: i64 = self
                .client
                .srem(self.keys.node_key(&at.node, "users"), user)
                .await
                .map_err(fail)?;
        }
        if went_offline == 1 {
            self.announce(&Status {
                user: user.to_owned(),
                online: false,
                last_seen: Some(now),
            })
            .await?;
        }
        Ok(went_offline == 1)
    }

    /// Writes again every device this process holds on `node`, after another process
    /// reaped the node as dead while it ran: its users are announced online again, devices
    /// that disconnected meanwhile are removed again (as after a heartbeat), and a
    /// restoration is announced, so that the node catches its connections up (what was
    /// stored for them while they looked offline was queued, not delivered). A device that
    /// cannot be written now is written by the node's next heartbeat.
    async fn rewrite_node(&self, node: &str) {
        let devices = self.held_devices(Some(node));
        let (results, removed) = self.refresh_held(&devices).await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "presence: a device gone meanwhile was not removed again");
        }
        let mut back: Vec<&str> = Vec::new();
        let mut failed = 0usize;
        for ((user, at), result) in devices.iter().zip(results) {
            match result {
                Ok(lost) => {
                    if lost && self.holds(at, user) && back.last() != Some(&user.as_str()) {
                        back.push(user);
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::debug!(error = %e, user, "presence: device not written again");
                }
            }
        }
        for user in back {
            let status = Status {
                user: user.to_owned(),
                online: true,
                last_seen: None,
            };
            if let Err(e) = self.announce(&status).await {
                tracing::warn!(error = %e, user, "presence: coming back online not announced");
            }
        }
        tracing::info!(
            node,
            devices = devices.len(),
            failed,
            "presence: devices written again after this node was reaped"
        );
        self.restorations.send_modify(|n| *n += 1);
    }

    /// Whether this process still holds the device `at` of `user`.
    fn holds(&self, at: &Location, user: &str) -> bool {
        self.local()
            .devices
            .get(&at.node)
            .and_then(|users| users.get(user))
            .is_some_and(|held| held.iter().any(|l| l.conn == at.conn))
    }

    /// The devices this process holds, on `node` or on all its nodes; a user's devices are
    /// next to each other.
    fn held_devices(&self, node: Option<&str>) -> Vec<(String, Location)> {
        let local = self.local();
        let nodes: Vec<&HashMap<String, Vec<Location>>> = match node {
            Some(node) => local.devices.get(node).into_iter().collect(),
            None => local.devices.values().collect(),
        };
        nodes
            .into_iter()
            .flat_map(|users| {
                users.iter().flat_map(|(user, locations)| {
                    locations.iter().map(move |l| (user.clone(), l.clone()))
                })
            })
            .collect()
    }

    /// Writes `devices` again, [`PIPELINED`] at a time, then removes again each one this
    /// process no longer holds: it disconnected meanwhile, and its refresh may have reached
    /// Redis after its removal (one of thousands in flight, or one retried after a
    /// reconnect), so that it would look online until its TTL and its user get no push.
    /// Answers each refresh's result, in order (`true`: presence had lost the device), and
    /// the first removal that failed.
    async fn refresh_held(
        &self,
        devices: &[(String, Location)],
    ) -> (Vec<Result<bool>>, Result<()>) {
        let mut results = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(PIPELINED) {
            let refreshed = chunk.iter().map(|(user, at)| self.refresh(user, at));
            results.extend(futures_util::future::join_all(refreshed).await);
        }
        let mut removed = Ok(());
        for (user, at) in devices {
            if !self.holds(at, user) {
                if let Err(e) = self.unregister(user, at).await {
                    removed = removed.and(Err(e));
                }
            }
        }
        (results, removed)
    }

    /// Writes everything this process registered again (after Redis restarted).
    async fn reassert(&self) {
        let nodes: Vec<String> = self.local().channels.keys().cloned().collect();
        let devices = self.held_devices(None);
        for node in &nodes {
            if let Err(e) = self.mark_alive(node).await {
                tracing::warn!(error = %e, node, "presence: liveness key not restored");
            }
        }
        // Every device, retrying those that fail (a restarted cluster node may refuse
        // writes for a while), before the restoration is announced: the catch-up it starts
        // must come after the devices can be located again, or a message stored in between
        // would be neither delivered live nor replayed.
        let mut left = devices;
        let mut restored = 0usize;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let give_up = tokio::time::Instant::now() + REASSERT_FOR;
        loop {
            // Disconnected since: its removal may have reached Redis already.
            left.retain(|(user, at)| self.holds(at, user));
            let (results, removed) = self.refresh_held(&left).await;
            if let Err(e) = removed {
                tracing::debug!(error = %e, "presence: a device gone meanwhile was not removed again");
            }
            let mut failed = Vec::new();
            for ((user, at), result) in left.into_iter().zip(results) {
                match result {
                    Ok(_) => restored += 1,
                    Err(e) => {
                        tracing::debug!(error = %e, user, "presence: device not restored yet");
                        failed.push((user, at));
                    }
                }
            }
            if failed.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > give_up {
                tracing::warn!(
                    devices = failed.len(),
                    "presence: devices not restored; their node's next heartbeat retries"
                );
                break;
            }
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(2))).await;
            left = failed;
        }
        tracing::info!(restored, "presence written again after a Redis reconnect");
        self.restorations.send_modify(|n| *n += 1);
    }
}

async fn listen(shared: Weak<Shared>, mut rx: broadcast::Receiver<fred::types::Message>) {
    loop {
        let message = match rx.recv().await {
            Ok(message) => message,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Deliveries lost here stay pending in the store (the recipient gets them on
                // the next connect); changes are lost. Counted: it must stay at zero.
                tracing::warn!(skipped = n, "presence: pub/sub receiver lagged");
                metrics::counter!("presence_pubsub_lagged_total").increment(n);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(text) = message.value.as_str() else {
            continue;
        };
        let channel = message.channel.to_string();
        if channel == shared.keys.changes_channel() {
            match serde_json::from_str::<Status>(&text) {
                Ok(status) => {
                    let _ = shared.changes.send(status);
                }
                Err(e) => tracing::warn!(error = %e, "presence: bad change message"),
            }
            continue;
        }
        let Some(node) = shared.keys.delivery_node(&channel) else {
            continue;
        };
        let sender = shared.local().channels.get(node).cloned();
        if let Some(sender) = sender {
            match serde_json::from_str::<Vec<NodeDelivery>>(&text) {
                Ok(deliveries) => {
                    let _ = sender.send(deliveries);
                }
                Err(e) => tracing::warn!(error = %e, node, "presence: bad delivery message"),
            }
        }
    }
}

async fn expiries(shared: Weak<Shared>, mut rx: broadcast::Receiver<fred::types::KeyspaceEvent>) {
    loop {
        let event = match rx.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "presence: expiry receiver lagged");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if event.operation != "expired" {
            continue;
        }
        let Some(key) = event.key.as_str().map(str::to_owned) else {
            continue;
        };
        if let Some(user) = shared.keys.devs_user(&key) {
            // The user's last device timed out: every process hears this event, and each
            // tells its own subscribers.
            let now = now_ms();
            let _: std::result::Result<Value, _> = shared
                .client
                .set(
                    shared.keys.seen_key(user),
                    now,
                    Some(Expiration::EX(SEEN_TTL_SECS)),
                    None,
                    false,
                )
                .await;
            let _ = shared.changes.send(Status {
                user: user.to_owned(),
                online: false,
                last_seen: Some(now),
            });
        } else if let Some(node) = shared.keys.alive_node(&key) {
            let node = node.to_owned();
            tokio::spawn(async move {
                if let Err(e) = shared.reap(&node, true).await {
                    tracing::warn!(error = %e, node, "presence: reaping a dead node failed");
                }
            });
        }
    }
}

async fn reassert_on_reconnect(
    shared: Weak<Shared>,
    mut rx: broadcast::Receiver<fred::types::config::Server>,
) {
    // The first connection is not a reconnect.
    loop {
        match rx.recv().await {
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.reassert().await;
    }
}

/// Every half node TTL, reaps the nodes whose liveness key expired (see
/// `sweep_dead_nodes`); ends with the last handle.
async fn sweep(shared: Weak<Shared>) {
    loop {
        let every = match shared.upgrade() {
            Some(s) => (s.config.node_ttl / 2).max(Duration::from_millis(500)),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if let Err(e) = strong.sweep_dead_nodes().await {
            tracing::debug!(error = %e, "presence: sweeping dead nodes failed");
        }
    }
}

/// Refreshes a node's liveness key while its delivery channel is open in this process.
async fn keep_alive(shared: Weak<Shared>, node: String) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let open = strong
            .local()
            .channels
            .get(&node)
            .is_some_and(|c| !c.is_closed());
        if !open {
            return;
        }
        match strong.mark_alive(&node).await {
            Ok(false) => {}
            Ok(true) => {
                // Unlisted since the last refresh: another process found the liveness key
                // gone (this process stalled, or could not reach Redis, for longer than the
                // node TTL) and reaped the node. Its devices are written again now, not by
                // the next heartbeat up to a heartbeat interval later.
                tracing::warn!(node, "presence: this node was reaped while it ran");
                let (shared, node) = (strong.clone(), node.clone());
                tokio::spawn(async move { shared.rewrite_node(&node).await });
            }
            Err(e) => tracing::warn!(error = %e, node, "presence: liveness key not refreshed"),
        }
        let every = strong.config.node_ttl / 3;
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

/// The operations themselves; [`PresenceService`] runs each under the breaker.
impl RedisPresence {
    /// Remembers a device this process registers: its heartbeats and the rewrite after a
    /// reconnect write it (again), also when registering it failed.
    fn remember(&self, user: &str, at: &Location) {
        let mut local = self.shared.local();
        let devices = local
            .devices
            .entry(at.node.clone())
            .or_default()
            .entry(user.to_owned())
            .or_default();
        devices.retain(|l| l.conn != at.conn);
        devices.push(at.clone());
    }

    async fn connect_unguarded(&self, user: &str, at: &Location) -> Result<bool> {
        let s = &self.shared;
        let ttl = millis(s.config.ttl);
        let now = now_ms();
        let _: i64 = s
            .client
            .sadd(s.keys.node_key(&at.node, "users"), user)
            .await
            .map_err(fail)?;
        let came_online: i64 = CONNECT
            .evalsha_with_reload(
                &s.client,
                vec![s.keys.devs_key(user)],
                vec![
                    Value::from(member(at)),
                    Value::from(now + ttl),
                    Value::from(now),
                    Value::from(ttl),
                ],
            )
            .await
            .map_err(fail)?;
        if came_online == 1 {
            s.announce(&Status {
                user: user.to_owned(),
                online: true,
                last_seen: None,
            })
            .await?;
        }
        Ok(came_online == 1)
    }

    async fn disconnect_unguarded(&self, user: &str, at: &Location) -> Result<bool> {
        {
            let mut local = self.shared.local();
            if let Some(users) = local.devices.get_mut(&at.node) {
                if let Some(devices) = users.get_mut(user) {
                    devices.retain(|l| l.conn != at.conn);
                    if devices.is_empty() {
                        users.remove(user);
                    }
                }
            }
        }
        self.shared.unregister(user, at).await
    }

    async fn heartbeat_unguarded(&self, node: &str, users: &[String]) -> Result<Vec<String>> {
        let s = &self.shared;
        let devices: Vec<(String, Location)> = {
            let local = s.local();
            let Some(on_node) = local.devices.get(node) else {
                return Ok(Vec::new());
            };
            users
                .iter()
                .filter_map(|u| on_node.get(u).map(|d| (u, d)))
                .flat_map(|(u, d)| d.iter().map(move |l| (u.clone(), l.clone())))
                .collect()
        };
        let (results, removed) = s.refresh_held(&devices).await;
        removed?;
        let mut lost: Vec<String> = Vec::new();
        // A user's devices are next to each other.
        for ((user, _), result) in devices.into_iter().zip(results) {
            if result? && lost.last() != Some(&user) {
                lost.push(user);
            }
        }
        Ok(lost)
    }

    async fn status_unguarded(&self, users: &[String]) -> Result<Vec<Status>> {
        let s = &self.shared;
        let now = now_ms() as f64;
        let lookups = users.iter().map(|user| async move {
            let live: i64 = s
                .client
                .zcount(s.keys.devs_key(user), now, f64::INFINITY)
                .await
                .map_err(fail)?;
            let seen: Option<i64> = if live > 0 {
                None
            } else {
                s.client.get(s.keys.seen_key(user)).await.map_err(fail)?
            };
            Ok(Status {
                user: user.clone(),
                online: live > 0,
                last_seen: seen,
            })
        });
        futures_util::future::try_join_all(lookups).await
    }

    async fn locate_unguarded(&self, users: &[String]) -> Result<HashMap<String, Vec<Location>>> {
        let s = &self.shared;
        let now = now_ms() as f64;
        let lookups = users.iter().map(|user| async move {
            let members: Vec<String> = s
                .client
                .zrangebyscore(s.keys.devs_key(user), now, f64::INFINITY, false, None)
                .await
                .map_err(fail)?;
            Ok::<_, Error>((user, members))
        });
        let mut found = HashMap::new();
        for (user, members) in futures_util::future::try_join_all(lookups).await? {
            let here: Vec<Location> = members.iter().filter_map(|m| parse_member(m)).collect();
            if !here.is_empty() {
                found.insert(user.clone(), here);
            }
        }
        Ok(found)
    }

    async fn publish_unguarded(&self, node: &str, deliveries: Vec<NodeDelivery>) -> Result<()> {
        let s = &self.shared;
        let payload =
            serde_json::to_string(&deliveries).map_err(|e| Error::Backend(e.to_string()))?;
        let _: i64 = s
            .client
            .publish(s.keys.deliver_channel(node), payload)
            .await
            .map_err(fail)?;
        Ok(())
    }

    async fn deliveries_unguarded(
        &self,
        node: &str,
    ) -> Result<mpsc::UnboundedReceiver<Vec<NodeDelivery>>> {
        let s = &self.shared;
        // A node that restarts under the same name left devices that are gone now.
        let fresh = !s.local().devices.contains_key(node);
        if fresh {
            s.reap(node, false).await?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        s.local().channels.insert(node.to_owned(), tx);
        s.subscriber
            .subscribe(s.keys.deliver_channel(node))
            .await
            .map_err(fail)?;
        s.mark_alive(node).await?;
        tokio::spawn(keep_alive(Arc::downgrade(&self.shared), node.to_owned()));
        Ok(rx)
    }

    async fn take_send_unguarded(&self, user: &str, quota: Quota) -> Result<bool> {
        let s = &self.shared;
        let interval = 1_000_000 / i64::from(quota.per_second.max(1));
        let allowed: i64 = TAKE_SEND
            .evalsha_with_reload(
                &s.client,
                vec![s.keys.sends_key(user)],
                vec![
                    Value::from(interval),
                    Value::from(i64::from(quota.burst.max(1))),
                ],
            )
            .await
            .map_err(fail)?;
        Ok(allowed == 1)
    }

    async fn ping_unguarded(&self) -> Result<()> {
        let _: String = self.shared.client.ping(None).await.map_err(fail)?;
        Ok(())
    }
}

fn counts(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_))
}

fn opened(e: Guarded<Error>) -> Error {
    match e {
        Guarded::Inner(e) => e,
        other => Error::Unavailable(other.to_string()),
    }
}

impl PresenceService for RedisPresence {
    async fn connect(&self, user: &str, at: &Location) -> Result<bool> {
        // First, so that a device whose registration fails (or is not tried, the breaker
        // being open) is registered by the node's next heartbeat.
        self.remember(user, at);
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.connect_unguarded(user, at))
            .await
            .map_err(opened)
    }
    async fn disconnect(&self, user: &str, at: &Location) -> Result<bool> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.disconnect_unguarded(user, at))
            .await
            .map_err(opened)
    }
    async fn heartbeat(&self, node: &str, users: &[String]) -> Result<Vec<String>> {
        // Many commands: bounded by each command's own timeout, not the breaker's.
        self.heartbeat_unguarded(node, users).await
    }
    async fn status(&self, users: &[String]) -> Result<Vec<Status>> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.status_unguarded(users))
            .await
            .map_err(opened)
    }
    async fn locate(&self, users: &[String]) -> Result<HashMap<String, Vec<Location>>> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.locate_unguarded(users))
            .await
            .map_err(opened)
    }
    async fn publish(&self, node: &str, deliveries: Vec<NodeDelivery>) -> Result<()> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.publish_unguarded(node, deliveries))
            .await
            .map_err(opened)
    }
    async fn deliveries(&self, node: &str) -> Result<mpsc::UnboundedReceiver<Vec<NodeDelivery>>> {
        self.deliveries_unguarded(node).await
    }
    fn changes(&self) -> broadcast::Receiver<Status> {
        self.shared.changes.subscribe()
    }
    fn restorations(&self) -> watch::Receiver<u64> {
        self.shared.restorations.subscribe()
    }

    async fn take_send(&self, user: &str, quota: Quota) -> Result<bool> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.take_send_unguarded(user, quota))
            .await
            .map_err(opened)
    }
    async fn ping(&self) -> Result<()> {
        let breaker = &self.shared.breaker;
        breaker
            .call(counts, self.ping_unguarded())
            .await
            .map_err(opened)
    }
}
