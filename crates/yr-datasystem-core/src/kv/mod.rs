//! The KV store: openYuanrong's `kv_*` semantics over an in-memory map, with an optional
//! second-level store ([`crate::l2`]).
//!
//! - **Writes** ([`KvStore::set`]) follow [`SetParam`]: `existence: NX` refuses an existing key
//!   with 4206; `ttl_second` expires the key (lazily on read, and a sweeper removes expired
//!   entries every second); `write_mode` says where the value lives: memory only
//!   (`NoneL2Cache`, `NoneL2CacheEvict`), also in the second-level store before the call
//!   returns (`WriteThroughL2Cache`), or also there soon after, from a background writer
//!   (`WriteBackL2Cache`). Without a second-level store, every mode keeps the value in memory
//!   only.
//! - **Reads** ([`KvStore::get`]) wait for keys that are not written yet and fail with 4005
//!   naming the missing keys after the timeout. A key missing from memory is read through
//!   from the second-level store, so a write-through value outlives a restart.
//! - **Limits**: keys of 1 to 1024 bytes and values up to [`MAX_MESSAGE_SIZE`] (64 MiB; 1001
//!   otherwise), checked before anything is stored.
//! - **Quota** ([`KvStore::set_quota`]): the store counts the bytes (key + value) each job holds
//!   in memory and refuses a write that would take its job over the quota with 4202, changing
//!   nothing. An overwrite counts the difference; deletes, expiry and evictions give the bytes
//!   back. Writes that name no job, and values read through from the second-level store, count
//!   under one shared bucket ([`UNKNOWN_JOB`]) with the same quota. When a write would go over,
//!   the job's values that the second-level store also holds are evicted from memory first
//!   (oldest first; a later read reads them through again). A read-through that does not fit
//!   is served without being kept in memory.
//!
//! - **Moves** ([`KvStore::moving_entries`], [`KvStore::adopt`], [`KvStore::forget_moved`]):
//!   in a cluster each key has one owner node; when the owners change, the previous owner
//!   hands its entries (value, time left, job, second-level state) to the new one, which keeps
//!   them unless it holds a newer write.
//!
//! Writes to one key are serialized (openYuanrong's causal consistency for KV): a write, a
//! delete, a read-through and the background writer each hold the key's write lock while they
//! touch the second-level store, so a late write-back never resurrects a deleted key.

mod expiry;
mod map;
mod moves;
mod params;
mod quota;
mod store;
mod watch;
mod write_back;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};
use yr_common::clock::{self, Clock};
use yr_common::Error;

use crate::l2::L2Store;

use expiry::SWEEP_PERIOD;
use map::Map;
pub use moves::MovingEntry;
pub use params::{
    slice_range, timeout_error, validate_key, validate_keys, validate_set, CacheType, Existence,
    SetParam, WriteMode, MAX_KEY_SIZE, MAX_MESSAGE_SIZE, MAX_TTL_SECOND, MAX_VALUE_SIZE,
    UNKNOWN_JOB,
};
pub use watch::Watch;
use write_back::Job;

/// Keys share this many write locks.
const WRITE_LOCKS: usize = 64;

struct Shared {
    map: Mutex<Map>,
    write_locks: Vec<Mutex<()>>,
    l2: Option<Arc<dyn L2Store>>,
    next_version: AtomicU64,
    /// The greatest write stamp made or seen here ([`Shared::stamp`]).
    last_stamp: AtomicU64,
    next_watch: AtomicU64,
    /// Queued write-back jobs, and a signal when one finishes.
    queued: Mutex<usize>,
    queue_changed: Condvar,
    /// Set by `close`: the error waiting reads end with.
    closed: Mutex<Option<Error>>,
    /// The most bytes one job may hold in memory (`u64::MAX`: no quota).
    quota: AtomicU64,
    /// The clock TTLs are measured on.
    clock: Arc<dyn Clock>,
    /// Live watches: reads waiting for keys not written yet.
    reads_waiting: AtomicUsize,
}

struct Handle {
    shared: Arc<Shared>,
    jobs: Mutex<Option<Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    _stop_sweeper: Sender<()>,
}

/// The KV store. Cloning it is cheap and shares the store. Calls block: on the second-level
/// store's IO, and `get` on keys not written yet.
#[derive(Clone)]
pub struct KvStore {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("keys", &self.handle.shared.map.lock().entries.len())
            .field(
                "l2",
                &self.handle.shared.l2.as_ref().map(|l2| l2.describe()),
            )
            .finish()
    }
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::new()
    }
}

fn stripe(key: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % WRITE_LOCKS as u64) as usize
}

impl Shared {
    fn write_lock(&self, key: &str) -> MutexGuard<'_, ()> {
        self.write_locks[stripe(key)].lock()
    }

    fn version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The stamp of a write made here now: microseconds of wall time, raised past every stamp
    /// made or seen here (a hybrid clock). Of two values of a key, the one written later has
    /// the greater stamp, also when two nodes wrote them, as long as their clocks agree to
    /// within the time between the writes.
    fn stamp(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut last = self.last_stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self.last_stamp.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Take note of a stamp made on another node, so that later writes here stamp above it.
    fn observe(&self, stamp: u64) {
        self.last_stamp.fetch_max(stamp, Ordering::Relaxed);
    }
}

impl KvStore {
    /// A store that keeps values in memory only.
    pub fn new() -> KvStore {
        KvStore::build(None, clock::system())
    }

    /// A store backed by the second-level store `l2`.
    pub fn with_l2(l2: Arc<dyn L2Store>) -> KvStore {
        KvStore::build(Some(l2), clock::system())
    }

    /// A store in memory only whose TTLs run on `clock` (tests move a [`yr_common::ManualClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> KvStore {
        KvStore::build(None, clock)
    }

    fn build(l2: Option<Arc<dyn L2Store>>, clock: Arc<dyn Clock>) -> KvStore {
        let shared = Arc::new(Shared {
            map: Mutex::new(Map::default()),
            write_locks: (0..WRITE_LOCKS).map(|_| Mutex::new(())).collect(),
            l2,
            next_version: AtomicU64::new(0),
            last_stamp: AtomicU64::new(0),
            next_watch: AtomicU64::new(0),
            queued: Mutex::new(0),
            queue_changed: Condvar::new(),
            closed: Mutex::new(None),
            quota: AtomicU64::new(u64::MAX),
            clock,
            reads_waiting: AtomicUsize::new(0),
        });
        let (jobs, writer) = if shared.l2.is_some() {
            let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
            let writer_shared = shared.clone();
            let writer = std::thread::Builder::new()
                .name("yr-kv-write-back".into())
                .spawn(move || {
                    for job in receiver {
                        writer_shared.run_job(job);
                        writer_shared.finish_job();
                    }
                })
                .ok();
            (Some(sender), writer)
        } else {
            (None, None)
        };
        let (stop_sweeper, stopped): (Sender<()>, Receiver<()>) = crossbeam_channel::bounded(1);
        let sweeper_shared = Arc::downgrade(&shared);
        let _ = std::thread::Builder::new()
            .name("yr-kv-sweeper".into())
            .spawn(move || loop {
                match stopped.recv_timeout(SWEEP_PERIOD) {
                    Err(RecvTimeoutError::Timeout) => match sweeper_shared.upgrade() {
                        Some(shared) => shared.sweep(),
                        None => return,
                    },
                    _ => return,
                }
            });
        KvStore {
            handle: Arc::new(Handle {
                shared,
                jobs: Mutex::new(jobs),
                writer: Mutex::new(writer),
                _stop_sweeper: stop_sweeper,
            }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// What the second-level store is, if there is one.
    pub fn l2_description(&self) -> Option<String> {
        self.shared().l2.as_ref().map(|l2| l2.describe())
    }

    /// The number of keys in memory (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shared().map.lock().entries.len()
    }

    /// Whether memory holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
