//! The clock that timing logic reads: heartbeats and leases, TTLs, recycle times, rate limits.
//! Code that decides by elapsed time asks a [`Clock`] for `now` instead of calling
//! `Instant::now()`, so that a test can hold time still and move it on by hand
//! ([`ManualClock`]) and see the decision change at exactly the instant it should, with no real
//! sleep. Production code uses [`SystemClock`]. (Async code whose timing is tokio's own
//! `sleep`/`interval` may use tokio's paused time in its tests instead.) See
//! docs/design/013-fail-points-and-clock.md.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A source of monotonic time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The real clock, shared.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A clock that stands still until a test advances it.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Instant>,
}

impl ManualClock {
    /// A clock standing at the real current instant.
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: Mutex::new(Instant::now()),
        })
    }

    /// Move the clock on by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let start = clock.now();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(5));
        assert_eq!(clock.now() - start, Duration::from_secs(5));
        let shared: Arc<dyn Clock> = clock.clone();
        assert_eq!(shared.now() - start, Duration::from_secs(5));
    }

    #[test]
    fn the_system_clock_moves_forward() {
        let clock = system();
        let first = clock.now();
        assert!(clock.now() >= first);
    }
}
