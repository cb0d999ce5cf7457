//! The system under test: a gateway on loopback (embedded, or a cluster of two gateways and
//! two dispatchers on the real servers). The client is in `client.rs`, private servers in
//! `servers.rs`, gateway processes in `process.rs`, the load balancer in `haproxy.rs`.
#![allow(dead_code)]

pub(crate) mod client;
pub(crate) mod haproxy;
pub(crate) mod process;
pub(crate) mod servers;

pub(crate) use client::*;

use std::net::SocketAddr;
use std::time::Duration;

use gateway::auth::Auth;
use gateway::{Config, Running};

pub(crate) const SECRET: &str = "test-secret";
/// Upper bound on waiting for any one expected event.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// `N` distinct free loopback ports, none handed out before in this process: all are held
/// at once while they are chosen, and the kernel may give a port out again once it is
/// released (a server not yet started, or stopped to be started again, does not hold its
/// port), so the ports given out are remembered.
pub(crate) fn free_ports<const N: usize>() -> [u16; N] {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut held = Vec::new();
    while held.len() < N {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener
            .local_addr()
            .expect("a bound port's address")
            .port();
        if !given.contains(&port) {
            given.push(port);
            held.push((port, listener));
        }
    }
    std::array::from_fn(|i| held[i].0)
}

/// The system under test: one embedded gateway, or, when `CHAT_TEST_CLUSTER` is set, a
/// distributed cluster of two gateways and two dispatchers on the real Kafka, CQL and
/// Redis servers named by `TEST_KAFKA_BROKERS`, `TEST_SCYLLA_NODES` and `TEST_REDIS_URL`.
/// In a cluster, clients connect through HAProxy (`infra/haproxy.cfg`, as in production)
/// and successive connections alternate between the gateways, so a test's sender and
/// recipient sit on different nodes.
pub(crate) struct TestGateway {
    pub running: Option<Running>,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    auth: Auth,
    cluster: Option<Cluster>,
}

/// The second gateway and the two dispatchers of a test cluster.
struct Cluster {
    /// The configuration the cluster's processes were started from.
    template: Config,
    peer: Option<Running>,
    peer_addr: SocketAddr,
    /// The load balancer every `connect` goes through; `gw=1|2` picks the gateway.
    lb: haproxy::Haproxy,
    dispatchers: Vec<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
    next: std::sync::atomic::AtomicUsize,
}

/// Whether this run exercises the distributed cluster (`CHAT_TEST_CLUSTER`).
pub(crate) fn cluster_mode() -> bool {
    std::env::var_os("CHAT_TEST_CLUSTER").is_some_and(|v| !v.is_empty() && v != "0")
}

pub(crate) fn server(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("CHAT_TEST_CLUSTER is set but {var} is not: run ./infra/test.sh, which starts the servers")
    })
}

/// The shared key ring of a test cluster.
pub(crate) const CLUSTER_KEYS: &str =
    "1:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The replication factor of the test servers: 3 on the replicated ones
/// (`TEST_REPLICATION`, set by `infra/servers.sh up-replicated`), else 1.
pub(crate) fn replication() -> i32 {
    std::env::var("TEST_REPLICATION")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
}

/// The credentials and TLS settings of servers that require them (`infra/servers.sh
/// up-secure` names them in `TEST_*` variables); nothing for the others.
pub(crate) fn secured(b: &mut dispatcher::startup::backends::BackendArgs) {
    use clap::ValueEnum;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(protocol) = var("TEST_KAFKA_SECURITY_PROTOCOL") {
        b.kafka_security_protocol =
            ValueEnum::from_str(&protocol, true).expect("TEST_KAFKA_SECURITY_PROTOCOL");
    }
    if let Some(mechanism) = var("TEST_KAFKA_SASL_MECHANISM") {
        b.kafka_sasl_mechanism =
            ValueEnum::from_str(&mechanism, true).expect("TEST_KAFKA_SASL_MECHANISM");
    }
    b.kafka_username = var("TEST_KAFKA_USERNAME");
    b.kafka_password = var("TEST_KAFKA_PASSWORD");
    b.kafka_ca_file = var("TEST_KAFKA_CA_FILE").map(Into::into);
    b.scylla_username = var("TEST_SCYLLA_USERNAME");
    b.scylla_password_file = var("TEST_SCYLLA_PASSWORD_FILE").map(Into::into);
    b.scylla_ca_file = var("TEST_SCYLLA_CA_FILE").map(Into::into);
    b.redis_username = var("TEST_REDIS_USERNAME");
    b.redis_password = var("TEST_REDIS_PASSWORD");
    b.redis_ca_file = var("TEST_REDIS_CA_FILE").map(Into::into);
}

/// Points a configuration at the test servers, under names of its own (`tag`).
pub(crate) fn distributed(config: &mut Config, tag: &str) {
    let b = &mut config.backends;
    b.kafka_brokers = Some(server("TEST_KAFKA_BROKERS"));
    b.kafka_topic_prefix = format!("{tag}.");
    b.kafka_partitions = 4;
    b.kafka_replication = Some(replication());
    b.kafka_group = format!("{tag}-dispatchers");
    b.scylla_nodes = server("TEST_SCYLLA_NODES")
        .split(',')
        .map(str::to_owned)
        .collect();
    b.scylla_keyspace = tag.replace('-', "_");
    b.scylla_replication = Some(replication() as u32);
    b.redis_url = Some(server("TEST_REDIS_URL"));
    b.redis_prefix = tag.to_owned();
    b.node_ttl_secs = 3;
    secured(b);
    config.keys.keys = Some(CLUSTER_KEYS.into());
    // Media on the S3 server, when the servers include one.
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(endpoint) = var("TEST_S3_ENDPOINT") {
        let m = &mut config.media;
        m.s3_endpoint = Some(endpoint);
        m.s3_bucket = var("TEST_S3_BUCKET");
        m.s3_access_key_id = var("TEST_S3_ACCESS_KEY_ID").unwrap_or_default();
        m.s3_secret_access_key = var("TEST_S3_SECRET_ACCESS_KEY").unwrap_or_default();
    }
}

/// Starts the system under test on a fresh data dir; `tune` adjusts the configuration of
/// each gateway first.
pub(crate) async fn start(tune: impl Fn(&mut Config)) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    if cluster_mode() {
        start_cluster(dir, tune).await
    } else {
        start_in(dir, tune).await
    }
}

async fn start_cluster(dir: tempfile::TempDir, tune: impl Fn(&mut Config)) -> TestGateway {
    let tag = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let config = |node: &str| {
        let mut config = Config::defaults();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin_listen = "127.0.0.1:0".parse().expect("addr");
        config.data_dir = dir.path().to_path_buf();
        config.jwt_secret = Some(SECRET.into());
        config.node_id = Some(format!("{tag}-{node}"));
        config.drain_secs = 1;
        distributed(&mut config, &tag);
        tune(&mut config);
        config
    };
    // The first gateway creates the keyspace and topics; the rest find them.
    let first = gateway::start(config("a")).await.expect("gateway a starts");
    let second = gateway::start(config("b")).await.expect("gateway b starts");
    let mut dispatchers = Vec::new();
    let template = config("dispatcher");
    for _ in 0..2 {
        let keys = storage::crypto::Keyring::parse(CLUSTER_KEYS).expect("keys");
        let backends = template
            .backends
            .connect(keys, template.presence_ttl(), template.backend_timeout())
            .await
            .expect("dispatcher backends");
        let stop = tokio_util::sync::CancellationToken::new();
        let run = dispatcher::Dispatcher::new(backends).run(stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = run.await {
                eprintln!("dispatcher failed: {e}");
            }
        });
        dispatchers.push((stop, task));
    }
    let lb = haproxy::Haproxy::start(
        &[
            (first.client_addr.port(), first.admin_addr.port()),
            (second.client_addr.port(), second.admin_addr.port()),
        ],
        true,
    )
    .await;
    TestGateway {
        client_addr: first.client_addr,
        admin_addr: first.admin_addr,
        running: Some(first),
        dir,
        auth: Auth::new(SECRET.as_bytes()),
        cluster: Some(Cluster {
            template,
            lb,
            peer_addr: second.client_addr,
            peer: Some(second),
            dispatchers,
            next: std::sync::atomic::AtomicUsize::new(0),
        }),
    }
}

/// Starts a gateway on an existing data dir.
pub(crate) async fn start_in(
    dir: tempfile::TempDir,
    tune: impl FnOnce(&mut Config),
) -> TestGateway {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().to_path_buf();
    config.jwt_secret = Some(SECRET.into());
    config.node_id = Some("test-node".into());
    config.drain_secs = 1;
    tune(&mut config);
    let running = gateway::start(config).await.expect("gateway starts");
    TestGateway {
        client_addr: running.client_addr,
        admin_addr: running.admin_addr,
        running: Some(running),
        dir,
        auth: Auth::new(SECRET.as_bytes()),
        cluster: None,
    }
}

impl TestGateway {
    /// The first gateway's node name.
    pub(crate) fn node(&self) -> String {
        self.running
            .as_ref()
            .map(|r| r.node.clone())
            .unwrap_or_default()
    }

    /// The backends `/readyz` reports in this mode.
    pub(crate) fn backend_checks(&self) -> [&'static str; 3] {
        if self.cluster.is_some() {
            ["store:scylla", "presence:redis", "log:kafka"]
        } else {
            ["store:embedded", "presence:memory", "log:memory"]
        }
    }

    pub(crate) fn token(&self, user: &str) -> String {
        self.auth.mint(user, Duration::from_secs(3600))
    }

    pub(crate) fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.client_addr)
    }

    pub(crate) fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.client_addr)
    }

    pub(crate) fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    pub(crate) async fn connect(&self, user: &str) -> Client {
        self.connect_device(user, "default").await
    }

    /// Connects a device; in a cluster, through HAProxy to each gateway in turn (only to
    /// the second once the first was drained).
    pub(crate) async fn connect_device(&self, user: &str, device: &str) -> Client {
        let url = match &self.cluster {
            Some(cluster) => {
                let n = cluster
                    .next
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let gw = if n % 2 == 1 || self.running.is_none() {
                    2
                } else {
                    1
                };
                format!(
                    "ws://127.0.0.1:{}/ws?device={device}&gw={gw}",
                    cluster.lb.port
                )
            }
            None => format!("ws://{}/ws?device={device}", self.client_addr),
        };
        connect_url(&url, &self.token(user), user).await
    }

    /// Cluster only: starts draining the first gateway (the returned future waits for the
    /// end of the drain); later connections all go to the second.
    pub(crate) fn drain_first(&mut self) -> impl std::future::Future<Output = ()> + use<> {
        let running = self.running.take();
        if let Some(cluster) = &self.cluster {
            self.client_addr = cluster.peer_addr;
        }
        if let Some(running) = &running {
            running.shutdown();
        }
        async move {
            if let Some(running) = running {
                running.wait().await;
            }
        }
    }

    /// Drains and stops the system, returning its data dir for a restart.
    /// Everything the server holds of a conversation, as text, once it stopped: its
    /// messages as the store reads them with the server's own keys and, in a cluster, every
    /// record of the inbound log (Kafka). What the server could read is in there.
    pub(crate) async fn server_view(self, conversation: &str) -> String {
        use storage::MessageStore;
        let conversation: storage::Conversation = conversation.parse().expect("conversation");
        let template = self.cluster.as_ref().map(|c| c.template.clone());
        let dir = self.stop().await;
        let mut view = String::new();
        let store = match &template {
            Some(template) => {
                let keys = storage::crypto::Keyring::parse(CLUSTER_KEYS).expect("keys");
                let store = template
                    .backends
                    .connect(keys, template.presence_ttl(), template.backend_timeout())
                    .await
                    .expect("backends")
                    .store;
                view.push_str(&log_records(&template.backends.kafka_topic_prefix));
                store
            }
            None => storage::Store::Embedded(
                storage::EmbeddedStore::open(storage::EmbeddedConfig::new(dir.path()))
                    .await
                    .expect("open the store"),
            ),
        };
        for message in store
            .history(&conversation, None, 100)
            .await
            .expect("history")
        {
            view.push_str(&serde_json::to_string(&message).expect("json"));
        }
        view
    }

    pub(crate) async fn stop(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await;
        }
        if let Some(mut cluster) = self.cluster.take() {
            if let Some(peer) = cluster.peer.take() {
                peer.shutdown();
                peer.wait().await;
            }
            for (stop, task) in cluster.dispatchers {
                stop.cancel();
                let _ = task.await;
            }
        }
        self.dir
    }

    /// Waits until a metric reaches `at_least` (metrics are updated after the frames
    /// that cause them are sent, so a test awaits them like any other event).
    pub(crate) async fn metric_reaches(&self, name: &str, at_least: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let value = self.metric(name).await;
            if value >= at_least || tokio::time::Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.admin("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Every record of a test cluster's inbound log (`<prefix>messages`), as text.
fn log_records(prefix: &str) -> String {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message as _;
    let topic = format!("{prefix}messages");
    let mut client = rdkafka::ClientConfig::new();
    let mut backends = Config::defaults().backends;
    secured(&mut backends);
    for (key, value) in backends.security().expect("test security settings").kafka.0 {
        client.set(key, value);
    }
    let consumer: BaseConsumer = client
        .set("bootstrap.servers", server("TEST_KAFKA_BROKERS"))
        .set("group.id", format!("{prefix}reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut assignment = rdkafka::TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition.id(), Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            assignment
                .add_partition_offset(&topic, partition.id(), rdkafka::Offset::Offset(low))
                .expect("assign");
            ends.insert(partition.id(), high);
        }
    }
    consumer.assign(&assignment).expect("assign");
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} took too long"
        );
        let Some(record) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let record = record.expect("record");
        text.push_str(&String::from_utf8_lossy(
            record.payload().unwrap_or_default(),
        ));
        text.push('\n');
        if record.offset() + 1 >= ends.get(&record.partition()).copied().unwrap_or(0) {
            ends.remove(&record.partition());
        }
    }
    text
}
