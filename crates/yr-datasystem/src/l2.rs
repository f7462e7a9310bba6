//! The backends of the KV store's second-level store (openYuanrong's "L2 cache", the
//! [`L2Store`] trait of `yr_datasystem_core::l2`): where write-through and write-back values
//! are kept so that they outlive the node's memory. Two backends:
//!
//! - [`DirectoryStore`] (the default, `<data dir>/kv-l2/`): one file per key, written
//!   atomically (temporary file, fsync, rename, fsync of the directory). Disk failures are 4203
//!   (`ERR_OPERATE_DISK_FAILED`), a full disk 4204.
//! - [`RedisStore`] (`--l2-redis host:port`): one Redis string per key under
//!   [`REDIS_KEY_PREFIX`], with its expiry as a Redis TTL. Failures are 3007.
//!
//! A value's expiry is stored with it as wall-clock time, so a key written with a TTL still
//! expires on time after the node restarts.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use yr_common::{Error, Result};
use yr_datasystem_core::l2::{L2Record, L2Store};

use crate::error::DataSystemError;
use crate::redis::RedisClient;

/// The prefix of the Redis keys that hold KV values: key `k` is stored as `yr:kv:k`.
pub const REDIS_KEY_PREFIX: &str = "yr:kv:";

// ----- directory ---------------------------------------------------------------------------

/// The first bytes of every value file.
const MAGIC: &[u8; 4] = b"YRKV";
/// The file format's version.
const FORMAT: u8 = 1;
/// Magic, format, expiry (u64 ms since the epoch, 0 = none), key length (u32).
const HEADER: usize = 4 + 1 + 8 + 4;
/// Encoded keys longer than this get a hashed file name (file names are limited to 255 bytes).
const MAX_PLAIN_NAME: usize = 200;
/// Temporary files start with this; leftovers of a crash are removed when the store opens.
const TMP_PREFIX: &str = ".tmp-";

/// One file per key in a directory.
#[derive(Debug)]
pub struct DirectoryStore {
    dir: PathBuf,
    next_tmp: AtomicU64,
}

/// A failed disk operation: 4204 if the disk is full (with `when_full`, what to do about it),
/// otherwise 4203 (with `otherwise`); see [`DataSystemError::disk`].
pub(crate) fn disk_error(
    what: &str,
    path: &Path,
    error: std::io::Error,
    when_full: &'static str,
    otherwise: &'static str,
) -> Error {
    DataSystemError::disk(what, path.to_path_buf(), error, when_full, otherwise).into()
}

fn l2_disk_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    disk_error(
        what,
        path,
        error,
        "free space on it or move the node's --data-dir",
        "check that the KV second-level directory is a writable directory, or choose another \
         --data-dir",
    )
}

/// Two FNV-1a hashes of `data` with different offsets: a stable 128-bit file name for keys too
/// long to spell out. The file's header holds the whole key, so a read never returns another
/// key's value.
fn hash128(data: &[u8]) -> (u64, u64) {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for byte in data {
        a = (a ^ u64::from(*byte)).wrapping_mul(PRIME);
        b = (b ^ u64::from(byte.rotate_left(3))).wrapping_mul(PRIME);
    }
    (a, b)
}

/// The file name of `key`: `k-` and the key with every byte outside `[A-Za-z0-9_-]` written as
/// `%XX`, or `h-` and a hash of the key when that is too long.
pub fn file_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 2);
    name.push_str("k-");
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
        if name.len() > MAX_PLAIN_NAME {
            let (a, b) = hash128(key.as_bytes());
            return format!("h-{a:016x}{b:016x}");
        }
    }
    name
}

fn to_unix_ms(time: Option<SystemTime>) -> u64 {
    time.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(1)
    })
    .unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    (ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

fn expired(expires_at: Option<SystemTime>) -> bool {
    expires_at.is_some_and(|t| t <= SystemTime::now())
}

/// A value file's header, parsed.
struct Header {
    expires_at: Option<SystemTime>,
    key: Vec<u8>,
}

fn read_header(file: &mut impl Read) -> std::io::Result<Option<Header>> {
    let mut fixed = [0u8; HEADER];
    if let Err(e) = file.read_exact(&mut fixed) {
        return if e.kind() == ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if &fixed[..4] != MAGIC || fixed[4] != FORMAT {
        return Ok(None);
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&fixed[5..13]);
    let mut length = [0u8; 4];
    length.copy_from_slice(&fixed[13..17]);
    let length = u32::from_le_bytes(length) as usize;
    let mut key = vec![0u8; length];
    if let Err(e) = file.read_exact(&mut key) {
        return if e.kind() == ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(Header {
        expires_at: from_unix_ms(u64::from_le_bytes(ms)),
        key,
    }))
}

impl DirectoryStore {
    /// Open (creating it if needed) the directory `dir`. Fails with 4203 if it cannot be
    /// created or written to. Removes temporary files a crash left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DirectoryStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| l2_disk_error("create", &dir, e))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| l2_disk_error("read", &dir, e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let store = DirectoryStore {
            dir,
            next_tmp: AtomicU64::new(0),
        };
        // Prove the directory is writable now rather than at the first write-through.
        let probe = store.tmp_path();
        File::create(&probe).map_err(|e| l2_disk_error("write to", &store.dir, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| l2_disk_error("sync", &self.dir, e))
    }

    /// The header of `key`'s file if it is `key`'s and has not expired; removes an expired one.
    fn live_header(&self, key: &str, file: &mut File, path: &Path) -> Result<Option<Header>> {
        let header = read_header(file).map_err(|e| l2_disk_error("read", path, e))?;
        match header {
            Some(header) if header.key == key.as_bytes() => {
                if expired(header.expires_at) {
                    let _ = std::fs::remove_file(path);
                    return Ok(None);
                }
                Ok(Some(header))
            }
            // Another key with the same hashed name, or not a value file.
            _ => Ok(None),
        }
    }
}

impl L2Store for DirectoryStore {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn put(&self, key: &str, value: &[u8], expires_at: Option<SystemTime>) -> Result<()> {
        let path = self.path(key);
        let tmp = self.tmp_path();
        let mut header = Vec::with_capacity(HEADER + key.len());
        header.extend_from_slice(MAGIC);
        header.push(FORMAT);
        header.extend_from_slice(&to_unix_ms(expires_at).to_le_bytes());
        header.extend_from_slice(&(key.len() as u32).to_le_bytes());
        header.extend_from_slice(key.as_bytes());
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(&header)?;
                file.write_all(value)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(l2_disk_error("write", &path, e));
        }
        self.sync_dir()
    }

    fn get(&self, key: &str) -> Result<Option<L2Record>> {
        let path = self.path(key);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(l2_disk_error("open", &path, e)),
        };
        let Some(header) = self.live_header(key, &mut file, &path)? else {
            return Ok(None);
        };
        let mut value = Vec::new();
        file.read_to_end(&mut value)
            .map_err(|e| l2_disk_error("read", &path, e))?;
        Ok(Some(L2Record {
            value: Bytes::from(value),
            expires_at: header.expires_at,
        }))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        if let Ok(mut file) = File::open(&path) {
            // A hashed name may belong to another key: leave that file alone.
            if let Ok(Some(header)) = read_header(&mut file) {
                if header.key != key.as_bytes() {
                    return Ok(());
                }
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(l2_disk_error("remove", &path, e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(l2_disk_error("open", &path, e)),
        };
        Ok(self.live_header(key, &mut file, &path)?.is_some())
    }
}

// ----- Redis ---------------------------------------------------------------------------------

/// One Redis string per key.
#[derive(Debug)]
pub struct RedisStore {
    client: RedisClient,
}

impl RedisStore {
    /// A store on the Redis server at `address` (`host:port`). Fails with 3007 if the server
    /// does not answer a PING.
    pub fn connect(address: &str) -> Result<RedisStore> {
        let client = RedisClient::new(address);
        client.ping()?;
        Ok(RedisStore { client })
    }

    /// The Redis key that holds `key`.
    pub fn redis_key(key: &str) -> Vec<u8> {
        let mut redis_key = Vec::with_capacity(REDIS_KEY_PREFIX.len() + key.len());
        redis_key.extend_from_slice(REDIS_KEY_PREFIX.as_bytes());
        redis_key.extend_from_slice(key.as_bytes());
        redis_key
    }
}

impl L2Store for RedisStore {
    fn describe(&self) -> String {
        format!("redis {}", self.client.address())
    }

    fn shared(&self) -> bool {
        true
    }

    fn put(&self, key: &str, value: &[u8], expires_at: Option<SystemTime>) -> Result<()> {
        let ttl_ms = expires_at.map(|t| {
            t.duration_since(SystemTime::now())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0)
        });
        self.client.set(&Self::redis_key(key), value, ttl_ms)
    }

    fn get(&self, key: &str) -> Result<Option<L2Record>> {
        Ok(self
            .client
            .get_with_ttl(&Self::redis_key(key))?
            .map(|(value, ttl_ms)| L2Record {
                value,
                expires_at: ttl_ms.map(|ms| SystemTime::now() + Duration::from_millis(ms)),
            }))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.client.del(&Self::redis_key(key)).map(|_| ())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.client.exists(&Self::redis_key(key))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use yr_datasystem_core::kv::{KvStore, SetParam, WriteMode};

    use super::*;
    use yr_common::ErrorCode;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Scratch {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "yr-l2-{label}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_name("user_1-a"), "k-user_1-a");
        assert_eq!(file_name("a/b"), "k-a%2Fb");
        assert_eq!(file_name(".."), "k-%2E%2E");
        assert_eq!(file_name("a b"), "k-a%20b");
        assert_ne!(file_name("a/b"), file_name("a%2Fb"));
        assert_eq!(file_name("键"), "k-%E9%94%AE");
        let long = "x".repeat(1024);
        let hashed = file_name(&long);
        assert!(hashed.starts_with("h-") && hashed.len() == 34, "{hashed}");
        assert_ne!(hashed, file_name(&"x".repeat(1023)));
        assert_eq!(hashed, file_name(&long), "stable across calls");
        for key in ["a/b", "..", &long, "\u{0}\n"] {
            let name = file_name(key);
            assert!(name.len() <= 255 && !name.contains('/') && !name.starts_with('.'));
        }
    }

    #[test]
    fn directory_round_trips_values_and_removes_them() {
        let scratch = Scratch::new("round");
        let store = DirectoryStore::open(&scratch.0).unwrap();
        let long = "k".repeat(1024);
        for key in ["plain", "with/slash", "..", long.as_str()] {
            assert_eq!(store.get(key).unwrap(), None);
            assert!(!store.exists(key).unwrap());
            store.put(key, key.as_bytes(), None).unwrap();
            let record = store.get(key).unwrap().unwrap();
            assert_eq!(record.value, key.as_bytes());
            assert_eq!(record.expires_at, None);
            assert!(store.exists(key).unwrap());
            store.put(key, b"second", None).unwrap();
            assert_eq!(store.get(key).unwrap().unwrap().value, &b"second"[..]);
            store.delete(key).unwrap();
            assert_eq!(store.get(key).unwrap(), None);
            store.delete(key).unwrap();
        }
        // Nothing but value files is left: no temporary files.
        let names: Vec<String> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn a_reopened_directory_serves_what_was_written() {
        let scratch = Scratch::new("reopen");
        DirectoryStore::open(&scratch.0)
            .unwrap()
            .put("kept", b"value", None)
            .unwrap();
        std::fs::write(scratch.0.join(".tmp-1-1"), b"half a write").unwrap();
        let store = DirectoryStore::open(&scratch.0).unwrap();
        assert_eq!(store.get("kept").unwrap().unwrap().value, &b"value"[..]);
        assert!(
            !scratch.0.join(".tmp-1-1").exists(),
            "leftover temporary files are removed"
        );
    }

    #[test]
    fn expired_values_are_gone_and_their_files_removed() {
        let scratch = Scratch::new("expiry");
        let store = DirectoryStore::open(&scratch.0).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        store.put("later", b"v", Some(later)).unwrap();
        let record = store.get("later").unwrap().unwrap();
        let kept = record.expires_at.unwrap();
        assert!(
            kept.duration_since(later).unwrap_or_else(|e| e.duration()) < Duration::from_millis(2)
        );
        store
            .put(
                "past",
                b"v",
                Some(SystemTime::now() - Duration::from_secs(1)),
            )
            .unwrap();
        assert!(!store.exists("past").unwrap());
        assert_eq!(store.get("past").unwrap(), None);
        assert!(!scratch.0.join(file_name("past")).exists());
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_4203() {
        let scratch = Scratch::new("blocked");
        std::fs::write(&scratch.0, b"a file, not a directory").unwrap();
        let error = DirectoryStore::open(scratch.0.join("kv-l2")).unwrap_err();
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert!(error.message().contains("kv-l2"), "{}", error.message());
    }

    #[test]
    fn a_write_into_a_vanished_directory_is_4203() {
        let scratch = Scratch::new("vanished");
        let store = DirectoryStore::open(&scratch.0).unwrap();
        std::fs::remove_dir_all(&scratch.0).unwrap();
        std::fs::write(&scratch.0, b"now a file").unwrap();
        let error = store.put("k", b"v", None).unwrap_err();
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert!(
            error.message().contains(&scratch.0.display().to_string()),
            "{}",
            error.message()
        );
    }

    #[test]
    fn a_file_of_another_format_is_not_a_value() {
        let scratch = Scratch::new("foreign");
        let store = DirectoryStore::open(&scratch.0).unwrap();
        std::fs::write(scratch.0.join(file_name("k")), b"garbage").unwrap();
        assert_eq!(store.get("k").unwrap(), None);
        assert!(!store.exists("k").unwrap());
    }

    // ----- the KV store over a directory -----

    fn param(mode: WriteMode) -> SetParam {
        SetParam {
            write_mode: mode,
            ..SetParam::default()
        }
    }

    fn bytes(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn a_directory_store_serves_write_through_values_to_a_new_store() {
        let dir = std::env::temp_dir().join(format!("yr-kv-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = KvStore::with_l2(Arc::new(DirectoryStore::open(&dir).unwrap()));
            store
                .set(
                    "wt",
                    bytes("through"),
                    &param(WriteMode::WriteThroughL2Cache),
                )
                .unwrap();
            store
                .set("wb", bytes("back"), &param(WriteMode::WriteBackL2Cache))
                .unwrap();
            store
                .set("mem", bytes("memory"), &param(WriteMode::NoneL2Cache))
                .unwrap();
            store
                .set(
                    "ttl",
                    bytes("expiring"),
                    &SetParam {
                        write_mode: WriteMode::WriteThroughL2Cache,
                        ttl_second: 1,
                        ..SetParam::default()
                    },
                )
                .unwrap();
            // Dropping the store drains its write-backs.
        }
        let store = KvStore::with_l2(Arc::new(DirectoryStore::open(&dir).unwrap()));
        assert_eq!(
            store.get(&["wt", "wb", "ttl"], SHORT).unwrap(),
            vec![bytes("through"), bytes("back"), bytes("expiring")]
        );
        assert_eq!(store.exist(&["mem"]).unwrap(), vec![false]);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(store.exist(&["ttl", "wt"]).unwrap(), vec![false, true]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
