//! The `dispatcher` binary: one member of the dispatchers' consumer group of a
//! distributed cluster. Run any number; Kafka spreads the partitions over them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use dispatcher::startup::logging::LogFormat;
use dispatcher::startup::{self, BackendArgs, Backends, KeyArgs};
use dispatcher::Dispatcher;
use metrics_exporter_prometheus::PrometheusHandle;
use storage::crypto::Keyring;
use tokio_util::sync::CancellationToken;

/// jemalloc: under load glibc malloc cost a quarter of the CPU (consolidation, and arena
/// locks between threads); idle connections cost the same with both.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Consumes the inbound log, persists to ScyllaDB, delivers through Redis.
#[derive(Debug, Parser)]
#[command(name = "dispatcher", version, about)]
struct Config {
    #[command(flatten)]
    backends: BackendArgs,

    /// The at-rest key ring (the same as the gateways').
    #[command(flatten)]
    keys: KeyArgs,

    /// Operator port: /healthz, /readyz, /metrics.
    #[arg(
        long,
        env = "DISPATCHER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    admin_listen: SocketAddr,

    /// Milliseconds any one backend call may take.
    #[arg(long, env = "DISPATCHER_BACKEND_TIMEOUT_MS", default_value_t = 5000)]
    backend_timeout_ms: u64,

    /// Seconds a device stays online without a heartbeat (as on the gateways).
    #[arg(long, env = "PRESENCE_TTL_SECS", default_value_t = 300)]
    presence_ttl_secs: u64,

    /// Log format.
    #[arg(long, env = "DISPATCHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

struct Admin {
    backends: Backends,
    metrics: PrometheusHandle,
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    startup::logging::init(config.log_format);
    match config.backends.distributed() {
        Ok(true) => {}
        Ok(false) => anyhow::bail!(
            "the dispatcher needs --kafka-brokers, --scylla-nodes and --redis-url \
             (the embedded gateway runs its own dispatcher)"
        ),
        Err(e) => anyhow::bail!(e),
    }
    config.backends.security().map_err(anyhow::Error::msg)?;
    let keys = config.keys.required().map_err(anyhow::Error::msg)?;
    let keys = Keyring::load(&keys, std::path::Path::new(".")).context("loading the key ring")?;
    let timeout = Duration::from_millis(config.backend_timeout_ms.max(1));
    let backends = config
        .backends
        .connect(keys, Duration::from_secs(config.presence_ttl_secs), timeout)
        .await
        .context("connecting the backends")?;

    let admin = Arc::new(Admin {
        backends: backends.clone(),
        metrics: startup::metrics::handle(),
        timeout,
    });
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin_listen))?;
    let admin_addr = listener.local_addr()?;
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(admin);
    let stop = CancellationToken::new();
    backends
        .store
        .keys()
        .reload_on_change(config.keys.reload_every(), stop.clone())
        .context("watching the key file")?;
    let admin_server = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    });
    tracing::info!(admin = %admin_addr, "dispatcher ready");

    let run = tokio::spawn(Dispatcher::new(backends).run(stop.clone()));
    startup::shutdown_signal().await;
    tracing::info!("shutdown requested");
    stop.cancel();
    run.await
        .context("dispatcher task")?
        .context("dispatcher")?;
    let _ = admin_server.await;
    Ok(())
}

async fn readyz(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    startup::readiness(admin.backends.readiness(admin.timeout).await)
}

async fn render_metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    admin.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
}
