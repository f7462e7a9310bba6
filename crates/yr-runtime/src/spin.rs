//! Waiting by spinning: a thread that expects what it waits for within microseconds checks for
//! it in a loop, yielding its CPU, before it blocks. On the small VMs yr targets, a wakeup
//! through the kernel costs about 30 µs, several times a short call. Spinners compete for the
//! CPUs the work they wait for needs, so a process lets only a few threads spin at once (one
//! per CPU, at least two; `YR_SPIN_MAX` overrides); the others block at once.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::handshake::SpinSlots;

/// This process's spin slots.
fn slots() -> &'static SpinSlots {
    static SLOTS: OnceLock<SpinSlots> = OnceLock::new();
    SLOTS.get_or_init(SpinSlots::new)
}

/// How many threads of this process may spin at once: `YR_SPIN_MAX` if set (0 turns spinning
/// off, for machines shared with other work), else one per CPU and at least two.
fn max_spinning() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        if let Some(n) = std::env::var("YR_SPIN_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return n;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    })
}

/// Check `done` in a loop, yielding between checks, for at most `limit`. Returns whether
/// `done` returned true; false also when too many threads of this process are spinning
/// already (then `done` is not called at all).
pub fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let Some(_slot) = slots().enter(max_spinning()) else {
        return false;
    };
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::yield_now();
    }
}
