//! Exponential backoff with jitter for reconnect loops: the first retry comes after about
//! [`Backoff::INITIAL`], each next one after twice as long, up to [`Backoff::MAX`]; a success
//! ([`Backoff::reset`]) starts over. The delay is a value the caller sleeps on, so tests check
//! the schedule without sleeping.
//!
//! ```
//! use std::time::Duration;
//! use yr_common::backoff::Backoff;
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
//! let first = backoff.next_delay();
//! assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
//! ```

use std::time::Duration;

/// The delays between attempts to reach something that is down.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The ceiling of the next delay (before jitter).
    ceiling: Duration,
    /// Attempts since the last reset.
    attempts: u32,
    /// xorshift state for the jitter.
    state: u64,
}

impl Backoff {
    /// The default first delay.
    pub const INITIAL: Duration = Duration::from_millis(100);
    /// The default longest delay.
    pub const MAX: Duration = Duration::from_secs(5);

    /// A backoff from `initial`, doubling up to `max`, with jitter seeded from the clock and
    /// the process id (so that nodes that lost the same master do not retry in step).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::with_seed(initial, max, nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// [`Backoff::new`] with the default delays.
    pub fn reconnect() -> Backoff {
        Self::new(Self::INITIAL, Self::MAX)
    }

    /// A backoff whose jitter comes from `seed` (for tests).
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            ceiling: initial,
            attempts: 0,
            state: seed | 1,
        }
    }

    /// The delay before the next attempt: between half the current ceiling and the ceiling
    /// ("equal jitter"); the ceiling then doubles, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = ceiling.saturating_mul(2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            self.random() % (spread + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// Attempts since the last reset (how many delays were handed out).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Start over after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
        self.attempts = 0;
    }

    fn random(&mut self) -> u64 {
        // xorshift64
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::reconnect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_from_the_initial_up_to_the_cap_within_their_jitter() {
        for seed in 0..50 {
            let mut backoff = Backoff::with_seed(100 * MS, 5_000 * MS, seed);
            let ceilings = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
            for ceiling in ceilings {
                let delay = backoff.next_delay();
                let ceiling = ceiling * MS;
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "seed {seed}: {delay:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
            assert_eq!(backoff.attempts(), ceilings.len() as u32);
        }
    }

    #[test]
    fn a_reset_starts_over() {
        let mut backoff = Backoff::with_seed(100 * MS, 5_000 * MS, 7);
        for _ in 0..20 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() >= 2_500 * MS);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert!(backoff.next_delay() <= 100 * MS);
    }

    #[test]
    fn the_jitter_spreads_retries() {
        let mut a = Backoff::with_seed(100 * MS, 5_000 * MS, 1);
        let mut b = Backoff::with_seed(100 * MS, 5_000 * MS, 2);
        let a: Vec<Duration> = (0..8).map(|_| a.next_delay()).collect();
        let b: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut backoff = Backoff::with_seed(MS, Duration::MAX, 3);
        for _ in 0..200 {
            backoff.next_delay();
        }
        let mut tiny = Backoff::with_seed(Duration::ZERO, Duration::ZERO, 3);
        assert!(tiny.next_delay() <= MS);
    }
}
