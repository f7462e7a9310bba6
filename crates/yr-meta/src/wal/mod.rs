//! The embedded store's files: a write-ahead log of committed writes and snapshots that let
//! the log be cut short.
//!
//! A directory holds:
//! - `LOCK`: held with `flock` while a store has the directory open;
//! - `log-<lsn>.wal`: the log of every record after log sequence number `<lsn>` (20 digits). It
//!   starts with the 8-byte magic `YRMETAL1`, then records;
//! - `snap-<lsn>.snap`: the whole state after record `<lsn>`: the magic `YRMETAS1`, then one
//!   record whose payload is a [`Snapshot`].
//!
//! A record is `len: u32 LE`, `crc32(len bytes): u32 LE`, `crc32(payload): u32 LE`, then `len`
//! bytes of payload (a prost-encoded [`WalRecord`]). The header has its own checksum so that a
//! damaged length is never mistaken for a torn write.
//!
//! Recovery loads the newest snapshot, then replays every log from its sequence number on. A
//! torn final record (a crash in the middle of a write) is cut off with a warning; later log
//! files, which cannot hold acknowledged writes, are removed. Anything else that fails its
//! checksum is [`MetaError::Corrupt`] with the file and offset.
//!
//! Compaction writes a snapshot as `snap-<lsn>.tmp`, syncs it, renames it into place, syncs the
//! directory, and only then removes the logs and snapshots it replaces.
//!
//! A record's framing is `record`, opening a directory is `recovery`; this module owns the
//! record types, the open log and snapshots.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::error::MetaError;

mod record;
mod recovery;
#[cfg(test)]
mod tests;

pub use record::crc32;
use record::{frame, parse_record, Parsed};
pub(crate) use recovery::recover;

const LOG_MAGIC: &[u8; 8] = b"YRMETAL1";
const SNAPSHOT_MAGIC: &[u8; 8] = b"YRMETAS1";
const HEADER_LEN: usize = 12;
/// No record is larger than this; a larger length is damage.
const MAX_RECORD_LEN: u32 = 1 << 30;

/// One committed change to the store, as logged.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WalRecord {
    /// The store revision after the record (unchanged by lease grants).
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// Puts and deletes, applied in order at `revision`.
    #[prost(message, repeated, tag = "2")]
    pub ops: Vec<WalOp>,
    /// A lease granted with `grant_ttl_ms`; 0 if none.
    #[prost(int64, tag = "3")]
    pub grant_lease: i64,
    #[prost(uint64, tag = "4")]
    pub grant_ttl_ms: u64,
    /// A lease ended (revoked or expired), deleting its keys; 0 if none.
    #[prost(int64, tag = "5")]
    pub end_lease: i64,
}

/// A put or delete of one key.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct WalOp {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bool, tag = "2")]
    pub delete: bool,
    #[prost(bytes = "bytes", tag = "3")]
    pub value: Bytes,
    /// 0 = no lease.
    #[prost(int64, tag = "4")]
    pub lease: i64,
}

/// The whole state of a store.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Snapshot {
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    #[prost(int64, tag = "2")]
    pub next_lease_id: i64,
    #[prost(message, repeated, tag = "3")]
    pub kvs: Vec<SnapshotKv>,
    #[prost(message, repeated, tag = "4")]
    pub leases: Vec<SnapshotLease>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SnapshotKv {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(uint64, tag = "3")]
    pub version: u64,
    #[prost(uint64, tag = "4")]
    pub mod_revision: u64,
    /// 0 = no lease.
    #[prost(int64, tag = "5")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SnapshotLease {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(uint64, tag = "2")]
    pub ttl_ms: u64,
}

fn log_name(lsn: u64) -> String {
    format!("log-{lsn:020}.wal")
}

fn snapshot_name(lsn: u64) -> String {
    format!("snap-{lsn:020}.snap")
}

fn parse_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The files of a directory, sorted by sequence number.
struct Listing {
    logs: Vec<u64>,
    snapshots: Vec<u64>,
    temps: Vec<PathBuf>,
}

fn list(dir: &Path) -> Result<Listing, MetaError> {
    let mut listing = Listing {
        logs: Vec::new(),
        snapshots: Vec::new(),
        temps: Vec::new(),
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| MetaError::io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| MetaError::io(format!("list {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(lsn) = parse_name(name, "log-", ".wal") {
            listing.logs.push(lsn);
        } else if let Some(lsn) = parse_name(name, "snap-", ".snap") {
            listing.snapshots.push(lsn);
        } else if name.ends_with(".tmp") {
            listing.temps.push(entry.path());
        }
    }
    listing.logs.sort_unstable();
    listing.snapshots.sort_unstable();
    Ok(listing)
}

/// What recovery hands to the store, in order.
pub(crate) enum Replay {
    /// The state after record `lsn`.
    Snapshot {
        lsn: u64,
        snapshot: Snapshot,
    },
    Record(WalRecord),
}

/// The open log: the file new records go to, and what the syncer still has to sync.
pub(crate) struct Log {
    dir: PathBuf,
    file: Arc<File>,
    /// The sequence number the current file starts after.
    start_lsn: u64,
    /// Bytes and records in the current file.
    pub bytes: u64,
    pub records: u64,
    /// Files replaced by a rotation whose last records are not yet synced.
    retired: Vec<Arc<File>>,
    dir_dirty: bool,
    /// Held (flock) while the store is open; released when the log is dropped.
    _lock: File,
}

/// What the syncer has to make durable.
pub(crate) struct SyncWork {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
}

impl SyncWork {
    /// Syncs the files, then the directory if a file was created in it.
    pub fn run(self) -> std::io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        if let Some(dir) = self.dir {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

impl Log {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record (not yet durable: see [`Log::sync_work`]).
    pub fn append(&mut self, record: &WalRecord) -> Result<(), MetaError> {
        let framed = frame(&record.encode_to_vec());
        if let Err(err) = (&*self.file).write_all(&framed) {
            // Cut off a partial write so later records do not follow damage.
            let path = self.dir.join(log_name(self.start_lsn));
            if let Err(cut) = self.file.set_len(self.bytes) {
                return Err(MetaError::Io(format!(
                    "append to {}: {err}; then cutting back the partial record failed: {cut}",
                    path.display()
                )));
            }
            let _ = (&*self.file).seek(SeekFrom::Start(self.bytes));
            return Err(MetaError::io(format!("append to {}", path.display()), err));
        }
        self.bytes += framed.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// The files (and directory) to sync so that every record appended so far is durable.
    pub fn sync_work(&mut self) -> SyncWork {
        let mut files = std::mem::take(&mut self.retired);
        files.push(self.file.clone());
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone());
        SyncWork { files, dir }
    }

    /// Starts a new log file for the records after `lsn`.
    pub fn rotate(&mut self, lsn: u64) -> Result<(), MetaError> {
        let path = self.dir.join(log_name(lsn));
        let file = create_log(&path)?;
        let old = std::mem::replace(&mut self.file, Arc::new(file));
        self.retired.push(old);
        self.start_lsn = lsn;
        self.bytes = LOG_MAGIC.len() as u64;
        self.records = 0;
        self.dir_dirty = true;
        Ok(())
    }
}

fn create_log(path: &Path) -> Result<File, MetaError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| MetaError::io(format!("create {}", path.display()), e))?;
    file.write_all(LOG_MAGIC)
        .map_err(|e| MetaError::io(format!("write {}", path.display()), e))?;
    Ok(file)
}

/// Writes the snapshot of the state after record `lsn` durably, then removes the files it
/// replaces.
pub(crate) fn write_snapshot(dir: &Path, lsn: u64, snapshot: &Snapshot) -> Result<(), MetaError> {
    let tmp = dir.join(format!("snap-{lsn:020}.tmp"));
    let path = dir.join(snapshot_name(lsn));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(SNAPSHOT_MAGIC)?;
        file.write_all(&frame(&snapshot.encode_to_vec()))?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().map_err(|e| MetaError::io(format!("write snapshot {}", path.display()), e))?;
    let listing = list(dir)?;
    for old in listing.snapshots.iter().filter(|&&s| s < lsn) {
        remove(&dir.join(snapshot_name(*old)));
    }
    for old in listing.logs.iter().filter(|&&l| l < lsn) {
        remove(&dir.join(log_name(*old)));
    }
    Ok(())
}

fn remove(path: &Path) {
    if let Err(err) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), %err, "meta store could not remove an obsolete file");
    }
}

fn lock_dir(dir: &Path) -> Result<File, MetaError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| MetaError::io(format!("open {}", path.display()), e))?;
    // SAFETY: flock on a file descriptor we own; it has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(MetaError::Io(format!(
            "{} is in use by another meta store ({err}); stop it first",
            dir.display()
        )));
    }
    Ok(file)
}

fn read_file(path: &Path) -> Result<Vec<u8>, MetaError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| MetaError::io(format!("read {}", path.display()), e))?;
    Ok(data)
}
