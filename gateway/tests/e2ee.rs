//! End-to-end encryption through real WebSockets, with the reference client's Olm and
//! Megolm (vodozemac, `loadtest::e2ee`): device keys and claims, per-device ciphertexts
//! and delivery, the device-list check, group keys shared to member devices, and that the
//! server's store and log never hold a plaintext. Against the embedded gateway or, with
//! `CHAT_TEST_CLUSTER`, the cluster (devices on both gateways).

mod common;

use std::collections::BTreeSet;

use common::{start, Client, TestGateway};
use loadtest::e2ee::{DeviceId, E2eeDevice, KEYS_PER_UPLOAD};
use serde_json::{json, Value};

/// A device of the reference client: a connection and its keys.
struct Peer {
    ws: Client,
    keys: E2eeDevice,
    /// Group messages whose key has not arrived yet.
    waiting: Vec<Value>,
}

fn id(user: &str, device: &str) -> DeviceId {
    (user.to_owned(), device.to_owned())
}

fn devices_of(list: &Value) -> BTreeSet<DeviceId> {
    list.as_array()
        .map(|all| {
            all.iter()
                .map(|d| {
                    id(
                        d["user"].as_str().unwrap_or_default(),
                        d["device"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Peer {
    /// Connects a device and publishes its keys.
    async fn join(gw: &TestGateway, user: &str, device: &str) -> Peer {
        let mut peer = Peer {
            ws: gw.connect_device(user, device).await,
            keys: E2eeDevice::new(user, device),
            waiting: Vec::new(),
        };
        let upload = peer.keys.keys_upload("up", KEYS_PER_UPLOAD);
        peer.ws.send(upload).await;
        let answer = peer.answer("keys").await;
        assert_eq!(answer["one_time_keys"], KEYS_PER_UPLOAD, "{answer}");
        peer
    }

    /// The next frame of type `kind`, keeping to-device messages (group keys) on the way.
    async fn answer(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.ws.recv().await;
            match frame["type"].as_str().unwrap_or("") {
                k if k == kind => return frame,
                "to_device" => self.take_to_device(&frame).await,
                "message" => self.waiting.push(frame),
                "receipt" | "presence" | "typing" | "group" | "keys_low" => {}
                _ => panic!("{}: expected {kind}, got {frame}", self.keys.user),
            }
        }
    }

    async fn take_to_device(&mut self, frame: &Value) {
        self.keys
            .receive_to_device(frame)
            .unwrap_or_else(|e| panic!("{}: to-device message: {e}", self.keys.user));
        let notice = frame["notice_id"].clone();
        self.ws
            .send(json!({"type":"ack","notice_ids":[notice]}))
            .await;
    }

    /// The current devices of these users.
    async fn devices(&mut self, users: &[&str]) -> Vec<DeviceId> {
        self.ws
            .send(json!({"type":"devices","ref":"d","users":users}))
            .await;
        let answer = self.answer("devices").await;
        self.keys.learn_devices(&answer).expect("devices")
    }

    /// Olm sessions with each of `devices` this device has none with yet.
    async fn sessions_with(&mut self, devices: &[DeviceId]) {
        let missing = self.keys.without_session(devices);
        if missing.is_empty() {
            return;
        }
        let named: Vec<Value> = missing
            .iter()
            .map(|(u, d)| json!({"user":u,"device":d}))
            .collect();
        self.ws
            .send(json!({"type":"keys_claim","ref":"c","devices":named}))
            .await;
        let claimed = self.answer("keys_claimed").await;
        self.keys.start_sessions(&claimed).expect("sessions");
    }

    /// Sends an encrypted direct message to `to`'s devices and this user's other ones, as
    /// listed now; the answer (`sent` or `error`).
    async fn send_direct(&mut self, to: &str, text: &str, cmid: &str) -> Value {
        let me = self.keys.user.clone();
        let devices = self.devices(&[to, &me]).await;
        self.send_direct_to(to, &devices, text, cmid).await
    }

    /// As `send_direct`, to the devices given.
    async fn send_direct_to(
        &mut self,
        to: &str,
        devices: &[DeviceId],
        text: &str,
        cmid: &str,
    ) -> Value {
        self.sessions_with(devices).await;
        let e2ee = self.keys.encrypt_direct(devices, text).expect("encrypt");
        self.ws
            .send(json!({"type":"send","client_msg_id":cmid,"to":to,"e2ee":e2ee}))
            .await;
        self.answer_to(cmid).await
    }

    /// The `sent` or `error` for a send.
    async fn answer_to(&mut self, cmid: &str) -> Value {
        loop {
            let frame = self.ws.recv().await;
            match frame["type"].as_str().unwrap_or("") {
                "sent" | "error" if frame["client_msg_id"] == cmid => return frame,
                "to_device" => self.take_to_device(&frame).await,
                "message" => self.waiting.push(frame),
                "receipt" | "presence" | "typing" | "group" | "keys_low" => {}
                _ => panic!(
                    "{}: expected an answer to {cmid}, got {frame}",
                    self.keys.user
                ),
            }
        }
    }

    /// Shares this device's group session for `conversation` with every member device
    /// (a new one when they changed), then sends `text` in it; the answer.
    async fn send_group(
        &mut self,
        conversation: &str,
        members: &[&str],
        text: &str,
        cmid: &str,
    ) -> Value {
        let devices = self.devices(members).await;
        self.sessions_with(&devices).await;
        if let Some(share) = self
            .keys
            .share_group_key(conversation, &devices)
            .expect("share")
        {
            let mut share = share;
            share["ref"] = json!("share");
            self.ws.send(share).await;
            self.answer("to_device_sent").await;
        }
        let e2ee = self
            .keys
            .encrypt_group(conversation, text)
            .expect("encrypt");
        self.ws
            .send(
                json!({"type":"send","client_msg_id":cmid,"conversation":conversation,"e2ee":e2ee}),
            )
            .await;
        self.answer_to(cmid).await
    }

    /// The next end-to-end encrypted message for this device, decrypted and acked.
    async fn read(&mut self) -> (Value, String) {
        loop {
            // Server-encrypted messages (the tests' fences) are not what this reads.
            self.waiting.retain(|m| m.get("e2ee").is_some());
            if let Some(at) = self.waiting.iter().position(|m| self.keys.can_decrypt(m)) {
                let frame = self.waiting.remove(at);
                let text = self.keys.decrypt(&frame).unwrap_or_else(|e| {
                    panic!("{}/{}: {e}: {frame}", self.keys.user, self.keys.device)
                });
                let message_id = frame["message_id"].clone();
                self.ws
                    .send(json!({"type":"ack","message_ids":[message_id]}))
                    .await;
                return (frame, text);
            }
            let frame = self.ws.recv().await;
            match frame["type"].as_str().unwrap_or("") {
                "message" => self.waiting.push(frame),
                "to_device" => self.take_to_device(&frame).await,
                "receipt" | "presence" | "typing" | "group" | "keys_low" => {}
                _ => panic!("{}: expected a message, got {frame}", self.keys.user),
            }
        }
    }

    /// Every frame queued for this device now (a ping's round trip), to-device messages
    /// taken; the messages among them are returned undecrypted.
    async fn drain(&mut self) -> Vec<Value> {
        let mut messages = std::mem::take(&mut self.waiting);
        for frame in self.ws.barrier().await {
            match frame["type"].as_str().unwrap_or("") {
                "message" => messages.push(frame),
                "to_device" => self.take_to_device(&frame).await,
                _ => {}
            }
        }
        messages
    }
}

/// Runs a test on a thread of its own with a large stack: the reference client's and the
/// cluster's futures nest deep in a debug build.
fn on_big_stack(test: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(test)
        })
        .expect("test thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn stored_count(page: &Value) -> usize {
    page["messages"].as_array().map_or(0, Vec::len)
}

async fn history(peer: &mut Peer, conversation: &str) -> Value {
    peer.ws
        .send(json!({"type":"history","ref":"h","conversation":conversation}))
        .await;
    peer.answer("history").await
}

#[test]
fn two_users_with_two_devices_each_talk_end_to_end_and_a_later_device_reads_only_what_follows() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut alice = Peer::join(&gw, "alice", "phone").await;
        let mut alice_laptop = Peer::join(&gw, "alice", "laptop").await;
        let mut bob = Peer::join(&gw, "bob", "phone").await;
        // bob's laptop publishes its keys, then goes offline: its ciphertext waits for it.
        let bob_laptop = Peer::join(&gw, "bob", "laptop").await;
        bob_laptop.ws.close().await;
        let marker = format!("secret-{}", uuid::Uuid::now_v7().simple());

        let sent = alice
            .send_direct("bob", &format!("hi bob {marker}"), "e1")
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        let conversation = sent["conversation"]
            .as_str()
            .expect("conversation")
            .to_owned();
        let (frame, text) = bob.read().await;
        assert_eq!(text, format!("hi bob {marker}"));
        assert_eq!(frame["from"], "alice");
        assert_eq!(frame["e2ee"]["device"], "phone");
        assert!(
            frame.get("body").is_none(),
            "an encrypted message has no body: {frame}"
        );
        // The sender's other device gets its own ciphertext.
        let (_, text) = alice_laptop.read().await;
        assert_eq!(text, format!("hi bob {marker}"));
        // The offline device gets it on connect, from its own queue.
        let mut bob_laptop = Peer {
            ws: gw.connect_device("bob", "laptop").await,
            ..bob_laptop
        };
        let (frame, text) = bob_laptop.read().await;
        assert_eq!(text, format!("hi bob {marker}"));
        assert_eq!(frame["message_id"], sent["message_id"]);

        // Delivered receipts come per device.
        let mut delivered_to = BTreeSet::new();
        while delivered_to.len() < 2 {
            let receipt = alice.ws.recv_type_of(&["receipt"]).await;
            if receipt["status"] == "delivered" {
                assert_eq!(receipt["by"], "bob", "{receipt}");
                delivered_to.insert(receipt["device"].as_str().unwrap_or("").to_owned());
            }
        }
        assert_eq!(
            delivered_to,
            BTreeSet::from(["phone".to_owned(), "laptop".to_owned()])
        );

        // A reply, to alice's two devices and bob's laptop.
        let reply = bob.send_direct("alice", "hello alice", "r1").await;
        assert_eq!(reply["type"], "sent", "{reply}");
        assert_eq!(alice.read().await.1, "hello alice");
        assert_eq!(alice_laptop.read().await.1, "hello alice");
        assert_eq!(bob_laptop.read().await.1, "hello alice");

        // bob adds a tablet: nothing old comes to it (a message sent once it is connected
        // comes after its replay: nothing before it), and its history cannot be read.
        let mut tablet = Peer::join(&gw, "bob", "tablet").await;
        let mut fence = gw.connect("fence").await;
        fence.send_message("bob", "after the replay", "fence").await;
        let early = loop {
            let frame = tablet.ws.recv().await;
            if frame["type"] == "message" {
                break frame;
            }
        };
        assert_eq!(
            early["from"], "fence",
            "old ciphertexts reached a new device: {early}"
        );
        let page = history(&mut tablet, &conversation).await;
        assert_eq!(stored_count(&page), 2, "{page}");
        for item in page["messages"].as_array().into_iter().flatten() {
            assert!(item["e2ee"].get("ciphertext").is_none(), "{item}");
        }

        // alice, unaware of the tablet, is refused with the device missing; nothing is stored.
        let old_devices = vec![
            id("bob", "phone"),
            id("bob", "laptop"),
            id("alice", "laptop"),
        ];
        let refused = alice
            .send_direct_to("bob", &old_devices, "for every device", "e2")
            .await;
        assert_eq!(refused["code"], "device_mismatch", "{refused}");
        assert_eq!(
            devices_of(&refused["missing"]),
            BTreeSet::from([id("bob", "tablet")])
        );
        assert_eq!(refused["stale"], json!([]));
        assert_eq!(refused["changed"], json!([]));
        assert_eq!(stored_count(&history(&mut alice, &conversation).await), 2);
        // The corrected resend, under the same client_msg_id, is stored once.
        let sent = alice.send_direct("bob", "for every device", "e2").await;
        assert_eq!(sent["type"], "sent", "{sent}");
        let again = alice.send_direct("bob", "for every device", "e2").await;
        assert_eq!(again["message_id"], sent["message_id"], "{again}");
        assert_eq!(stored_count(&history(&mut alice, &conversation).await), 3);
        for device in [&mut tablet, &mut bob, &mut bob_laptop, &mut alice_laptop] {
            let (frame, text) = device.read().await;
            assert_eq!(text, "for every device");
            assert_eq!(frame["message_id"], sent["message_id"]);
        }

        // A removed device is stale.
        tablet
            .ws
            .send(json!({"type":"remove_device","ref":"rm","device":"tablet"}))
            .await;
        assert_eq!(tablet.answer("device_removed").await["device"], "tablet");
        let with_tablet = vec![
            id("bob", "phone"),
            id("bob", "laptop"),
            id("bob", "tablet"),
            id("alice", "laptop"),
        ];
        let refused = alice
            .send_direct_to("bob", &with_tablet, "after removal", "e3")
            .await;
        assert_eq!(refused["code"], "device_mismatch", "{refused}");
        assert_eq!(refused["missing"], json!([]));
        assert_eq!(
            devices_of(&refused["stale"]),
            BTreeSet::from([id("bob", "tablet")])
        );

        // What the server holds: a plain message's text is readable to it (the check can
        // fail), the encrypted one's is not, in the store or in the log.
        let control = format!("plain-{}", uuid::Uuid::now_v7().simple());
        alice.ws.send_message("bob", &control, "p1").await;
        let view = gw.server_view(&conversation).await;
        assert!(
            view.contains(&control),
            "the server's view misses the plain message"
        );
        assert!(
            !view.contains(&marker),
            "the server holds the plaintext of an E2EE message"
        );
    });
}

#[test]
fn a_device_set_up_again_under_its_id_is_refused_as_changed_and_is_sent_nothing_old() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut alice = Peer::join(&gw, "alice", "laptop").await;
        let mut bob = Peer::join(&gw, "bob", "phone").await;
        let sent = alice.send_direct("bob", "before", "d1").await;
        assert_eq!(sent["type"], "sent", "{sent}");
        assert_eq!(bob.read().await.1, "before");
        let old_identity = bob.keys.identity_key();
        bob.ws.close().await;
        let sent = alice.send_direct("bob", "to the old phone", "d2").await;
        assert_eq!(sent["type"], "sent", "{sent}");

        // bob sets his phone up again: a new identity under the same device id. Its first
        // connect, before its keys, still replays the old one's queue; the new keys drop it.
        let mut phone = Peer::join(&gw, "bob", "phone").await;
        assert_ne!(phone.keys.identity_key(), old_identity);
        phone.drain().await;
        phone.ws.close().await;
        phone.ws = gw.connect_device("bob", "phone").await;
        let mut fence = gw.connect("fence").await;
        fence
            .send_message("bob", "after the new keys", "fence")
            .await;
        let first = phone.ws.recv_type("message").await;
        assert_eq!(
            first["from"], "fence",
            "the old identity's ciphertext reached the new one: {first}"
        );

        // alice still has the session with the old identity: refused, the device named
        // as changed, nothing stored; so is a to-device message for the old identity.
        let devices = vec![id("bob", "phone")];
        let refused = alice.send_direct_to("bob", &devices, "stale", "d3").await;
        assert_eq!(refused["code"], "device_mismatch", "{refused}");
        assert_eq!(
            devices_of(&refused["changed"]),
            BTreeSet::from([id("bob", "phone")])
        );
        assert_eq!(refused["missing"], json!([]));
        assert_eq!(refused["stale"], json!([]));
        let conversation = sent["conversation"].as_str().unwrap_or_default().to_owned();
        assert_eq!(stored_count(&history(&mut alice, &conversation).await), 2);
        alice
            .ws
            .send(
                json!({"type":"to_device","ref":"td","messages":[{"user":"bob",
                "device":"phone","type":1,"ciphertext":"AAAA","identity_key":old_identity}]}),
            )
            .await;
        let refused = alice.answer("error").await;
        assert_eq!(refused["code"], "device_mismatch", "{refused}");
        assert_eq!(refused["ref"], "td", "{refused}");
        assert_eq!(
            devices_of(&refused["changed"]),
            BTreeSet::from([id("bob", "phone")])
        );

        // A new session with the new identity, the same client_msg_id: stored once, read.
        alice.keys.identities_changed(&devices);
        let sent = alice.send_direct_to("bob", &devices, "stale", "d3").await;
        assert_eq!(sent["type"], "sent", "{sent}");
        let (frame, text) = phone.read().await;
        assert_eq!(text, "stale");
        assert_eq!(frame["message_id"], sent["message_id"]);
        assert_eq!(stored_count(&history(&mut alice, &conversation).await), 3);
    });
}

#[test]
fn keys_uploaded_after_a_keys_low_withdraw_it() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut bob = gw.connect_device("bob", "phone").await;
        let mut keys = E2eeDevice::new("bob", "phone");
        bob.send(keys.keys_upload("up", 11)).await;
        assert_eq!(bob.recv_type("keys").await["one_time_keys"], 11);
        bob.close().await;
        let mut carol = gw.connect_device("carol", "x").await;
        for i in 0..2 {
            carol
                .send(json!({"type":"keys_claim","ref":i,"devices":[{"user":"bob","device":"phone"}]}))
                .await;
            carol.recv_type("keys_claimed").await;
        }
        // Told on connect; it uploads more instead of confirming.
        let mut bob = gw.connect_device("bob", "phone").await;
        let low = bob.recv_type_of(&["keys_low"]).await;
        assert_eq!(low["one_time_keys"], 9, "{low}");
        bob.send(keys.keys_upload("more", 20)).await;
        assert_eq!(bob.recv_type("keys").await["one_time_keys"], 29);
        bob.close().await;
        // Not told again: nothing but the fence comes.
        let mut again = gw.connect_device("bob", "phone").await;
        carol.send_message("bob", "after the replay", "fence").await;
        let first = again.recv_type_of(&["keys_low", "message"]).await;
        assert_eq!(
            first["type"], "message",
            "an out-of-date keys_low came: {first}"
        );
    });
}

#[test]
fn concurrent_claims_never_hand_out_a_key_twice_and_an_empty_supply_falls_back() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut bob = gw.connect_device("bob", "phone").await;
        let mut keys = E2eeDevice::new("bob", "phone");
        bob.send(keys.keys_upload("up", 20)).await;
        assert_eq!(bob.recv_type("keys").await["one_time_keys"], 20);
        // Two claimers (on both gateways of a cluster), 15 claims each, all at once.
        let mut claimers = vec![
            gw.connect_device("carol", "x").await,
            gw.connect_device("dave", "y").await,
        ];
        for claimer in &mut claimers {
            for i in 0..15 {
                claimer
                    .send(json!({"type":"keys_claim","ref":i,"devices":[{"user":"bob","device":"phone"}]}))
                    .await;
            }
        }
        let mut handed = Vec::new();
        let mut fallbacks = 0;
        for claimer in &mut claimers {
            for _ in 0..15 {
                let answer = claimer.recv_type("keys_claimed").await;
                let claimed = &answer["keys"][0];
                assert_eq!(claimed["identity_key"], keys.identity_key(), "{answer}");
                if claimed["fallback"] == true {
                    fallbacks += 1;
                } else {
                    handed.push(
                        claimed["one_time_key"]["id"]
                            .as_str()
                            .unwrap_or("")
                            .to_owned(),
                    );
                }
            }
        }
        let distinct: BTreeSet<&String> = handed.iter().collect();
        assert_eq!(
            handed.len(),
            20,
            "every one-time key is handed out: {handed:?}"
        );
        assert_eq!(
            distinct.len(),
            20,
            "a one-time key was handed out twice: {handed:?}"
        );
        assert_eq!(fallbacks, 10);
        // The owner is told its supply ran out.
        let low = loop {
            let frame = bob.recv().await;
            if frame["type"] == "keys_low" && frame["one_time_keys"] == 0 {
                break frame;
            }
        };
        bob.send(json!({"type":"ack","notice_ids":[low["notice_id"]]}))
            .await;
        // Unknown devices are left out of an answer.
        claimers[0]
            .send(json!({"type":"keys_claim","ref":"none","devices":[{"user":"bob","device":"nope"}]}))
            .await;
        assert_eq!(
            claimers[0].recv_type("keys_claimed").await["keys"],
            json!([])
        );
        // Told again on connect until confirmed: confirmed, so a new connection is not told.
        // A message sent after it connected comes after its replay: nothing before it.
        bob.barrier().await;
        let mut again = gw.connect_device("bob", "phone").await;
        claimers[0]
            .send_message("bob", "after the replay", "fence")
            .await;
        loop {
            let frame = again.recv().await;
            assert_ne!(frame["type"], "keys_low", "a confirmed keys_low came again");
            if frame["type"] == "message" {
                break;
            }
        }
        // Replenished: the next claim gets one of the new one-time keys, not the fallback.
        let more = keys.keys_upload("more", 5);
        let fresh: BTreeSet<String> = more["one_time_keys"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| k["id"].as_str().unwrap_or("").to_owned())
            .collect();
        again.send(more).await;
        let keys_answer = loop {
            // (More `keys_low` notices may be queued before it: one per claim past the
            // low mark.)
            let frame = again.recv().await;
            if frame["type"] == "keys" {
                break frame;
            }
            assert_eq!(frame["type"], "keys_low", "{frame}");
        };
        assert_eq!(keys_answer["one_time_keys"], 5);
        claimers[1]
            .send(json!({"type":"keys_claim","ref":"after","devices":[{"user":"bob","device":"phone"}]}))
            .await;
        let answer = claimers[1].recv_type("keys_claimed").await;
        assert_eq!(answer["keys"][0]["fallback"], false, "{answer}");
        let id = answer["keys"][0]["one_time_key"]["id"]
            .as_str()
            .unwrap_or("");
        assert!(fresh.contains(id), "{id} is not one of the new keys");
    });
}

#[test]
fn a_group_key_reaches_current_member_devices_only() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut alice = Peer::join(&gw, "alice", "phone").await;
        let mut alice_laptop = Peer::join(&gw, "alice", "laptop").await;
        let mut bob = Peer::join(&gw, "bob", "phone").await;
        alice
            .ws
            .send(json!({"type":"create_group","ref":"g","name":"team","members":["bob"]}))
            .await;
        let group = alice.answer("group").await;
        let g = group["conversation"].as_str().expect("group").to_owned();

        let sent = alice
            .send_group(&g, &["alice", "bob"], "first words", "g1")
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        assert_eq!(bob.read().await.1, "first words");
        assert_eq!(alice_laptop.read().await.1, "first words");

        // carol joins: what came before is not for her devices.
        let mut carol = Peer::join(&gw, "carol", "phone").await;
        alice
            .ws
            .send(json!({"type":"add_members","ref":"add","conversation":g,"members":["carol"]}))
            .await;
        alice.answer("group").await;
        // She is not shown it at all (a member added later sees the group from then on),
        // and the group key it was sealed with never reached her.
        let page = history(&mut carol, &g).await;
        assert_eq!(stored_count(&page), 0, "{page}");
        let page = history(&mut bob, &g).await;
        assert_eq!(stored_count(&page), 1, "{page}");
        assert!(
            !carol.keys.can_decrypt(&page["messages"][0]),
            "carol holds the old key"
        );

        // The old session's device list is stale now: refused, then a new session is shared.
        let e2ee = alice.keys.encrypt_group(&g, "with carol").expect("encrypt");
        alice
            .ws
            .send(json!({"type":"send","client_msg_id":"g2","conversation":g,"e2ee":e2ee}))
            .await;
        let refused = alice.answer_to("g2").await;
        assert_eq!(refused["code"], "device_mismatch", "{refused}");
        assert_eq!(
            devices_of(&refused["missing"]),
            BTreeSet::from([id("carol", "phone")])
        );
        let sent = alice
            .send_group(&g, &["alice", "bob", "carol"], "with carol", "g2")
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        assert_eq!(carol.read().await.1, "with carol");
        assert_eq!(bob.read().await.1, "with carol");
        assert_eq!(alice_laptop.read().await.1, "with carol");

        // bob is removed: no new key and no new message reach his device.
        alice
            .ws
            .send(json!({"type":"remove_members","ref":"rm","conversation":g,"members":["bob"]}))
            .await;
        alice.answer("group").await;
        let sent = alice
            .send_group(&g, &["alice", "carol"], "without bob", "g3")
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        assert_eq!(carol.read().await.1, "without bob");
        assert_eq!(alice_laptop.read().await.1, "without bob");
        let late = bob.drain().await;
        assert!(late.is_empty(), "a removed member got {late:?}");
        let page = history(&mut carol, &g).await;
        let newest = &page["messages"][0];
        assert!(
            !bob.keys.can_decrypt(newest),
            "a removed member's device got the new group key"
        );
    });
}

#[test]
fn bad_keys_and_ciphertexts_get_clear_errors_and_store_nothing() {
    on_big_stack(async {
        let gw = start(|_| {}).await;
        let mut alice = Peer::join(&gw, "alice", "phone").await;
        let mut bob = Peer::join(&gw, "bob", "phone").await;
        let upload = |identity: &str| {
            json!({"type":"keys_upload","ref":"u","identity_key":identity,
                   "signing_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})
        };
        let cases = [
            (upload("not base64!"), "`identity_key` is not base64"),
            (upload("AAAA"), "`identity_key` is 3 bytes"),
            (
                {
                    let mut u = upload("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
                    u["one_time_keys"] = json!((0..101)
                        .map(|i| json!({"id":format!("k{i}"),"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}))
                        .collect::<Vec<_>>());
                    u
                },
                "at most 100 keys per upload",
            ),
        ];
        for (frame, expected) in cases {
            alice.ws.send(frame).await;
            let error = alice.answer("error").await;
            assert_eq!(error["code"], "bad_request", "{error}");
            assert!(
                error["message"].as_str().unwrap_or("").contains(expected),
                "{error}"
            );
            assert_eq!(error["ref"], "u");
        }
        // A supply has a ceiling: 50 published, 100 + 100 more is one upload too many.
        for (round, accepted) in [(0, true), (1, false)] {
            let mut frame = alice.keys.keys_upload("more", 100);
            frame["one_time_keys"] = json!((0..100)
                .map(|i| json!({"id":format!("extra-{round}-{i}"),"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}))
                .collect::<Vec<_>>());
            alice.ws.send(frame).await;
            let answer = alice.answer_of(&["keys", "error"]).await;
            if accepted {
                assert_eq!(answer["one_time_keys"], 150, "{answer}");
            } else {
                assert_eq!(answer["code"], "bad_request", "{answer}");
                assert!(
                    answer["message"].as_str().unwrap_or("").contains("200"),
                    "{answer}"
                );
            }
        }
        // Keys land on the connection's own user and device, whatever the frame says.
        let mut mallory = gw.connect_device("mallory", "m").await;
        let mut frame = E2eeDevice::new("bob", "phone").keys_upload("steal", 1);
        frame["user"] = json!("bob");
        frame["device"] = json!("phone");
        mallory.send(frame).await;
        mallory.recv_type("keys").await;
        let listed = alice.devices(&["bob", "mallory"]).await;
        assert_eq!(
            listed,
            vec![id("bob", "phone"), id("mallory", "m")],
            "a device published keys for another user"
        );

        // Malformed encrypted sends: refused, nothing stored.
        let sent = alice.send_direct("bob", "the only one", "ok").await;
        let conversation = sent["conversation"]
            .as_str()
            .expect("conversation")
            .to_owned();
        bob.read().await;
        let bad_sends = [
            (
                json!({"to":[{"user":"bob","device":"phone","type":1,"ciphertext":"%%%"}]}),
                "base64",
            ),
            (
                json!({"to":[{"user":"bob","device":"phone","type":7,"ciphertext":"AAAA"}]}),
                "`type` 7",
            ),
            (
                json!({"to":[{"user":"bob","device":"phone"}]}),
                "needs `type` and `ciphertext`",
            ),
            (
                json!({"to":[{"user":"bob","device":"phone"}],"group":{"session":"s","ciphertext":"AAAA"}}),
                "`e2ee.group` is for groups",
            ),
            (
                json!({"to":[{"user":"bob","device":"phone","type":1,"ciphertext":"AAAA","identity_key":"AAAA"}]}),
                "`e2ee.to.identity_key` is 3 bytes",
            ),
        ];
        for (i, (e2ee, expected)) in bad_sends.into_iter().enumerate() {
            let cmid = format!("bad-{i}");
            alice
                .ws
                .send(json!({"type":"send","client_msg_id":cmid,"to":"bob","e2ee":e2ee}))
                .await;
            let error = alice.answer_to(&cmid).await;
            assert_eq!(error["code"], "bad_request", "{error}");
            assert!(
                error["message"].as_str().unwrap_or("").contains(expected),
                "{error}"
            );
        }
        alice
            .ws
            .send(json!({"type":"send","client_msg_id":"both","to":"bob","body":"x","e2ee":{"to":[]}}))
            .await;
        assert_eq!(alice.answer_to("both").await["code"], "bad_request");
        alice
            .ws
            .send(json!({"type":"to_device","ref":"td","messages":[{"user":"bob","device":"ghost","type":0,"ciphertext":"AAAA"}]}))
            .await;
        let error = alice.answer("error").await;
        assert_eq!(error["code"], "not_found", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or("")
                .contains("bob/ghost"),
            "{error}"
        );
        assert_eq!(stored_count(&history(&mut alice, &conversation).await), 1);
        assert!(bob.drain().await.is_empty(), "a refused send reached bob");
    });
}

impl Peer {
    /// The next frame of one of `kinds`.
    async fn answer_of(&mut self, kinds: &[&str]) -> Value {
        loop {
            let frame = self.ws.recv().await;
            if kinds.contains(&frame["type"].as_str().unwrap_or("")) {
                return frame;
            }
        }
    }
}

#[test]
fn to_device_messages_beyond_the_budget_are_refused_and_none_is_kept() {
    on_big_stack(async {
        let gw = start(|config| {
            config.to_device_burst = 5;
            config.to_device_per_sec = 1;
        })
        .await;
        let bob = Peer::join(&gw, "bob", "phone").await;
        bob.ws.close().await;
        let mut alice = gw.connect_device("alice", "laptop").await;
        let frame = |reference: &str, n: usize| {
            let messages: Vec<Value> = (0..n)
                .map(|i| json!({"user":"bob","device":"phone","type":1,"ciphertext":format!("{reference}{i}A")}))
                .collect();
            json!({"type":"to_device","ref":reference,"messages":messages})
        };
        alice.send(frame("ok", 3)).await;
        assert_eq!(alice.recv_type("to_device_sent").await["ref"], "ok");
        // Two are left of the burst of five (the budget refills one a second): five more
        // are refused whole.
        alice.send(frame("over", 5)).await;
        let refused = alice.error().await;
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        assert_eq!(refused["ref"], "over");
        let mut bob = gw.connect_device("bob", "phone").await;
        alice.send_message("bob", "after the replay", "fence").await;
        let mut kept = Vec::new();
        loop {
            let frame = bob.recv().await;
            match frame["type"].as_str() {
                Some("to_device") => kept.push(frame["e2ee"]["ciphertext"].clone()),
                Some("message") => break,
                _ => {}
            }
        }
        assert_eq!(kept, vec![json!("ok0A"), json!("ok1A"), json!("ok2A")]);
    });
}

#[test]
fn claims_beyond_the_budget_are_refused_and_take_no_key() {
    on_big_stack(async {
        let gw = start(|config| {
            config.key_claim_burst = 5;
            config.key_claims_per_sec = 1;
        })
        .await;
        let mut bob = gw.connect_device("bob", "phone").await;
        let mut keys = E2eeDevice::new("bob", "phone");
        bob.send(keys.keys_upload("up", 20)).await;
        assert_eq!(bob.recv_type("keys").await["one_time_keys"], 20);
        let mut eve = gw.connect_device("eve", "x").await;
        let five: Vec<Value> = (0..5)
            .map(|_| json!({"user":"bob","device":"phone"}))
            .collect();
        // Five claims of one device in one frame name it once: one key.
        eve.send(json!({"type":"keys_claim","ref":"a","devices":five}))
            .await;
        assert_eq!(
            eve.recv_type("keys_claimed").await["keys"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        // Four more fit the burst of five; five more do not (however slow this runs: the
        // budget refills one a second).
        for i in 0..4 {
            eve.send(
                json!({"type":"keys_claim","ref":i,"devices":[{"user":"bob","device":"phone"}]}),
            )
            .await;
            eve.recv_type("keys_claimed").await;
        }
        let over: Vec<Value> = ["phone", "b", "c", "d", "e"]
            .iter()
            .map(|d| json!({"user":"bob","device":d}))
            .collect();
        eve.send(json!({"type":"keys_claim","ref":"over","devices":over}))
            .await;
        let refused = eve.error().await;
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        assert_eq!(refused["ref"], "over");
        // The refused claim took nothing: 20 - 5 keys are left.
        bob.send(
            json!({"type":"keys_upload","ref":"count","identity_key":keys.identity_key(),
                        "signing_key":keys.keys_upload("x", 0)["signing_key"]}),
        )
        .await;
        let count = loop {
            let frame = bob.recv().await;
            if frame["type"] == "keys" {
                break frame;
            }
        };
        assert_eq!(count["one_time_keys"], 15, "{count}");
    });
}
