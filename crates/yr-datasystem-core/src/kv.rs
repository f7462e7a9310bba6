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
//! Writes to one key are serialized (openYuanrong's causal consistency for KV): a write, a
//! delete, a read-through and the background writer each hold the key's write lock while they
//! touch the second-level store, so a late write-back never resurrects a deleted key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};
use yr_common::clock::{self, Clock};
use yr_common::{Error, ErrorCode, Result};

use crate::l2::L2Store;

/// The longest key, in bytes.
pub const MAX_KEY_SIZE: usize = 1024;
/// The largest message a KV write may carry, in bytes (64 MiB): the bound on one value.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// The largest value, in bytes: [`MAX_MESSAGE_SIZE`].
pub const MAX_VALUE_SIZE: usize = MAX_MESSAGE_SIZE;
/// The quota bucket of writes that name no job (and of values read through from the
/// second-level store, which belong to no job in memory).
pub const UNKNOWN_JOB: &str = "";
/// The longest time to live, in seconds.
pub const MAX_TTL_SECOND: u64 = u32::MAX as u64;
/// How often expired entries are removed.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Write-backs waiting for the second-level store; a writer waits for room beyond this.
const WRITE_BACK_QUEUE: usize = 10_000;
/// How long a writer waits for room in a full write-back queue.
const WRITE_BACK_ROOM_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of one write-back before it is given up (and logged).
const WRITE_BACK_ATTEMPTS: u32 = 3;
/// How long dropping the store waits for queued write-backs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys share this many write locks.
const WRITE_LOCKS: usize = 64;

/// Whether a write may replace an existing key.
///
/// ```
/// use yr_datasystem_core::kv::{Existence, KvStore, SetParam};
/// let store = KvStore::new();
/// let nx = SetParam { existence: Existence::NX, ..SetParam::default() };
/// store.set("k", "first".into(), &nx).unwrap();
/// assert_eq!(store.set("k", "second".into(), &nx).unwrap_err().code().number(), 4206);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Existence {
    /// Write whether or not the key exists.
    #[default]
    None,
    /// Write only if the key does not exist; otherwise fail with 4206.
    #[allow(clippy::upper_case_acronyms)] // openYuanrong's name
    NX,
}

/// Where a written value lives (openYuanrong's `WriteMode`).
///
/// ```
/// use yr_datasystem_core::kv::{KvStore, SetParam, WriteMode};
/// let store = KvStore::new(); // no second-level store: every mode keeps values in memory
/// let durable = SetParam { write_mode: WriteMode::WriteThroughL2Cache, ..SetParam::default() };
/// store.set("k", "v".into(), &durable).unwrap();
/// assert_eq!(store.exist(&["k"]).unwrap(), vec![true]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WriteMode {
    /// Memory only: fastest, lost when the node stops.
    #[default]
    NoneL2Cache,
    /// Also in the second-level store before the write returns: survives a restart.
    WriteThroughL2Cache,
    /// Also in the second-level store, asynchronously: survives a restart once flushed.
    WriteBackL2Cache,
    /// Memory only, and evictable under memory pressure.
    NoneL2CacheEvict,
}

/// openYuanrong's cache type. Accepted; values are kept in memory either way.
///
/// ```
/// use yr_datasystem_core::kv::{CacheType, SetParam};
/// let param = SetParam { cache_type: CacheType::Disk, ..SetParam::default() };
/// assert_eq!(SetParam::default().cache_type, CacheType::Memory);
/// # let _ = param;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheType {
    /// Memory.
    #[default]
    Memory,
    /// Disk.
    Disk,
}

/// How a value is written: by default, whether or not the key exists, memory only, with no
/// expiry.
///
/// ```
/// use std::time::Duration;
/// use yr_datasystem_core::kv::{KvStore, SetParam};
/// let store = KvStore::new();
/// let brief = SetParam { ttl_second: 1, ..SetParam::default() };
/// store.set("k", "v".into(), &brief).unwrap();
/// std::thread::sleep(Duration::from_millis(1100));
/// assert_eq!(store.exist(&["k"]).unwrap(), vec![false]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SetParam {
    /// Whether an existing key may be replaced.
    pub existence: Existence,
    /// Where the value lives.
    pub write_mode: WriteMode,
    /// Seconds until the key expires; 0 means never.
    pub ttl_second: u64,
    /// openYuanrong's cache type.
    pub cache_type: CacheType,
}

/// Check a key: 1 to [`MAX_KEY_SIZE`] bytes, else 1001.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            "the KV key is empty; use a key of 1 to 1024 bytes",
        ));
    }
    if key.len() > MAX_KEY_SIZE {
        let start: String = key.chars().take(32).collect();
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "the KV key {start:?}… is {} bytes, longer than the limit of {MAX_KEY_SIZE} \
                 bytes; use a shorter key",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Check a list of keys: at least one, each valid.
pub fn validate_keys<S: AsRef<str>>(keys: &[S]) -> Result<()> {
    if keys.is_empty() {
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            "no KV keys were given; pass at least one key",
        ));
    }
    keys.iter().try_for_each(|k| validate_key(k.as_ref()))
}

/// Check a write before it is sent anywhere: the key, the value's size, the TTL.
pub fn validate_set(key: &str, value_len: usize, param: &SetParam) -> Result<()> {
    validate_key(key)?;
    if value_len > MAX_VALUE_SIZE {
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "the value of KV key {key:?} is {value_len} bytes, larger than the largest \
                 KV message of {MAX_VALUE_SIZE} bytes (64 MiB), so nothing was stored; split \
                 it into several keys or store it as an object"
            ),
        ));
    }
    if param.ttl_second > MAX_TTL_SECOND {
        return Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "ttl_second {} of KV key {key:?} is larger than {MAX_TTL_SECOND}; use 0 for a \
                 key that never expires",
                param.ttl_second
            ),
        ));
    }
    Ok(())
}

/// The part `offset..offset + size` of `value` (`size` 0: to the end), or 1001.
pub fn slice_range(key: &str, value: &Bytes, offset: u64, size: u64) -> Result<Bytes> {
    let len = value.len() as u64;
    let end = if size == 0 {
        Some(len)
    } else {
        offset.checked_add(size)
    };
    match end {
        Some(end) if offset <= len && end <= len => Ok(value.slice(offset as usize..end as usize)),
        _ => Err(Error::new(
            ErrorCode::ParamInvalid,
            format!(
                "the range offset {offset}, size {size} is outside the value of KV key {key:?}, \
                 which is {len} bytes; read within 0..{len} (size 0 reads to the end)"
            ),
        )),
    }
}

/// The 4005 of a read whose keys did not all appear in time.
pub fn timeout_error<S: AsRef<str>>(missing: &[S], timeout: Duration) -> Error {
    let names: Vec<&str> = missing.iter().map(AsRef::as_ref).collect();
    Error::new(
        ErrorCode::GetOperationFailed,
        format!(
            "KV get timed out after {timeout:?}: {} key(s) were not written: [{}]; write them, \
             or raise the timeout",
            names.len(),
            names.join(", ")
        ),
    )
}

/// Where a value's copy in the second-level store stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L2State {
    /// No copy (or an old one that a queued delete removes).
    Absent,
    /// A write-back is queued.
    Pending,
    /// The second-level store holds this value.
    Stored,
}

struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
    version: u64,
    l2: L2State,
    /// The quota bucket the entry counts under.
    job: Arc<str>,
    /// What it counts: the key's and the value's bytes.
    size: u64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

type Waker = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Map {
    entries: HashMap<String, Entry>,
    watchers: HashMap<String, Vec<(u64, Waker)>>,
    /// The bytes each job holds in memory: its entries' sizes, and room reserved by its writes
    /// in progress. A job holding nothing has no row.
    held: HashMap<Arc<str>, u64>,
    /// The sum of `held`.
    total: u64,
}

impl Map {
    fn held(&self, job: &str) -> u64 {
        self.held.get(job).copied().unwrap_or(0)
    }

    fn charge(&mut self, job: &Arc<str>, bytes: u64) {
        if bytes == 0 {
            return;
        }
        *self.held.entry(job.clone()).or_insert(0) += bytes;
        self.total += bytes;
    }

    fn credit(&mut self, job: &str, bytes: u64) {
        let Some(held) = self.held.get_mut(job) else {
            debug_assert!(
                bytes == 0,
                "KV job {job:?} gives back bytes it does not hold"
            );
            return;
        };
        debug_assert!(
            *held >= bytes,
            "KV job {job:?} gives back more than it holds"
        );
        *held = held.saturating_sub(bytes);
        if *held == 0 {
            self.held.remove(job);
        }
        self.total = self.total.saturating_sub(bytes);
    }

    /// Remove the entry of `key`, giving its bytes back to its job.
    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.credit(&entry.job, entry.size);
        Some(entry)
    }

    /// Insert `entry` (replacing and crediting the old one), whose job already reserved
    /// `reserved` of its size.
    fn put(&mut self, key: &str, entry: Entry, reserved: u64) {
        self.remove(key);
        self.charge(&entry.job, entry.size.saturating_sub(reserved));
        self.entries.insert(key.to_string(), entry);
    }
}

/// The bucket name in messages.
fn job_name(job: &str) -> String {
    if job == UNKNOWN_JOB {
        "an unknown job (the writes named no job)".to_string()
    } else {
        format!("job {job}")
    }
}

/// What a key and value count against the quota.
fn entry_size(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}

/// Work for the background writer.
enum Job {
    Put {
        key: String,
        version: u64,
        value: Bytes,
        expires_at: Option<SystemTime>,
    },
    Delete {
        key: String,
        version: u64,
    },
}

struct Shared {
    map: Mutex<Map>,
    write_locks: Vec<Mutex<()>>,
    l2: Option<Arc<dyn L2Store>>,
    next_version: AtomicU64,
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

/// Stops watching keys when dropped.
pub struct Watch {
    shared: Weak<Shared>,
    id: u64,
    keys: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut map = shared.map.lock();
        for key in &self.keys {
            if let Some(list) = map.watchers.get_mut(key) {
                list.retain(|(id, _)| *id != self.id);
                if list.is_empty() {
                    map.watchers.remove(key);
                }
            }
        }
    }
}

fn stripe(key: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % WRITE_LOCKS as u64) as usize
}

/// The instant on `now`'s clock at which a key expiring at wall time `expires_at` expires.
fn instant_of(expires_at: Option<SystemTime>, now: Instant) -> Option<Instant> {
    expires_at.map(|t| match t.duration_since(SystemTime::now()) {
        Ok(left) => now
            .checked_add(left)
            .unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX))),
        Err(_) => now,
    })
}

impl Shared {
    fn write_lock(&self, key: &str) -> MutexGuard<'_, ()> {
        self.write_locks[stripe(key)].lock()
    }

    fn version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The live value of `key` in memory; removes it if it has expired.
    fn memory_get(&self, key: &str) -> Option<Bytes> {
        let mut map = self.map.lock();
        let now = self.clock.now();
        match map.entries.get(key) {
            Some(entry) if entry.live(now) => Some(entry.value.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Insert an entry, whose job reserved `reserved` of its size, and wake the readers
    /// waiting for its key.
    fn insert(&self, key: &str, entry: Entry, reserved: u64) {
        let wakers: Vec<Waker> = {
            let mut map = self.map.lock();
            map.put(key, entry, reserved);
            map.watchers
                .get(key)
                .map(|list| list.iter().map(|(_, w)| w.clone()).collect())
                .unwrap_or_default()
        };
        for waker in wakers {
            waker();
        }
    }

    /// Read `key` from the second-level store into memory. The caller found it missing.
    fn read_through(&self, key: &str) -> Result<Option<Bytes>> {
        let Some(l2) = &self.l2 else {
            return Ok(None);
        };
        let _lock = self.write_lock(key);
        if let Some(value) = self.memory_get(key) {
            return Ok(Some(value));
        }
        let Some(record) = l2.get(key)? else {
            return Ok(None);
        };
        let value = record.value.clone();
        let job: Arc<str> = Arc::from(UNKNOWN_JOB);
        let size = entry_size(key, value.len());
        // A value that does not fit is served without being kept.
        if let Ok(reserved) = self.reserve(&job, key, size) {
            self.insert(
                key,
                Entry {
                    value: record.value,
                    expires_at: instant_of(record.expires_at, self.clock.now()),
                    version: self.version(),
                    l2: L2State::Stored,
                    job,
                    size,
                },
                reserved,
            );
        }
        Ok(Some(value))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        if self.memory_get(key).is_some() {
            return Ok(true);
        }
        match &self.l2 {
            Some(l2) => l2.exists(key),
            None => Ok(false),
        }
    }

    fn finish_job(&self) {
        let mut queued = self.queued.lock();
        *queued = queued.saturating_sub(1);
        self.queue_changed.notify_all();
    }

    /// Run one write-back job: only if the entry it was queued for is still current.
    fn run_job(&self, job: Job) {
        let Some(l2) = &self.l2 else { return };
        let (key, version) = match &job {
            Job::Put { key, version, .. } | Job::Delete { key, version } => (key, *version),
        };
        for attempt in 0..WRITE_BACK_ATTEMPTS {
            let result = {
                let _lock = self.write_lock(key);
                let current = self
                    .map
                    .lock()
                    .entries
                    .get(key.as_str())
                    .is_some_and(|e| e.version == version);
                if !current {
                    return;
                }
                let result = match &job {
                    Job::Put {
                        value, expires_at, ..
                    } => {
                        if expires_at.is_some_and(|t| t <= SystemTime::now()) {
                            return;
                        }
                        l2.put(key, value, *expires_at)
                    }
                    Job::Delete { .. } => l2.delete(key),
                };
                if result.is_ok() {
                    if let Job::Put { .. } = job {
                        if let Some(entry) = self.map.lock().entries.get_mut(key.as_str()) {
                            if entry.version == version {
                                entry.l2 = L2State::Stored;
                            }
                        }
                    }
                }
                result
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(key = %key, attempt, %error, "KV write-back to {} failed", l2.describe());
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
            }
        }
        tracing::error!(key = %key, "KV write-back to {} gave up after {WRITE_BACK_ATTEMPTS} attempts", l2.describe());
    }

    /// Reserve room in memory for `job`'s write of `size` bytes under `key` (the caller holds
    /// the key's write lock): the bytes it adds beyond the entry of `key` that the job already
    /// holds. If that takes the job over the quota, its expired entries are dropped and its
    /// values that the second-level store also holds are evicted (oldest first) until the write
    /// fits; if it still does not, 4202 and nothing changed. Returns the bytes reserved, which
    /// [`Shared::insert`] or [`Shared::release`] settle.
    fn reserve(&self, job: &Arc<str>, key: &str, size: u64) -> Result<u64> {
        let quota = self.quota.load(Ordering::Relaxed);
        let mut map = self.map.lock();
        let replaced = match map.entries.get(key) {
            Some(entry) if entry.job == *job => entry.size,
            _ => 0,
        };
        let extra = size.saturating_sub(replaced);
        let fits = |map: &Map| extra == 0 || map.held(job).saturating_add(extra) <= quota;
        if !fits(&map) {
            let now = self.clock.now();
            let mut candidates: Vec<(bool, u64, String, u64)> = map
                .entries
                .iter()
                .filter(|(k, e)| {
                    e.job == *job && k.as_str() != key && (!e.live(now) || e.l2 == L2State::Stored)
                })
                .map(|(k, e)| (e.live(now), e.version, k.clone(), e.size))
                .collect();
            // Evict only if that makes the write fit: a refused write changes nothing.
            let freeable: u64 = candidates.iter().map(|c| c.3).sum();
            let enough = map.held(job).saturating_sub(freeable).saturating_add(extra) <= quota;
            if enough {
                // Expired entries first, then the oldest.
                candidates.sort_unstable();
                for (_, _, victim, _) in candidates {
                    if fits(&map) {
                        break;
                    }
                    map.remove(&victim);
                }
            }
        }
        if !fits(&map) {
            let held = map.held(job);
            return Err(Error::new(
                ErrorCode::SharedMemoryLimited,
                format!(
                    "KV quota exceeded: {} holds {held} bytes of KV memory on this node, and \
                     writing {size} bytes (key and value) under key {key:?} would take it over \
                     its quota of {quota} bytes, so nothing was written; delete keys the job no \
                     longer needs (kv_del), or start the node with a larger --kv-quota-mb",
                    job_name(job)
                ),
            ));
        }
        map.charge(job, extra);
        Ok(extra)
    }

    /// Give back room reserved for a write that failed.
    fn release(&self, job: &str, reserved: u64) {
        self.map.lock().credit(job, reserved);
    }

    /// Remove the entries that have expired (and their second-level copies).
    fn sweep(&self) {
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
            next_watch: AtomicU64::new(0),
            queued: Mutex::new(0),
            queue_changed: Condvar::new(),
            closed: Mutex::new(None),
            quota: AtomicU64::new(u64::MAX),
            clock,
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

    fn enqueue(&self, job: Job) -> Result<()> {
        let sender = self.handle.jobs.lock().clone();
        let Some(sender) = sender else {
            return Ok(());
        };
        *self.shared().queued.lock() += 1;
        if sender.send(job).is_err() {
            self.shared().finish_job();
        }
        Ok(())
    }

    fn wait_for_queue_room(&self, key: &str) -> Result<()> {
        let shared = self.shared();
        let deadline = Instant::now() + WRITE_BACK_ROOM_TIMEOUT;
        let mut queued = shared.queued.lock();
        while *queued >= WRITE_BACK_QUEUE {
            if shared
                .queue_changed
                .wait_until(&mut queued, deadline)
                .timed_out()
            {
                return Err(Error::new(
                    ErrorCode::DatasystemFailed,
                    format!(
                        "the KV write-back queue stayed full ({WRITE_BACK_QUEUE} writes) for \
                         {WRITE_BACK_ROOM_TIMEOUT:?}, so key {key:?} was not written; the \
                         second-level store is too slow or failing: check it, or write with \
                         WriteThroughL2Cache"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Limit the bytes (keys and values) each job may hold in memory to `quota_bytes`
    /// (`None`: no limit, the default). Writes already stored stay.
    ///
    /// ```
    /// use yr_datasystem_core::kv::{KvStore, SetParam};
    /// let store = KvStore::new();
    /// store.set_quota(Some(10));
    /// store.set_for_job("job-a", "k", "12345".into(), &SetParam::default()).unwrap();
    /// let error = store
    ///     .set_for_job("job-a", "k2", "123456".into(), &SetParam::default())
    ///     .unwrap_err();
    /// assert_eq!(error.code().number(), 4202);
    /// // Another job has a quota of its own.
    /// store.set_for_job("job-b", "k2", "123456".into(), &SetParam::default()).unwrap();
    /// assert_eq!(store.job_bytes("job-a"), 6);
    /// assert_eq!(store.memory_bytes(), 14);
    /// ```
    pub fn set_quota(&self, quota_bytes: Option<u64>) {
        self.shared()
            .quota
            .store(quota_bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The per-job quota, in bytes (`None`: no limit).
    pub fn quota(&self) -> Option<u64> {
        let quota = self.shared().quota.load(Ordering::Relaxed);
        (quota != u64::MAX).then_some(quota)
    }

    /// The bytes (keys and values) every job holds in memory together.
    pub fn memory_bytes(&self) -> u64 {
        self.shared().map.lock().total
    }

    /// The bytes `job_id` holds in memory ([`UNKNOWN_JOB`]: writes that named no job).
    pub fn job_bytes(&self, job_id: &str) -> u64 {
        self.shared().map.lock().held(job_id)
    }

    /// Write `value` under `key`, counted under no job ([`UNKNOWN_JOB`]); see
    /// [`KvStore::set_for_job`].
    pub fn set(&self, key: &str, value: Bytes, param: &SetParam) -> Result<()> {
        self.set_for_job(UNKNOWN_JOB, key, value, param)
    }

    /// Write `value` under `key` for `job_id`. 1001 for a bad key, value or TTL; 4206 for an
    /// existing key with `Existence::NX`; 4202 if it would take the job over its quota; the
    /// second-level store's code (4203, 4204, 3007) if a write-through fails. A failed write
    /// changes nothing.
    pub fn set_for_job(
        &self,
        job_id: &str,
        key: &str,
        value: Bytes,
        param: &SetParam,
    ) -> Result<()> {
        validate_set(key, value.len(), param)?;
        let shared = self.shared();
        let l2 = match param.write_mode {
            WriteMode::WriteThroughL2Cache | WriteMode::WriteBackL2Cache => shared.l2.clone(),
            WriteMode::NoneL2Cache | WriteMode::NoneL2CacheEvict => None,
        };
        if l2.is_some() && param.write_mode == WriteMode::WriteBackL2Cache {
            self.wait_for_queue_room(key)?;
        }
        let _lock = shared.write_lock(key);
        if param.existence == Existence::NX && shared.exists(key)? {
            return Err(Error::new(
                ErrorCode::KeyAlreadyExist,
                format!(
                    "KV key {key:?} already exists and the write was NX (only if absent); use \
                     another key, or write without NX to replace it"
                ),
            ));
        }
        let job: Arc<str> = Arc::from(job_id);
        let size = entry_size(key, value.len());
        let reserved = shared.reserve(&job, key, size)?;
        let ttl = (param.ttl_second > 0).then(|| Duration::from_secs(param.ttl_second));
        let expires_at = ttl.and_then(|t| shared.clock.now().checked_add(t));
        let expires_at_wall = ttl.and_then(|t| SystemTime::now().checked_add(t));
        let version = shared.version();
        let previous = shared.map.lock().entries.get(key).map(|e| e.l2);
        let state = match (&l2, param.write_mode) {
            (Some(l2), WriteMode::WriteThroughL2Cache) => l2
                .put(key, &value, expires_at_wall)
                .map(|()| L2State::Stored),
            (Some(_), _) => self
                .enqueue(Job::Put {
                    key: key.to_string(),
                    version,
                    value: value.clone(),
                    expires_at: expires_at_wall,
                })
                .map(|()| L2State::Pending),
            (None, _) => {
                if previous.is_some_and(|p| p != L2State::Absent) {
                    // The second-level store holds an older value: remove it in the background.
                    self.enqueue(Job::Delete {
                        key: key.to_string(),
                        version,
                    })
                    .map(|()| L2State::Absent)
                } else {
                    Ok(L2State::Absent)
                }
            }
        };
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                shared.release(&job, reserved);
                return Err(error);
            }
        };
        shared.insert(
            key,
            Entry {
                value,
                expires_at,
                version,
                l2: state,
                job,
                size,
            },
            reserved,
        );
        Ok(())
    }

    /// The values of `keys` now, read through from the second-level store; `None` for a key
    /// that has no value.
    pub fn try_get<S: AsRef<str>>(&self, keys: &[S]) -> Result<Vec<Option<Bytes>>> {
        let shared = self.shared();
        let mut values: Vec<Option<Bytes>> =
            keys.iter().map(|k| shared.memory_get(k.as_ref())).collect();
        if shared.l2.is_some() {
            for (value, key) in values.iter_mut().zip(keys) {
                if value.is_none() {
                    *value = shared.read_through(key.as_ref())?;
                }
            }
        }
        Ok(values)
    }

    /// Call `waker` whenever one of `keys` is written, until the returned guard is dropped.
    pub fn watch<S: AsRef<str>>(&self, keys: &[S], waker: Waker) -> Watch {
        let shared = &self.handle.shared;
        let id = shared.next_watch.fetch_add(1, Ordering::Relaxed);
        let keys: Vec<String> = keys.iter().map(|k| k.as_ref().to_string()).collect();
        {
            let mut map = shared.map.lock();
            for key in &keys {
                map.watchers
                    .entry(key.clone())
                    .or_default()
                    .push((id, waker.clone()));
            }
        }
        Watch {
            shared: Arc::downgrade(shared),
            id,
            keys,
        }
    }

    /// The values of `keys`, in order, waiting up to `timeout` for keys that are not written
    /// yet. 1001 for a bad key; 4005 naming the keys still missing after `timeout`.
    pub fn get<S: AsRef<str>>(&self, keys: &[S], timeout: Duration) -> Result<Vec<Bytes>> {
        validate_keys(keys)?;
        let deadline = Instant::now().checked_add(timeout);
        let signal = Arc::new((Mutex::new(false), Condvar::new()));
        let waker: Waker = {
            let signal = signal.clone();
            Arc::new(move || {
                *signal.0.lock() = true;
                signal.1.notify_all();
            })
        };
        let _watch = self.watch(keys, waker);
        loop {
            let values = self.try_get(keys)?;
            if values.iter().all(Option::is_some) {
                return Ok(values.into_iter().flatten().collect());
            }
            if let Some(error) = self.shared().closed.lock().clone() {
                return Err(error);
            }
            let mut written = signal.0.lock();
            let mut timed_out = false;
            while !*written && !timed_out {
                match deadline {
                    Some(deadline) => {
                        timed_out = signal.1.wait_until(&mut written, deadline).timed_out()
                    }
                    None => signal.1.wait(&mut written),
                }
            }
            *written = false;
            drop(written);
            if timed_out {
                let values = self.try_get(keys)?;
                if values.iter().all(Option::is_some) {
                    return Ok(values.into_iter().flatten().collect());
                }
                let missing: Vec<&str> = keys
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| k.as_ref())
                    .collect();
                return Err(timeout_error(&missing, timeout));
            }
        }
    }

    /// Part of the value of `key`: `size` bytes from `offset` (`size` 0: to the end), waiting
    /// up to `timeout` for the key. 1001 for a range outside the value.
    pub fn get_with_param(
        &self,
        key: &str,
        offset: u64,
        size: u64,
        timeout: Duration,
    ) -> Result<Bytes> {
        let value = self.get(&[key], timeout)?.pop().unwrap_or_default();
        slice_range(key, &value, offset, size)
    }

    /// Delete `keys` from memory and from the second-level store. Deleting a missing key
    /// succeeds.
    pub fn del<S: AsRef<str>>(&self, keys: &[S]) -> Result<()> {
        validate_keys(keys)?;
        let shared = self.shared();
        for key in keys {
            let key = key.as_ref();
            let _lock = shared.write_lock(key);
            shared.map.lock().remove(key);
            if let Some(l2) = &shared.l2 {
                l2.delete(key)?;
            }
        }
        Ok(())
    }

    /// Whether each of `keys` has a value (in memory or in the second-level store).
    pub fn exist<S: AsRef<str>>(&self, keys: &[S]) -> Result<Vec<bool>> {
        validate_keys(keys)?;
        keys.iter()
            .map(|k| self.shared().exists(k.as_ref()))
            .collect()
    }

    /// End every read that waits for a key, now and later, with `error` (the owner of the
    /// store is going away). Reads of written keys and writes still work.
    pub fn close(&self, error: Error) {
        let shared = self.shared();
        *shared.closed.lock() = Some(error);
        let wakers: Vec<Waker> = shared
            .map
            .lock()
            .watchers
            .values()
            .flatten()
            .map(|(_, waker)| waker.clone())
            .collect();
        for waker in wakers {
            waker();
        }
    }

    /// Wait up to `timeout` until every queued write-back has reached the second-level store
    /// (or was given up). Returns whether the queue drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        let mut queued = shared.queued.lock();
        while *queued > 0 {
            if shared
                .queue_changed
                .wait_until(&mut queued, deadline)
                .timed_out()
            {
                return *queued == 0;
            }
        }
        true
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

impl Drop for Handle {
    fn drop(&mut self) {
        // Close the queue; the writer finishes what is queued, within a bound.
        drop(self.jobs.lock().take());
        if let Some(writer) = self.writer.lock().take() {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while !writer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::warn!(
                    "KV write-backs were still queued after {DRAIN_TIMEOUT:?}; they may be lost"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::L2Record;

    fn param(mode: WriteMode) -> SetParam {
        SetParam {
            write_mode: mode,
            ..SetParam::default()
        }
    }

    fn nx() -> SetParam {
        SetParam {
            existence: Existence::NX,
            ..SetParam::default()
        }
    }

    fn ttl(seconds: u64) -> SetParam {
        SetParam {
            ttl_second: seconds,
            ..SetParam::default()
        }
    }

    fn bytes(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    const SHORT: Duration = Duration::from_millis(50);

    /// An in-memory second-level store that can be told to fail, and counts its writes.
    #[derive(Default)]
    struct FakeL2 {
        values: Mutex<HashMap<String, L2Record>>,
        failing: std::sync::atomic::AtomicBool,
        puts: AtomicU64,
        delay: Mutex<Duration>,
    }

    impl FakeL2 {
        fn check(&self) -> Result<()> {
            std::thread::sleep(*self.delay.lock());
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorCode::OperateDiskFailed,
                    "fake disk failure",
                ));
            }
            Ok(())
        }

        fn has(&self, key: &str) -> bool {
            self.values.lock().contains_key(key)
        }
    }

    impl L2Store for FakeL2 {
        fn describe(&self) -> String {
            "fake".into()
        }
        fn put(&self, key: &str, value: &[u8], expires_at: Option<SystemTime>) -> Result<()> {
            self.check()?;
            self.puts.fetch_add(1, Ordering::SeqCst);
            self.values.lock().insert(
                key.to_string(),
                L2Record {
                    value: Bytes::copy_from_slice(value),
                    expires_at,
                },
            );
            Ok(())
        }
        fn get(&self, key: &str) -> Result<Option<L2Record>> {
            self.check()?;
            Ok(self
                .values
                .lock()
                .get(key)
                .filter(|r| r.expires_at.is_none_or(|t| t > SystemTime::now()))
                .cloned())
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.check()?;
            self.values.lock().remove(key);
            Ok(())
        }
        fn exists(&self, key: &str) -> Result<bool> {
            Ok(self.get(key)?.is_some())
        }
    }

    fn with_fake() -> (KvStore, Arc<FakeL2>) {
        let fake = Arc::new(FakeL2::default());
        (KvStore::with_l2(fake.clone()), fake)
    }

    #[test]
    fn set_then_get_returns_the_value() {
        let store = KvStore::new();
        store.set("a", bytes("1"), &SetParam::default()).unwrap();
        store.set("b", bytes("2"), &SetParam::default()).unwrap();
        assert_eq!(
            store.get(&["a", "b", "a"], SHORT).unwrap(),
            vec![bytes("1"), bytes("2"), bytes("1")]
        );
        store.set("a", bytes("3"), &SetParam::default()).unwrap();
        assert_eq!(store.get(&["a"], SHORT).unwrap(), vec![bytes("3")]);
    }

    #[test]
    fn nx_on_an_existing_key_is_4206_and_keeps_the_value() {
        let store = KvStore::new();
        store.set("k", bytes("first"), &nx()).unwrap();
        let error = store.set("k", bytes("second"), &nx()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::KeyAlreadyExist);
        assert!(error.message().contains("\"k\""), "{}", error.message());
        assert_eq!(store.get(&["k"], SHORT).unwrap(), vec![bytes("first")]);
        store.del(&["k"]).unwrap();
        store.set("k", bytes("third"), &nx()).unwrap();
    }

    #[test]
    fn nx_sees_keys_that_only_the_second_level_store_holds() {
        let (store, fake) = with_fake();
        fake.put("old", b"v", None).unwrap();
        let error = store.set("old", bytes("new"), &nx()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::KeyAlreadyExist);
    }

    #[test]
    fn concurrent_nx_writes_let_exactly_one_win() {
        let store = KvStore::new();
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = store.clone();
                    scope.spawn(move || store.set("race", bytes(&i.to_string()), &nx()).is_ok())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn keys_are_checked() {
        let store = KvStore::new();
        let empty = store.set("", bytes("v"), &SetParam::default()).unwrap_err();
        assert_eq!(empty.code(), ErrorCode::ParamInvalid);
        let long = "x".repeat(MAX_KEY_SIZE + 1);
        let error = store
            .set(&long, bytes("v"), &SetParam::default())
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid);
        assert!(error.message().contains("1025"), "{}", error.message());
        store
            .set(&"x".repeat(MAX_KEY_SIZE), bytes("v"), &SetParam::default())
            .unwrap();
        for result in [
            store.get(&[""], SHORT).map(|_| ()),
            store.get::<&str>(&[], SHORT).map(|_| ()),
            store.del(&[long.as_str()]),
            store.exist(&[""]).map(|_| ()),
        ] {
            assert_eq!(result.unwrap_err().code(), ErrorCode::ParamInvalid);
        }
    }

    #[test]
    fn values_over_the_message_size_are_1001_with_both_sizes() {
        let error = validate_set("big", MAX_VALUE_SIZE + 1, &SetParam::default()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid);
        assert!(error.message().contains(&(MAX_VALUE_SIZE + 1).to_string()));
        assert!(error.message().contains(&MAX_VALUE_SIZE.to_string()));
        validate_set("big", MAX_VALUE_SIZE, &SetParam::default()).unwrap();
        let store = KvStore::new();
        let error = store
            .set(
                "big",
                Bytes::from(vec![0u8; MAX_VALUE_SIZE + 1]),
                &SetParam::default(),
            )
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid);
        assert!(store.is_empty());
    }

    #[test]
    fn a_ttl_beyond_the_limit_is_1001() {
        let store = KvStore::new();
        let error = store
            .set("k", bytes("v"), &ttl(MAX_TTL_SECOND + 1))
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::ParamInvalid);
        store.set("k", bytes("v"), &ttl(MAX_TTL_SECOND)).unwrap();
        assert_eq!(store.get(&["k"], SHORT).unwrap(), vec![bytes("v")]);
    }

    #[test]
    fn get_times_out_with_4005_naming_only_the_missing_keys() {
        let store = KvStore::new();
        store.set("here", bytes("v"), &SetParam::default()).unwrap();
        let started = Instant::now();
        let error = store
            .get(&["here", "gone-1", "gone-2"], Duration::from_millis(200))
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(error.code(), ErrorCode::GetOperationFailed);
        assert!(
            error.message().contains("[gone-1, gone-2]"),
            "{}",
            error.message()
        );
        assert!(!error.message().contains("here,"), "{}", error.message());
        let error = store.get(&["gone-1"], Duration::ZERO).unwrap_err();
        assert_eq!(error.code(), ErrorCode::GetOperationFailed);
    }

    #[test]
    fn get_waits_for_keys_written_later() {
        let store = KvStore::new();
        let writer = store.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer
                .set("late-1", bytes("1"), &SetParam::default())
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            writer
                .set("late-2", bytes("2"), &SetParam::default())
                .unwrap();
        });
        let values = store
            .get(&["late-1", "late-2"], Duration::from_secs(10))
            .unwrap();
        assert_eq!(values, vec![bytes("1"), bytes("2")]);
        assert!(started.elapsed() < Duration::from_secs(5));
        thread.join().unwrap();
        // The waiter unregistered itself.
        assert!(store.handle.shared.map.lock().watchers.is_empty());
    }

    #[test]
    fn close_ends_waiting_reads_with_its_error() {
        let store = KvStore::new();
        let closer = store.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            closer.close(Error::new(ErrorCode::Finalized, "going away"));
        });
        let error = store.get(&["never"], Duration::MAX).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Finalized);
        thread.join().unwrap();
        let error = store.get(&["never"], Duration::MAX).unwrap_err();
        assert_eq!(error.code(), ErrorCode::Finalized);
        store.set("k", bytes("v"), &SetParam::default()).unwrap();
        assert_eq!(store.get(&["k"], Duration::MAX).unwrap(), vec![bytes("v")]);
    }

    #[test]
    fn get_waits_forever_with_duration_max() {
        let store = KvStore::new();
        let writer = store.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.set("k", bytes("v"), &SetParam::default()).unwrap();
        });
        assert_eq!(store.get(&["k"], Duration::MAX).unwrap(), vec![bytes("v")]);
        thread.join().unwrap();
    }

    #[test]
    fn keys_expire_after_their_ttl() {
        let clock = yr_common::ManualClock::new();
        let store = KvStore::with_clock(clock.clone());
        store.set("short", bytes("v"), &ttl(1)).unwrap();
        store
            .set("forever", bytes("v"), &SetParam::default())
            .unwrap();
        assert_eq!(
            store.exist(&["short", "forever"]).unwrap(),
            vec![true, true]
        );
        // Alive up to its last instant…
        clock.advance(Duration::from_millis(999));
        assert_eq!(
            store.exist(&["short", "forever"]).unwrap(),
            vec![true, true]
        );
        clock.advance(Duration::from_millis(1));
        // …gone at its TTL, lazily on read…
        assert_eq!(
            store.exist(&["short", "forever"]).unwrap(),
            vec![false, true]
        );
        assert_eq!(
            store.get(&["short"], SHORT).unwrap_err().code(),
            ErrorCode::GetOperationFailed
        );
        // …and an expired key may be written again with NX.
        store.set("short", bytes("again"), &nx()).unwrap();
    }

    #[test]
    fn the_sweeper_removes_expired_keys_nobody_reads() {
        let clock = yr_common::ManualClock::new();
        let store = KvStore::with_clock(clock.clone());
        for i in 0..10 {
            store.set(&format!("k{i}"), bytes("v"), &ttl(1)).unwrap();
        }
        store.set("kept", bytes("v"), &ttl(2)).unwrap();
        store.handle.shared.sweep();
        assert_eq!(store.len(), 11, "nothing has expired yet");
        clock.advance(Duration::from_secs(1));
        store.handle.shared.sweep();
        assert_eq!(store.len(), 1, "the sweep removed the expired keys unread");
        clock.advance(Duration::from_secs(1));
        store.handle.shared.sweep();
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn the_real_sweeper_thread_runs() {
        let store = KvStore::new();
        store.set("k", bytes("v"), &ttl(1)).unwrap();
        // A bound on a hang, not a guess: the sweeper runs every SWEEP_PERIOD.
        let deadline = Instant::now() + SWEEP_PERIOD + Duration::from_secs(5);
        while !store.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn the_quota_evicts_expired_keys_first() {
        let clock = yr_common::ManualClock::new();
        let store = KvStore::with_clock(clock.clone());
        let size = entry_size("a", 100);
        store.set_quota(Some(2 * size));
        store
            .set("a", Bytes::from(vec![0u8; 100]), &ttl(1))
            .unwrap();
        store
            .set("b", Bytes::from(vec![0u8; 100]), &SetParam::default())
            .unwrap();
        let refused = store
            .set("c", Bytes::from(vec![0u8; 100]), &SetParam::default())
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::SharedMemoryLimited);
        clock.advance(Duration::from_secs(1));
        store
            .set("c", Bytes::from(vec![0u8; 100]), &SetParam::default())
            .unwrap();
        assert_eq!(
            store.exist(&["a", "b", "c"]).unwrap(),
            vec![false, true, true]
        );
    }

    #[test]
    fn ranged_reads_and_bad_ranges() {
        let store = KvStore::new();
        store
            .set("r", bytes("0123456789"), &SetParam::default())
            .unwrap();
        assert_eq!(
            store.get_with_param("r", 2, 3, SHORT).unwrap(),
            bytes("234")
        );
        assert_eq!(
            store.get_with_param("r", 7, 0, SHORT).unwrap(),
            bytes("789")
        );
        assert_eq!(store.get_with_param("r", 10, 0, SHORT).unwrap(), bytes(""));
        assert_eq!(
            store.get_with_param("r", 0, 10, SHORT).unwrap(),
            bytes("0123456789")
        );
        for (offset, size) in [(11, 0), (5, 6), (u64::MAX, 2), (1, u64::MAX)] {
            let error = store.get_with_param("r", offset, size, SHORT).unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid, "{offset} {size}");
            assert!(error.message().contains("10 bytes"), "{}", error.message());
        }
        assert_eq!(
            store
                .get_with_param("missing", 0, 1, SHORT)
                .unwrap_err()
                .code(),
            ErrorCode::GetOperationFailed
        );
    }

    #[test]
    fn del_and_exist() {
        let store = KvStore::new();
        store.set("a", bytes("1"), &SetParam::default()).unwrap();
        store.set("b", bytes("2"), &SetParam::default()).unwrap();
        assert_eq!(
            store.exist(&["a", "b", "c"]).unwrap(),
            vec![true, true, false]
        );
        store.del(&["a", "c"]).unwrap();
        assert_eq!(
            store.exist(&["a", "b", "c"]).unwrap(),
            vec![false, true, false]
        );
    }

    #[test]
    fn without_a_second_level_store_every_mode_keeps_values_in_memory() {
        let store = KvStore::new();
        for (i, mode) in [
            WriteMode::NoneL2Cache,
            WriteMode::WriteThroughL2Cache,
            WriteMode::WriteBackL2Cache,
            WriteMode::NoneL2CacheEvict,
        ]
        .into_iter()
        .enumerate()
        {
            let key = format!("m{i}");
            store.set(&key, bytes("v"), &param(mode)).unwrap();
            assert_eq!(store.get(&[key], SHORT).unwrap(), vec![bytes("v")]);
        }
        assert!(store.flush(SHORT));
    }

    #[test]
    fn write_through_is_in_the_second_level_store_before_set_returns() {
        let (store, fake) = with_fake();
        store
            .set("wt", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
            .unwrap();
        assert_eq!(fake.values.lock()["wt"].value, bytes("v"));
        store
            .set("mem", bytes("v"), &param(WriteMode::NoneL2Cache))
            .unwrap();
        store
            .set("evict", bytes("v"), &param(WriteMode::NoneL2CacheEvict))
            .unwrap();
        assert!(store.flush(Duration::from_secs(5)));
        assert!(!fake.has("mem") && !fake.has("evict"));
    }

    #[test]
    fn a_failed_write_through_fails_the_set_and_leaves_memory_alone() {
        let (store, fake) = with_fake();
        store
            .set("k", bytes("old"), &param(WriteMode::WriteThroughL2Cache))
            .unwrap();
        fake.failing.store(true, Ordering::SeqCst);
        let error = store
            .set("k", bytes("new"), &param(WriteMode::WriteThroughL2Cache))
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert_eq!(store.try_get(&["k"]).unwrap(), vec![Some(bytes("old"))]);
    }

    #[test]
    fn write_back_lands_later_without_blocking_the_writer() {
        let (store, fake) = with_fake();
        *fake.delay.lock() = Duration::from_millis(300);
        let started = Instant::now();
        store
            .set("wb", bytes("v"), &param(WriteMode::WriteBackL2Cache))
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "set waited for the store"
        );
        assert_eq!(store.try_get(&["wb"]).unwrap(), vec![Some(bytes("v"))]);
        assert!(store.flush(Duration::from_secs(5)));
        assert_eq!(fake.values.lock()["wb"].value, bytes("v"));
    }

    #[test]
    fn a_write_back_queued_before_a_delete_does_not_resurrect_the_key() {
        let (store, fake) = with_fake();
        *fake.delay.lock() = Duration::from_millis(100);
        store
            .set("blocker", bytes("v"), &param(WriteMode::WriteBackL2Cache))
            .unwrap();
        store
            .set("gone", bytes("v"), &param(WriteMode::WriteBackL2Cache))
            .unwrap();
        store.del(&["gone"]).unwrap();
        assert!(store.flush(Duration::from_secs(5)));
        assert!(!fake.has("gone"));
        assert!(fake.has("blocker"));
    }

    #[test]
    fn only_the_latest_of_several_write_backs_is_written() {
        let (store, fake) = with_fake();
        *fake.delay.lock() = Duration::from_millis(50);
        for i in 0..5 {
            store
                .set(
                    "k",
                    bytes(&i.to_string()),
                    &param(WriteMode::WriteBackL2Cache),
                )
                .unwrap();
        }
        assert!(store.flush(Duration::from_secs(5)));
        assert_eq!(fake.values.lock()["k"].value, bytes("4"));
        assert!(
            fake.puts.load(Ordering::SeqCst) <= 2,
            "stale write-backs are skipped"
        );
    }

    #[test]
    fn a_memory_only_write_over_a_stored_key_removes_the_old_copy() {
        let (store, fake) = with_fake();
        store
            .set(
                "k",
                bytes("durable"),
                &param(WriteMode::WriteThroughL2Cache),
            )
            .unwrap();
        store
            .set("k", bytes("volatile"), &param(WriteMode::NoneL2Cache))
            .unwrap();
        assert!(store.flush(Duration::from_secs(5)));
        assert!(!fake.has("k"));
        assert_eq!(
            store.try_get(&["k"]).unwrap(),
            vec![Some(bytes("volatile"))]
        );
    }

    #[test]
    fn a_miss_in_memory_reads_through_and_keeps_the_ttl() {
        let (store, fake) = with_fake();
        fake.put("old", b"v", None).unwrap();
        fake.put(
            "brief",
            b"v",
            Some(SystemTime::now() + Duration::from_millis(600)),
        )
        .unwrap();
        assert_eq!(
            store.get(&["old", "brief"], SHORT).unwrap(),
            vec![bytes("v"), bytes("v")]
        );
        assert_eq!(store.len(), 2, "read-through values are cached in memory");
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(store.exist(&["old", "brief"]).unwrap(), vec![true, false]);
    }

    #[test]
    fn del_removes_the_second_level_copy() {
        let (store, fake) = with_fake();
        store
            .set("k", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
            .unwrap();
        fake.put("only-l2", b"v", None).unwrap();
        store.del(&["k", "only-l2"]).unwrap();
        assert!(!fake.has("k") && !fake.has("only-l2"));
        assert_eq!(store.exist(&["k", "only-l2"]).unwrap(), vec![false, false]);
    }

    #[test]
    fn a_get_waiting_on_a_key_is_woken_by_a_write_through() {
        let (store, _fake) = with_fake();
        let writer = store.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer
                .set("late", bytes("v"), &param(WriteMode::WriteThroughL2Cache))
                .unwrap();
        });
        assert_eq!(
            store.get(&["late"], Duration::from_secs(10)).unwrap(),
            vec![bytes("v")]
        );
        thread.join().unwrap();
    }

    #[test]
    fn the_sweeper_removes_expired_second_level_copies() {
        let (store, fake) = with_fake();
        store
            .set(
                "k",
                bytes("v"),
                &SetParam {
                    write_mode: WriteMode::WriteThroughL2Cache,
                    ttl_second: 1,
                    ..SetParam::default()
                },
            )
            .unwrap();
        // The fake keeps expired records until deleted; the sweeper deletes them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.has("k") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!fake.has("k"));
    }

    // ----- the per-job quota -----

    /// The bytes each job holds match its entries exactly, and the total matches their sum.
    fn assert_accounting_exact(store: &KvStore) {
        let map = store.handle.shared.map.lock();
        let mut by_job: HashMap<&str, u64> = HashMap::new();
        for (key, entry) in &map.entries {
            assert_eq!(entry.size, entry_size(key, entry.value.len()));
            *by_job.entry(&entry.job).or_default() += entry.size;
        }
        let held: HashMap<&str, u64> = map.held.iter().map(|(j, b)| (&**j, *b)).collect();
        assert_eq!(held, by_job, "held bytes per job");
        assert_eq!(map.total, by_job.values().sum::<u64>(), "total bytes");
    }

    fn value(len: usize) -> Bytes {
        Bytes::from(vec![b'v'; len])
    }

    fn write(store: &KvStore, job: &str, key: &str, len: usize) -> Result<()> {
        store.set_for_job(job, key, value(len), &SetParam::default())
    }

    #[test]
    fn kv_bytes_follow_sets_overwrites_and_deletes_back_to_zero() {
        let store = KvStore::new();
        store.set_quota(Some(1 << 20));
        write(&store, "job-a", "k", 10).unwrap();
        assert_eq!(store.job_bytes("job-a"), 11);
        write(&store, "job-a", "k", 100).unwrap(); // bigger
        assert_eq!(store.job_bytes("job-a"), 101);
        write(&store, "job-a", "k", 4).unwrap(); // smaller
        assert_eq!(store.job_bytes("job-a"), 5);
        write(&store, "job-a", "kk", 8).unwrap();
        write(&store, "job-b", "other", 5).unwrap();
        store
            .set("anonymous", value(1), &SetParam::default())
            .unwrap();
        assert_eq!(store.job_bytes("job-a"), 5 + 10);
        assert_eq!(store.job_bytes("job-b"), 10);
        assert_eq!(store.job_bytes(UNKNOWN_JOB), 10);
        assert_eq!(store.memory_bytes(), 35);
        assert_accounting_exact(&store);
        // Another job overwriting a key takes it over: the bytes move.
        write(&store, "job-b", "k", 4).unwrap();
        assert_eq!(store.job_bytes("job-a"), 10);
        assert_eq!(store.job_bytes("job-b"), 15);
        assert_accounting_exact(&store);
        store
            .del(&["k", "kk", "other", "anonymous", "missing"])
            .unwrap();
        assert_eq!(store.memory_bytes(), 0);
        assert!(store.handle.shared.map.lock().held.is_empty());
    }

    #[test]
    fn a_write_over_the_quota_is_4202_naming_job_bytes_and_quota_and_changes_nothing() {
        let store = KvStore::new();
        store.set_quota(Some(100));
        write(&store, "job-a", "k", 49).unwrap(); // 50 bytes
        let error = write(&store, "job-a", "k2", 59).unwrap_err(); // 61 more
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        for needle in ["job-a", "holds 50 bytes", "61 bytes", "\"k2\"", "100 bytes"] {
            assert!(error.message().contains(needle), "{needle}: {error}");
        }
        assert!(error.message().contains("kv_del"), "{error}");
        assert!(error.message().contains("--kv-quota-mb"), "{error}");
        assert_eq!(store.exist(&["k2"]).unwrap(), vec![false]);
        // A refused overwrite keeps the old value.
        let error = write(&store, "job-a", "k", 120).unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert_eq!(store.try_get(&["k"]).unwrap(), vec![Some(value(49))]);
        assert_eq!(store.job_bytes("job-a"), 50);
        // An overwrite counts the difference: exactly the quota fits.
        write(&store, "job-a", "k", 99).unwrap();
        assert_eq!(store.job_bytes("job-a"), 100);
        // Shrinking always fits, even over a quota lowered since.
        store.set_quota(Some(10));
        write(&store, "job-a", "k", 50).unwrap();
        assert_eq!(store.job_bytes("job-a"), 51);
        assert_accounting_exact(&store);
    }

    #[test]
    fn each_job_has_a_quota_of_its_own_and_no_job_shares_one() {
        let store = KvStore::new();
        store.set_quota(Some(100));
        write(&store, "job-a", "a", 99).unwrap();
        assert_eq!(
            write(&store, "job-a", "a2", 1).unwrap_err().code(),
            ErrorCode::SharedMemoryLimited
        );
        write(&store, "job-b", "b", 99).unwrap();
        store.set("u1", value(60), &SetParam::default()).unwrap();
        let error = store
            .set("u2", value(60), &SetParam::default())
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert!(error.message().contains("unknown job"), "{error}");
        assert_eq!(store.memory_bytes(), 100 + 100 + 62);
        assert_accounting_exact(&store);
    }

    #[test]
    fn expiry_gives_the_bytes_back() {
        let store = KvStore::new();
        store.set_quota(Some(100));
        for i in 0..4 {
            store
                .set_for_job("job-a", &format!("t{i}"), value(16), &ttl(1))
                .unwrap();
        }
        write(&store, "job-a", "forever", 8).unwrap();
        assert_eq!(store.job_bytes("job-a"), 4 * 18 + 15);
        std::thread::sleep(Duration::from_millis(1100));
        // Expired keys not swept yet do not stand in the way of a write.
        write(&store, "job-a", "new", 80).unwrap();
        assert_accounting_exact(&store);
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.len() > 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(store.job_bytes("job-a"), 15 + 83);
        store.del(&["forever", "new"]).unwrap();
        assert_eq!(store.memory_bytes(), 0);
        // The sweeper gives back what nobody reads.
        store.set_for_job("job-a", "t", value(20), &ttl(1)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.memory_bytes() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(store.memory_bytes(), 0);
        assert!(store.handle.shared.map.lock().held.is_empty());
    }

    #[test]
    fn a_refused_write_through_does_not_reach_the_second_level_store() {
        let (store, fake) = with_fake();
        store.set_quota(Some(100));
        let through = param(WriteMode::WriteThroughL2Cache);
        store
            .set_for_job("job-a", "mem", value(90), &SetParam::default())
            .unwrap();
        let error = store
            .set_for_job("job-a", "wt", value(20), &through)
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert!(!fake.has("wt"));
        // A write-through that fails gives its reserved room back.
        store.del(&["mem"]).unwrap();
        fake.failing.store(true, Ordering::SeqCst);
        let error = store
            .set_for_job("job-a", "wt", value(20), &through)
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert_eq!(store.memory_bytes(), 0);
        assert_accounting_exact(&store);
    }

    #[test]
    fn values_the_second_level_store_holds_are_evicted_to_make_room() {
        let (store, fake) = with_fake();
        store.set_quota(Some(50));
        let through = param(WriteMode::WriteThroughL2Cache);
        store
            .set_for_job("job-a", "old", value(17), &through)
            .unwrap(); // 20
        store
            .set_for_job("job-a", "mid", value(17), &through)
            .unwrap(); // 20
        store
            .set_for_job("job-a", "new", value(17), &through)
            .unwrap(); // evicts "old"
        assert_eq!(store.job_bytes("job-a"), 40);
        assert!(fake.has("old"));
        assert_accounting_exact(&store);
        // The evicted value is read through again, counted under no job.
        assert_eq!(store.get(&["old"], SHORT).unwrap(), vec![value(17)]);
        assert_eq!(store.job_bytes(UNKNOWN_JOB), 20);
        // Memory-only values are never evicted.
        let error = store
            .set_for_job("job-a", "mem", value(60), &SetParam::default())
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        // A write that would not fit even after evicting changes nothing: nothing is evicted.
        assert_eq!(store.job_bytes("job-a"), 40);
        assert_eq!(
            store.try_get(&["mid", "new"]).unwrap(),
            vec![Some(value(17)), Some(value(17))]
        );
        store.del(&["old", "mid", "new"]).unwrap();
        assert_eq!(store.memory_bytes(), 0);
    }

    #[test]
    fn a_read_through_that_does_not_fit_is_served_without_being_kept() {
        let (store, fake) = with_fake();
        store.set_quota(Some(50));
        fake.put("big", &[b'v'; 60], None).unwrap();
        assert_eq!(store.get(&["big"], SHORT).unwrap(), vec![value(60)]);
        assert_eq!(store.len(), 0);
        assert_eq!(store.memory_bytes(), 0);
    }

    #[test]
    fn concurrent_writers_of_one_job_never_pass_its_quota() {
        let store = KvStore::new();
        let quota = 10_000;
        store.set_quota(Some(quota));
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..200 {
                        let key = format!("t{thread}-{}", i % 50);
                        let _ = write(&store, "job-a", &key, 50 + (i * 7) % 100);
                    }
                });
            }
        });
        assert!(store.job_bytes("job-a") <= quota);
        assert_accounting_exact(&store);
        let keys: Vec<String> = store
            .handle
            .shared
            .map
            .lock()
            .entries
            .keys()
            .cloned()
            .collect();
        store.del(&keys).unwrap();
        assert_eq!(store.memory_bytes(), 0);
    }
}
