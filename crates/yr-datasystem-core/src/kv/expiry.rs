//! TTL expiry of KV entries: the period of the sweeper that removes expired entries (and their
//! second-level copies) nobody reads, the sweep itself, and the conversion of a second-level
//! record's wall-clock expiry to the store's clock.

use std::time::{Duration, Instant, SystemTime};

use super::map::L2State;
use super::Shared;

/// How often expired entries are removed.
pub(super) const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// The instant on `now`'s clock at which a key expiring at wall time `expires_at` expires.
pub(super) fn instant_of(expires_at: Option<SystemTime>, now: Instant) -> Option<Instant> {
    expires_at.map(|t| match t.duration_since(SystemTime::now()) {
        Ok(left) => now
            .checked_add(left)
            .unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX))),
        Err(_) => now,
    })
}

impl Shared {
    /// Remove the entries that have expired (and their second-level copies).
    pub(super) fn sweep(&self) {
        let now = self.clock.now();
        let expired: Vec<(String, u64)> = self
            .map
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, e)| (k.clone(), e.version))
            .collect();
        for (key, version) in expired {
            let _lock = self.write_lock(&key);
            let removed = {
                let mut map = self.map.lock();
                match map.entries.get(&key) {
                    Some(e) if e.version == version => map.remove(&key),
                    _ => None,
                }
            };
            if let (Some(entry), Some(l2)) = (removed, &self.l2) {
                if entry.l2 != L2State::Absent {
                    if let Err(error) = l2.delete(&key) {
                        tracing::warn!(key = %key, %error, "cannot remove an expired KV key from {}", l2.describe());
                    }
                }
            }
        }
    }
}
