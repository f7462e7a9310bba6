//! How many calls wait in one place: a named-instance lookup for a name not created yet, a KV
//! read for a key not written yet, a stream receive or send. The node reports the counts as
//! metrics (`yr_node_waiting_requests`), so an operator sees what is parked, and a test waits
//! for "the node has taken the call in and parks it" as an event instead of sleeping and
//! hoping it has.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A count of the calls waiting at one place.
///
/// ```
/// let waiting = yr_common::Waiting::default();
/// {
///     let _parked = waiting.enter();
///     assert_eq!(waiting.count(), 1);
/// }
/// assert_eq!(waiting.count(), 0);
/// ```
#[derive(Debug, Default)]
pub struct Waiting(AtomicUsize);

impl Waiting {
    /// Count one more waiting call, until the returned guard is dropped.
    pub fn enter(&self) -> WaitingGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(&self.0)
    }

    /// How many calls wait now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One waiting call, counted until dropped.
#[derive(Debug)]
pub struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
