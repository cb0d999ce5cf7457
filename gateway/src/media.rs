//! Attachments: upload slots, completion, download URLs, the checks a `send` with
//! attachments passes, the collector of abandoned uploads, and the embedded mode's own
//! upload and download endpoint (`/media/<id>`), which stands where S3's presigned URLs
//! stand in a cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use storage::blob::{Blobs, Media, MediaState, UrlOp};
use storage::{Attachment, MessageStore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::App;
use crate::config::Config;
use crate::protocol::{AttachmentSend, ErrorCode, Refusal, ServerFrame};
use crate::session::{forbidden, Session};

/// Most attachments one message carries.
pub const MAX_ATTACHMENTS: usize = 10;
/// Longest file name and content type, in characters.
const MAX_NAME: usize = 255;
/// Largest thumbnail, in characters of base64.
const MAX_THUMBNAIL: usize = 32 * 1024;

/// The blob store this gateway uses: the S3 bucket, Azure container or GCS bucket
/// configured; else, in the embedded mode, a directory under the data dir with URLs to
/// this gateway; else none (a cluster without one refuses media requests).
pub fn open(
    config: &Config,
    client_addr: SocketAddr,
    secret: &[u8],
) -> Result<Option<Blobs>, storage::Error> {
    let timeout = config.backend_timeout();
    let named = |name: &Option<String>| name.clone().filter(|n| !n.is_empty());
    if let Some(s3) = config.media.s3() {
        return Blobs::s3(&s3, timeout).map(Some);
    }
    if let Some(container) = named(&config.media.azure_container) {
        return Blobs::azure(&container, timeout).map(Some);
    }
    if let Some(bucket) = named(&config.media.gcs_bucket) {
        return Blobs::gcs(&bucket, timeout).map(Some);
    }
    if config.is_distributed() {
        return Ok(None);
    }
    let base = config.media.public_url.clone().unwrap_or_else(|| {
        let scheme = if config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{client_addr}")
    });
    Blobs::local(
        &config.data_dir.join("media"),
        secret,
        base.trim_end_matches('/').to_owned(),
        timeout,
    )
    .map(Some)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn blobs(s: &Session) -> Result<&Blobs, Refusal> {
    s.app.blobs.as_ref().ok_or_else(|| {
        Refusal::new(
            ErrorCode::Unavailable,
            "media storage is not configured on this server (S3_BUCKET)",
        )
    })
}

fn parse_media_id(value: &str) -> Result<Uuid, Refusal> {
    Uuid::try_parse(value)
        .map_err(|_| Refusal::bad_request(format!("`media_id` is not a media id: {value:?}")))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An upload's record, which must exist.
async fn record(s: &Session, blobs: &Blobs, id: Uuid) -> Result<Media, Refusal> {
    s.call(blobs.media(id))
        .await?
        .ok_or_else(|| Refusal::new(ErrorCode::NotFound, format!("no upload {id}")))
}

/// `media_upload`: checks the declared file against the limits and the user's quota, and
/// hands out a slot.
pub async fn upload(
    s: &Session,
    reference: Value,
    content_type: String,
    size: u64,
    sha256: String,
) -> Result<(), Refusal> {
    let limits = &s.app.config.media;
    let content_type = content_type.trim().to_ascii_lowercase();
    if content_type.chars().count() > MAX_NAME || !limits.allows(&content_type) {
        return Err(Refusal::bad_request(format!(
            "content type {content_type:?} may not be uploaded here; allowed: {}",
            limits.media_types.join(", ")
        )));
    }
    if size == 0 {
        return Err(Refusal::bad_request(
            "`size` is 0: there is nothing to upload",
        ));
    }
    if size > limits.media_max_bytes {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "`size` is {size} bytes, the limit is {}",
                limits.media_max_bytes
            ),
        ));
    }
    if !is_sha256(&sha256) {
        return Err(Refusal::bad_request(
            "`sha256` must be the file's SHA-256 in 64 hex digits",
        ));
    }
    let blobs = blobs(s)?;
    let media = Media {
        id: Uuid::now_v7(),
        owner: s.conn.user.clone(),
        content_type: content_type.clone(),
        size,
        sha256: sha256.to_ascii_lowercase(),
        created_ms: now_ms(),
        state: MediaState::Pending,
    };
    s.call(blobs.reserve(&media, limits.media_quota_bytes))
        .await?;
    let lifetime = limits.url_lifetime();
    let url = s.call(blobs.url(UrlOp::Put, media.id, lifetime)).await?;
    metrics::counter!("gateway_media_uploads_total").increment(1);
    s.reply(ServerFrame::MediaUpload {
        reference,
        media_id: media.id.to_string(),
        url,
        method: "PUT",
        headers: BTreeMap::from([("Content-Type", content_type)]),
        expires_at: media.created_ms + lifetime.as_millis() as i64,
    });
    Ok(())
}

/// `media_complete`: the bytes are checked against what was declared.
pub async fn complete(s: &Session, reference: Value, media_id: String) -> Result<(), Refusal> {
    let id = parse_media_id(&media_id)?;
    let blobs = blobs(s)?;
    let media = record(s, blobs, id).await?;
    if media.owner != s.conn.user {
        return Err(forbidden(format!("upload {id} is not yours")));
    }
    let media = s.call(blobs.complete(media)).await?;
    s.reply(ServerFrame::MediaComplete {
        reference,
        media_id,
        content_type: media.content_type,
        size: media.size,
        sha256: media.sha256,
    });
    Ok(())
}

/// `media_url`: a download URL for the uploader, or for a member of a conversation that a
/// message carrying the media was sent to.
pub async fn url(
    s: &Session,
    reference: Value,
    media_id: String,
    conversation: Option<String>,
    message_id: Option<String>,
) -> Result<(), Refusal> {
    let id = parse_media_id(&media_id)?;
    let blobs = blobs(s)?;
    let media = record(s, blobs, id).await?;
    if media.owner != s.conn.user {
        let refused = || {
            forbidden(format!(
                "media {id} is neither yours nor carried by that message of a conversation \
                 you belong to"
            ))
        };
        let (Some(conversation), Some(message_id)) = (conversation, message_id) else {
            return Err(forbidden(format!(
                "media {id} is not yours: name the `conversation` and `message_id` of the \
                 message that carries it"
            )));
        };
        let message_id = crate::session::parse_id(&message_id, "message_id")?;
        let (conversation, group) = s.member_of(&conversation).await?;
        let message = s
            .call(s.app.store.message(&conversation, message_id))
            .await?
            .ok_or_else(refused)?;
        let before_joining = group.is_some_and(|g| !g.shows(&s.conn.user, message.id));
        if before_joining || !message.attachments.iter().any(|a| a.media_id == id) {
            return Err(refused());
        }
    } else if media.state == MediaState::Pending {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("upload {id} is not complete: send media_complete first"),
        ));
    }
    let lifetime = s.app.config.media.url_lifetime();
    let url = s.call(blobs.url(UrlOp::Get, id, lifetime)).await?;
    s.reply(ServerFrame::MediaUrl {
        reference,
        media_id,
        url,
        content_type: media.content_type,
        size: media.size,
        expires_at: now_ms() + lifetime.as_millis() as i64,
    });
    Ok(())
}

/// The attachments of a `send`: each a complete upload of the sender, as declared. They
/// are marked as referenced (no longer expiring) before the message is published.
pub async fn check_attachments(
    s: &Session,
    given: Vec<AttachmentSend>,
) -> Result<Vec<Attachment>, Refusal> {
    if given.len() > MAX_ATTACHMENTS {
        return Err(Refusal::bad_request(format!(
            "a message carries at most {MAX_ATTACHMENTS} attachments"
        )));
    }
    let blobs = blobs(s)?;
    let mut records = Vec::with_capacity(given.len());
    let mut attachments = Vec::with_capacity(given.len());
    for a in given {
        let id = parse_media_id(&a.media_id)?;
        if attachments
            .iter()
            .any(|known: &Attachment| known.media_id == id)
        {
            return Err(Refusal::bad_request(format!(
                "attachment {id} is named twice in `attachments`"
            )));
        }
        let too_long = |field: &str, value: &Option<String>, max: usize| match value {
            Some(v) if v.chars().count() > max => Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("attachment {id}: `{field}` is longer than {max} characters"),
            )),
            _ => Ok(()),
        };
        too_long("name", &a.name, MAX_NAME)?;
        too_long("caption", &a.caption, s.app.config.max_body_bytes)?;
        too_long("thumbnail", &a.thumbnail, MAX_THUMBNAIL)?;
        let media = s
            .call(blobs.media(id))
            .await?
            .ok_or_else(|| Refusal::bad_request(format!("attachment {id}: no such upload")))?;
        if media.owner != s.conn.user {
            return Err(forbidden(format!(
                "attachment {id}: the upload is not yours (upload the file yourself)"
            )));
        }
        if media.state == MediaState::Pending {
            return Err(Refusal::bad_request(format!(
                "attachment {id}: the upload is not complete: send media_complete first"
            )));
        }
        let differs = a
            .content_type
            .as_ref()
            .is_some_and(|t| !t.trim().eq_ignore_ascii_case(&media.content_type))
            || a.size.is_some_and(|n| n != media.size)
            || a.sha256
                .as_ref()
                .is_some_and(|h| !h.eq_ignore_ascii_case(&media.sha256));
        if differs {
            return Err(Refusal::bad_request(format!(
                "attachment {id}: `content_type`, `size` or `sha256` differ from the upload \
                 ({}, {} bytes, {})",
                media.content_type, media.size, media.sha256
            )));
        }
        attachments.push(Attachment {
            media_id: id,
            content_type: media.content_type.clone(),
            size: media.size,
            sha256: media.sha256.clone(),
            name: a.name,
            caption: a.caption,
            thumbnail: a.thumbnail,
        });
        records.push(media);
    }
    s.call(blobs.attach(&records)).await?;
    Ok(attachments)
}

/// Deletes abandoned uploads now and then, until `stop`.
pub async fn collect(app: Arc<App>, stop: CancellationToken) {
    let Some(blobs) = app.blobs.clone() else {
        return;
    };
    let expire = app.config.media.expire_after();
    let every = (expire / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match blobs.collect(expire).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "deleted uploads no message referenced"),
                Err(e) => tracing::warn!(error = %e, "collecting abandoned uploads failed"),
            },
        }
    }
}

/// The embedded mode's `/media/<id>`: PUT uploads to a slot, GET downloads (with ranges).
pub fn routes(router: Router<Arc<App>>) -> Router<Arc<App>> {
    router.route("/media/{id}", get(download).put(upload_bytes))
}

#[derive(Deserialize)]
struct Signed {
    op: String,
    expires: u64,
    signature: String,
}

fn refuse(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
}

/// Checks a local URL: its blob store, id, operation and signature.
fn signed<'a>(
    app: &'a App,
    op: UrlOp,
    id: &str,
    query: &Signed,
) -> Result<(&'a Blobs, Uuid), (StatusCode, &'static str)> {
    let Some(blobs) = app.blobs.as_ref() else {
        return Err((StatusCode::NOT_FOUND, "no media here"));
    };
    let Ok(id) = Uuid::try_parse(id) else {
        return Err((StatusCode::NOT_FOUND, "no such media"));
    };
    let op_matches = query.op == if op == UrlOp::Put { "put" } else { "get" };
    if !op_matches || !blobs.verify_local(op, id, query.expires, &query.signature) {
        return Err((
            StatusCode::FORBIDDEN,
            "this URL is not valid for this request, or it expired: ask for a new one",
        ));
    }
    Ok((blobs, id))
}

async fn upload_bytes(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<Signed>,
    request: Request,
) -> Response {
    let (blobs, id) = match signed(&app, UrlOp::Put, &id, &query) {
        Ok(found) => found,
        Err((status, message)) => return refuse(status, message),
    };
    let media = match blobs.media(id).await {
        Ok(Some(media)) => media,
        Ok(None) => return refuse(StatusCode::NOT_FOUND, "no such upload (it expired?)"),
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    if media.state != MediaState::Pending {
        return refuse(StatusCode::CONFLICT, "this upload is already complete");
    }
    // One byte more than declared is enough to know it is too much.
    let limit = usize::try_from(media.size.saturating_add(1)).unwrap_or(usize::MAX);
    let bytes = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(bytes) if bytes.len() as u64 <= media.size => bytes,
        Ok(_) | Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("more than the {} bytes declared", media.size),
            )
        }
    };
    match blobs.put(id, bytes).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn download(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<Signed>,
    request: Request,
) -> Response {
    let (blobs, id) = match signed(&app, UrlOp::Get, &id, &query) {
        Ok(found) => found,
        Err((status, message)) => return refuse(status, message),
    };
    let media = match blobs.media(id).await {
        Ok(Some(media)) if media.state != MediaState::Pending => media,
        Ok(_) => return refuse(StatusCode::NOT_FOUND, "no such media"),
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    // One range is served as asked; several (rare) get the whole file, as RFC 9110 allows.
    let range = match request.headers().get(header::RANGE) {
        None => None,
        Some(value) => {
            let parsed = value
                .to_str()
                .ok()
                .and_then(|v| http_range_header::parse_range_header(v).ok())
                .map(|r| r.validate(media.size));
            match parsed {
                Some(Ok(ranges)) if ranges.len() == 1 => {
                    ranges.first().map(|r| *r.start()..r.end() + 1)
                }
                Some(Ok(_)) => None,
                _ => {
                    let mut response = refuse(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!("the file has {} bytes", media.size),
                    );
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", media.size)) {
                        response.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return response;
                }
            }
        }
    };
    let got = match blobs
        .get(id, range.clone().map(object_store::GetRange::from))
        .await
    {
        Ok(got) => got,
        Err(storage::Error::NotFound(_)) => return refuse(StatusCode::NOT_FOUND, "no such media"),
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let served = got.range.clone();
    let body = Body::from_stream(got.into_stream().map_err(std::io::Error::other));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    let mut set = |name, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(header::CONTENT_TYPE, media.content_type.clone());
    set(
        header::CONTENT_LENGTH,
        (served.end - served.start).to_string(),
    );
    set(header::ACCEPT_RANGES, "bytes".to_owned());
    set(header::CACHE_CONTROL, "private, max-age=300".to_owned());
    if range.is_some() {
        set(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", served.start, served.end - 1, media.size),
        );
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response
}
