//! Admission under memory pressure: while the machine's available memory is below a critical
//! share of its total, a runtime rejects invokes with 1005 instead of risking the OOM killer.
//! The share is `YR_MEMORY_CRITICAL_RATIO` (default 0.05); the reading is refreshed at most
//! every 200 ms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use yr_common::{Error, ErrorCode};

/// The variable that sets the critical share of available memory.
pub const ENV_MEMORY_CRITICAL_RATIO: &str = "YR_MEMORY_CRITICAL_RATIO";
const DEFAULT_RATIO: f64 = 0.05;
const REFRESH: Duration = Duration::from_millis(200);

fn ratio() -> f64 {
    static RATIO: OnceLock<f64> = OnceLock::new();
    *RATIO.get_or_init(|| {
        std::env::var(ENV_MEMORY_CRITICAL_RATIO)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r))
            .unwrap_or(DEFAULT_RATIO)
    })
}

/// Available and total memory in kB, from /proc/meminfo.
fn read_meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("MemAvailable:")?, field("MemTotal:")?))
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Whether memory is critically low now.
pub fn critical() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(u64::MAX);
    static CRITICAL: AtomicBool = AtomicBool::new(false);
    let now = start().elapsed().as_millis() as u64;
    let last = LAST.load(Ordering::Relaxed);
    if last == u64::MAX || now.saturating_sub(last) >= REFRESH.as_millis() as u64 {
        LAST.store(now, Ordering::Relaxed);
        let critical = read_meminfo()
            .map(|(available, total)| (available as f64) < ratio() * total as f64)
            .unwrap_or(false);
        CRITICAL.store(critical, Ordering::Relaxed);
    }
    CRITICAL.load(Ordering::Relaxed)
}

/// 1005 if memory is critically low.
pub fn admit_invoke() -> Result<(), Error> {
    if critical() {
        return Err(Error::new(
            ErrorCode::InvokeRateLimited,
            format!(
                "system memory usage not enough, reject invoke request: less than {:.0}% of memory \
                 is available on this node; retry later or free memory",
                ratio() * 100.0
            ),
        ));
    }
    Ok(())
}
