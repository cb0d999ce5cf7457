//! The composition root: start-up (ports, authentication, the backends, distributed or
//! embedded with its in-process dispatcher), the tasks a running gateway keeps, and the
//! drain on shutdown. The routes are in `routes.rs`, the accept loop in `listener.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dispatcher::startup::Backends;
use dispatcher::Dispatcher;
use presence::PresenceService;
use storage::crypto::{KeySource, Keyring};
use storage::EmbeddedConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::Auth;
use crate::config::Config;
use crate::listener::{bind, Listener};
use crate::routes::client_router;
use crate::tls::Tls;
use crate::{connection, Error};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How often the outbound queues' depth is sampled for the metrics.
const QUEUE_SAMPLE: Duration = Duration::from_secs(5);

/// How long after presence says it was restored the catch-up of every connection starts.
/// One outage restores more than once (a Redis Cluster reconnects once per primary, and the
/// subscriber's connections renew their subscriptions on their own): every restoration
/// within this time joins one catch-up instead of starting one each.
const CATCH_UP_GATHER: Duration = Duration::from_millis(500);

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

    let keys = config.keys.source().unwrap_or(KeySource::DevGenerated);
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
    app.store
        .keys()
        .reload_on_change(app.config.keys.reload_every(), shutdown.clone())?;
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

/// The dev-mode signing secret, generated into the data dir once (readable by its owner
/// only) so tokens survive restarts.
fn dev_secret(data_dir: &Path) -> Result<Vec<u8>, Error> {
    let path = data_dir.join("dev-jwt-secret");
    std::fs::create_dir_all(data_dir).map_err(|source| Error::File {
        path: data_dir.to_owned(),
        source,
    })?;
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
                            let mut behind = Vec::new();
                            for delivery in batch {
                                app.hub.dispatch(&app.node, delivery, &mut behind);
                            }
                            for conn in behind {
                                tokio::spawn(connection::catch_up(conn, app.clone()));
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

    // Sends the dispatcher did not answer in time get `unavailable`; the outbound queues'
    // depth, sampled; and what connections keep of their last replay, once its time is up.
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
                        let (all, fullest) = app.hub.sweep();
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
            let mut catch_up_at: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    Ok(()) = restorations.changed() => {
                        // Presence lost this node's devices and has them again.
                        catch_up_at.get_or_insert_with(|| tokio::time::Instant::now() + CATCH_UP_GATHER);
                    }
                    () = async {
                        match catch_up_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        catch_up_at = None;
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
                            Ok(lost) => {
                                // The heartbeat registered every device of this node again:
                                // whatever was stored for them while they could not be
                                // located (heartbeats failed, a connect's registration
                                // failed, or presence had lost the device: Redis came back
                                // empty, or another process reaped this node as dead) is
                                // delivered now, not on their next connect.
                                let behind = if std::mem::take(&mut failing) {
                                    app.unlocated.take();
                                    app.hub.all()
                                } else {
                                    let mut behind = app.unlocated.take();
                                    let listed: HashSet<u64> =
                                        behind.iter().map(|c| c.id).collect();
                                    behind.extend(
                                        app.hub.of(&lost).into_iter().filter(|c| !listed.contains(&c.id)),
                                    );
                                    behind
                                };
                                if !behind.is_empty() {
                                    tracing::info!(connections = behind.len(), "catching up after presence was restored");
                                    tokio::spawn(catch_up_all(behind, app.clone()));
                                }
                            }
                        }
                        app.sends.forget_idle();
                        app.claims.forget_idle();
                        app.to_device.forget_idle();
                        app.group_notices.forget_idle();
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

/// Catches up connections after presence was restored, a few at a time: each reads its
/// user's pending queue from the store.
async fn catch_up_all(conns: Vec<Arc<crate::hub::ConnHandle>>, app: Arc<App>) {
    use futures_util::StreamExt;
    futures_util::stream::iter(conns)
        .for_each_concurrent(32, |conn| connection::catch_up(conn, app.clone()))
        .await;
}
