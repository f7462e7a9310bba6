//! Deadlines of calls (`InvokeOptions::timeout_s`): one thread per process sleeps until the
//! earliest deadline and fails the results of calls that have not finished by then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use yr_common::{Error, ErrorCode};

use crate::object_store::{ObjectHandle, ObjectSlot};

struct Entry {
    at: Instant,
    seq: u64,
    returns: Vec<Weak<ObjectSlot>>,
    function: &'static str,
    timeout: Duration,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Deadlines {
    heap: Mutex<(BinaryHeap<Reverse<Entry>>, u64)>,
    changed: Condvar,
}

fn deadlines() -> &'static Arc<Deadlines> {
    static DEADLINES: OnceLock<Arc<Deadlines>> = OnceLock::new();
    DEADLINES.get_or_init(|| {
        let deadlines = Arc::new(Deadlines::default());
        let watcher = deadlines.clone();
        let spawned = std::thread::Builder::new()
            .name("yr-deadlines".into())
            .spawn(move || watcher.run());
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the thread that times calls out");
        }
        deadlines
    })
}

/// The error of a call that did not finish within its `timeout_s`.
pub fn timed_out(function: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorCode::GetOperationFailed,
        format!(
            "the call to {function} did not finish within its timeout_s of {} s and was \
             abandoned; raise timeout_s (-1 = no timeout) or make the call faster",
            timeout.as_secs()
        ),
    )
}

/// Fail `returns` with 4005 if they are not finished `timeout` from now; the call is
/// cancelled too (a queued call does not run, a running one's result is dropped).
pub fn fail_after(function: &'static str, timeout: Duration, returns: &[ObjectHandle]) {
    let deadlines = deadlines();
    let mut heap = deadlines.heap.lock();
    heap.1 += 1;
    let seq = heap.1;
    heap.0.push(Reverse(Entry {
        at: Instant::now() + timeout,
        seq,
        returns: returns.iter().map(Arc::downgrade).collect(),
        function,
        timeout,
    }));
    drop(heap);
    deadlines.changed.notify_one();
}

impl Deadlines {
    fn run(&self) {
        let mut heap = self.heap.lock();
        loop {
            let now = Instant::now();
            let next = heap.0.peek().map(|entry| entry.0.at);
            match next {
                None => self.changed.wait(&mut heap),
                Some(at) if at > now => {
                    self.changed.wait_until(&mut heap, at);
                }
                Some(_) => {
                    let Some(Reverse(entry)) = heap.0.pop() else {
                        continue;
                    };
                    drop(heap);
                    let error = timed_out(entry.function, entry.timeout);
                    for handle in entry.returns.iter().filter_map(Weak::upgrade) {
                        handle.fail_and_cancel(error.clone());
                    }
                    heap = self.heap.lock();
                }
            }
        }
    }
}
