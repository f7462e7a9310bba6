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

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::error::MetaError;

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

/// CRC-32 (IEEE 802.3, the zlib/`crc32fast` polynomial). Also checks the data worker's spill
/// log records.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Frames `payload` as one record.
fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32(&len).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What parsing one record found.
enum Parsed<'a> {
    Record {
        payload: &'a [u8],
        next: usize,
    },
    End,
    /// The file ends in the middle of a record, or in zeros: a torn final write.
    Torn(String),
    Corrupt(String),
}

fn parse_record(data: &[u8], offset: usize) -> Parsed<'_> {
    let rest = &data[offset..];
    if rest.is_empty() {
        return Parsed::End;
    }
    if rest.iter().all(|&b| b == 0) {
        return Parsed::Torn(format!("{} zero bytes", rest.len()));
    }
    if rest.len() < HEADER_LEN {
        return Parsed::Torn(format!("a {}-byte partial header", rest.len()));
    }
    let len_bytes: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
    let header_crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let payload_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
    if crc32(&len_bytes) != header_crc {
        return Parsed::Corrupt("record header checksum mismatch".to_string());
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_RECORD_LEN {
        return Parsed::Corrupt(format!("record length {len} is too large"));
    }
    let end = HEADER_LEN + len as usize;
    if rest.len() < end {
        return Parsed::Torn(format!(
            "a record of {len} bytes with only {} present",
            rest.len() - HEADER_LEN
        ));
    }
    let payload = &rest[HEADER_LEN..end];
    if crc32(payload) != payload_crc {
        // A torn write leaves a bad final record; damage followed by more data is corruption.
        if rest[end..].iter().all(|&b| b == 0) {
            return Parsed::Torn("a final record with a bad checksum".to_string());
        }
        return Parsed::Corrupt("record checksum mismatch".to_string());
    }
    Parsed::Record {
        payload,
        next: offset + end,
    }
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

fn corrupt(path: &Path, offset: usize, what: impl std::fmt::Display) -> MetaError {
    MetaError::Corrupt(format!(
        "{} at byte offset {offset}: {what}; restore the directory from a backup or remove the damaged file",
        path.display()
    ))
}

fn load_snapshot(path: &Path) -> Result<Snapshot, MetaError> {
    let data = read_file(path)?;
    if data.len() < SNAPSHOT_MAGIC.len() || &data[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
        return Err(corrupt(path, 0, "not a meta store snapshot"));
    }
    let offset = SNAPSHOT_MAGIC.len();
    match parse_record(&data, offset) {
        Parsed::Record { payload, .. } => Snapshot::decode(payload)
            .map_err(|e| corrupt(path, offset, format!("undecodable snapshot: {e}"))),
        Parsed::End => Err(corrupt(path, offset, "empty snapshot")),
        Parsed::Torn(what) | Parsed::Corrupt(what) => Err(corrupt(path, offset, what)),
    }
}

/// Opens `dir` (creating it if needed), locks it, and hands its snapshot and log records to
/// `apply` in order. Returns the open log and the sequence number of the last record.
pub(crate) fn recover(
    dir: &Path,
    apply: &mut dyn FnMut(Replay) -> Result<(), MetaError>,
) -> Result<(Log, u64), MetaError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| MetaError::io(format!("create {}", dir.display()), e))?;
    let lock = lock_dir(dir)?;
    let listing = list(dir)?;
    for tmp in &listing.temps {
        remove(tmp);
    }
    let snapshot_lsn = listing.snapshots.last().copied().unwrap_or(0);
    if let Some(&lsn) = listing.snapshots.last() {
        let snapshot = load_snapshot(&dir.join(snapshot_name(lsn)))?;
        apply(Replay::Snapshot { lsn, snapshot })?;
    }
    for old in listing.logs.iter().filter(|&&l| l < snapshot_lsn) {
        remove(&dir.join(log_name(*old)));
    }
    let logs: Vec<u64> = listing
        .logs
        .iter()
        .copied()
        .filter(|&l| l >= snapshot_lsn)
        .collect();

    let mut lsn = snapshot_lsn;
    // The file to keep appending to: (start lsn, valid length, records).
    let mut current: Option<(u64, u64, u64)> = None;
    for (index, &start) in logs.iter().enumerate() {
        let path = dir.join(log_name(start));
        if start != lsn {
            return Err(MetaError::Corrupt(format!(
                "{} should start after record {lsn}; a log file is missing",
                path.display()
            )));
        }
        let data = read_file(&path)?;
        let is_last = index + 1 == logs.len();
        if data.len() < LOG_MAGIC.len() {
            if data[..] != LOG_MAGIC[..data.len()] {
                return Err(corrupt(&path, 0, "not a meta store log"));
            }
            // Created, but the crash came before its header was written.
            tracing::warn!(path = %path.display(), "meta store log has no header; rewriting it");
            let file = create_log(&path)?;
            file.sync_all()
                .map_err(|e| MetaError::io(format!("sync {}", path.display()), e))?;
            current = Some((start, LOG_MAGIC.len() as u64, 0));
            discard_later(dir, &logs[index + 1..]);
            break;
        }
        if &data[..LOG_MAGIC.len()] != LOG_MAGIC {
            return Err(corrupt(&path, 0, "not a meta store log"));
        }
        let mut offset = LOG_MAGIC.len();
        let mut records = 0u64;
        let mut torn = false;
        loop {
            match parse_record(&data, offset) {
                Parsed::Record { payload, next } => {
                    let record = WalRecord::decode(payload)
                        .map_err(|e| corrupt(&path, offset, format!("undecodable record: {e}")))?;
                    apply(Replay::Record(record)).map_err(|e| match e {
                        MetaError::Corrupt(what) => corrupt(&path, offset, what),
                        other => other,
                    })?;
                    records += 1;
                    lsn += 1;
                    offset = next;
                }
                Parsed::End => break,
                Parsed::Torn(what) => {
                    tracing::warn!(
                        path = %path.display(),
                        offset,
                        what,
                        "meta store log ends in a torn write (a crash during a write); cutting it off"
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| {
                            f.set_len(offset as u64)?;
                            f.sync_all()
                        })
                        .map_err(|e| MetaError::io(format!("truncate {}", path.display()), e));
                    file?;
                    torn = true;
                    break;
                }
                Parsed::Corrupt(what) => return Err(corrupt(&path, offset, what)),
            }
        }
        current = Some((start, offset as u64, records));
        if torn || is_last {
            // Nothing after a torn write was acknowledged: each log is synced before any
            // record of the next one counts as durable.
            discard_later(dir, &logs[index + 1..]);
            break;
        }
    }

    let (start, bytes, records, file) = match current {
        Some((start, bytes, records)) => {
            let path = dir.join(log_name(start));
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| MetaError::io(format!("open {}", path.display()), e))?;
            file.seek(SeekFrom::Start(bytes))
                .map_err(|e| MetaError::io(format!("seek {}", path.display()), e))?;
            (start, bytes, records, file)
        }
        None => {
            let path = dir.join(log_name(lsn));
            let file = create_log(&path)?;
            file.sync_all()
                .map_err(|e| MetaError::io(format!("sync {}", path.display()), e))?;
            sync_dir(dir).map_err(|e| MetaError::io(format!("sync {}", dir.display()), e))?;
            (lsn, LOG_MAGIC.len() as u64, 0, file)
        }
    };
    let log = Log {
        dir: dir.to_path_buf(),
        file: Arc::new(file),
        start_lsn: start,
        bytes,
        records,
        retired: Vec::new(),
        dir_dirty: false,
        _lock: lock,
    };
    Ok((log, lsn))
}

fn discard_later(dir: &Path, later: &[u64]) {
    for &start in later {
        let path = dir.join(log_name(start));
        tracing::warn!(
            path = %path.display(),
            "meta store log follows a torn write and holds no acknowledged record; removing it"
        );
        remove(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_record_cut_anywhere_is_torn_and_damage_before_more_data_is_corrupt() {
        let one = frame(b"hello");
        let two = frame(b"world!");
        let mut data = one.clone();
        data.extend_from_slice(&two);
        match parse_record(&data, 0) {
            Parsed::Record { payload, next } => {
                assert_eq!(payload, b"hello");
                assert_eq!(next, one.len());
            }
            _ => panic!("expected a record"),
        }
        for cut in one.len() + 1..data.len() {
            assert!(
                matches!(parse_record(&data[..cut], one.len()), Parsed::Torn(_)),
                "cut at {cut}"
            );
        }
        let mut damaged = data.clone();
        damaged[HEADER_LEN + 1] ^= 0xFF;
        assert!(matches!(parse_record(&damaged, 0), Parsed::Corrupt(_)));
        let mut damaged_last = data.clone();
        *damaged_last.last_mut().unwrap() ^= 0xFF;
        assert!(matches!(
            parse_record(&damaged_last, one.len()),
            Parsed::Torn(_)
        ));
        let mut bad_len = data.clone();
        bad_len[0] ^= 0x40;
        assert!(matches!(parse_record(&bad_len, 0), Parsed::Corrupt(_)));
        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 40]);
        assert!(matches!(parse_record(&zeros, data.len()), Parsed::Torn(_)));
    }
}
