//! The per-node create rate limit: a token bucket. A create that finds it empty is 1012.

use std::sync::Arc;
use std::time::Instant;

use yr_common::clock::{self, Clock};

/// A token bucket refilled at `rate` tokens per second up to `burst`, by the time its
/// [`Clock`] tells.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    clock: Arc<dyn Clock>,
}

impl TokenBucket {
    /// A full bucket on the system clock.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        Self::with_clock(rate, burst, clock::system())
    }

    /// A full bucket that reads `clock`.
    pub fn with_clock(rate: f64, burst: f64, clock: Arc<dyn Clock>) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: clock.now(),
            clock,
        }
    }

    /// Take a token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = self.clock.now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use yr_common::ManualClock;

    #[test]
    fn a_burst_is_allowed_then_refused_then_refilled() {
        let clock = ManualClock::new();
        let mut bucket = TokenBucket::with_clock(10.0, 3.0, clock.clone());
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        clock.advance(Duration::from_millis(100));
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
    }

    #[test]
    fn a_bucket_refills_only_up_to_its_burst() {
        let clock = ManualClock::new();
        let mut bucket = TokenBucket::with_clock(10.0, 2.0, clock.clone());
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        // An hour idle refills the bucket to its burst, no more.
        clock.advance(Duration::from_secs(3600));
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        // Half a token's time is not a token.
        clock.advance(Duration::from_millis(50));
        assert!(!bucket.try_take());
        clock.advance(Duration::from_millis(50));
        assert!(bucket.try_take());
    }
}
