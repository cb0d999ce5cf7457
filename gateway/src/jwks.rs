//! Signing keys published by an identity provider (a JSON Web Key Set at a URL), for
//! tokens it signs with RS256/ES256 and the like: fetched at start, again every
//! `--jwks-refresh-secs`, and again (at most every few seconds) when a token names a key
//! id not seen yet, so a key the provider rotates in is accepted without a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio_util::sync::CancellationToken;

/// The shortest gap between two fetches caused by unknown key ids: a client sending
/// made-up `kid`s must not turn the gateway into a load generator for the provider.
const MISS_REFETCH_GAP: Duration = Duration::from_secs(5);
/// Bound on one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The provider's current keys by id, with the algorithm each verifies.
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
    /// When an unknown key id last caused a fetch.
    last_miss_fetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("url", &self.url).finish()
    }
}

impl Jwks {
    /// Fetches the set once; an error names the URL and what went wrong.
    pub async fn fetch(url: &str) -> Result<Arc<Jwks>, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("JWKS client: {e}"))?;
        let jwks = Arc::new(Jwks {
            url: url.to_owned(),
            client,
            keys: RwLock::new(HashMap::new()),
            last_miss_fetch: Mutex::new(None),
        });
        let count = jwks.refresh().await?;
        tracing::info!(url, keys = count, "JWKS fetched");
        Ok(jwks)
    }

    /// The key named `kid`, fetching the set again first when it is unknown (and the
    /// last fetch is a few seconds old).
    pub async fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        if let Some(found) = self.lookup(kid) {
            return Some(found);
        }
        let due = {
            let mut last = self
                .last_miss_fetch
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() >= MISS_REFETCH_GAP);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "JWKS refetch for an unknown key id failed");
            }
        }
        self.lookup(kid)
    }

    fn lookup(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(kid).cloned()
    }

    /// Fetches the set and replaces the keys; the count of usable keys.
    async fn refresh(&self) -> Result<usize, String> {
        let result = self.fetch_keys().await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("gateway_jwks_fetches_total", "result" => outcome).increment(1);
        let keys = result?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(count)
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
        let url = &self.url;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("JWKS at {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("JWKS at {url}: HTTP {}", response.status()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("JWKS at {url}: {e}"))?;
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("JWKS at {url}: {e}"))?;
        let keys: HashMap<_, _> = set.keys.iter().filter_map(usable).collect();
        if keys.is_empty() {
            return Err(format!(
                "JWKS at {url}: no signing key with a `kid` (RS*, PS*, ES256/384 or EdDSA)"
            ));
        }
        Ok(keys)
    }

    /// Fetches the set again every `every`, until `stop`; a failed fetch keeps the keys.
    pub fn refresh_every(self: &Arc<Self>, every: Duration, stop: CancellationToken) {
        let jwks = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = jwks.refresh().await {
                            tracing::warn!(error = %e, "JWKS refresh failed: the keys in use stay");
                        }
                    }
                }
            }
        });
    }
}

/// A signing key of the set with its id and the one algorithm it verifies. Symmetric
/// keys are never taken from a URL (HS256 is `--jwt-secret`'s), nor encryption keys.
fn usable(jwk: &Jwk) -> Option<(String, (DecodingKey, Algorithm))> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(declared), AlgorithmParameters::RSA(_)) => match declared {
            KeyAlgorithm::RS256 => Algorithm::RS256,
            KeyAlgorithm::RS384 => Algorithm::RS384,
            KeyAlgorithm::RS512 => Algorithm::RS512,
            KeyAlgorithm::PS256 => Algorithm::PS256,
            KeyAlgorithm::PS384 => Algorithm::PS384,
            KeyAlgorithm::PS512 => Algorithm::PS512,
            _ => return None,
        },
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (_, AlgorithmParameters::EllipticCurve(ec)) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (_, AlgorithmParameters::OctetKeyPair(okp)) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, (key, algorithm)))
}
