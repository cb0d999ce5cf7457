//! The reliability patterns every distributed backend uses: a timeout on each call, a
//! circuit breaker per backend that fails fast while the backend is down, and retries with
//! exponential backoff and full jitter for idempotent operations.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use failsafe::backoff::EqualJittered;
use failsafe::failure_policy::ConsecutiveFailures;
use failsafe::futures::CircuitBreaker as _;
use failsafe::{Config, StateMachine};

/// Why a guarded call did not return the backend's own answer.
#[derive(Debug, thiserror::Error)]
pub enum Guarded<E> {
    /// The breaker is open: the backend failed repeatedly and is left alone for a while.
    #[error("circuit open: {0} failed repeatedly and is given a rest")]
    Open(&'static str),
    #[error("{0} did not answer within {1:?}")]
    TimedOut(&'static str, Duration),
    #[error(transparent)]
    Inner(E),
}

/// Publishes a breaker's state as `backend_breaker_state{backend}`: 0 closed, 1 half open
/// (one probe call let through), 2 open (calls rejected).
#[derive(Clone, Debug)]
struct StateGauge(&'static str);

impl StateGauge {
    fn new(backend: &'static str) -> Self {
        let gauge = StateGauge(backend);
        gauge.set(0.0);
        gauge
    }

    fn set(&self, state: f64) {
        metrics::gauge!("backend_breaker_state", "backend" => self.0).set(state);
    }
}

impl failsafe::Instrument for StateGauge {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        self.set(2.0);
    }

    fn on_half_open(&self) {
        self.set(1.0);
    }

    fn on_closed(&self) {
        self.set(0.0);
    }
}

/// A circuit breaker for one backend: it opens after 5 consecutive failures, rejects calls
/// for 1 s (growing, jittered, up to 10 s while failures continue), then lets one call
/// through to probe.
#[derive(Clone)]
pub struct Breaker {
    name: &'static str,
    machine: StateMachine<ConsecutiveFailures<EqualJittered>, StateGauge>,
    timeout: Duration,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Breaker {
    /// `name` labels errors and metrics; `timeout` bounds every call made through it.
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        let backoff =
            failsafe::backoff::equal_jittered(Duration::from_secs(1), Duration::from_secs(10));
        let policy = failsafe::failure_policy::consecutive_failures(5, backoff);
        Breaker {
            name,
            machine: Config::new()
                .failure_policy(policy)
                .instrument(StateGauge::new(name))
                .build(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True while calls are let through.
    pub fn is_closed(&self) -> bool {
        self.machine.is_call_permitted()
    }

    /// Counts the outcome of a call made without [`Breaker::call`] (one whose answer comes
    /// by callback).
    pub fn record(&self, ok: bool) {
        if ok {
            self.machine.on_success();
        } else {
            self.machine.on_error();
        }
    }

    /// Runs one call under the timeout and the breaker. Only failures for which
    /// `counts(&error)` holds (the backend's own failures, not answers about the request)
    /// and timeouts count towards opening it.
    pub async fn call<T, E, F>(&self, counts: fn(&E) -> bool, call: F) -> Result<T, Guarded<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let timeout = self.timeout;
        // Boxed once here: inline, the call would be laid out three times over (as the
        // argument, in the timeout, in the breaker's future), and backend calls are large.
        let call = Box::pin(call);
        let timed = async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Guarded::Inner(e)),
                Err(_) => Err(Guarded::TimedOut(self.name, timeout)),
            }
        };
        let predicate = move |e: &Guarded<E>| match e {
            Guarded::Inner(e) => counts(e),
            _ => true,
        };
        match self.machine.call_with(predicate, timed).await {
            Ok(v) => Ok(v),
            Err(failsafe::Error::Rejected) => {
                metrics::counter!("backend_rejected_total", "backend" => self.name).increment(1);
                Err(Guarded::Open(self.name))
            }
            Err(failsafe::Error::Inner(e)) => Err(e),
        }
    }
}

/// Retries an idempotent operation on failures for which `retryable` holds: 4 attempts
/// after the first, exponential backoff from 50 ms capped at 2 s, full jitter.
pub async fn retry<T, E, F, Fut>(retryable: fn(&E) -> bool, op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).take(4);
    op.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(retryable)
        .await
}

/// Exponential backoff with full jitter, the one every retry loop of the workspace uses
/// (store calls, Kafka partitions read again, presence written again after a Redis
/// reconnect): the n-th wait is uniform in `[0, min(base × 2ⁿ, max)]`, so that clients
/// that failed together do not retry together.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next wait's ceiling, without the jitter.
    pub fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    /// The next wait; the sequence never ends (`take` bounds it).
    fn next(&mut self) -> Option<Duration> {
        let wait = self.ceiling().mul_f64(rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        Some(wait)
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_and_start_over_on_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let ceilings: Vec<_> = (0..5)
            .map(|_| {
                let ceiling = backoff.ceiling();
                let wait = backoff.next().expect("endless");
                assert!(wait <= ceiling, "{wait:?} over {ceiling:?}");
                ceiling.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        // Jittered: a thousand waits are not all the same.
        let waits: std::collections::BTreeSet<_> = (0..1000)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next())
            .collect();
        assert!(waits.len() > 900);
    }
}
