//! KV: a key-value store kept by the data system, shared by every driver and runtime of a
//! node (in local mode, by the threads of this process). openYuanrong's `kv_*` API.
//!
//! - Keys are 1 to 1024 bytes; values are bytes, up to 64 MiB (1001 otherwise).
//! - In a cluster, each node keeps at most `yr start --kv-quota-mb` of KV memory (keys and
//!   values) per job; a write over it fails with 4202 and changes nothing. Local mode has no
//!   quota: the store lives in the driver's own memory.
//! - [`SetParam`] says how a value is written: only if absent ([`Existence::NX`], else 4206),
//!   with a time to live (`ttl_second`), and where it lives ([`WriteMode`]): memory only, or
//!   also in the node's second-level store (a directory, or Redis with `yr start --l2-redis`),
//!   synchronously ([`WriteMode::WriteThroughL2Cache`], which survives a restart of the whole
//!   cluster) or in the background ([`WriteMode::WriteBackL2Cache`]). Local mode has no
//!   second-level store and keeps every value in memory.
//! - Reads wait for keys that are not written yet, and fail with 4005 naming the missing keys
//!   after the timeout.

use std::time::Duration;

use yr_common::Result;
pub use yr_runtime::kv::{CacheType, Existence, SetParam, WriteMode};

/// Write `value` under `key`, as `param` says. 1001 for an empty key, a key over 1024 bytes or
/// a value over 64 MiB; 4206 if `param.existence` is [`Existence::NX`] and the key exists; 4202
/// if the write would take the job over the node's KV quota.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_write("greeting", b"hello", yr::SetParam::default()).unwrap();
/// let only_if_absent = yr::SetParam {
///     existence: yr::Existence::NX,
///     ..yr::SetParam::default()
/// };
/// let error = yr::kv_write("greeting", b"again", only_if_absent).unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::KeyAlreadyExist);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_write(key: &str, value: &[u8], param: SetParam) -> Result<()> {
    yr_runtime::current()?.kv().set(key, value, &param)
}

/// The same as [`kv_write`] (openYuanrong's other name for it).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let durable = yr::SetParam {
///     write_mode: yr::WriteMode::WriteThroughL2Cache,
///     ttl_second: 3600,
///     ..yr::SetParam::default()
/// };
/// yr::kv_set("session", b"state", durable).unwrap();
/// assert_eq!(yr::kv_get(&["session"], yr::FOREVER).unwrap(), vec![b"state".to_vec()]);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_set(key: &str, value: &[u8], param: SetParam) -> Result<()> {
    kv_write(key, value, param)
}

/// The values of `keys`, in order, waiting up to `timeout` for keys that are not written yet.
/// 4005 naming the keys still missing after `timeout`; 1001 for no keys or a bad key.
///
/// ```
/// use std::time::Duration;
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_write("a", b"1", yr::SetParam::default()).unwrap();
/// let writer = std::thread::spawn(|| {
///     std::thread::sleep(Duration::from_millis(50));
///     yr::kv_write("b", b"2", yr::SetParam::default()).unwrap();
/// });
/// let values = yr::kv_read(&["a", "b"], Duration::from_secs(10)).unwrap();
/// assert_eq!(values, vec![b"1".to_vec(), b"2".to_vec()]);
/// writer.join().unwrap();
///
/// let error = yr::kv_read(&["never"], Duration::from_millis(10)).unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::GetOperationFailed);
/// assert!(error.message().contains("never"));
/// # yr::finalize().unwrap();
/// ```
pub fn kv_read(keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
    Ok(yr_runtime::current()?
        .kv()
        .get(keys, timeout)?
        .into_iter()
        .map(|value| value.to_vec())
        .collect())
}

/// The same as [`kv_read`] (openYuanrong's other name for it).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_set("k", b"v", yr::SetParam::default()).unwrap();
/// assert_eq!(yr::kv_get(&["k"], yr::FOREVER).unwrap(), vec![b"v".to_vec()]);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_get(keys: &[&str], timeout: Duration) -> Result<Vec<Vec<u8>>> {
    kv_read(keys, timeout)
}

/// `size` bytes of the value of `key` from `offset` (`size` 0: to the end), waiting up to
/// `timeout` for the key. 1001 for a range outside the value; 4005 if the key is not written
/// in time.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_write("digits", b"0123456789", yr::SetParam::default()).unwrap();
/// assert_eq!(yr::kv_get_with_param("digits", 2, 3, yr::FOREVER).unwrap(), b"234");
/// assert_eq!(yr::kv_get_with_param("digits", 8, 0, yr::FOREVER).unwrap(), b"89");
/// let error = yr::kv_get_with_param("digits", 8, 5, yr::FOREVER).unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::ParamInvalid);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_get_with_param(
    key: &str,
    offset: usize,
    size: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    Ok(yr_runtime::current()?
        .kv()
        .get_range(key, offset as u64, size as u64, timeout)?
        .to_vec())
}

/// Delete `keys`, also from the second-level store. Deleting a missing key succeeds.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_write("temporary", b"v", yr::SetParam::default()).unwrap();
/// yr::kv_del(&["temporary", "never-written"]).unwrap();
/// assert_eq!(yr::kv_exist(&["temporary"]).unwrap(), vec![false]);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_del(keys: &[&str]) -> Result<()> {
    yr_runtime::current()?.kv().del(keys)
}

/// Whether each of `keys` has a value (expired keys do not).
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// yr::kv_write("present", b"v", yr::SetParam::default()).unwrap();
/// assert_eq!(yr::kv_exist(&["present", "absent"]).unwrap(), vec![true, false]);
/// # yr::finalize().unwrap();
/// ```
pub fn kv_exist(keys: &[&str]) -> Result<Vec<bool>> {
    yr_runtime::current()?.kv().exist(keys)
}
