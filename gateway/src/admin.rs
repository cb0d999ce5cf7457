//! The operator port: liveness, readiness by backend, Prometheus metrics, and the at-rest
//! key ring (its state, a reload, a background re-encryption pass) for `gateway keys`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use storage::{MessageStore, Reencryption};

use crate::app::App;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/keys", get(keys))
        .route("/admin/keys/reload", post(reload_keys))
        .route("/admin/keys/reencrypt", post(reencrypt))
        .with_state(app)
}

/// The re-encryption pass this node runs or ran last.
#[derive(Default)]
pub struct Reencryptions {
    last: Mutex<Option<Pass>>,
}

struct Pass {
    /// The primary key when the pass started: the one it sealed rows with.
    primary: u32,
    started: Instant,
    progress: Arc<Reencryption>,
    /// Seconds it took and how it ended, once it has.
    finished: Option<(f64, Result<(), String>)>,
}

impl Reencryptions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pass>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn describe(&self) -> Value {
        let last = self.lock();
        let Some(pass) = last.as_ref() else {
            return Value::Null;
        };
        let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        let (state, seconds, error) = match &pass.finished {
            None => ("running", pass.started.elapsed().as_secs_f64(), None),
            Some((seconds, Ok(()))) => ("done", *seconds, None),
            Some((seconds, Err(e))) => ("failed", *seconds, Some(e.clone())),
        };
        json!({
            "state": state,
            "primary": pass.primary,
            "scanned": count(&pass.progress.scanned),
            "rewritten": count(&pass.progress.rewritten),
            "seconds": (seconds * 10.0).round() / 10.0,
            "error": error,
        })
    }
}

fn key_state(app: &App) -> Value {
    let keys = app.store.keys();
    json!({
        "primary": keys.primary(),
        "key_ids": keys.key_ids(),
        "file": keys.file().map(|p| p.display().to_string()),
        "reencryption": app.reencryptions.describe(),
    })
}

async fn keys(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(key_state(&app))
}

/// Reads the key file again now (as SIGHUP does); 422 with the reason if it does not parse,
/// and the ring in use stays.
async fn reload_keys(State(app): State<Arc<App>>) -> impl IntoResponse {
    match app.store.keys().reload_logged("admin request") {
        Ok(_) => (StatusCode::OK, Json(key_state(&app))),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// Starts a pass that seals every row the primary key did not seal again with it, in the
/// background (202); 409 while one runs. `GET /admin/keys` follows its progress.
async fn reencrypt(State(app): State<Arc<App>>) -> impl IntoResponse {
    let progress = Arc::new(Reencryption::default());
    {
        let mut last = app.reencryptions.lock();
        if last.as_ref().is_some_and(|p| p.finished.is_none()) {
            drop(last);
            return (StatusCode::CONFLICT, Json(key_state(&app)));
        }
        *last = Some(Pass {
            primary: app.store.keys().primary(),
            started: Instant::now(),
            progress: progress.clone(),
            finished: None,
        });
    }
    tokio::spawn({
        let app = app.clone();
        async move {
            let started = Instant::now();
            tracing::info!(
                primary = app.store.keys().primary(),
                "re-encryption pass started"
            );
            let result = app
                .store
                .reencrypt(&progress)
                .await
                .map_err(|e| e.to_string());
            let seconds = started.elapsed().as_secs_f64();
            let count =
                |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
            match &result {
                Ok(()) => tracing::info!(
                    scanned = count(&progress.scanned),
                    rewritten = count(&progress.rewritten),
                    seconds,
                    "re-encryption pass finished"
                ),
                Err(e) => tracing::error!(error = %e, "re-encryption pass failed"),
            }
            if let Some(pass) = app.reencryptions.lock().as_mut() {
                pass.finished = Some((seconds, result));
            }
        }
    });
    (StatusCode::ACCEPTED, Json(key_state(&app)))
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let mut checks = app.backends().readiness(app.config.backend_timeout()).await;
    checks.push((
        "gateway".to_owned(),
        if app.is_draining() {
            Err("draining".into())
        } else {
            Ok(())
        },
    ));
    dispatcher::startup::readiness(checks)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}
