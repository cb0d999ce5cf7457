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
    let _alice = gw.connect("alice").await;
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
}
