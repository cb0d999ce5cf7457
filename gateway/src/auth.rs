//! Client authentication: HS256 JWTs checked once, at the WebSocket handshake.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused (the handshake answers 401 with this text).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <token>` or `?token=<token>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Verifies (and in dev mode mints) tokens with the operator's secret.
#[derive(Clone)]
pub struct Auth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { .. }")
    }
}

impl Auth {
    pub fn new(secret: &[u8]) -> Self {
        // The algorithm is pinned: a token claiming any other `alg` is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 5;
        Auth {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    /// The user id a token was issued for.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let user = data.claims.sub;
        if !storage::is_valid_id(&user) {
            return Err(AuthError::Invalid(
                "`sub` is not a valid user id (1-64 characters of A-Z a-z 0-9 _ . @ -)".into(),
            ));
        }
        Ok(user)
    }

    /// A token for `user` valid for `ttl` (dev mode and tests).
    pub fn mint(&self, user: &str, ttl: Duration) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let claims = Claims {
            sub: user.to_owned(),
            exp,
        };
        // HMAC signing of a small struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_tokens_pass_and_bad_ones_do_not() {
        let auth = Auth::new(b"secret");
        let token = auth.mint("alice", Duration::from_secs(60));
        assert_eq!(auth.verify(&token).expect("valid"), "alice");
        assert!(Auth::new(b"other").verify(&token).is_err(), "wrong secret");
        assert!(auth.verify("not.a.jwt").is_err());
        assert!(matches!(auth.verify(""), Err(AuthError::Missing)));

        let past = Claims {
            sub: "alice".into(),
            exp: 1_000_000,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &past,
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        assert!(auth.verify(&expired).is_err(), "expired");

        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                sub: "alice".into(),
                exp: u64::MAX / 2,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        assert!(auth.verify(&hs512).is_err(), "algorithm is pinned");

        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "alice"}),
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode");
        assert!(auth.verify(&no_exp).is_err(), "exp is required");

        let bad_sub = auth.mint("not valid!", Duration::from_secs(60));
        assert!(auth.verify(&bad_sub).is_err());
    }
}
