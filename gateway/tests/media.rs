//! Attachments end to end, as a client does it: an upload slot over the WebSocket, the bytes
//! over HTTP to the URL it names (the embedded gateway's own endpoint, or a presigned S3 URL
//! on the real S3-compatible server in a cluster), `media_complete`, a `send` that carries
//! the media id, and the recipient's download URL.

mod common;

use std::time::Duration;

use common::servers::Server;
use common::{start, Client, TestGateway};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Bytes that look like nothing in particular (not all the same, so a range shows).
fn picture(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A user name of its own: quotas are per user, and the test S3 server is shared.
fn fresh(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Asks for an upload slot; returns the answer (or the error).
async fn slot(client: &mut Client, content_type: &str, size: usize, hash: &str) -> Value {
    let reference = uuid::Uuid::now_v7().to_string();
    client
        .send(json!({"type":"media_upload","ref":reference,"content_type":content_type,"size":size,"sha256":hash}))
        .await;
    let answer = client.recv_type_of(&["media_upload", "error"]).await;
    assert_eq!(answer["ref"], reference.as_str(), "{answer}");
    answer
}

/// PUTs bytes to a slot's URL with the headers it names; returns the HTTP status.
async fn put(slot: &Value, bytes: Vec<u8>) -> u16 {
    assert_eq!(slot["method"], "PUT", "{slot}");
    let mut request = reqwest::Client::new().put(slot["url"].as_str().expect("url"));
    for (name, value) in slot["headers"].as_object().expect("headers") {
        request = request.header(name, value.as_str().expect("header value"));
    }
    request
        .body(bytes)
        .send()
        .await
        .expect("upload")
        .status()
        .as_u16()
}

/// Sends a request with a `ref` and returns its answer of `kind`, or the error.
async fn ask(client: &mut Client, mut frame: Value, kind: &str) -> Value {
    let reference = uuid::Uuid::now_v7().to_string();
    frame["ref"] = json!(reference);
    client.send(frame).await;
    let answer = client.recv_type_of(&[kind, "error"]).await;
    assert_eq!(answer["ref"], reference.as_str(), "{answer}");
    answer
}

/// Uploads `bytes` completely and returns the media id.
async fn uploaded(client: &mut Client, content_type: &str, bytes: &[u8]) -> String {
    let slot = slot(client, content_type, bytes.len(), &sha256(bytes)).await;
    assert_eq!(slot["type"], "media_upload", "{slot}");
    assert_eq!(put(&slot, bytes.to_vec()).await, 200);
    let media_id = slot["media_id"].as_str().expect("media_id").to_owned();
    let done = ask(
        client,
        json!({"type":"media_complete","media_id":media_id}),
        "media_complete",
    )
    .await;
    assert_eq!(done["type"], "media_complete", "{done}");
    assert_eq!(done["size"], bytes.len());
    media_id
}

async fn download(url: &str, range: Option<&str>) -> (u16, Vec<u8>, Option<String>) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(range) = range {
        request = request.header("Range", range);
    }
    let response = request.send().await.expect("download");
    let status = response.status().as_u16();
    let content_range = response
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response.bytes().await.expect("body").to_vec();
    (status, bytes, content_range)
}

async fn media_url(client: &mut Client, media_id: &str, message: Option<&Value>) -> Value {
    let mut frame = json!({"type":"media_url","media_id":media_id});
    if let Some(m) = message {
        frame["conversation"] = m["conversation"].clone();
        frame["message_id"] = m["message_id"].clone();
    }
    ask(client, frame, "media_url").await
}

async fn gateway() -> TestGateway {
    start(|c| {
        c.media.media_max_bytes = 1024 * 1024;
        c.media.media_types = vec!["image/*".into(), "audio/ogg".into()];
    })
    .await
}

#[tokio::test]
async fn a_picture_goes_from_upload_to_download_byte_for_byte() {
    let gw = gateway().await;
    let (alice_id, bob_id) = (fresh("alice"), fresh("bob"));
    let mut alice = gw.connect(&alice_id).await;
    let mut bob = gw.connect(&bob_id).await;
    let bytes = picture(200_000);
    let media_id = uploaded(&mut alice, "image/png", &bytes).await;

    alice
        .send(json!({"type":"send","client_msg_id":"pic-1","to":bob_id,"body":"look",
            "attachments":[{"media_id":media_id,"name":"cat.png","caption":"a cat","thumbnail":"AAEC"}]}))
        .await;
    let sent = alice.recv_type("sent").await;
    assert_eq!(sent["client_msg_id"], "pic-1", "{sent}");
    let message = bob.recv_type("message").await;
    assert_eq!(message["body"], "look");
    let attachment = &message["attachments"][0];
    assert_eq!(attachment["media_id"], media_id.as_str());
    assert_eq!(attachment["content_type"], "image/png");
    assert_eq!(attachment["size"], bytes.len());
    assert_eq!(attachment["sha256"], sha256(&bytes).as_str());
    assert_eq!(attachment["name"], "cat.png");
    assert_eq!(attachment["caption"], "a cat");
    assert_eq!(attachment["thumbnail"], "AAEC");

    // The recipient downloads through the message; the bytes are the uploaded ones.
    let url = media_url(&mut bob, &media_id, Some(&message)).await;
    assert_eq!(url["type"], "media_url", "{url}");
    assert_eq!(url["content_type"], "image/png");
    let link = url["url"].as_str().expect("url");
    let (status, got, _) = download(link, None).await;
    assert_eq!(status, 200);
    assert!(got == bytes, "downloaded bytes differ from the upload");
    // Seeking: a range comes back as 206 with exactly those bytes.
    let (status, part, content_range) = download(link, Some("bytes=1000-1999")).await;
    assert_eq!(status, 206);
    assert!(part == bytes[1000..2000], "the range's bytes differ");
    assert_eq!(
        content_range.as_deref(),
        Some(format!("bytes 1000-1999/{}", bytes.len()).as_str())
    );
    // The uploader may download their own upload without naming a message.
    let own = media_url(&mut alice, &media_id, None).await;
    assert_eq!(own["type"], "media_url", "{own}");

    // History keeps the attachment.
    let conversation = message["conversation"].as_str().expect("conversation");
    let history = ask(
        &mut bob,
        json!({"type":"history","conversation":conversation}),
        "history",
    )
    .await;
    assert_eq!(
        history["messages"][0]["attachments"][0]["media_id"],
        media_id.as_str(),
        "{history}"
    );
    // A file with no text is a message too.
    let voice = uploaded(&mut alice, "audio/ogg", &picture(3000)).await;
    alice
        .send(json!({"type":"send","client_msg_id":"voice-1","to":bob_id,"attachments":[{"media_id":voice}]}))
        .await;
    assert_eq!(alice.recv_type("sent").await["client_msg_id"], "voice-1");
    let note = bob.recv_type("message").await;
    assert!(note.get("body").is_none() || note["body"] == "", "{note}");
    assert_eq!(note["attachments"][0]["content_type"], "audio/ogg");
}

#[tokio::test]
async fn bad_uploads_get_clear_errors_and_nothing_is_sent() {
    let gw = start(|c| {
        c.media.media_max_bytes = 1024 * 1024;
        c.media.media_types = vec!["image/*".into()];
        c.media.media_quota_bytes = 300_000;
    })
    .await;
    let (alice_id, bob_id, carol_id) = (fresh("alice"), fresh("bob"), fresh("carol"));
    let mut alice = gw.connect(&alice_id).await;
    let mut bob = gw.connect(&bob_id).await;
    let mut carol = gw.connect(&carol_id).await;
    let bytes = picture(10_000);
    let hash = sha256(&bytes);

    // Limits on the slot itself.
    let too_big = slot(&mut alice, "image/png", 2 * 1024 * 1024, &hash).await;
    assert_eq!(too_big["code"], "too_large", "{too_big}");
    let wrong_type = slot(&mut alice, "application/x-msdownload", 10, &hash).await;
    assert_eq!(wrong_type["code"], "bad_request", "{wrong_type}");
    assert!(wrong_type["message"]
        .as_str()
        .is_some_and(|m| m.contains("image/*")));
    let bad_hash = slot(&mut alice, "image/png", 10, "abc").await;
    assert_eq!(bad_hash["code"], "bad_request", "{bad_hash}");

    // Other bytes than declared: refused at completion, and discarded.
    let declared = slot(&mut alice, "image/png", bytes.len(), &hash).await;
    let media_id = declared["media_id"].as_str().expect("media_id").to_owned();
    let mut other = bytes.clone();
    other[0] ^= 1;
    assert_eq!(put(&declared, other).await, 200);
    let refused = ask(
        &mut alice,
        json!({"type":"media_complete","media_id":media_id}),
        "media_complete",
    )
    .await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    assert!(refused["message"]
        .as_str()
        .is_some_and(|m| m.contains("SHA-256")));
    // Fewer bytes than declared: refused too (more are refused by the upload URL itself, or
    // at completion).
    assert_eq!(put(&declared, bytes[..100].to_vec()).await, 200);
    let short = ask(
        &mut alice,
        json!({"type":"media_complete","media_id":media_id}),
        "media_complete",
    )
    .await;
    assert_eq!(short["code"], "bad_request", "{short}");
    assert!(short["message"]
        .as_str()
        .is_some_and(|m| m.contains("100 bytes")));
    // Not complete: it cannot be sent, nor downloaded.
    alice
        .send(
            json!({"type":"send","client_msg_id":"x-1","to":bob_id,"body":"see",
            "attachments":[{"media_id":media_id}]}),
        )
        .await;
    let error = alice.error().await;
    assert_eq!(error["client_msg_id"], "x-1");
    assert_eq!(error["code"], "bad_request", "{error}");
    let url = media_url(&mut alice, &media_id, None).await;
    assert_eq!(url["code"], "not_found", "{url}");

    // Bob may not send alice's upload, nor download it without a message carrying it.
    let alices = uploaded(&mut alice, "image/png", &bytes).await;
    bob.send(
        json!({"type":"send","client_msg_id":"x-2","to":alice_id,"body":"mine now",
        "attachments":[{"media_id":alices}]}),
    )
    .await;
    let error = bob.error().await;
    assert_eq!(error["code"], "forbidden", "{error}");
    let url = media_url(&mut bob, &alices, None).await;
    assert_eq!(url["code"], "forbidden", "{url}");
    // Declared fields that differ from the upload are refused.
    alice
        .send(json!({"type":"send","client_msg_id":"x-3","to":bob_id,
            "attachments":[{"media_id":alices,"size":1}]}))
        .await;
    assert_eq!(alice.error().await["code"], "bad_request");
    // So is the same upload named twice in one message.
    alice
        .send(json!({"type":"send","client_msg_id":"x-4","to":bob_id,
            "attachments":[{"media_id":alices},{"media_id":alices.to_uppercase()}]}))
        .await;
    let twice = alice.error().await;
    assert_eq!(
        (twice["code"].as_str(), twice["client_msg_id"].as_str()),
        (Some("bad_request"), Some("x-4")),
        "{twice}"
    );
    assert!(twice["message"]
        .as_str()
        .is_some_and(|m| m.contains("twice")));

    // Sent to bob: carol, not in the conversation, is refused even naming the message.
    alice
        .send(json!({"type":"send","client_msg_id":"ok-1","to":bob_id,"attachments":[{"media_id":alices}]}))
        .await;
    assert_eq!(alice.recv_type("sent").await["client_msg_id"], "ok-1");
    let message = bob.recv_type("message").await;
    assert_eq!(message["attachments"][0]["media_id"], alices.as_str());
    let url = media_url(&mut carol, &alices, Some(&message)).await;
    assert_eq!(url["code"], "forbidden", "{url}");
    // Naming a message that does not carry the media is refused too.
    let plain = alice.send_message(&carol_id, "hello", "plain-1").await;
    let carols = carol.recv_type("message").await;
    assert_eq!(carols["message_id"], plain["message_id"]);
    let url = media_url(&mut carol, &alices, Some(&carols)).await;
    assert_eq!(url["code"], "forbidden", "{url}");

    // The quota: 300,000 bytes a day, of which two slots of 10,000 are used.
    let over = slot(&mut alice, "image/png", 290_000, &hash).await;
    assert_eq!(over["code"], "quota_exceeded", "{over}");
    let within = slot(&mut alice, "image/png", 200_000, &hash).await;
    assert_eq!(within["type"], "media_upload", "{within}");

    // None of the refused sends reached bob: the only message he got is `ok-1`.
    let before = bob.barrier().await;
    assert!(
        before.iter().all(|f| f["type"] != "message"),
        "bob got more: {before:?}"
    );
}

#[tokio::test]
async fn an_expired_upload_url_is_refused() {
    let gw = start(|c| {
        c.media.media_url_secs = 1;
    })
    .await;
    let mut alice = gw.connect(&fresh("alice")).await;
    let bytes = picture(100);
    let slot = slot(&mut alice, "image/png", bytes.len(), &sha256(&bytes)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await; // the URL's lifetime passing
    assert_eq!(put(&slot, bytes).await, 403);
    let done = ask(
        &mut alice,
        json!({"type":"media_complete","media_id":slot["media_id"]}),
        "media_complete",
    )
    .await;
    assert_eq!(done["code"], "not_found", "nothing was stored: {done}");
}

/// A member added to a group later may download what is sent from then on, not what was
/// sent before they joined (they cannot see that message).
#[tokio::test]
async fn a_member_added_later_downloads_only_what_came_after() {
    let gw = gateway().await;
    let (alice_id, carol_id) = (fresh("alice"), fresh("carol"));
    let mut alice = gw.connect(&alice_id).await;
    let mut carol = gw.connect(&carol_id).await;
    let group = ask(
        &mut alice,
        json!({"type":"create_group","name":"photos","members":[]}),
        "group",
    )
    .await;
    let conversation = group["conversation"]
        .as_str()
        .expect("conversation")
        .to_owned();
    async fn send_picture(
        alice: &mut Client,
        conversation: &str,
        client_msg_id: &str,
    ) -> (String, Value) {
        let media_id = uploaded(alice, "image/png", &picture(300)).await;
        alice
            .send(
                json!({"type":"send","client_msg_id":client_msg_id,"conversation":conversation,
                "attachments":[{"media_id":media_id}]}),
            )
            .await;
        let sent = alice.recv_type("sent").await;
        assert_eq!(sent["client_msg_id"], client_msg_id, "{sent}");
        (media_id, sent)
    }
    let (old_media, old_message) = send_picture(&mut alice, &conversation, "old").await;
    let added = ask(
        &mut alice,
        json!({"type":"add_members","conversation":conversation,"members":[carol_id]}),
        "group",
    )
    .await;
    assert_eq!(
        added["members"].as_array().map(Vec::len),
        Some(2),
        "{added}"
    );
    let (new_media, new_message) = send_picture(&mut alice, &conversation, "new").await;

    assert_eq!(
        carol.recv_type("message").await["message_id"],
        new_message["message_id"]
    );
    let new_message = json!({"conversation":conversation,"message_id":new_message["message_id"]});
    let url = media_url(&mut carol, &new_media, Some(&new_message)).await;
    assert_eq!(url["type"], "media_url", "{url}");
    let old_message = json!({"conversation":conversation,"message_id":old_message["message_id"]});
    let url = media_url(&mut carol, &old_media, Some(&old_message)).await;
    assert_eq!(url["code"], "forbidden", "{url}");
}

#[tokio::test]
async fn an_upload_no_message_references_is_collected_and_a_sent_one_stays() {
    let gw = start(|c| c.media.media_expire_secs = 3).await;
    let (alice_id, bob_id) = (fresh("alice"), fresh("bob"));
    let mut alice = gw.connect(&alice_id).await;
    let mut bob = gw.connect(&bob_id).await;
    let kept_bytes = picture(500);
    let kept = uploaded(&mut alice, "image/png", &kept_bytes).await;
    alice
        .send(json!({"type":"send","client_msg_id":"keep","to":bob_id,"attachments":[{"media_id":kept}]}))
        .await;
    assert_eq!(alice.recv_type("sent").await["client_msg_id"], "keep");
    let message = bob.recv_type("message").await;
    let abandoned = uploaded(&mut alice, "image/png", &picture(700)).await;

    // The collector runs every second; the abandoned upload goes within its 3 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let url = media_url(&mut alice, &abandoned, None).await;
        if url["code"] == "not_found" {
            break;
        }
        assert_eq!(url["type"], "media_url", "{url}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned upload is still there"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The sent one stays, bytes and all.
    let url = media_url(&mut bob, &kept, Some(&message)).await;
    assert_eq!(url["type"], "media_url", "{url}");
    let (status, got, _) = download(url["url"].as_str().expect("url"), None).await;
    assert_eq!(status, 200);
    assert!(got == kept_bytes);
}

#[tokio::test]
async fn with_the_blob_store_down_media_is_unavailable_and_text_flows() {
    if std::env::var_os("TEST_S3_ENDPOINT").is_none() && std::env::var_os("CI").is_none() {
        eprintln!("skipped: no S3 server here (./infra/test.sh builds and starts one)");
        return;
    }
    let mut s3 = Server::start("s3").await;
    let endpoint = s3.address();
    let gw = start(|c| {
        c.media.s3_endpoint = Some(endpoint.clone());
        c.media.s3_bucket = Some("chat-media".into());
        c.media.s3_access_key_id = "chat-test".into();
        c.media.s3_secret_access_key = "chat-test-secret-key".into();
    })
    .await;
    let (alice_id, bob_id) = (fresh("alice"), fresh("bob"));
    let mut alice = gw.connect(&alice_id).await;
    let mut bob = gw.connect(&bob_id).await;
    let bytes = picture(1000);
    // Up: media works against this server.
    uploaded(&mut alice, "image/png", &bytes).await;

    s3.kill().await;
    let refused = slot(&mut alice, "image/png", bytes.len(), &sha256(&bytes)).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    // Text goes on as before.
    for i in 0..5 {
        let sent = alice
            .send_message(&bob_id, &format!("still here {i}"), &format!("t-{i}"))
            .await;
        let got = bob.recv_type("message").await;
        assert_eq!(got["message_id"], sent["message_id"]);
    }
    let readyz = reqwest::get(gw.admin("/readyz")).await.expect("readyz");
    assert_eq!(readyz.status().as_u16(), 200, "media down is not unready");
}
