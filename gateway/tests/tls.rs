//! TLS on the client port (`wss://`) and the admin port: certificates made by the test,
//! a reload on SIGHUP and on a file change that keeps open connections, a failed reload
//! that keeps the certificate in use, and start-up refusing files that do not fit.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{start, try_connect_url, try_connect_with, Client, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::Connector;

/// A self-signed certificate for `localhost`, as PEM files in `dir`, and the DER a client
/// trusts it by.
struct Certificate {
    der: CertificateDer<'static>,
}

fn make_certificate(dir: &Path) -> Certificate {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    write_atomically(&dir.join("cert.pem"), made.cert.pem().as_bytes());
    write_atomically(
        &dir.join("key.pem"),
        made.signing_key.serialize_pem().as_bytes(),
    );
    Certificate {
        der: made.cert.der().clone(),
    }
}

/// Writes through a rename, as a deployment tool (or a Kubernetes secret) does, so a
/// reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).expect("write");
    std::fs::rename(&partial, path).expect("rename");
}

fn trusting(cert: &Certificate) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.der.clone()).expect("root");
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

struct Tls {
    dir: tempfile::TempDir,
}

impl Tls {
    fn new() -> Tls {
        Tls {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}

async fn connect_wss(
    gw: &common::TestGateway,
    user: &str,
    trust: &Certificate,
) -> Result<Client, String> {
    let url = format!("wss://localhost:{}/ws", gw.client_addr.port());
    try_connect_with(
        &url,
        &gw.token(user),
        user,
        Some(Connector::Rustls(trusting(trust))),
    )
    .await
}

/// Connects until a client that trusts only `trust` gets in: the gateway has reloaded.
async fn await_certificate(gw: &common::TestGateway, trust: &Certificate) -> Client {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect_wss(gw, "watcher", trust).await {
            Ok(client) => return client,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("the new certificate was not served within {WAIT:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn exchange(from: &mut Client, to: &mut Client, body: &str) {
    let to_user = to.user.clone();
    let client_msg_id = uuid::Uuid::new_v4().simple().to_string();
    from.send_message(&to_user, body, &client_msg_id).await;
    let message = to.recv_type("message").await;
    assert_eq!(message["body"], body, "{message}");
}

/// `GET path` on an HTTPS port, trusting `trust`: the status line and the body.
async fn https_get(addr: std::net::SocketAddr, path: &str, trust: &Certificate) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let connector = tokio_rustls::TlsConnector::from(trusting(trust));
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(WAIT, tls.read_to_string(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    response
}

fn hang_up_this_process() {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_clients_and_sighup_swaps_the_certificate_under_open_connections() {
    let files = Tls::new();
    let first = make_certificate(files.dir.path());
    let gw = start(|c| {
        c.tls_cert = Some(files.cert());
        c.tls_key = Some(files.key());
        c.admin_tls = true;
        c.tls_reload_secs = 0;
    })
    .await;

    let mut alice = connect_wss(&gw, "alice", &first)
        .await
        .expect("alice over wss");
    let mut bob = connect_wss(&gw, "bob", &first).await.expect("bob over wss");
    exchange(&mut alice, &mut bob, "over TLS").await;
    // Plain WebSocket on a TLS port gets nowhere.
    let plain = try_connect_url(
        &format!("ws://{}/ws", gw.client_addr),
        &gw.token("carol"),
        "carol",
    )
    .await;
    assert!(plain.is_err(), "plain ws:// was served on the TLS port");
    // So does the admin port, with the same certificate.
    let health = https_get(gw.admin_addr, "/healthz", &first).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // A new certificate, then SIGHUP: new connections get it, open ones go on.
    let second = make_certificate(files.dir.path());
    hang_up_this_process();
    let _watcher = await_certificate(&gw, &second).await;
    exchange(&mut alice, &mut bob, "still here after the reload").await;
    exchange(&mut bob, &mut alice, "and back").await;
    assert!(
        connect_wss(&gw, "dave", &first).await.is_err(),
        "the old certificate is still served"
    );

    // A key that does not parse: the reload fails, loudly, and the certificate stays.
    write_atomically(
        &files.key(),
        b"-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n",
    );
    hang_up_this_process();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = https_get(gw.admin_addr, "/metrics", &second).await;
        // Counted once per gateway of the process (a test cluster has two).
        if metrics.contains("gateway_tls_reloads_total{result=\"failed\"} ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed reload counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut erin = connect_wss(&gw, "erin", &second)
        .await
        .expect("the certificate in use stays after a failed reload");
    exchange(&mut alice, &mut erin, "after a failed reload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_file_is_served_without_a_signal() {
    let files = Tls::new();
    let first = make_certificate(files.dir.path());
    let gw = start(|c| {
        c.tls_cert = Some(files.cert());
        c.tls_key = Some(files.key());
        c.tls_reload_secs = 1;
    })
    .await;
    let mut alice = connect_wss(&gw, "alice", &first).await.expect("alice");
    let second = make_certificate(files.dir.path());
    let mut watcher = await_certificate(&gw, &second).await;
    exchange(&mut alice, &mut watcher, "across the change").await;
    // The admin port stayed plain: TLS there is its own choice.
    let health = reqwest::get(gw.admin("/healthz"))
        .await
        .expect("plain admin");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn start_up_refuses_tls_files_that_do_not_fit_and_names_them() {
    let files = Tls::new();
    make_certificate(files.dir.path());
    let other = Tls::new();
    make_certificate(other.dir.path());
    let attempt = |cert: PathBuf, key: PathBuf| {
        let mut config = gateway::Config::defaults();
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin_listen = "127.0.0.1:0".parse().expect("addr");
        config.data_dir = files.dir.path().join("data");
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
        gateway::start(config)
    };
    let mismatched = attempt(files.cert(), other.key())
        .await
        .expect_err("mismatch");
    let text = mismatched.to_string();
    assert!(
        text.contains("does not suit") && text.contains(&files.cert().display().to_string()),
        "{text}"
    );
    let missing = attempt(files.dir.path().join("nope.pem"), files.key())
        .await
        .expect_err("missing");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    std::fs::write(files.dir.path().join("empty.pem"), "").expect("write");
    let empty = attempt(files.dir.path().join("empty.pem"), files.key())
        .await
        .expect_err("empty");
    assert!(empty.to_string().contains("no PEM"), "{empty}");
}
