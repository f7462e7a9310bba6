//! The KV API's values and their checks: the write parameters ([`SetParam`] and its enums),
//! the limits on keys, values and TTLs, and the errors a bad key, value, range or timed-out
//! read produce. Clients check a call with these before sending it anywhere; the store checks
//! it again before storing.

use std::time::Duration;

use bytes::Bytes;
use yr_common::{Error, ErrorCode, Result};

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
