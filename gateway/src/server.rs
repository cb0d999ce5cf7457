//! The client port (WebSocket at `/ws`, dev endpoints), the accept loop, start-up of the
//! embedded system, and the drain on shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dispatcher::startup::Backends;
use dispatcher::Dispatcher;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use presence::PresenceService;
use serde::Deserialize;
use serde_json::json;
use storage::crypto::{KeySource, Keyring};
use storage::EmbeddedConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::fragments::FragmentCap;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::Auth;
use crate::config::Config;
use crate::tls::Tls;
use crate::{connection, Error};

/// How often the outbound queues' depth is sampled for the metrics.
const QUEUE_SAMPLE: Duration = Duration::from_secs(5);
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A started gateway: its bound addresses and the means to stop it.
#[derive(Debug)]
pub struct Running {
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub node: String,
    shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Running {
    /// Starts the drain: stop accepting, close connections with 1012 over the drain period.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the drain is over and every backend is closed.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Binds both ports, connects the distributed backends or opens the embedded ones (and
/// starts the in-process dispatcher), and serves until [`Running::shutdown`].
pub async fn start(config: Config) -> Result<Running, Error> {
    config.validate().map_err(Error::Config)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::new(cert, key).map_err(Error::Config)?),
        _ => None,
    };
    let client = bind(config.listen, config.listen_backlog).map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let admin = bind(config.admin_listen, 128).map_err(|source| Error::Bind {
        addr: config.admin_listen,
        source,
    })?;
    let client_addr = client.local_addr()?;
    let admin_addr = admin.local_addr()?;

    let node = config
        .node_id
        .clone()
        .unwrap_or_else(|| format!("gw-{:08x}", rand::random::<u32>()));
    let given_secret = config.jwt_secret.as_deref().is_some_and(|s| !s.is_empty());
    let hs256 = given_secret || config.dev_mode();
    let secret = match &config.jwt_secret {
        Some(secret) if !secret.is_empty() => secret.clone().into_bytes(),
        // Only an identity provider signs tokens: HS256 is off, and the secret (which
        // also signs the embedded mode's media URLs) is this process's own.
        _ if !config.dev_mode() => rand::random::<[u8; 32]>().to_vec(),
        _ => dev_secret(&config.data_dir)?,
    };
    let jwks = match &config.jwks_url {
        Some(url) => Some(crate::jwks::Jwks::fetch(url).await.map_err(Error::Config)?),
        None => None,
    };

    let keys = match (&config.keys_file, &config.keys) {
        (Some(path), _) => KeySource::File(path.clone()),
        (None, Some(inline)) => KeySource::Inline(inline.clone()),
        (None, None) => KeySource::DevGenerated,
    };
    let dispatcher_stop = CancellationToken::new();
    let (backends, dispatcher) = if config.is_distributed() {
        // One gateway of a cluster: dispatchers run as their own processes.
        let keys = Keyring::load(&keys, &config.data_dir)?;
        let backends = config
            .backends
            .connect(keys, config.presence_ttl(), config.backend_timeout())
            .await?;
        (backends, None)
    } else {
        // The embedded system: no backend is configured.
        let store = EmbeddedConfig {
            data_dir: config.data_dir.clone(),
            keys,
            idempotency_ttl: Duration::from_secs(48 * 3600),
            cache_bytes: config.store_cache_mib << 20,
            memtable_bytes: config.store_memtable_mib << 20,
        };
        let backends = Backends::embedded(store, config.presence_ttl(), config.partitions).await?;
        let dispatcher =
            tokio::spawn(Dispatcher::new(backends.clone()).run(dispatcher_stop.clone()));
        (backends, Some(dispatcher))
    };

    let blobs = crate::media::open(&config, client_addr, &secret)?;
    let deliveries = backends.presence.deliveries(&node).await?;
    let required = crate::auth::Required {
        audience: config.jwt_audience.clone(),
        issuer: config.jwt_issuer.clone(),
    };
    let admin_tls = config.admin_tls;
    let app = Arc::new(App::new(
        config,
        node.clone(),
        match &jwks {
            Some(jwks) => Auth::requiring(&secret, required).with_jwks(jwks.clone(), hs256),
            None => Auth::requiring(&secret, required),
        },
        backends,
        blobs,
        crate::metrics::handle(),
    ));
    tracing::info!(
        client = %client_addr,
        admin = %admin_addr,
        node = %node,
        dev = app.config.dev_mode(),
        store = app.store.backend(),
        presence = app.presence.backend(),
        log = app.log.backend(),
        media = app.blobs.as_ref().map_or("none", |b| b.backend()),
        "gateway ready"
    );

    let shutdown = CancellationToken::new();
    if let Some(jwks) = &jwks {
        jwks.refresh_every(
            Duration::from_secs(app.config.jwks_refresh_secs),
            shutdown.clone(),
        );
    }
    app.store.keys().reload_on_change(
        Duration::from_secs(app.config.keys_reload_secs),
        shutdown.clone(),
    )?;
    if let Some(tls) = &tls {
        tls.reload_on_change(
            Duration::from_secs(app.config.tls_reload_secs),
            shutdown.clone(),
        )?;
    }
    let done = tokio::spawn(run(
        app,
        Listener::new(client, tls.clone()),
        Listener::new(admin, tls.filter(|_| admin_tls)),
        deliveries,
        shutdown.clone(),
        dispatcher_stop,
        dispatcher,
    ));
    Ok(Running {
        client_addr,
        admin_addr,
        node,
        shutdown,
        done,
    })
}

/// Binds a listening socket with room for `backlog` connections waiting to be accepted
/// (the kernel caps it at `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128:
/// a reconnect storm overflows that, and each SYN dropped costs its client a one-second
/// retransmission (measured with `loadtest hostile`).
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The dev-mode signing secret, generated into the data dir once (readable by its owner
/// only) so tokens survive restarts.
fn dev_secret(data_dir: &Path) -> Result<Vec<u8>, Error> {
    let path = data_dir.join("dev-jwt-secret");
    std::fs::create_dir_all(data_dir)?;
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => Ok(secret.trim().as_bytes().to_vec()),
        _ => {
            let secret = hex::encode(rand::random::<[u8; 32]>());
            // Owner-only, as the dev keys are (an empty file left over is replaced).
            let _ = std::fs::remove_file(&path);
            storage::crypto::write_private(&path, &secret)?;
            tracing::warn!(path = %path.display(), "dev mode: generated a JWT secret");
            Ok(secret.into_bytes())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    app: Arc<App>,
    client: Listener,
    admin: Listener,
    mut deliveries: tokio::sync::mpsc::UnboundedReceiver<Vec<presence::NodeDelivery>>,
    shutdown: CancellationToken,
    dispatcher_stop: CancellationToken,
    dispatcher: Option<JoinHandle<dispatcher::Result<()>>>,
) {
    let background = CancellationToken::new();

    let admin_stop = CancellationToken::new();
    let admin_server = tokio::spawn({
        let stop = admin_stop.clone();
        let router = crate::admin::router(app.clone());
        let timeout = app.config.handshake_timeout();
        // Operator connections are not the drain's to wait for: plain tasks.
        admin.serve(router, timeout, stop, |connection| {
            tokio::spawn(connection);
        })
    });

    // Deliveries for this node, from the dispatchers.
    let router_task = tokio::spawn({
        let (app, stop) = (app.clone(), background.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    batch = deliveries.recv() => match batch {
                        Some(batch) => {
                            for delivery in batch {
                                app.hub.dispatch(&app.node, delivery);
                            }
                        }
                        None => return,
                    },
                }
            }
        }
    });

    // Presence changes, for this node's subscribers.
    let presence_task = tokio::spawn({
        let (app, stop) = (app.clone(), background.clone());
        let mut changes = app.presence.changes();
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(status) => app.hub.presence_changed(&status),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "presence changes lagged");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    });

    // Sends the dispatcher did not answer in time get `unavailable`; and the outbound
    // queues' depth, sampled.
    let deadline_task = tokio::spawn({
        let (app, stop) = (app.clone(), background.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sample = tokio::time::interval(QUEUE_SAMPLE);
            sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => app.deadlines.expire(std::time::Instant::now()),
                    _ = sample.tick() => {
                        let (all, fullest) = app.hub.queued_frames();
                        metrics::gauge!("gateway_outbound_queued_frames").set(all as f64);
                        metrics::gauge!("gateway_outbound_queue_fullest_frames").set(fullest as f64);
                    }
                }
            }
        }
    });

    // Presence heartbeats for this node's users, and housekeeping.
    let heartbeat_task = tokio::spawn({
        let (app, stop) = (app.clone(), background.clone());
        async move {
            let every = (app.config.presence_ttl() / 3)
                .clamp(Duration::from_millis(100), Duration::from_secs(30));
            let mut tick = tokio::time::interval(every);
            let mut failing = false;
            let mut restorations = PresenceService::restorations(&app.presence);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    Ok(()) = restorations.changed() => {
                        // Presence lost this node's devices and has them again.
                        let all = app.hub.all();
                        tracing::info!(connections = all.len(), "catching up after presence was restored");
                        tokio::spawn(catch_up_all(all, app.clone()));
                    }
                    _ = tick.tick() => {
                        let users = app.hub.users();
                        match PresenceService::heartbeat(&app.presence, &app.node, &users).await {
                            Err(e) => {
                                tracing::warn!(error = %e, "presence heartbeat failed");
                                failing = true;
                            }
                            Ok(()) => {
                                // The heartbeat registered every device of this node again:
                                // whatever was stored for them while they could not be
                                // located is delivered now, not on their next connect.
                                let behind = if std::mem::take(&mut failing) {
                                    app.unlocated.take();
                                    app.hub.all()
                                } else {
                                    app.unlocated.take()
                                };
                                if !behind.is_empty() {
                                    tracing::info!(connections = behind.len(), "catching up after presence was restored");
                                    tokio::spawn(catch_up_all(behind, app.clone()));
                                }
                            }
                        }
                        app.sends.forget_idle();
                        app.claims.forget_idle();
                        app.metrics.run_upkeep();
                    }
                }
            }
        }
    });

    let collector = tokio::spawn(crate::media::collect(app.clone(), background.clone()));

    let tracker = app.tracker.clone();
    client
        .serve(
            client_router(app.clone()),
            app.config.handshake_timeout(),
            shutdown,
            |connection| {
                tracker.spawn(connection);
            },
        )
        .await;

    // Drain: refuse new upgrades, then close every connection with 1012, spread over the
    // drain period so that clients do not all reconnect at the same instant. Each stops
    // reading and sends the answers to the sends it read before its close frame.
    app.start_draining();
    let conns = app.hub.all();
    tracing::info!(connections = conns.len(), "draining");
    let step = app.config.drain() / (conns.len().max(1) as u32);
    for conn in conns {
        conn.close(CloseCode::Restart);
        if !step.is_zero() {
            tokio::time::sleep(step).await;
        }
    }
    app.tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 10 s of the drain");
    }
    background.cancel();
    let _ = tokio::join!(
        router_task,
        presence_task,
        heartbeat_task,
        deadline_task,
        collector
    );
    dispatcher_stop.cancel();
    if let Some(dispatcher) = dispatcher {
        match dispatcher.await {
            Ok(Err(e)) => tracing::error!(error = %e, "dispatcher failed"),
            Err(e) => tracing::error!(error = %e, "dispatcher task failed"),
            Ok(Ok(())) => {}
        }
    }
    admin_stop.cancel();
    let _ = admin_server.await;
    tracing::info!("gateway stopped");
}

/// A listening port, with TLS or without.
struct Listener {
    tcp: TcpListener,
    tls: Option<Tls>,
}

impl Listener {
    fn new(tcp: TcpListener, tls: Option<Tls>) -> Listener {
        Listener { tcp, tls }
    }

    /// Accepts connections until `stop` and hands each to `spawn` as one future: the TLS
    /// handshake (when on) and HTTP, both within `timeout`, then whatever the router does.
    async fn serve(
        self,
        router: Router,
        timeout: Duration,
        stop: CancellationToken,
        spawn: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.tcp.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (router, stop) = (router.clone(), stop.clone());
            match &self.tls {
                None => spawn(Box::pin(serve_http(stream, router, timeout, stop))),
                Some(tls) => {
                    let acceptor = tls.acceptor().clone();
                    spawn(Box::pin(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => serve_http(stream, router, timeout, stop).await,
                            Ok(Err(e)) => {
                                metrics::counter!("gateway_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!(error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                metrics::counter!("gateway_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!("TLS handshake timed out");
                            }
                        }
                    }))
                }
            }
        }
    }
}

async fn serve_http<S>(stream: S, router: Router, timeout: Duration, shutdown: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => if let Err(e) = served {
            tracing::debug!(error = %e, "http connection ended");
        },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn client_router(app: Arc<App>) -> Router {
    let mut router = Router::new().route("/ws", get(upgrade));
    if app.config.dev_mode() {
        router = router
            .route("/", get(|| async { Html(include_str!("demo.html")) }))
            .route("/dev/token", post(dev_token));
    }
    if app.blobs.as_ref().is_some_and(|b| b.backend() == "local") {
        router = crate::media::routes(router);
    }
    router
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))) })
        .with_state(app)
}

fn refuse(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let mut response = (status, Json(json!({"error": message.to_string()}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    device: Option<String>,
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// `GET /ws`: authenticate, then upgrade. Every refusal is an HTTP status, never an upgrade.
async fn upgrade(
    State(app): State<Arc<App>>,
    Query(query): Query<WsQuery>,
    mut request: Request,
) -> Response {
    if app.is_draining() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: connect to another node",
        );
    }
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let token = bearer.or(query.token.as_deref()).unwrap_or("");
    let user = match app.auth.authenticate(token).await {
        Ok(user) => user,
        Err(e) => {
            metrics::counter!("gateway_auth_failures_total").increment(1);
            return refuse(StatusCode::UNAUTHORIZED, e);
        }
    };
    let device = query.device.unwrap_or_else(|| "default".to_owned());
    if !storage::is_valid_id(&device) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`device` must be 1-64 characters of A-Z a-z 0-9 _ . @ -",
        );
    }
    if !app.config.allowed_origins.is_empty() {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            if !app.config.allowed_origins.iter().any(|o| o == origin) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!("origin {origin} is not allowed"),
                );
            }
        }
    }
    let is_upgrade = header_has(headers, header::CONNECTION, "upgrade")
        && header_has(headers, header::UPGRADE, "websocket");
    if !is_upgrade {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket only",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        );
    };

    let Some(slot) = app
        .hub
        .reserve(&user, app.config.max_conns_per_user as usize)
    else {
        metrics::counter!("gateway_conn_cap_refusals_total").increment(1);
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{user} has {} connections on this gateway, the most allowed: close one",
                app.config.max_conns_per_user
            ),
        );
    };
    let config = app.ws_config();
    let max_fragments = app.config.max_fragments as usize;
    app.tracker.spawn({
        let app = app.clone();
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        FragmentCap::new(TokioIo::new(upgraded), max_fragments),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    // A task of its own: this one, with the upgrade's state, ends here
                    // instead of staying alive (and allocated) for the whole connection.
                    let tracker = app.tracker.clone();
                    tracker.spawn(connection::serve(ws.split(), user, device, app, slot));
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
    });

    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// `POST /dev/token` (dev mode): `{"user":"alice"}` → `{"token":"…"}`, valid 24 hours.
async fn dev_token(State(app): State<Arc<App>>, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct TokenRequest {
        user: String,
    }
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"user\":\"<id>\"}}: {e}"),
            )
        }
    };
    if !storage::is_valid_id(&request.user) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`user` must be 1-64 characters of A-Z a-z 0-9 _ . @ -",
        );
    }
    let token = app.auth.mint(&request.user, Duration::from_secs(24 * 3600));
    Json(json!({ "token": token, "user": request.user })).into_response()
}

/// Catches up connections after presence was restored, a few at a time: each reads its
/// user's pending queue from the store.
async fn catch_up_all(conns: Vec<Arc<crate::hub::ConnHandle>>, app: Arc<App>) {
    use futures_util::StreamExt;
    futures_util::stream::iter(conns)
        .for_each_concurrent(32, |conn| connection::catch_up(conn, app.clone()))
        .await;
}
