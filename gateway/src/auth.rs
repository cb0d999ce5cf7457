//! Client authentication: JWTs checked once, at the WebSocket handshake: HS256 with the
//! operator's secret, and, with `--jwks-url`, tokens an identity provider signs with the
//! keys it publishes ([`crate::jwks`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused (the handshake answers 401 with this text). The reasons are
/// fixed phrases: a client learns which rule its token broke, never the parser's internals.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <token>` or `?token=<token>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

impl AuthError {
    fn from_jwt(e: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        AuthError::Invalid(match e.kind() {
            K::ExpiredSignature => "expired",
            K::ImmatureSignature => "not valid yet (`nbf` is in the future)",
            K::InvalidSignature => "bad signature",
            K::InvalidAlgorithm | K::InvalidAlgorithmName => "wrong algorithm",
            K::InvalidAudience => "wrong audience (`aud`)",
            K::InvalidIssuer => "wrong issuer (`iss`)",
            K::MissingRequiredClaim(_) => {
                "a required claim is missing (`sub`, `exp`, and `aud`/`iss` when configured)"
            }
            _ => "malformed",
        })
    }
}

/// Claims a deployment may require beyond `sub` and `exp`.
#[derive(Clone, Debug, Default)]
pub struct Required {
    /// `aud` must name this audience.
    pub audience: Option<String>,
    /// `iss` must be this issuer.
    pub issuer: Option<String>,
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
    /// HS256 tokens are accepted (off when only an identity provider's keys are).
    hs256: bool,
    jwks: Option<Arc<crate::jwks::Jwks>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { .. }")
    }
}

impl Auth {
    pub fn new(secret: &[u8]) -> Self {
        Self::requiring(secret, Required::default())
    }

    /// Verifies `sub`, `exp` and `nbf`, and `aud`/`iss` when `required` names them.
    pub fn requiring(secret: &[u8], required: Required) -> Self {
        // The algorithm is pinned: a token claiming any other `alg` is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        let mut claims = vec!["exp", "sub"];
        validation.validate_aud = false;
        if let Some(audience) = &required.audience {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
            claims.push("aud");
        }
        if let Some(issuer) = &required.issuer {
            validation.set_issuer(&[issuer]);
            claims.push("iss");
        }
        validation.set_required_spec_claims(&claims);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 5;
        Auth {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            hs256: true,
            jwks: None,
        }
    }

    /// Also accepts tokens signed with the provider's published keys; `hs256` says
    /// whether the secret's tokens still are.
    pub fn with_jwks(mut self, jwks: Arc<crate::jwks::Jwks>, hs256: bool) -> Self {
        self.jwks = Some(jwks);
        self.hs256 = hs256;
        self
    }

    /// The user id a token was issued for, by whichever key the token's header names:
    /// HS256 with the secret, or the provider's key `kid` with the one algorithm that key
    /// verifies (so a token cannot choose a weaker check than its key's).
    pub async fn authenticate(&self, token: &str) -> Result<String, AuthError> {
        let Some(jwks) = &self.jwks else {
            return self.verify(token);
        };
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed"))?;
        if header.alg == Algorithm::HS256 {
            if !self.hs256 {
                return Err(AuthError::Invalid("wrong algorithm"));
            }
            return self.verify(token);
        }
        let kid = header.kid.ok_or(AuthError::Invalid(
            "no `kid` in the header: name the signing key",
        ))?;
        let (key, algorithm) = jwks
            .key(&kid)
            .await
            .ok_or(AuthError::Invalid("unknown signing key (`kid`)"))?;
        if header.alg != algorithm {
            return Err(AuthError::Invalid("wrong algorithm"));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![algorithm];
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            AuthError::from_jwt(&e)
        })?;
        valid_user(data.claims.sub)
    }

    /// The user id a token was issued for.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                tracing::debug!(error = %e, "token refused");
                AuthError::from_jwt(&e)
            })?;
        valid_user(data.claims.sub)
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

fn valid_user(user: String) -> Result<String, AuthError> {
    if !storage::is_valid_id(&user) {
        return Err(AuthError::Invalid(
            "`sub` is not a valid user id (1-64 characters of A-Z a-z 0-9 _ . @ -)",
        ));
    }
    Ok(user)
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

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("encode")
    }

    #[test]
    fn nbf_aud_and_iss_are_checked_and_refusals_are_fixed_phrases() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let auth = Auth::new(b"secret");
        let later = signed(serde_json::json!({"sub":"alice","exp":now + 7200,"nbf":now + 3600}));
        let refused = auth.verify(&later).expect_err("nbf in an hour");
        assert_eq!(
            refused.to_string(),
            "invalid token: not valid yet (`nbf` is in the future)"
        );
        let now_valid = signed(serde_json::json!({"sub":"alice","exp":now + 60,"nbf":now}));
        assert_eq!(auth.verify(&now_valid).expect("nbf now"), "alice");
        // Without a configured audience, a token's `aud` is not looked at.
        let with_aud = signed(serde_json::json!({"sub":"alice","exp":now + 60,"aud":"x"}));
        assert!(auth.verify(&with_aud).is_ok());

        let strict = Auth::requiring(
            b"secret",
            Required {
                audience: Some("chat".into()),
                issuer: Some("idp".into()),
            },
        );
        let good =
            signed(serde_json::json!({"sub":"alice","exp":now + 60,"aud":"chat","iss":"idp"}));
        assert_eq!(strict.verify(&good).expect("aud and iss right"), "alice");
        for (claims, why) in [
            (
                serde_json::json!({"sub":"alice","exp":now + 60,"aud":"other","iss":"idp"}),
                "wrong audience (`aud`)",
            ),
            (
                serde_json::json!({"sub":"alice","exp":now + 60,"aud":"chat","iss":"evil"}),
                "wrong issuer (`iss`)",
            ),
            (
                serde_json::json!({"sub":"alice","exp":now + 60,"iss":"idp"}),
                "a required claim is missing (`sub`, `exp`, and `aud`/`iss` when configured)",
            ),
        ] {
            let refused = strict.verify(&signed(claims)).expect_err(why);
            assert_eq!(refused.to_string(), format!("invalid token: {why}"));
        }
        assert_eq!(
            auth.verify("not.a.jwt").expect_err("garbage").to_string(),
            "invalid token: malformed"
        );
    }
}
