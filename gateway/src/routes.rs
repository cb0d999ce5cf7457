//! The client port's routes: the WebSocket upgrade at `/ws` (token, device, origin and
//! per-user connection cap checked before the handshake), and in dev mode the demo page and
//! `/dev/token`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::connection;
use crate::fragments::FragmentCap;

pub(crate) fn client_router(app: Arc<App>) -> Router {
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
