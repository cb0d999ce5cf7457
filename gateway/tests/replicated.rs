//! The cluster on replicated servers (`infra/servers.sh up-replicated`, the test command's
//! last stage): three Kafka brokers (topics with replication factor 3 and
//! `min.insync.replicas=2`) and three Cassandra nodes (keyspace RF 3, LOCAL_QUORUM). A
//! server node is SIGKILLed while messages flow: no `sent` message is lost, clients see
//! nothing worse than `unavailable` answers they retry, and the node comes back.
//!
//! Runs only when `CHAT_TEST_CLUSTER` is set and `TEST_REPLICATION` is 3; one test at a
//! time (each kills a server the other needs).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{start, Client};
use serde_json::json;

fn replicated() -> bool {
    common::cluster_mode() && common::replication() == 3
}

/// One server node started by `infra/servers.sh up-replicated`: a line of its `pids` file.
struct Node {
    pid: u32,
    kind: String,
    port: String,
    dir: String,
}

fn state_dir() -> PathBuf {
    PathBuf::from(common::server("TEST_SERVERS_STATE"))
}

/// The nodes of one kind, in the order they were first started (a restarted node's later
/// line replaces its earlier one).
fn nodes(kind: &str) -> Vec<Node> {
    let pids = std::fs::read_to_string(state_dir().join("pids")).expect("servers' pids file");
    let mut nodes: Vec<Node> = Vec::new();
    for node in pids.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let node = Node {
            pid: fields.next()?.parse().ok()?,
            kind: fields.next()?.to_owned(),
            port: fields.next()?.to_owned(),
            dir: fields.next()?.to_owned(),
        };
        (node.kind == kind).then_some(node)
    }) {
        match nodes.iter_mut().find(|n| n.dir == node.dir) {
            Some(earlier) => *earlier = node,
            None => nodes.push(node),
        }
    }
    nodes
}

fn sigkill(node: &Node) {
    let status = std::process::Command::new("kill")
        .args(["-9", &node.pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -9 {}", node.pid);
}

/// Starts a killed node again on its directory and port (it rejoins its cluster), and
/// records it so that `infra/servers.sh down` stops it too.
fn restart(node: &Node) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/servers.sh");
    let log = std::fs::File::create(format!("{}.restarted.log", node.dir)).expect("log file");
    let mut child = std::process::Command::new(script)
        .args(["run", &node.kind, &node.dir, &node.port])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the node again");
    let line = format!("{} {} {} {}\n", child.id(), node.kind, node.port, node.dir);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(state_dir().join("pids"))
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .expect("record the restarted node");
    // Reaped if it exits while the tests run; it outlives them otherwise (`down` stops it).
    std::thread::spawn(move || child.wait());
}

/// Waits until a restarted node accepts connections again.
async fn answers(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What one sender got accepted, and how many `unavailable` answers it retried.
struct Sent {
    ids: BTreeSet<String>,
    retried: usize,
}

/// Sends `count` messages to `to`, 20 in flight, resending a refused one (same
/// `client_msg_id`) until it is `sent`; only `unavailable` refusals are expected.
async fn send_all(mut client: Client, to: String, count: usize) -> Sent {
    let mut ids = HashMap::new();
    let (mut next, mut in_flight, mut retried) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(180);
    while ids.len() < count {
        while next < count && in_flight < 20 {
            let cmid = format!("c{next}");
            client
                .send(json!({"type":"send","client_msg_id":cmid,"to":to,"body":cmid}))
                .await;
            next += 1;
            in_flight += 1;
        }
        let answer = client.recv_type_of(&["sent", "error"]).await;
        let cmid = answer["client_msg_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if answer["type"] == "sent" {
            in_flight -= 1;
            let id = answer["message_id"].as_str().unwrap_or_default().to_owned();
            if let Some(first) = ids.insert(cmid.clone(), id.clone()) {
                assert_eq!(first, id, "{cmid} answered two ids");
            }
        } else {
            assert_eq!(answer["code"], "unavailable", "{answer}");
            assert!(Instant::now() < deadline, "{cmid} not sent within 180 s");
            retried += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            client
                .send(json!({"type":"send","client_msg_id":cmid,"to":to,"body":cmid}))
                .await;
        }
    }
    Sent {
        ids: ids.into_values().collect(),
        retried,
    }
}

/// Reads (and acks, in batches) messages from the start, until every id of `expected`
/// (once known) arrived or 90 s after that.
async fn receive_all(
    mut client: Client,
    mut expected: tokio::sync::watch::Receiver<Option<BTreeSet<String>>>,
) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let mut unacked = Vec::new();
    let mut deadline = None;
    loop {
        if let Some(all) = expected.borrow_and_update().as_ref() {
            let until = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(90));
            if all.is_subset(&got) || Instant::now() > until {
                return got;
            }
        }
        match client.try_recv(Duration::from_millis(200)).await {
            Ok(Some(frame)) if frame["type"] == "message" => {
                let id = frame["message_id"].as_str().unwrap_or_default().to_owned();
                unacked.push(id.clone());
                got.insert(id);
            }
            Ok(_) => {}
            Err(ended) => panic!("{}: connection ended: {ended:?}", client.user),
        }
        if unacked.len() >= 50 || (!unacked.is_empty() && expected.borrow().is_some()) {
            let ids = std::mem::take(&mut unacked);
            client.send(json!({"type":"ack","message_ids":ids})).await;
        }
    }
}

/// Five senders, 300 messages each, to five recipients on the other gateway; `fault`
/// runs once the first messages are through. Every accepted message must be delivered
/// and stored exactly once.
async fn load_through(fault: impl FnOnce(&str)) {
    const PAIRS: usize = 5;
    const PER_SENDER: usize = 300;
    let gw = start(|c| {
        c.rate_per_sec = 100_000;
        c.rate_burst = 100_000;
    })
    .await;
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    let mut expected_tx = Vec::new();
    let mut first_sender = None;
    for i in 0..PAIRS {
        // Connections alternate between the gateways: sender on one, recipient on the other.
        let sender = gw.connect(&format!("s{i}")).await;
        let recipient = gw.connect(&format!("r{i}")).await;
        let (tx, rx) = tokio::sync::watch::channel(None);
        expected_tx.push(tx);
        recipients.push(tokio::spawn(receive_all(recipient, rx)));
        if i == 0 {
            first_sender = Some(sender);
        } else {
            senders.push((
                i,
                tokio::spawn(send_all(sender, format!("r{i}"), PER_SENDER)),
            ));
        }
    }
    // The fault once messages flow: after the first sender's first `sent`.
    let mut first = first_sender.expect("a sender");
    let probe = first.send_message("r0", "before the fault", "probe").await;
    let node = gw.node();
    fault(node.strip_suffix("-a").unwrap_or(&node));
    let started = Instant::now();
    senders.insert(
        0,
        (
            0,
            tokio::spawn(send_all(first, "r0".into(), PER_SENDER - 1)),
        ),
    );
    let mut retried = 0;
    for ((i, sender), (recipient, expected)) in senders
        .into_iter()
        .zip(recipients.into_iter().zip(expected_tx))
    {
        let mut sent = sender.await.expect("sender");
        retried += sent.retried;
        if i == 0 {
            sent.ids
                .insert(probe["message_id"].as_str().unwrap_or_default().to_owned());
        }
        let _ = expected.send(Some(sent.ids.clone()));
        let got = recipient.await.expect("recipient");
        let missing: Vec<_> = sent.ids.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "r{i} never got {} accepted messages: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        // Stored once each: the conversation's history is exactly what was accepted.
        let mut reader = gw.connect_device(&format!("s{i}"), "laptop").await;
        let mut history = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut request = json!({"type":"history","ref":"h","conversation":format!("dm:r{i}:s{i}"),"limit":100});
            if let Some(before) = &before {
                request["before"] = json!(before);
            }
            reader.send(request).await;
            let page = reader.recv_type("history").await;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            history.extend(
                messages
                    .iter()
                    .filter_map(|m| m["message_id"].as_str().map(str::to_owned)),
            );
            before = history.last().cloned();
            if page["more"] != true {
                break;
            }
        }
        let unique: BTreeSet<String> = history.iter().cloned().collect();
        assert_eq!(unique.len(), history.len(), "a message is stored twice");
        assert_eq!(
            unique, sent.ids,
            "s{i}: history holds exactly the accepted messages"
        );
    }
    eprintln!(
        "every accepted message delivered and stored once, {:?} after the fault; {retried} \
         `unavailable` answers retried",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_killed_under_load_loses_no_sent_message() {
    if !replicated() {
        return;
    }
    let brokers = nodes("kafka");
    assert_eq!(brokers.len(), 3, "three brokers");
    let restart_later = std::cell::Cell::new(None);
    // The victim is chosen once the topics exist: the broker leading the most partitions
    // of the messages topic (at least two of the four), every one of them busy.
    load_through(|tag| {
        let leader = busiest_leader(&format!("{tag}.messages"));
        let victim = &brokers[usize::try_from(leader - 1).expect("broker ids are 1-3")];
        sigkill(victim);
        restart_later.set(Some(leader));
    })
    .await;
    let leader = restart_later.get().expect("a broker was killed");
    let victim = &brokers[usize::try_from(leader - 1).expect("broker ids are 1-3")];
    restart(victim);
    answers(&format!("127.0.0.1:{}", victim.port)).await;
}

/// The id (1-3, the node directory's number) of the broker that leads the most partitions
/// of `topic`.
fn busiest_leader(topic: &str) -> i32 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::server("TEST_KAFKA_BROKERS"))
        .create()
        .expect("a Kafka client");
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut led: HashMap<i32, usize> = HashMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        *led.entry(partition.leader()).or_default() += 1;
    }
    let (leader, count) = led
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .expect("the topic has partitions");
    assert!(
        count >= 2,
        "{topic}: the busiest leader leads {count} partitions"
    );
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cassandra_node_killed_under_load_loses_nothing() {
    if !replicated() {
        return;
    }
    let cassandra = nodes("cassandra");
    assert_eq!(cassandra.len(), 3, "three Cassandra nodes");
    // Not the seed: the others find each other through it when the victim comes back.
    let victim = &cassandra[2];
    load_through(|_| sigkill(victim)).await;
    restart(victim);
    answers(&format!("127.0.0.3:{}", victim.port)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_lost_and_restarted_strands_nothing() {
    if !replicated() {
        return;
    }
    const PAIRS: usize = 6;
    const PER_SENDER: usize = 60;
    let masters = nodes("redis-cluster");
    assert_eq!(masters.len(), 3, "three Redis masters");
    let gw = start(|c| {
        c.rate_per_sec = 100_000;
        c.rate_burst = 100_000;
    })
    .await;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut expected = Vec::new();
    for i in 0..PAIRS {
        let sender = gw.connect(&format!("m{i}")).await;
        let recipient = gw.connect(&format!("n{i}")).await;
        let (tx, rx) = tokio::sync::watch::channel(None);
        expected.push(tx);
        receivers.push(tokio::spawn(receive_all(recipient, rx)));
        senders.push(sender);
    }
    // A master without replicas goes: its slots (presence, budgets and liveness of the
    // users and nodes hashed there) are gone until it is back, empty. Messages keep being
    // stored; once it is back, presence is written again and the recipients, connected all
    // along, get everything (live, or by the catch-up).
    let victim = &masters[1];
    sigkill(victim);
    let sending: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(send_all(s, format!("n{i}"), PER_SENDER)))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    restart(victim);
    answers(&format!("127.0.0.1:{}", victim.port)).await;
    let mut retried = 0;
    for (i, ((sender, receiver), expected)) in
        sending.into_iter().zip(receivers).zip(expected).enumerate()
    {
        let sent = sender.await.expect("sender");
        retried += sent.retried;
        let _ = expected.send(Some(sent.ids.clone()));
        let got = receiver.await.expect("recipient");
        let missing: Vec<_> = sent.ids.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "n{i} (connected all along) never got {} accepted messages: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    eprintln!("every accepted message reached its connected recipient; {retried} `unavailable` answers retried");
}
