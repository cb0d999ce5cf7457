//! What only a test inside the module can reach: the reap's own guard.

use super::*;

/// The test Redis from `TEST_REDIS_URL` (`infra/test.sh` sets it), on a prefix of the
/// test's own; skipped without it, except under `CI`, where a missing server is a failure.
async fn presence() -> Option<RedisPresence> {
    let url = match std::env::var("TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var_os("CI").is_some() => {
            panic!("TEST_REDIS_URL is not set: this test needs Redis (run ./infra/test.sh)")
        }
        _ => {
            eprintln!("skipped: TEST_REDIS_URL is not set (./infra/test.sh starts Redis)");
            return None;
        }
    };
    let mut config = RedisConfig::new(url);
    config.prefix = format!("t{:032x}", uuid::Uuid::new_v4().as_u128());
    // No liveness refresh or sweep of this process's own while the test runs (every 20 and
    // 30 s): the test alone decides when the node looks dead.
    config.node_ttl = Duration::from_secs(60);
    Some(RedisPresence::connect(config).await.expect("redis"))
}

/// A node found dead (its liveness key gone) whose key is back by the time the reaper holds
/// the lock (it was refreshed in between) keeps its devices; one still dead loses them.
#[tokio::test]
async fn a_reap_leaves_a_node_whose_liveness_came_back_before_the_lock() {
    let Some(p) = presence().await else {
        return;
    };
    let _n1 = p.deliveries("n1").await.expect("deliveries");
    let at = Location {
        node: "n1".into(),
        device: "phone".into(),
        conn: 1,
    };
    assert!(p.connect("kim", &at).await.expect("connect"), "came online");
    let s = &p.shared;
    let devices = || async {
        p.locate(&["kim".into()])
            .await
            .expect("locate")
            .get("kim")
            .map_or(0, Vec::len)
    };

    // As a sweep or an expiry that found the key gone reaps, the key being back now.
    s.reap("n1", true).await.expect("reap");
    assert_eq!(devices().await, 1, "a live node's device was reaped");
    let lock: i64 = s
        .client
        .exists(s.keys.node_key("n1", "reap"))
        .await
        .expect("EXISTS");
    assert_eq!(lock, 0, "the lock is given back for a later reap");

    // Still dead when the lock is held: reaped.
    let _: i64 = s
        .client
        .del(s.keys.node_key("n1", "alive"))
        .await
        .expect("DEL");
    s.reap("n1", true).await.expect("reap");
    assert_eq!(devices().await, 0, "a dead node's device was left");
}
