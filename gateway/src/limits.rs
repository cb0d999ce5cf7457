//! Rate limits: a token bucket per user for sends, one per connection for other frames.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Sends per user on this node. Several devices of a user share one bucket.
pub struct SendLimiter {
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
            limiter: RateLimiter::keyed(quota(per_second, burst)),
        }
    }

    /// Takes one token from the user's bucket; `false` when it is empty.
    pub fn allow(&self, user: &str) -> bool {
        self.limiter.check_key(&user.to_owned()).is_ok()
    }

    /// Forgets buckets that are full again, so idle users cost nothing.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// A connection's budget for frames other than `send` (acks, typing, history…).
pub fn frame_limiter(per_second: u32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(quota(per_second, per_second.saturating_mul(2)))
}
