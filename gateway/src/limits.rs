//! Rate limits: a budget per user for sends, shared by every node, and one per connection
//! for other frames.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use presence::{Presence, PresenceService};

/// Sends per user. The budget lives in the presence backend, so that every device of a
/// user, on whatever node, draws from one; while that backend cannot answer, each node
/// falls back to a bucket of its own (counted in `gateway_rate_limit_fallbacks_total`).
pub struct SendLimiter {
    quota: presence::Quota,
    /// The fallback.
    limiter: DefaultKeyedRateLimiter<String>,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(per_second);
    Quota::per_second(per_second).allow_burst(burst)
}

impl SendLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        SendLimiter {
            quota: presence::Quota { per_second, burst },
            limiter: RateLimiter::keyed(quota(per_second, burst)),
        }
    }

    /// Takes one send from the user's budget; `false` when it is spent. Waits at most
    /// `wait` for the shared budget before using this node's own.
    pub async fn allow(&self, presence: &Presence, user: &str, wait: Duration) -> bool {
        let fallback = match tokio::time::timeout(wait, presence.take_send(user, self.quota)).await
        {
            Ok(Ok(allowed)) => return allowed,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {wait:?}"),
        };
        metrics::counter!("gateway_rate_limit_fallbacks_total").increment(1);
        tracing::debug!(%fallback, "shared send budget unavailable: using this node's");
        self.limiter.check_key(&user.to_owned()).is_ok()
    }

    /// Forgets buckets that are full again, so idle users cost nothing.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// A budget per user on this node, for what one frame may ask many of: one-time key
/// claims (a claim hands out, and uses up, another user's key, so a client may not drain
/// others' supplies faster than a real one sets up sessions) and to-device messages (each
/// is stored for another device until it confirms it).
pub struct UserBudget(DefaultKeyedRateLimiter<String>);

impl UserBudget {
    pub fn new(per_second: u32, burst: u32) -> Self {
        UserBudget(RateLimiter::keyed(quota(per_second, burst)))
    }

    /// Takes `n` from the user's budget; `false` when it does not hold that many.
    pub fn allow(&self, user: &str, n: u32) -> bool {
        let Some(n) = NonZeroU32::new(n) else {
            return true;
        };
        matches!(self.0.check_key_n(&user.to_owned(), n), Ok(Ok(())))
    }

    /// Forgets buckets that are full again.
    pub fn forget_idle(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

/// A connection's budget for frames other than `send` (acks, typing, history…).
pub fn frame_limiter(per_second: u32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(quota(per_second, per_second.saturating_mul(2)))
}
