//! What both binaries do to start and stop, in one place so that their `main`s read alike:
//! the backend flags and the [`Backends`] they give (distributed or embedded), the key ring's
//! flags, logging, the metrics recorder, the readiness answer, and the signals that begin a
//! shutdown.

pub mod backends;
pub mod keys;
pub mod logging;
pub mod metrics;

use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};

pub use backends::{BackendArgs, Backends};
pub use keys::KeyArgs;

/// The `/readyz` answer from named checks: `200 {"status":"ready","checks":{name:"ok"}}`
/// when every check passed, else `503` with `"unavailable"` and each failure's reason.
pub fn readiness(checks: Vec<(String, Result<(), String>)>) -> (StatusCode, Json<Value>) {
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let checks: Map<String, Value> = checks
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

/// Resolves on SIGTERM or Ctrl-C (SIGINT): the start of a graceful shutdown.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
