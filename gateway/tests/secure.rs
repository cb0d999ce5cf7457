//! The distributed mode on servers that require credentials and TLS (`infra/servers.sh
//! up-secure`, run by `infra/test.sh` as its own stage with `TEST_SECURE=1`): a cluster
//! carries messages over them, and a wrong password, a missing CA or plain text where TLS
//! is required stops start-up quickly with a message naming the backend. Elsewhere these
//! tests have no servers to talk to and return at once.

mod common;

use std::time::{Duration, Instant};

use common::{start, SECRET};
use gateway::Config;

fn secure_servers() -> bool {
    let secure = std::env::var_os("TEST_SECURE").is_some_and(|v| v == "1");
    if !secure {
        eprintln!("TEST_SECURE is not set: these tests run in infra/test.sh's secure stage");
    }
    secure
}

fn config(tune: impl Fn(&mut Config)) -> Config {
    let tag = format!("s{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.jwt_secret = Some(SECRET.into());
    common::distributed(&mut config, &tag);
    config.backend_timeout_ms = 3000;
    tune(&mut config);
    config
}

/// Starts a gateway that must fail; the error, and how long it took.
async fn refused(tune: impl Fn(&mut Config)) -> (String, Duration) {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(tune);
    config.data_dir = dir.path().to_path_buf();
    match gateway::start(config).await {
        Ok(_) => panic!("a gateway started with bad backend settings"),
        Err(e) => {
            eprintln!("refused after {:?}: {e}", started.elapsed());
            (e.to_string(), started.elapsed())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_carries_messages_over_authenticated_tls_backends() {
    if !secure_servers() {
        return;
    }
    let gw = start(|c| c.backend_timeout_ms = 5000).await;
    let mut alice = gw.connect("alice").await;
    let mut bob = gw.connect("bob").await;
    let sent = alice
        .send_message("bob", "over TLS, with passwords", "c1")
        .await;
    let message = bob.recv_type("message").await;
    assert_eq!(message["message_id"], sent["message_id"], "{message}");
    assert_eq!(message["body"], "over TLS, with passwords");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_no_tls_stop_start_up_naming_the_backend() {
    if !secure_servers() {
        return;
    }
    // Each case breaks one backend's settings; the others are right.
    let (kafka, took) = refused(|c| c.backends.kafka_password = Some("wrong".into())).await;
    assert!(
        kafka.contains("Kafka") && kafka.contains("uthentication"),
        "{kafka}"
    );
    assert!(
        took < Duration::from_secs(10),
        "Kafka refusal took {took:?}: {kafka}"
    );

    let (kafka, _) = refused(|c| {
        c.backends.kafka_security_protocol =
            dispatcher::startup::backends::KafkaSecurity::SaslPlaintext;
        c.backends.kafka_ca_file = None;
    })
    .await;
    assert!(kafka.contains("Kafka"), "{kafka}");

    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_password = dir.path().join("password");
    std::fs::write(&wrong_password, "wrong\n").expect("write");
    let (cql, took) =
        refused(|c| c.backends.scylla_password_file = Some(wrong_password.clone())).await;
    assert!(
        cql.contains("CQL") && cql.contains("uthentication"),
        "{cql}"
    );
    assert!(
        took < Duration::from_secs(10),
        "CQL refusal took {took:?}: {cql}"
    );

    let (cql, _) = refused(|c| {
        c.backends.scylla_ca_file = None;
        c.backends.scylla_tls = false;
    })
    .await;
    assert!(cql.contains("CQL"), "{cql}");

    let (redis, took) = refused(|c| c.backends.redis_password = Some("wrong".into())).await;
    assert!(
        redis.contains("redis at") && redis.contains("WRONGPASS"),
        "{redis}"
    );
    assert!(
        !redis.contains("chat-test-password"),
        "a password in an error: {redis}"
    );
    assert!(
        took < Duration::from_secs(10),
        "Redis refusal took {took:?}: {redis}"
    );

    // A server certificate the client does not trust: the system's roots do not hold
    // the test CA.
    let (redis, _) = refused(|c| c.backends.redis_ca_file = None).await;
    assert!(redis.contains("redis at"), "{redis}");

    // Settings that cannot work are refused before anything is dialled.
    let (flags, took) = refused(|c| c.backends.kafka_username = None).await;
    assert!(flags.contains("--kafka-username"), "{flags}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}
