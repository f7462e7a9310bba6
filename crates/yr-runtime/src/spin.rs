//! Waiting by spinning: a thread that expects what it waits for within microseconds checks for
//! it in a loop, yielding its CPU, before it blocks. On the small VMs yr targets, a wakeup
//! through the kernel costs about 30 µs, several times a short call. Spinners compete for the
//! CPUs the work they wait for needs, so a process lets only a few threads spin at once (one
//! per CPU, at least two; `YR_SPIN_MAX` overrides); the others block at once.
//!
//! Spinning pays only while a CPU is free. When other work holds every CPU, a spinner takes
//! CPU time that work needs, and the kernel then wakes the spinner's threads late, after the
//! other work's turn: on a 2-CPU machine whose CPUs other builds held, a call round trip took
//! 340–850 µs spinning and 41 µs with spinning off (docs/benchmarks.md, "Across hosts"). A
//! yield that takes longer than [`CONTENDED_YIELD`] gave the CPU to such work, so the process
//! stops spinning for [`CONTENDED_BACKOFF`] and its threads block at once meanwhile. A process
//! at a real-time priority (`chrt`) never yields to ordinary work, and a long yield there is
//! the kernel's throttling of real-time work: it keeps spinning as before.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// A yield that takes longer than this gave the CPU to other work that wanted it: every CPU
/// is busy. (A yield to another thread of yr that is running a call returns well within it.)
const CONTENDED_YIELD: Duration = Duration::from_micros(200);
/// How long the process does not spin after a contended yield.
const CONTENDED_BACKOFF: Duration = Duration::from_millis(250);

/// The moment the process's threads may spin again after a contended yield, in nanoseconds
/// since [`epoch`]; 0 while they may.
static QUIET_UNTIL: AtomicU64 = AtomicU64::new(0);

/// The process's reference instant for [`QUIET_UNTIL`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether this process runs at a real-time priority (`SCHED_FIFO` or `SCHED_RR`).
fn real_time() -> bool {
    static REAL_TIME: OnceLock<bool> = OnceLock::new();
    *REAL_TIME.get_or_init(|| {
        // SAFETY: sched_getscheduler has no preconditions; 0 is this thread.
        let policy = unsafe { libc::sched_getscheduler(0) };
        policy == libc::SCHED_FIFO || policy == libc::SCHED_RR
    })
}

fn nanos_since_epoch(now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Check `done` in a loop, yielding between checks, for at most `limit`. Returns whether
/// `done` returned true; false also when too many threads of this process are spinning
/// already, or when the CPUs were found busy with other work in the last
/// [`CONTENDED_BACKOFF`] (then `done` is not called at all).
pub fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let quiet_until = QUIET_UNTIL.load(Ordering::Relaxed);
    if quiet_until != 0 && nanos_since_epoch(start) < quiet_until {
        return false;
    }
    let Some(_slot) = slots().enter(max_spinning()) else {
        return false;
    };
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now.duration_since(start) >= limit {
            return false;
        }
        std::thread::yield_now();
        if now.elapsed() > CONTENDED_YIELD && !real_time() {
            QUIET_UNTIL.store(
                nanos_since_epoch(Instant::now() + CONTENDED_BACKOFF),
                Ordering::Relaxed,
            );
            return false;
        }
    }
}
