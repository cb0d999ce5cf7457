//! The operator port: liveness, readiness by backend, Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use dispatcher::InboundLog;
use presence::PresenceService;
use serde_json::{json, Map, Value};
use storage::MessageStore;
use tokio::time::timeout;

use crate::app::App;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn check<E: std::fmt::Display>(
    app: &App,
    call: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match timeout(app.config.backend_timeout(), call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let results = [
        (
            format!("store:{}", app.store.backend()),
            check(&app, app.store.ping()).await,
        ),
        (
            format!("presence:{}", app.presence.backend()),
            check(&app, app.presence.ping()).await,
        ),
        (
            format!("bus:{}", app.bus.backend()),
            check(&app, app.bus.ping()).await,
        ),
        (
            "gateway".to_owned(),
            if app.is_draining() {
                Err("draining".into())
            } else {
                Ok(())
            },
        ),
    ];
    let ready = results.iter().all(|(_, r)| r.is_ok());
    let checks: Map<String, Value> = results
        .into_iter()
        .map(|(name, r)| (name, Value::String(r.err().unwrap_or_else(|| "ok".into()))))
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if ready { "ready" } else { "unavailable" }, "checks": checks});
    (status, Json(body))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
