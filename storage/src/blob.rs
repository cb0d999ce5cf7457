//! Media: the bytes of attachments, in an object store beside the message store.
//!
//! One interface ([`Blobs`]) over the backends of the `object_store` crate: a directory
//! under the data dir (embedded mode) and any S3-compatible store (distributed mode; Azure
//! Blob Storage and Google Cloud Storage too, configured from their usual environment).
//! Clients never send bytes through the message path: they upload to a short-lived URL
//! (an S3 presigned PUT, or the embedded gateway's own signed `/media/<id>` endpoint, the
//! same shape to them) and send a message that references the media id.
//!
//! What the store keeps, all in the one bucket or directory:
//!
//! | key | what |
//! |-----|------|
//! | `blobs/<id>` | the uploaded bytes |
//! | `meta/<id>` | the upload's [`Media`] record (JSON): owner, declared size, type, hash, state |
//! | `pending/<id>` | present until a message references the media; the collector expires uploads by its age |
//! | `quota/<day>/<user>/<id>.<size>` | one empty object per upload of that UTC day, so the day's total is one listing |

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::resilience::{Breaker, Guarded};

/// An upload and where it has got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    pub id: Uuid,
    /// The user who asked for the upload slot; only they may attach it to a message.
    pub owner: String,
    pub content_type: String,
    /// Declared size in bytes; the upload must have exactly this many.
    pub size: u64,
    /// Declared SHA-256, lowercase hex; the upload must hash to it.
    pub sha256: String,
    pub created_ms: i64,
    pub state: MediaState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaState {
    /// A slot was handed out; the bytes are not (known to be) there yet.
    Pending,
    /// The bytes are there and match what was declared.
    Complete,
    /// A message references it: it no longer expires.
    Attached,
}

/// An S3-compatible bucket.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `http(s)://host:port` of a non-AWS store (path-style requests); `None` for AWS.
    pub endpoint: Option<String>,
    /// Where clients reach the store, when not at `endpoint` (a container network's name
    /// is not a client's): URLs for clients are signed for this one.
    pub public_endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// How upload and download URLs are made.
enum Urls {
    /// Presigned for the cloud store itself (S3, Azure, GCS), under the name of its kind.
    Presigned(Arc<dyn Signer>, &'static str),
    /// The embedded gateway's `/media/<id>` endpoint, signed with this node's key.
    Local { key: [u8; 32], base: String },
}

/// The blob store: one per process, cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    urls: Urls,
    breaker: Breaker,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("backend", &self.backend())
            .finish()
    }
}

/// What a signed local URL allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlOp {
    Put,
    Get,
}

impl UrlOp {
    fn as_str(self) -> &'static str {
        match self {
            UrlOp::Put => "put",
            UrlOp::Get => "get",
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn blob_key(id: Uuid) -> Key {
    Key::from(format!("blobs/{id}"))
}

fn meta_key(id: Uuid) -> Key {
    Key::from(format!("meta/{id}"))
}

fn pending_key(id: Uuid) -> Key {
    Key::from(format!("pending/{id}"))
}

/// The UTC day of a time, as quota keys name it.
fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

fn quota_prefix(day: i64, user: &str) -> Key {
    Key::from(format!("quota/{day}/{user}"))
}

/// Backend failures count towards the breaker; answers about the request do not.
fn counts(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. } | object_store::Error::AlreadyExists { .. }
    )
}

impl From<Guarded<object_store::Error>> for Error {
    fn from(e: Guarded<object_store::Error>) -> Self {
        match e {
            Guarded::Inner(object_store::Error::NotFound { path, .. }) => Error::NotFound(path),
            Guarded::Inner(e) => Error::Unavailable(format!("blob store: {e}")),
            other => Error::Unavailable(other.to_string()),
        }
    }
}

impl Blobs {
    /// Blobs in a directory (created if missing), with URLs to the gateway at `base`
    /// (`http://host:port`) signed with a key derived from `secret`.
    pub fn local(dir: &Path, secret: &[u8], base: String, timeout: Duration) -> Result<Self> {
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"media URLs v1");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::Backend(format!("media directory {}: {e}", dir.display())))?;
        Ok(Self::with(
            Arc::new(store),
            Urls::Local { key, base },
            timeout,
        ))
    }

    /// Blobs in an S3-compatible bucket, with presigned URLs.
    pub fn s3(config: &S3Config, timeout: Duration) -> Result<Self> {
        let bucket = |endpoint: Option<&String>| {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_access_key_id(&config.access_key_id)
                .with_secret_access_key(&config.secret_access_key);
            if let Some(endpoint) = endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            builder
                .build()
                .map(Arc::new)
                .map_err(|e| Error::Backend(format!("S3 configuration: {e}")))
        };
        let s3 = bucket(config.endpoint.as_ref())?;
        let signer = match &config.public_endpoint {
            Some(public) => bucket(Some(public))?,
            None => s3.clone(),
        };
        Ok(Self::with(s3, Urls::Presigned(signer, "s3"), timeout))
    }

    /// Blobs in an Azure Blob Storage container, with the account and credentials from the
    /// environment (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …).
    pub fn azure(container: &str, timeout: Duration) -> Result<Self> {
        let azure = MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .build()
            .map(Arc::new)
            .map_err(|e| Error::Backend(format!("Azure configuration: {e}")))?;
        Ok(Self::with(
            azure.clone(),
            Urls::Presigned(azure, "azure"),
            timeout,
        ))
    }

    /// Blobs in a Google Cloud Storage bucket, with credentials from the environment
    /// (`GOOGLE_SERVICE_ACCOUNT`, …).
    pub fn gcs(bucket: &str, timeout: Duration) -> Result<Self> {
        let gcs = GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map(Arc::new)
            .map_err(|e| Error::Backend(format!("GCS configuration: {e}")))?;
        Ok(Self::with(
            gcs.clone(),
            Urls::Presigned(gcs, "gcs"),
            timeout,
        ))
    }

    fn with(store: Arc<dyn ObjectStore>, urls: Urls, timeout: Duration) -> Self {
        Blobs {
            inner: Arc::new(Inner {
                store,
                urls,
                breaker: Breaker::new("blob store", timeout),
            }),
        }
    }

    /// The backend's name, for logs and `/readyz`.
    pub fn backend(&self) -> &'static str {
        match self.inner.urls {
            Urls::Presigned(_, kind) => kind,
            Urls::Local { .. } => "local",
        }
    }

    async fn guarded<T, F>(&self, call: F) -> Result<T>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        let started = std::time::Instant::now();
        let result = self.inner.breaker.call(counts, call).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("blob_ops_total", "outcome" => outcome).increment(1);
        metrics::histogram!("blob_op_seconds").record(started.elapsed().as_secs_f64());
        result.map_err(Error::from)
    }

    /// Every object under a prefix.
    async fn list(&self, prefix: &Key) -> Result<Vec<object_store::ObjectMeta>> {
        let listing = self.inner.store.list(Some(prefix));
        self.guarded(async { listing.collect::<Vec<_>>().await.into_iter().collect() })
            .await
    }

    /// Deletes one object; one that is not there is fine.
    async fn delete_key(&self, key: &Key) -> Result<()> {
        match self.guarded(self.inner.store.delete(key)).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Records a new upload of `media.owner`, charging its size to their quota of the
    /// day: `Quota` when the day's uploads and this one would pass `daily_quota` bytes
    /// (nothing is recorded then).
    pub async fn reserve(&self, media: &Media, daily_quota: u64) -> Result<()> {
        let prefix = quota_prefix(day_of(media.created_ms), &media.owner);
        let store = &self.inner.store;
        let listed = self.list(&prefix).await?;
        let used: u64 = listed
            .iter()
            .filter_map(|o| {
                o.location
                    .filename()?
                    .rsplit_once('.')?
                    .1
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        if used.saturating_add(media.size) > daily_quota {
            return Err(Error::Quota(format!(
                "{} of today's {daily_quota} bytes of uploads are used; this one needs {}",
                used, media.size
            )));
        }
        let record = serde_json::to_vec(media)
            .map_err(|e| Error::Backend(format!("encoding media {}: {e}", media.id)))?;
        let charge = prefix.clone().join(format!("{}.{}", media.id, media.size));
        self.guarded(store.put(&charge, PutPayload::new())).await?;
        self.guarded(store.put(&pending_key(media.id), PutPayload::new()))
            .await?;
        self.guarded(store.put(&meta_key(media.id), record.into()))
            .await?;
        Ok(())
    }

    /// An upload's record, if it has one.
    pub async fn media(&self, id: Uuid) -> Result<Option<Media>> {
        let store = &self.inner.store;
        match self
            .guarded(async { store.get(&meta_key(id)).await?.bytes().await })
            .await
        {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Backend(format!("media record {id}: {e}"))),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn save(&self, media: &Media) -> Result<()> {
        let record = serde_json::to_vec(media)
            .map_err(|e| Error::Backend(format!("encoding media {}: {e}", media.id)))?;
        self.guarded(self.inner.store.put(&meta_key(media.id), record.into()))
            .await
            .map(drop)
    }

    /// Checks that the bytes of a pending upload are there and are what was declared, and
    /// marks it complete. Bytes of another size or hash are deleted (the slot stays, so
    /// the client can upload again while its URL is valid) and the answer is `Invalid`;
    /// no bytes yet is `NotFound`. Completing a complete upload again changes nothing.
    pub async fn complete(&self, mut media: Media) -> Result<Media> {
        if media.state != MediaState::Pending {
            return Ok(media);
        }
        let key = blob_key(media.id);
        let store = &self.inner.store;
        let head = match self.guarded(store.head(&key)).await {
            Err(Error::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "nothing was uploaded for media {} yet: PUT the bytes to the upload URL first",
                    media.id
                )))
            }
            other => other?,
        };
        let refused = if head.size != media.size {
            Some(format!(
                "the upload has {} bytes, {} were declared",
                head.size, media.size
            ))
        } else {
            let digest = self
                .guarded(async {
                    let mut hasher = Sha256::new();
                    let mut stream = store.get(&key).await?.into_stream();
                    while let Some(chunk) = stream.next().await {
                        hasher.update(&chunk?);
                    }
                    Ok(hex::encode(hasher.finalize()))
                })
                .await?;
            (digest != media.sha256).then(|| {
                format!(
                    "the upload's SHA-256 is {digest}, {} was declared",
                    media.sha256
                )
            })
        };
        if let Some(refused) = refused {
            self.delete_key(&key).await?;
            return Err(Error::Invalid(format!(
                "{refused}: the bytes were discarded, upload them again"
            )));
        }
        media.state = MediaState::Complete;
        self.save(&media).await?;
        Ok(media)
    }

    /// Marks complete uploads as referenced by a message: they no longer expire.
    pub async fn attach(&self, media: &[Media]) -> Result<()> {
        for m in media {
            if m.state == MediaState::Complete {
                let attached = Media {
                    state: MediaState::Attached,
                    ..m.clone()
                };
                self.save(&attached).await?;
                self.delete_key(&pending_key(m.id)).await?;
            }
        }
        Ok(())
    }

    /// Deletes an upload: its bytes and its record. Deleting again is harmless.
    pub async fn delete(&self, id: Uuid) -> Result<()> {
        self.delete_key(&blob_key(id)).await?;
        self.delete_key(&pending_key(id)).await?;
        self.delete_key(&meta_key(id)).await
    }

    /// Deletes uploads that no message referenced within `max_age` of their slot, and the
    /// quota records of days before yesterday. Returns how many uploads went. Every node
    /// may run it: deleting is idempotent.
    pub async fn collect(&self, max_age: Duration) -> Result<usize> {
        let store = &self.inner.store;
        let cutoff = SystemTime::now() - max_age;
        let pending = self.list(&Key::from("pending")).await?;
        let mut collected = 0;
        for entry in pending {
            if SystemTime::from(entry.last_modified) > cutoff {
                continue;
            }
            let Some(id) = entry
                .location
                .filename()
                .and_then(|f| Uuid::try_parse(f).ok())
            else {
                continue;
            };
            match self.media(id).await? {
                Some(m) if m.state == MediaState::Attached => {
                    self.delete_key(&pending_key(id)).await?
                }
                _ => {
                    self.delete(id).await?;
                    collected += 1;
                }
            }
        }
        let yesterday = day_of(now_ms()) - 1;
        let days = self
            .guarded(store.list_with_delimiter(Some(&Key::from("quota"))))
            .await?;
        for day in days.common_prefixes {
            let old = day
                .filename()
                .and_then(|d| d.parse::<i64>().ok())
                .is_some_and(|d| d < yesterday);
            if old {
                for charge in self.list(&day).await? {
                    self.delete_key(&charge.location).await?;
                }
            }
        }
        if collected > 0 {
            metrics::counter!("media_collected_total").increment(collected as u64);
        }
        Ok(collected)
    }

    /// A URL that lets its holder `op` the blob of `id` until `expires_in` from now.
    pub async fn url(&self, op: UrlOp, id: Uuid, expires_in: Duration) -> Result<String> {
        match &self.inner.urls {
            Urls::Presigned(signer, _) => {
                let method = match op {
                    UrlOp::Put => http::Method::PUT,
                    UrlOp::Get => http::Method::GET,
                };
                signer
                    .signed_url(method, &blob_key(id), expires_in)
                    .await
                    .map(|url| url.to_string())
                    .map_err(|e| Error::Backend(format!("signing a URL: {e}")))
            }
            Urls::Local { key, base } => {
                let expires = (now_ms() / 1000) as u64 + expires_in.as_secs().max(1);
                let signature = local_signature(key, op, id, expires);
                Ok(format!(
                    "{base}/media/{id}?op={}&expires={expires}&signature={signature}",
                    op.as_str()
                ))
            }
        }
    }

    /// Whether a local URL's signature lets its holder `op` the blob of `id` now. Always
    /// false for a cloud store (its URLs go to the store).
    pub fn verify_local(&self, op: UrlOp, id: Uuid, expires: u64, signature: &str) -> bool {
        let Urls::Local { key, .. } = &self.inner.urls else {
            return false;
        };
        let Ok(given) = hex::decode(signature) else {
            return false;
        };
        let mac = local_mac(key, op, id, expires);
        (now_ms() / 1000) as u64 <= expires && mac.verify_slice(&given).is_ok()
    }

    /// Stores uploaded bytes (the local upload endpoint).
    pub async fn put(&self, id: Uuid, bytes: bytes::Bytes) -> Result<()> {
        self.guarded(self.inner.store.put(&blob_key(id), bytes.into()))
            .await
            .map(drop)
    }

    /// Reads a blob, or part of it (the local download endpoint).
    pub async fn get(&self, id: Uuid, range: Option<GetRange>) -> Result<GetResult> {
        let options = GetOptions {
            range,
            ..GetOptions::default()
        };
        self.guarded(self.inner.store.get_opts(&blob_key(id), options))
            .await
    }

    /// Answers when the store can serve requests (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.media(Uuid::nil()).await.map(drop)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn local_mac(key: &[u8; 32], op: UrlOp, id: Uuid, expires: u64) -> HmacSha256 {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{}\n{id}\n{expires}", op.as_str()).as_bytes());
    mac
}

fn local_signature(key: &[u8; 32], op: UrlOp, id: Uuid, expires: u64) -> String {
    hex::encode(local_mac(key, op, id, expires).finalize().into_bytes())
}
