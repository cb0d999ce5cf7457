//! The blob store's conformance suite: every scenario written once and run against both
//! backends, a local directory and a real S3-compatible server (`TEST_S3_*`, started by
//! `infra/servers.sh`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::server_url;
use sha2::{Digest, Sha256};
use storage::blob::{Blobs, Media, MediaState, S3Config, UrlOp};
use storage::Error;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh local blob store; the guard keeps its directory.
fn local() -> (Blobs, Option<tempfile::TempDir>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = Blobs::local(
        dir.path(),
        b"test secret",
        "http://127.0.0.1:1".into(),
        TIMEOUT,
    )
    .expect("local blobs");
    (blobs, Some(dir))
}

/// The S3 server's bucket, if one is configured here.
fn s3() -> Option<(Blobs, Option<tempfile::TempDir>)> {
    let endpoint = server_url("TEST_S3_ENDPOINT")?;
    let config = S3Config {
        endpoint: Some(endpoint),
        public_endpoint: None,
        bucket: std::env::var("TEST_S3_BUCKET").expect("TEST_S3_BUCKET"),
        region: "us-east-1".into(),
        access_key_id: std::env::var("TEST_S3_ACCESS_KEY_ID").expect("TEST_S3_ACCESS_KEY_ID"),
        secret_access_key: std::env::var("TEST_S3_SECRET_ACCESS_KEY")
            .expect("TEST_S3_SECRET_ACCESS_KEY"),
    };
    Some((Blobs::s3(&config, TIMEOUT).expect("s3 blobs"), None))
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A new upload of `bytes` by a user of its own (quotas are per user and shared servers
/// keep them between tests).
fn upload(owner: &str, bytes: &[u8]) -> Media {
    Media {
        id: Uuid::now_v7(),
        owner: owner.to_owned(),
        content_type: "image/png".into(),
        size: bytes.len() as u64,
        sha256: sha256(bytes),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64,
        state: MediaState::Pending,
    }
}

fn user() -> String {
    format!("u{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn upload_complete_attach(blobs: Blobs) {
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let media = upload(&user(), &bytes);
    blobs.reserve(&media, 1 << 30).await.expect("reserve");
    assert_eq!(
        blobs.media(media.id).await.expect("read"),
        Some(media.clone())
    );
    blobs
        .put(media.id, Bytes::from(bytes.clone()))
        .await
        .expect("put");
    let complete = blobs.complete(media.clone()).await.expect("complete");
    assert_eq!(complete.state, MediaState::Complete);
    assert_eq!(
        blobs.media(media.id).await.expect("read").map(|m| m.state),
        Some(MediaState::Complete)
    );
    // Completing again changes nothing.
    assert_eq!(
        blobs.complete(complete.clone()).await.expect("again"),
        complete
    );
    blobs
        .attach(std::slice::from_ref(&complete))
        .await
        .expect("attach");
    assert_eq!(
        blobs.media(media.id).await.expect("read").map(|m| m.state),
        Some(MediaState::Attached)
    );
    let whole = blobs.get(media.id, None).await.expect("get");
    assert_eq!(whole.bytes().await.expect("bytes").as_ref(), &bytes[..]);
    // A range: bytes 100 to 199.
    let part = blobs
        .get(media.id, Some((100..200).into()))
        .await
        .expect("range");
    assert_eq!(part.range, 100..200);
    assert_eq!(
        part.bytes().await.expect("bytes").as_ref(),
        &bytes[100..200]
    );
}

async fn wrong_bytes_are_refused_and_discarded(blobs: Blobs) {
    let bytes = b"the declared bytes".to_vec();
    let media = upload(&user(), &bytes);
    blobs.reserve(&media, 1 << 30).await.expect("reserve");
    let missing = blobs.complete(media.clone()).await;
    assert!(
        matches!(missing, Err(Error::NotFound(_))),
        "nothing uploaded: {missing:?}"
    );
    for wrong in [b"the declared bytez".to_vec(), b"too short".to_vec()] {
        blobs.put(media.id, Bytes::from(wrong)).await.expect("put");
        let refused = blobs.complete(media.clone()).await;
        assert!(
            matches!(&refused, Err(Error::Invalid(m)) if m.contains("declared")),
            "{refused:?}"
        );
        assert!(
            matches!(blobs.get(media.id, None).await, Err(Error::NotFound(_))),
            "refused bytes are deleted"
        );
        assert_eq!(
            blobs.media(media.id).await.expect("read").map(|m| m.state),
            Some(MediaState::Pending)
        );
    }
    // The slot stays: the right bytes complete it.
    blobs.put(media.id, Bytes::from(bytes)).await.expect("put");
    blobs.complete(media).await.expect("complete");
}

async fn quota_is_per_user_and_day(blobs: Blobs) {
    let owner = user();
    let first = upload(&owner, &[1u8; 60]);
    blobs.reserve(&first, 100).await.expect("60 of 100");
    let second = upload(&owner, &[2u8; 50]);
    let refused = blobs.reserve(&second, 100).await;
    assert!(matches!(refused, Err(Error::Quota(_))), "{refused:?}");
    assert_eq!(
        blobs.media(second.id).await.expect("read"),
        None,
        "nothing recorded"
    );
    let third = upload(&owner, &[3u8; 40]);
    blobs.reserve(&third, 100).await.expect("exactly 100");
    // Another user has a quota of their own.
    blobs
        .reserve(&upload(&user(), &[4u8; 90]), 100)
        .await
        .expect("another user");
}

async fn abandoned_uploads_are_collected(blobs: Blobs) {
    let owner = user();
    let abandoned = upload(&owner, b"never sent");
    let sent = upload(&owner, b"sent in a message");
    for (media, bytes) in [
        (&abandoned, &b"never sent"[..]),
        (&sent, &b"sent in a message"[..]),
    ] {
        blobs.reserve(media, 1 << 30).await.expect("reserve");
        blobs
            .put(media.id, Bytes::copy_from_slice(bytes))
            .await
            .expect("put");
    }
    let complete = blobs.complete(sent.clone()).await.expect("complete");
    blobs.attach(&[complete]).await.expect("attach");
    // A long expiry keeps both; none expires.
    blobs
        .collect(Duration::from_secs(3600))
        .await
        .expect("collect");
    assert!(blobs.media(abandoned.id).await.expect("read").is_some());
    // Expired at once: the abandoned one goes, bytes and record; the sent one stays.
    let collected = blobs.collect(Duration::ZERO).await.expect("collect");
    assert!(collected >= 1, "collected {collected}");
    assert_eq!(blobs.media(abandoned.id).await.expect("read"), None);
    assert!(matches!(
        blobs.get(abandoned.id, None).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        blobs.media(sent.id).await.expect("read").map(|m| m.state),
        Some(MediaState::Attached)
    );
    let kept = blobs.get(sent.id, None).await.expect("kept");
    assert_eq!(
        kept.bytes().await.expect("bytes").as_ref(),
        b"sent in a message"
    );
}

async fn delete_is_idempotent(blobs: Blobs) {
    let media = upload(&user(), b"x");
    blobs.reserve(&media, 1 << 30).await.expect("reserve");
    blobs
        .put(media.id, Bytes::from_static(b"x"))
        .await
        .expect("put");
    blobs.delete(media.id).await.expect("delete");
    blobs.delete(media.id).await.expect("delete again");
    blobs.delete(Uuid::now_v7()).await.expect("delete unknown");
    assert_eq!(blobs.media(media.id).await.expect("read"), None);
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod local_dir {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let (blobs, _guard) = super::local();
                    super::$scenario(blobs).await;
                }
            )*
        }
        mod s3_server {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some((blobs, _guard)) = super::s3() else { return };
                    super::$scenario(blobs).await;
                }
            )*
        }
    };
}

conformance!(
    upload_complete_attach,
    wrong_bytes_are_refused_and_discarded,
    quota_is_per_user_and_day,
    abandoned_uploads_are_collected,
    delete_is_idempotent,
);

/// Local URLs are signed per operation and id, and expire.
#[tokio::test]
async fn local_urls_are_signed_per_operation_and_id() {
    let (blobs, _guard) = local();
    let id = Uuid::now_v7();
    let url = blobs
        .url(UrlOp::Put, id, Duration::from_secs(60))
        .await
        .expect("url");
    let query = |name: &str| {
        url.split(['?', '&'])
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .expect("query parameter")
            .to_owned()
    };
    let (expires, signature) = (
        query("expires").parse().expect("expires"),
        query("signature"),
    );
    assert!(url.starts_with(&format!("http://127.0.0.1:1/media/{id}?op=put")));
    assert!(blobs.verify_local(UrlOp::Put, id, expires, &signature));
    assert!(!blobs.verify_local(UrlOp::Get, id, expires, &signature));
    assert!(!blobs.verify_local(UrlOp::Put, Uuid::now_v7(), expires, &signature));
    assert!(!blobs.verify_local(UrlOp::Put, id, expires + 1, &signature));
    assert!(!blobs.verify_local(UrlOp::Put, id, expires, "00"));
    // A URL whose time is up no longer verifies, signature or not.
    let past = blobs
        .url(UrlOp::Get, id, Duration::from_secs(1))
        .await
        .expect("url");
    let expires_past: u64 = past
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .expect("expires");
    let signature_past = past
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("signature="))
        .expect("signature");
    assert!(blobs.verify_local(UrlOp::Get, id, expires_past, signature_past));
    tokio::time::sleep(Duration::from_millis(2100)).await; // the URL's lifetime passing
    assert!(!blobs.verify_local(UrlOp::Get, id, expires_past, signature_past));
}
