//! The presence conformance suite, written once generic over [`PresenceService`] and
//! instantiated for each backend by `conformance!`.

use std::future::Future;
use std::time::Duration;

use presence::{
    ConnRef, Location, MemoryPresence, NodeDelivery, Payload, Presence, PresenceService, Quota,
    RedisConfig, RedisPresence, Status,
};
use storage::Conversation;
use tokio::sync::broadcast;
use tokio::time::timeout;

trait Backend {
    /// A fresh backend whose devices expire `ttl` after their last heartbeat.
    fn make(ttl: Duration) -> impl Future<Output = Presence>;

    /// False when the backend's server is not configured here (the suite is skipped,
    /// which `server_url` refuses under CI).
    fn available() -> bool {
        true
    }
}

struct Memory;

impl Backend for Memory {
    async fn make(ttl: Duration) -> Presence {
        Presence::Memory(MemoryPresence::new(ttl))
    }
}

struct Redis;

impl Backend for Redis {
    async fn make(ttl: Duration) -> Presence {
        Presence::Redis(
            RedisPresence::connect(redis_config(ttl))
                .await
                .expect("redis"),
        )
    }

    fn available() -> bool {
        server_url("TEST_REDIS_URL").is_some()
    }
}

/// The test server's settings, with a key space of the test's own on the shared server and
/// devices expiring `ttl` after their last heartbeat.
fn redis_config(ttl: Duration) -> RedisConfig {
    let url = server_url("TEST_REDIS_URL").expect("checked by available()");
    let mut config = RedisConfig::new(url);
    config.prefix = format!("t{:08x}", rand_u32());
    config.ttl = ttl;
    config
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_fields().0
}

// `server_url`: a test server's address from the environment, written once for every
// suite that needs real servers.
#[path = "../../storage/tests/common/mod.rs"]
mod servers;
use servers::server_url;

fn at(node: &str, device: &str, conn: u64) -> Location {
    Location {
        node: node.into(),
        device: device.into(),
        conn,
    }
}

async fn next_change(rx: &mut broadcast::Receiver<Status>, user: &str) -> Status {
    timeout(Duration::from_secs(10), async {
        loop {
            let status = rx.recv().await.expect("changes channel");
            if status.user == user {
                return status;
            }
        }
    })
    .await
    .expect("a presence change within 10 s")
}

/// The next `n` users announced online, sorted.
async fn online(rx: &mut broadcast::Receiver<Status>, n: usize) -> Vec<String> {
    let mut users = Vec::new();
    timeout(Duration::from_secs(10), async {
        while users.len() < n {
            let status = rx.recv().await.expect("changes channel");
            if status.online && !users.contains(&status.user) {
                users.push(status.user);
            }
        }
    })
    .await
    .expect("presence changes within 10 s");
    users.sort();
    users
}

async fn online_while_any_device_is_connected<B: Backend>() {
    let p = B::make(Duration::from_secs(60)).await;
    let mut changes = p.changes();
    let user = "alice";
    assert_eq!(
        p.status(&[user.into()]).await.expect("status"),
        vec![Status {
            user: user.into(),
            online: false,
            last_seen: None
        }]
    );
    assert!(p
        .connect(user, &at("n1", "phone", 1))
        .await
        .expect("connect"));
    assert_eq!(
        next_change(&mut changes, user).await,
        Status {
            user: user.into(),
            online: true,
            last_seen: None
        }
    );
    assert!(
        !p.connect(user, &at("n2", "laptop", 7))
            .await
            .expect("connect"),
        "second device"
    );

    assert!(!p
        .disconnect(user, &at("n1", "phone", 1))
        .await
        .expect("disconnect"));
    assert!(p.status(&[user.into()]).await.expect("status")[0].online);
    assert!(!p
        .disconnect(user, &at("n1", "phone", 1))
        .await
        .expect("disconnect twice"));

    assert!(p
        .disconnect(user, &at("n2", "laptop", 7))
        .await
        .expect("disconnect"));
    let offline = next_change(&mut changes, user).await;
    assert!(!offline.online);
    assert!(offline.last_seen.is_some());
    let status = p.status(&[user.into()]).await.expect("status");
    assert_eq!(status[0], offline);
}

async fn locate_finds_every_device<B: Backend>() {
    let p = B::make(Duration::from_secs(60)).await;
    p.connect("bob", &at("n1", "phone", 1))
        .await
        .expect("connect");
    p.connect("bob", &at("n2", "web", 2))
        .await
        .expect("connect");
    p.connect("carol", &at("n1", "phone", 3))
        .await
        .expect("connect");
    let found = p
        .locate(&["bob".into(), "carol".into(), "nobody".into()])
        .await
        .expect("locate");
    let mut bob = found.get("bob").cloned().expect("bob located");
    bob.sort_by_key(|l| l.conn);
    assert_eq!(bob, vec![at("n1", "phone", 1), at("n2", "web", 2)]);
    assert_eq!(found.get("carol"), Some(&vec![at("n1", "phone", 3)]));
    assert!(!found.contains_key("nobody"));
}

async fn deliveries_reach_the_node_channel<B: Backend>() {
    let p = B::make(Duration::from_secs(60)).await;
    let mut n1 = p.deliveries("n1").await.expect("subscribe");
    let mut n2 = p.deliveries("n2").await.expect("subscribe");
    let delivery = NodeDelivery {
        users: vec!["bob".into()],
        except: Some(ConnRef {
            node: "n1".into(),
            conn: 4,
        }),
        payload: Payload::Typing {
            conversation: Conversation::direct("alice", "bob"),
            user: "alice".into(),
        },
    };
    let answer = NodeDelivery {
        users: vec!["alice".into()],
        except: None,
        payload: Payload::Sent {
            conn: 4,
            client_msg_id: "c-1".into(),
            message_id: uuid::Uuid::now_v7(),
            conversation: Conversation::direct("alice", "bob"),
            ts: 1,
        },
    };
    // Several deliveries published together arrive together, in order.
    let batch = vec![delivery.clone(), answer];
    p.publish("n1", batch.clone()).await.expect("publish");
    let got = timeout(Duration::from_secs(10), n1.recv())
        .await
        .expect("in time");
    assert_eq!(got, Some(batch));
    assert!(n2.try_recv().is_err(), "n2 must not see n1's deliveries");
    // Publishing to a node nobody listens on is not an error.
    p.publish("gone", vec![delivery])
        .await
        .expect("publish to a dead node");
}

async fn devices_expire_without_heartbeats<B: Backend>() {
    let p = B::make(Duration::from_millis(1500)).await;
    let mut changes = p.changes();
    p.connect("dave", &at("dead-node", "phone", 1))
        .await
        .expect("connect");
    assert!(next_change(&mut changes, "dave").await.online);
    // Redis expires a key when it is read after its TTL, or when its expiry cycle, which
    // looks at 20 keys with a TTL at a time, comes across it: on a server holding thousands
    // of keys with a TTL (every user's last-seen time), that can take longer than this
    // test waits. So it reads meanwhile, as the gateways do.
    let started = std::time::Instant::now();
    let gone = loop {
        let _ = p.locate(&["dave".into()]).await.expect("locate");
        if let Ok(status) = timeout(
            Duration::from_millis(100),
            next_change(&mut changes, "dave"),
        )
        .await
        {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no presence change within 10 s"
        );
    };
    assert!(!gone.online, "the dead node's user went offline");
    assert!(p.locate(&["dave".into()]).await.expect("locate").is_empty());
}

async fn heartbeats_keep_devices_alive<B: Backend>() {
    let p = B::make(Duration::from_millis(1500)).await;
    p.connect("erin", &at("n1", "phone", 1))
        .await
        .expect("connect");
    // Five heartbeats 500 ms apart cover more than the TTL.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lost = p
            .heartbeat("n1", &["erin".into()])
            .await
            .expect("heartbeat");
        assert!(lost.is_empty(), "a heartbeat in time finds nothing lost");
    }
    assert!(p.status(&["erin".into()]).await.expect("status")[0].online);
}

async fn a_send_budget_allows_a_burst_then_refills<B: Backend>() {
    let p = B::make(Duration::from_secs(30)).await;
    let quota = Quota {
        per_second: 4,
        burst: 5,
    };
    for i in 0..5 {
        assert!(
            p.take_send("fay", quota).await.expect("take"),
            "send {i} of the burst"
        );
    }
    assert!(
        !p.take_send("fay", quota).await.expect("take"),
        "the burst is spent"
    );
    assert!(
        !p.take_send("fay", quota).await.expect("take"),
        "and stays spent"
    );
    assert!(
        p.take_send("gus", quota).await.expect("take"),
        "another user has a budget of their own"
    );
    // One send comes back every 250 ms: poll until it has.
    let started = std::time::Instant::now();
    while !p.take_send("fay", quota).await.expect("take") {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the budget never refilled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !p.take_send("fay", quota).await.expect("take"),
        "it refills one send at a time"
    );
}

/// One test per scenario for one backend.
macro_rules! instantiate {
    ($module:ident => $backend:ident: $($scenario:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $scenario() {
                    if !<super::$backend as super::Backend>::available() {
                        return;
                    }
                    super::$scenario::<super::$backend>().await;
                }
            )*
        }
    };
}

/// Every scenario, listed once, against both backends.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        instantiate!(memory => Memory: $($scenario),*);
        instantiate!(redis => Redis: $($scenario),*);
    };
}

conformance!(
    online_while_any_device_is_connected,
    locate_finds_every_device,
    deliveries_reach_the_node_channel,
    devices_expire_without_heartbeats,
    heartbeats_keep_devices_alive,
    a_send_budget_allows_a_burst_then_refills,
);

/// Held by the test that empties the shared server's script cache twice and by the test
/// that runs thousands of scripts: a flush between a script's reload and its retry fails
/// the call, which that test would report as its own failure.
static SCRIPT_CACHE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Redis only: the scripts run by their SHA-1 (`EVALSHA`), so a server whose script cache
/// was emptied (a restart, `SCRIPT FLUSH`) must be given them again.
#[tokio::test]
async fn redis_scripts_run_again_after_the_script_cache_is_flushed() {
    use fred::interfaces::{ClientLike, LuaInterface};
    if !Redis::available() {
        return;
    }
    let _flushing = SCRIPT_CACHE.lock().await;
    let p = Redis::make(Duration::from_secs(30)).await;
    let quota = Quota {
        per_second: 1,
        burst: 2,
    };
    assert!(p.take_send("hal", quota).await.expect("take"));
    assert!(p
        .connect("hal", &at("n1", "phone", 1))
        .await
        .expect("connect"));
    let url = server_url("TEST_REDIS_URL").expect("checked by available()");
    let config = fred::prelude::Config::from_url(&url).expect("the test server's url");
    let admin = fred::prelude::Builder::from_config(config)
        .build()
        .expect("a client");
    admin.init().await.expect("connecting");
    admin
        .script_flush_cluster(false)
        .await
        .expect("SCRIPT FLUSH");
    assert!(
        p.take_send("hal", quota)
            .await
            .expect("take after the flush"),
        "the second send of the burst"
    );
    assert!(
        !p.take_send("hal", quota).await.expect("take"),
        "the budget was kept across the flush"
    );
    admin
        .script_flush_cluster(false)
        .await
        .expect("SCRIPT FLUSH");
    assert!(p
        .disconnect("hal", &at("n1", "phone", 1))
        .await
        .expect("disconnect after the flush"));
    assert!(!p.status(&["hal".into()]).await.expect("status")[0].online);
}

/// Redis only: a device that presence lost while its node ran (Redis came back empty, or
/// another process reaped the node as dead) is written again by the next heartbeat, which
/// says so: the node then catches its connections up.
#[tokio::test]
async fn redis_a_heartbeat_writes_a_lost_device_again_and_says_so() {
    use fred::interfaces::{ClientLike, KeysInterface};
    if !Redis::available() {
        return;
    }
    let config = redis_config(Duration::from_secs(30));
    let url = config.url.clone();
    let prefix = config.prefix.clone();
    let p = Presence::Redis(RedisPresence::connect(config).await.expect("redis"));
    p.connect("ivy", &at("n1", "phone", 1))
        .await
        .expect("connect");
    assert!(
        p.heartbeat("n1", &["ivy".into()])
            .await
            .expect("heartbeat")
            .is_empty(),
        "nothing lost yet"
    );
    let admin = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&url).expect("the test server's url"),
    )
    .build()
    .expect("a client");
    admin.init().await.expect("connecting");
    let deleted: i64 = admin
        .del(format!("{{{prefix}:u:ivy}}:devs"))
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the device's key, as the module doc names it");
    assert!(p.locate(&["ivy".into()]).await.expect("locate").is_empty());
    assert_eq!(
        p.heartbeat("n1", &["ivy".into()]).await.expect("heartbeat"),
        vec!["ivy".to_owned()],
        "the heartbeat says whose lost device it wrote again"
    );
    assert_eq!(
        p.locate(&["ivy".into()]).await.expect("locate")["ivy"].len(),
        1,
        "located again"
    );
    assert!(
        p.heartbeat("n1", &["ivy".into()])
            .await
            .expect("heartbeat")
            .is_empty(),
        "and the next one finds it there"
    );
}

/// Redis only: a node that another process reaped as dead while it ran (it stalled, or
/// could not reach Redis, for longer than the node TTL) writes its devices again at its
/// next liveness refresh — its users are announced online again and a restoration is
/// announced, so that it catches its connections up — instead of leaving them offline
/// (messages to them queued, not delivered) until its next heartbeat.
#[tokio::test]
async fn redis_a_node_reaped_while_it_runs_writes_its_devices_again() {
    use fred::interfaces::{ClientLike, KeysInterface, SetsInterface};
    if !Redis::available() {
        return;
    }
    let _scripts = SCRIPT_CACHE.lock().await;
    let mut config = redis_config(Duration::from_secs(30));
    let url = config.url.clone();
    // Liveness refreshed every second.
    config.node_ttl = Duration::from_secs(3);
    let prefix = config.prefix.clone();
    let p = Presence::Redis(RedisPresence::connect(config).await.expect("redis"));
    let _n1 = p.deliveries("n1").await.expect("deliveries");
    let mut changes = p.changes();
    p.connect("kim", &at("n1", "phone", 1))
        .await
        .expect("connect");
    p.connect("lou", &at("n1", "laptop", 2))
        .await
        .expect("connect");
    assert_eq!(online(&mut changes, 2).await, ["kim", "lou"], "connected");
    let mut restorations = p.restorations();
    // What a reap leaves, as the module doc names the keys: the users' devices gone, the
    // node's user set gone, the node unlisted.
    let admin = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&url).expect("the test server's url"),
    )
    .build()
    .expect("a client");
    admin.init().await.expect("connecting");
    for key in [
        format!("{{{prefix}:u:kim}}:devs"),
        format!("{{{prefix}:u:lou}}:devs"),
        format!("{{{prefix}:n:n1}}:users"),
    ] {
        let deleted: i64 = admin.del(&key).await.expect("DEL");
        assert_eq!(deleted, 1, "{key}, as the module doc names it");
    }
    let unlisted: i64 = admin
        .srem(format!("{{{prefix}}}:nodes"), "n1")
        .await
        .expect("SREM");
    assert_eq!(unlisted, 1, "the node was listed");
    assert!(p
        .locate(&["kim".into(), "lou".into()])
        .await
        .expect("locate")
        .is_empty());
    // Well before the next heartbeat (30 s by default; this test sends none).
    timeout(Duration::from_secs(5), restorations.changed())
        .await
        .expect("a restoration within 5 s")
        .expect("presence open");
    let located = p
        .locate(&["kim".into(), "lou".into()])
        .await
        .expect("locate");
    assert_eq!(located.get("kim").map(Vec::len), Some(1), "{located:?}");
    assert_eq!(located.get("lou").map(Vec::len), Some(1), "{located:?}");
    assert_eq!(
        online(&mut changes, 2).await,
        ["kim", "lou"],
        "announced online again"
    );
    let listed: bool = admin
        .sismember(format!("{{{prefix}}}:nodes"), "n1")
        .await
        .expect("SISMEMBER");
    assert!(listed, "the node is listed again");
}

/// Redis only: devices that disconnect while their node's heartbeat is refreshing them stay
/// offline. A refresh that reaches Redis after the device's removal (one of thousands in
/// flight, or one retried after a reconnect) wrote it back until its TTL, and its user got
/// no push meanwhile. The devices go last to first, so that the removals of the devices
/// refreshed last overtake their refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_devices_that_disconnect_during_a_heartbeat_stay_offline() {
    if !Redis::available() {
        return;
    }
    let _scripts = SCRIPT_CACHE.lock().await;
    let p = std::sync::Arc::new(Redis::make(Duration::from_secs(30)).await);
    let users: Vec<String> = (0..2_000).map(|i| format!("racer{i}")).collect();
    for (conn, user) in (0u64..).zip(&users) {
        p.connect(user, &at("n1", "phone", conn))
            .await
            .expect("connect");
    }
    let heartbeat = tokio::spawn({
        let (p, users) = (p.clone(), users.clone());
        async move { p.heartbeat("n1", &users).await }
    });
    let disconnects = tokio::spawn({
        let (p, users) = (p.clone(), users.clone());
        async move {
            let devices: Vec<(u64, &String)> = (0u64..).zip(&users).collect();
            for (conn, user) in devices.into_iter().rev() {
                p.disconnect(user, &at("n1", "phone", conn))
                    .await
                    .expect("disconnect");
            }
        }
    });
    heartbeat.await.expect("heartbeat task").expect("heartbeat");
    disconnects.await.expect("disconnect task");
    let left = p.locate(&users).await.expect("locate");
    let mut some: Vec<_> = left.keys().collect();
    some.sort();
    some.truncate(5);
    assert!(
        left.is_empty(),
        "{} of {} disconnected users still located, among them {some:?}",
        left.len(),
        users.len()
    );
}

/// Redis only: a node that restarts under the same name takes the devices its previous
/// process left out of presence, all of them, when it opens its deliveries: here 5,000
/// users' devices left by another process (the reap runs them in chunks of 1,000,
/// pipelined). Their users are offline afterwards, with a last-seen time.
#[tokio::test]
async fn redis_a_restarted_node_reaps_every_device_its_previous_process_left() {
    if !Redis::available() {
        return;
    }
    let _scripts = SCRIPT_CACHE.lock().await;
    let config = redis_config(Duration::from_secs(60));
    let before = Presence::Redis(RedisPresence::connect(config.clone()).await.expect("redis"));
    let users: Vec<String> = (0..5_000).map(|i| format!("left{i}")).collect();
    futures_util::future::join_all((0u64..).zip(&users).map(|(conn, user)| {
        let before = &before;
        async move {
            before
                .connect(user, &at("n9", "phone", conn))
                .await
                .expect("connect")
        }
    }))
    .await;
    assert_eq!(
        before.locate(&users).await.expect("locate").len(),
        users.len()
    );
    let after = Presence::Redis(RedisPresence::connect(config).await.expect("redis"));
    let started = std::time::Instant::now();
    let _n9 = after.deliveries("n9").await.expect("deliveries");
    // Printed, not asserted: see ARCHITECTURE.md.
    eprintln!("reaped {} devices in {:?}", users.len(), started.elapsed());
    let left = after.locate(&users).await.expect("locate");
    assert!(
        left.is_empty(),
        "{} of {} still located",
        left.len(),
        users.len()
    );
    let statuses = after.status(&users).await.expect("status");
    assert!(
        statuses.iter().all(|s| !s.online && s.last_seen.is_some()),
        "{:?}",
        statuses.iter().find(|s| s.online || s.last_seen.is_none())
    );
}
