//! Connecting: authentication at the handshake, devices, dev endpoints, origins, timeouts,
//! and the operator endpoints.

mod common;

use std::time::Duration;

use common::{refused, refused_status, start, try_connect_url, SECRET, WAIT};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_no_upgrade() {
    let gw = start(|_| {}).await;
    let expired = {
        let claims = json!({"sub": "alice", "exp": 1_000_000});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("encode")
    };
    let wrong_secret =
        gateway::auth::Auth::new(b"not-the-secret").mint("alice", Duration::from_secs(60));
    let bad_sub = gateway::auth::Auth::new(SECRET.as_bytes())
        .mint("no spaces allowed", Duration::from_secs(60));
    assert_eq!(refused_status(gw.ws_url("")).await, 401, "missing token");
    for token in ["garbage", "a.b.c", &expired, &wrong_secret, &bad_sub] {
        assert_eq!(
            refused_status(gw.ws_url(&format!("?token={token}"))).await,
            401,
            "{token}"
        );
        let mut request = gw.ws_url("").into_client_request().expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        assert_eq!(refused_status(request).await, 401, "{token} in header");
    }
}

fn signed(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn tokens_not_valid_yet_or_for_another_audience_are_refused_in_plain_words() {
    let gw = start(|_| {}).await;
    let now = now_secs();
    let later = signed(json!({"sub":"alice","exp":now + 7200,"nbf":now + 3600}));
    let (status, body) = refused(gw.ws_url(&format!("?token={later}"))).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json body"),
        json!({"error":"invalid token: not valid yet (`nbf` is in the future)"})
    );
    // The parser's own words stay inside the server.
    let (_, body) = refused(gw.ws_url("?token=a.b.c")).await;
    assert_eq!(body, r#"{"error":"invalid token: malformed"}"#);

    let strict = start(|c| {
        c.jwt_audience = Some("chat".into());
        c.jwt_issuer = Some("https://idp.example".into());
    })
    .await;
    let token =
        |aud: &str, iss: &str| signed(json!({"sub":"alice","exp":now + 600,"aud":aud,"iss":iss}));
    for (wrong, why) in [
        (
            token("other", "https://idp.example"),
            "wrong audience (`aud`)",
        ),
        (
            token("chat", "https://evil.example"),
            "wrong issuer (`iss`)",
        ),
        (strict.token("alice"), "a required claim is missing"),
    ] {
        let (status, body) = refused(strict.ws_url(&format!("?token={wrong}"))).await;
        assert_eq!(status, 401, "{why}");
        assert!(body.contains(why), "{body}");
    }
    let good = token("chat", "https://idp.example");
    try_connect_url(&strict.ws_url(&format!("?token={good}")), &good, "alice")
        .await
        .expect("the right audience and issuer connect");
}

#[tokio::test]
async fn a_user_gets_a_bounded_number_of_connections_per_gateway() {
    let gw = start(|c| c.max_conns_per_user = 2).await;
    // All on one gateway (the cap is per gateway; in a cluster `connect` alternates).
    let token = gw.token("alice");
    let on_one = |device: &str| gw.ws_url(&format!("?token={token}&device={device}"));
    let first = try_connect_url(&on_one("a"), &token, "alice")
        .await
        .expect("first");
    let _second = try_connect_url(&on_one("b"), &token, "alice")
        .await
        .expect("second");
    let (status, body) = refused(on_one("c")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("the most allowed"), "{body}");
    // Other users are not affected.
    let bob = gw.token("bob");
    try_connect_url(&gw.ws_url(""), &bob, "bob")
        .await
        .expect("bob connects");
    // A slot comes back when a connection ends.
    first.close().await;
    let url = on_one("c");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match try_connect_url(&url, &token, "alice").await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                // The server frees the slot once the connection's task has ended, just
                // after the close handshake the client saw: poll for it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no slot came back: {e}"),
        }
    }
}

#[tokio::test]
async fn a_token_in_the_query_or_the_header_connects_and_welcome_comes_first() {
    let gw = start(|_| {}).await;
    let url = gw.ws_url(&format!("?token={}&device=phone-1", gw.token("alice")));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token connects");
    use futures_util::StreamExt;
    let first = ws.next().await.expect("frame").expect("ok");
    let welcome: Value = serde_json::from_str(first.to_text().expect("text")).expect("json");
    assert_eq!(
        welcome,
        json!({"type":"welcome","user":"alice","device":"phone-1","node":gw.node(),"heartbeat_s":30})
    );

    let client = gw.connect("bob").await;
    assert_eq!(client.welcome["user"], "bob");
    assert_eq!(client.welcome["device"], "default");
}

/// A device that connects again before its old connection is gone (a reconnect after a
/// network change, before the heartbeat timeout) gets a second connection: the first is not
/// closed, and both get the device's frames until one goes.
#[tokio::test]
async fn a_device_connected_twice_gets_its_frames_on_both_until_one_closes() {
    let gw = start(|_| {}).await;
    let mut old = gw.connect_device("bob", "phone").await;
    let mut new = gw.connect_device("bob", "phone").await;
    let mut alice = gw.connect("alice").await;
    let first = alice.send_message("bob", "to both", "c1").await;
    for conn in [&mut old, &mut new] {
        assert_eq!(
            conn.recv_type("message").await["message_id"],
            first["message_id"]
        );
    }
    old.close().await;
    let second = alice.send_message("bob", "to the one left", "c2").await;
    assert_eq!(
        new.recv_type("message").await["message_id"],
        second["message_id"]
    );
    // Online while a connection is left; offline once none is.
    alice
        .send(json!({"type":"subscribe_presence","users":["bob"]}))
        .await;
    assert_eq!(alice.recv_type("presence").await["status"], "online");
    new.close().await;
    assert_eq!(alice.recv_type("presence").await["status"], "offline");
}

#[tokio::test]
async fn an_invalid_device_id_is_refused() {
    let gw = start(|_| {}).await;
    let url = gw.ws_url(&format!("?token={}&device=bad%20device", gw.token("alice")));
    assert_eq!(refused_status(url).await, 400);
}

#[tokio::test]
async fn dev_mode_mints_tokens_and_serves_the_demo_page() {
    let gw = start(|c| c.dev = Some(true)).await;
    let http = reqwest::Client::new();
    let response = http
        .post(gw.http("/dev/token"))
        .body(r#"{"user":"alice"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let token = body["token"].as_str().expect("token");
    let (_ws, _) = tokio_tungstenite::connect_async(gw.ws_url(&format!("?token={token}")))
        .await
        .expect("a dev token connects");

    for bad in [
        "{",
        r#"{"user":""}"#,
        r#"{"user":"a b"}"#,
        r#"{"name":"x"}"#,
    ] {
        let response = http
            .post(gw.http("/dev/token"))
            .body(bad)
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 400, "{bad}");
    }
    let page = http.get(gw.http("/")).send().await.expect("get /");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(
        html.contains("<html") && html.contains("/dev/token") && html.contains("/ws"),
        "demo page"
    );
}

#[tokio::test]
async fn without_dev_mode_there_are_no_dev_endpoints() {
    let gw = start(|c| c.dev = Some(false)).await;
    let http = reqwest::Client::new();
    let response = http
        .post(gw.http("/dev/token"))
        .body(r#"{"user":"alice"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 404);
    assert_eq!(
        http.get(gw.http("/")).send().await.expect("get").status(),
        404
    );
    gw.connect("alice").await;
}

#[tokio::test]
async fn outside_dev_mode_a_jwt_secret_is_required() {
    let mut config = gateway::Config::defaults();
    config.dev = Some(false);
    config.jwt_secret = None;
    let err = gateway::start(config).await.expect_err("must refuse");
    assert!(err.to_string().contains("--jwt-secret"), "{err}");
}

/// A data dir that cannot be made is named in the error, whichever file start-up was at.
#[tokio::test]
async fn a_data_dir_that_cannot_be_made_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    let data_dir = file.join("data");
    for dev in [true, false] {
        let mut config = gateway::Config::defaults();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin_listen = "127.0.0.1:0".parse().expect("addr");
        config.dev = Some(dev);
        config.jwt_secret = (!dev).then(|| "s".into());
        config.data_dir = data_dir.clone();
        let err = gateway::start(config).await.expect_err("must fail");
        assert!(
            err.to_string().contains(&data_dir.display().to_string()),
            "dev {dev}: {err}"
        );
    }
}

#[tokio::test]
async fn the_origin_allowlist_applies_to_browsers() {
    let gw = start(|c| c.allowed_origins = vec!["https://chat.example".into()]).await;
    let request = |origin: Option<&str>| {
        let mut r = gw
            .ws_url(&format!("?token={}", gw.token("alice")))
            .into_client_request()
            .expect("request");
        if let Some(origin) = origin {
            r.headers_mut()
                .insert("origin", origin.parse().expect("header"));
        }
        r
    };
    assert_eq!(
        refused_status(request(Some("https://evil.example"))).await,
        403
    );
    tokio_tungstenite::connect_async(request(Some("https://chat.example")))
        .await
        .expect("allowed origin");
    tokio_tungstenite::connect_async(request(None))
        .await
        .expect("no origin: not a browser");
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_handshake_timeout() {
    let gw = start(|c| c.handshake_timeout_secs = 1).await;
    let mut socket = tokio::net::TcpStream::connect(gw.client_addr)
        .await
        .expect("tcp");
    let mut buf = [0u8; 512];
    // The server closes the socket (read returns 0) or answers 408; either way it ends.
    let read = tokio::time::timeout(WAIT, socket.read(&mut buf))
        .await
        .expect("closed within the timeout");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
}

#[tokio::test]
async fn operator_endpoints_report_health_readiness_and_metrics() {
    let gw = start(|_| {}).await;
    let alice = gw.connect("alice").await;
    let health = reqwest::get(gw.admin("/healthz")).await.expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(gw.admin("/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready");
    for check in gw.backend_checks() {
        assert_eq!(body["checks"][check], "ok", "{body}");
    }
    assert!(gw.metric("gateway_connections_active").await >= 1.0);
    let text = reqwest::get(gw.admin("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("# TYPE gateway_connections_active gauge"),
        "{text}"
    );
    // Every metric has its catalogue row as HELP text, and the counters without labels are
    // exported before their first event (nothing in this test binary is closed with 1008).
    assert!(
        text.contains("# HELP gateway_connections_total connections welcomed"),
        "{text}"
    );
    assert!(
        text.contains(
            "# HELP gateway_slow_consumer_disconnects_total connections closed with 1008"
        ),
        "{text}"
    );
    assert!(
        text.contains("\ngateway_slow_consumer_disconnects_total 0\n"),
        "{text}"
    );
    // Frames are counted by their type; what is not a request counts as `invalid`.
    let mut alice = alice;
    let ping = r#"gateway_frames_received_total{type="ping"}"#;
    let invalid = r#"gateway_frames_received_total{type="invalid"}"#;
    let (pings, invalids) = (gw.metric(ping).await, gw.metric(invalid).await);
    alice.send(json!({"type":"ping","ref":"m-1"})).await;
    assert_eq!(alice.recv().await, json!({"type":"pong","ref":"m-1"}));
    alice.send_text("not json").await;
    alice.recv_type("error").await;
    assert!(gw.metric(ping).await > pings);
    assert!(gw.metric(invalid).await > invalids);
    // Each connection's replay of its pending queues is measured (alice's was empty).
    assert!(
        gw.metric_reaches("gateway_replayed_messages_count", 1.0)
            .await
            >= 1.0
    );
    assert!(
        gw.metric(r#"gateway_replayed_messages_bucket{le="0"}"#)
            .await
            >= 1.0
    );
}

/// An identity provider's key: an ES256 key pair made by the test, and its JWK.
struct ProviderKey {
    kid: String,
    encoding: jsonwebtoken::EncodingKey,
    jwk: Value,
}

fn provider_key(kid: &str) -> ProviderKey {
    use base64::Engine as _;
    let pair = rcgen::KeyPair::generate().expect("P-256 key");
    let point = pair.public_key_raw();
    assert_eq!(point.len(), 65, "an uncompressed P-256 point");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    ProviderKey {
        kid: kid.into(),
        encoding: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .expect("PKCS#8 PEM"),
        jwk: json!({"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid":kid,
                    "x":b64(&point[1..33]),"y":b64(&point[33..])}),
    }
}

fn provider_token(key: &ProviderKey, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(
        &header,
        &json!({"sub": sub, "exp": now_secs() + 600}),
        &key.encoding,
    )
    .expect("sign")
}

/// Serves `set` at `/jwks` and counts the fetches.
async fn serve_jwks(
    set: std::sync::Arc<std::sync::Mutex<Value>>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get({
            let (set, fetches) = (set.clone(), fetches.clone());
            move || async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(set.lock().expect("set").clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, fetches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_an_identity_provider_signs_are_checked_against_its_published_keys() {
    let first = provider_key("k1");
    let set = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": [first.jwk]})));
    let (jwks, fetches) = serve_jwks(set.clone()).await;
    let gw = start(|c| {
        c.jwks_url = Some(format!("http://{jwks}/jwks"));
        c.jwks_refresh_secs = 3600;
    })
    .await;
    let url = gw.ws_url("");
    let connects = |token: String, user: &'static str| {
        let url = url.clone();
        async move { try_connect_url(&url, &token, user).await.is_ok() }
    };
    assert!(connects(provider_token(&first, "alice"), "alice").await);
    // The operator's HS256 tokens still work beside the provider's.
    assert!(connects(gw.token("bob"), "bob").await);

    // A key the provider rotates in is fetched when a token first names it.
    let second = provider_key("k2");
    set.lock().expect("set")["keys"] = json!([first.jwk, second.jwk]);
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(connects(provider_token(&second, "carol"), "carol").await);
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );

    // A key the set does not hold, a `kid` naming another key, and the provider's key
    // id on an HS256 token signed with its public coordinates: all 401, in plain words.
    let stranger = provider_key("k1");
    let forged = provider_token(&stranger, "mallory");
    let (status, body) = refused(gw.ws_url(&format!("?token={forged}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"invalid token: bad signature"}"#)
    );
    let unknown = provider_token(&provider_key("k9"), "mallory");
    let (status, body) = refused(gw.ws_url(&format!("?token={unknown}"))).await;
    assert_eq!(status, 401);
    assert!(body.contains("unknown signing key"), "{body}");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &json!({"sub": "mallory", "exp": now_secs() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(first.jwk["x"].as_str().expect("x").as_bytes()),
    )
    .expect("sign");
    assert_eq!(
        refused_status(gw.ws_url(&format!("?token={confused}"))).await,
        401
    );
    // Made-up key ids do not make the gateway fetch the set again and again.
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
    for n in 0..5 {
        let made_up = provider_token(&provider_key(&format!("x{n}")), "mallory");
        assert_eq!(
            refused_status(gw.ws_url(&format!("?token={made_up}"))).await,
            401
        );
    }
    assert!(fetches.load(std::sync::atomic::Ordering::SeqCst) <= before + 1);
}

#[tokio::test]
async fn with_only_a_jwks_url_hs256_tokens_are_refused_and_a_dead_url_stops_start_up() {
    let key = provider_key("k1");
    let set = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": [key.jwk]})));
    let (jwks, _) = serve_jwks(set).await;
    let gw = start(|c| {
        c.jwt_secret = None;
        c.dev = Some(false);
        c.jwks_url = Some(format!("http://{jwks}/jwks"));
    })
    .await;
    let token = provider_token(&key, "alice");
    assert!(try_connect_url(&gw.ws_url(""), &token, "alice")
        .await
        .is_ok());
    let hs = gateway::auth::Auth::new(SECRET.as_bytes()).mint("bob", Duration::from_secs(60));
    let (status, body) = refused(gw.ws_url(&format!("?token={hs}"))).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"invalid token: wrong algorithm"}"#)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = gateway::Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().to_path_buf();
    config.dev = Some(false);
    config.jwks_url = Some("http://127.0.0.1:9/jwks".into());
    let error = gateway::start(config).await.expect_err("no JWKS there");
    assert!(
        error
            .to_string()
            .contains("JWKS at http://127.0.0.1:9/jwks"),
        "{error}"
    );
}

/// Runs `gateway keys <args>` as an operator would, returning (success, stdout, stderr).
async fn keys_command(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("keys")
        .args(args)
        .env_remove("STORAGE_KEYS_FILE")
        .env_remove("GATEWAY_ADMIN_URL")
        .output()
        .await
        .expect("run gateway keys");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// The at-rest key rotated with `gateway keys` against a running gateway: a new key added
/// and reloaded, made primary, the old rows sealed again by a background pass, the old key
/// retired (refused before the pass) — and every message, from before and after, still
/// reads back through the WebSocket. The cluster's test dispatchers run in this process
/// with their key ring inline, so this runs against the embedded gateway; the ScyllaDB
/// store's pass is held to the same contract by the store conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_at_rest_key_is_rotated_without_a_restart() {
    if common::cluster_mode() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys");
    let path = file.to_str().expect("utf-8 path").to_owned();
    storage::crypto::write_private(&file, &format!("1:{}\n", "5a".repeat(32))).expect("keys");
    let gw = start(|c| {
        c.keys.keys_file = Some(file.clone());
        c.keys.keys_reload_secs = 0;
    })
    .await;
    let admin = gw.admin("");
    let ring = |json: &str| -> Value { serde_json::from_str(json).expect("JSON ring") };

    let mut alice = gw.connect("alice").await;
    for i in 0..5 {
        alice
            .send_message("bob", &format!("before {i}"), &format!("b{i}"))
            .await;
    }

    let (ok, id, err) = keys_command(&["add", "--file", &path]).await;
    assert!(ok, "add: {err}");
    assert_eq!(id.trim(), "2");
    let (ok, out, err) = keys_command(&["reload", "--admin", &admin]).await;
    assert!(ok, "reload: {err}");
    assert_eq!(ring(&out)["primary"], 1, "added, not yet primary: {out}");
    assert_eq!(ring(&out)["key_ids"], json!([1, 2]));
    let (ok, _, err) = keys_command(&["retire", "--file", &path, "1", "--admin", &admin]).await;
    assert!(
        !ok && err.contains("primary"),
        "retiring the primary: {err}"
    );

    let (ok, _, err) = keys_command(&["promote", "--file", &path, "2"]).await;
    assert!(ok, "promote: {err}");
    let (ok, out, err) = keys_command(&["reload", "--admin", &admin]).await;
    assert!(ok, "reload: {err}");
    assert_eq!(ring(&out)["primary"], 2, "{out}");
    for i in 0..2 {
        alice
            .send_message("bob", &format!("after {i}"), &format!("a{i}"))
            .await;
    }
    let (ok, _, err) = keys_command(&["retire", "--file", &path, "1", "--admin", &admin]).await;
    assert!(
        !ok && err.contains("re-encryption"),
        "retired before a pass: {err}"
    );

    let (ok, out, err) = keys_command(&["reencrypt", "--admin", &admin]).await;
    assert!(ok, "reencrypt: {err}");
    assert!(
        out.contains("done: 7 rows read, 5 sealed again with key 2"),
        "{out}"
    );
    let (ok, _, err) = keys_command(&["retire", "--file", &path, "1", "--admin", &admin]).await;
    assert!(ok, "retire after the pass: {err}");
    let (ok, out, err) = keys_command(&["reload", "--admin", &admin]).await;
    assert!(ok, "reload: {err}");
    assert_eq!(ring(&out)["key_ids"], json!([2]), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key file stays owner-only");
    }

    // Every message, sealed under either key, reads back with key 2 alone.
    let mut alice = gw.connect("alice").await;
    alice
        .send(json!({"type":"history","ref":"h","conversation":"dm:alice:bob","limit":100}))
        .await;
    let history = alice.recv_type("history").await;
    let mut bodies: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["body"].as_str())
        .collect();
    bodies.sort_unstable();
    assert_eq!(
        bodies,
        ["after 0", "after 1", "before 0", "before 1", "before 2", "before 3", "before 4"]
    );

    // A key file that does not parse is refused and the ring in use stays.
    std::fs::write(&file, "2:not-hex\n").expect("write");
    let (ok, _, err) = keys_command(&["reload", "--admin", &admin]).await;
    assert!(!ok && err.contains("kept its key ring"), "{err}");
    let (ok, out, _) = keys_command(&["status", "--admin", &admin]).await;
    assert!(ok);
    assert_eq!(ring(&out)["primary"], 2, "{out}");
}
