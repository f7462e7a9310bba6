//! The node's spill directory: shared-memory objects moved to disk under memory pressure, one
//! file per object (`<id>.obj`, named by the owner's `ObjectId`), and the metadata that says
//! what is spilled, kept in an append-only log next to them (`objects.log`).
//!
//! The log starts with the magic `YRSPILL1`; each record is 29 bytes: an operation (1 spilled,
//! 2 removed), the 16-byte object id, the size (u64 LE), and a CRC-32 of those 25 bytes. A
//! spill writes (and syncs) the object's file first, then appends and syncs its record, so a
//! record always names a whole file. When the store opens, it replays the log, keeps the
//! objects whose files are whole, removes files no record names, and rewrites the log with
//! only the live records. A node restarted on the same directory therefore serves the objects
//! it had spilled, by the same ids.
//!
//! Failures: the directory or an object's file cannot be written is 4203, a full disk or a
//! full `--spill-limit-mb` is 4204, and the log cannot be written is 4201. This module does not
//! own shared memory: [`crate::shared_memory`] decides what to spill and where it goes back.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, ObjectId, Result};

use crate::error::DataSystemError;
use crate::l2::disk_error;

const MAGIC: &[u8; 8] = b"YRSPILL1";
const LOG_NAME: &str = "objects.log";
const RECORD: usize = 1 + 16 + 8 + 4;
const OP_SPILLED: u8 = 1;
const OP_REMOVED: u8 = 2;
/// Objects are copied to and from disk in pieces of this size.
const COPY_CHUNK: usize = 1 << 20;
/// Without `--spill-limit-mb`, spilled objects may take this share of the free space that the
/// spill directory's disk had when the node started.
pub const DEFAULT_LIMIT_SHARE: f64 = 0.95;

/// A spilled object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpilledObject {
    /// Its size in bytes.
    pub size: u64,
    /// The process holding it (its owner); `None` for objects found on disk when the node
    /// started, which any process of the node may restore by id.
    pub holder: Option<u32>,
}

/// What the spill directory holds, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpillStats {
    /// Bytes of spilled objects.
    pub bytes: u64,
    /// Spilled objects.
    pub objects: usize,
    /// The most bytes that may be spilled (0: spilling is off).
    pub limit: u64,
}

#[derive(Debug, Default)]
struct State {
    log: Option<File>,
    objects: HashMap<ObjectId, SpilledObject>,
    /// Bytes of spilled objects plus those being written.
    bytes: u64,
}

/// The spill directory and its metadata log.
#[derive(Debug)]
pub struct SpillStore {
    dir: PathBuf,
    limit: u64,
    state: Mutex<State>,
}

fn metadata_error(what: &'static str, path: &Path, error: std::io::Error) -> Error {
    DataSystemError::SpillLog {
        what,
        path: path.to_path_buf(),
        source: error,
    }
    .into()
}

fn spill_disk_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    disk_error(
        what,
        path,
        error,
        "free space on it or move the node's --spill-dir to a larger disk",
        "check that the node's --spill-dir is a writable directory, or choose another",
    )
}

/// The IO error a fail point plays: `full` is a full disk, anything else a refused write.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected_io_error(kind: Option<String>) -> std::io::Error {
    match kind.as_deref() {
        Some("full") => std::io::Error::new(ErrorKind::StorageFull, "injected by a fail point"),
        _ => std::io::Error::new(ErrorKind::PermissionDenied, "injected by a fail point"),
    }
}

/// Copy `length` bytes from `from` at `from_offset` to `to` at `to_offset`.
pub(crate) fn copy_range(
    from: &File,
    from_offset: u64,
    to: &File,
    to_offset: u64,
    length: u64,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; COPY_CHUNK.min(length as usize)];
    let mut done = 0u64;
    while done < length {
        let chunk = (length - done).min(buffer.len() as u64) as usize;
        from.read_exact_at(&mut buffer[..chunk], from_offset + done)?;
        to.write_all_at(&buffer[..chunk], to_offset + done)?;
        done += chunk as u64;
    }
    Ok(())
}

fn record(op: u8, id: ObjectId, size: u64) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[0] = op;
    out[1..17].copy_from_slice(&id.to_bytes());
    out[17..25].copy_from_slice(&size.to_le_bytes());
    let crc = yr_meta::crc32(&out[..25]);
    out[25..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The records of a log's bytes (after the magic), up to the first torn or damaged one.
fn parse(bytes: &[u8]) -> (Vec<(u8, ObjectId, u64)>, usize) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset + RECORD <= bytes.len() {
        let raw = &bytes[offset..offset + RECORD];
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&raw[25..]);
        if yr_meta::crc32(&raw[..25]) != u32::from_le_bytes(crc) {
            break;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&raw[1..17]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&raw[17..25]);
        records.push((raw[0], ObjectId::from_bytes(id), u64::from_le_bytes(size)));
        offset += RECORD;
    }
    (records, offset)
}

/// Free bytes on the disk of `path`, or of its nearest existing ancestor.
fn free_space(path: &Path) -> Option<u64> {
    let mut candidate = Some(path);
    while let Some(path) = candidate {
        if path.exists() {
            let text = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: statvfs with a NUL-terminated path into a zeroed struct.
            let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(text.as_ptr(), &mut stat) } != 0 {
                return None;
            }
            return Some(stat.f_bavail.saturating_mul(stat.f_frsize));
        }
        candidate = path.parent();
    }
    None
}

impl SpillStore {
    /// The store over `dir`, holding at most `limit` bytes (`None`: [`DEFAULT_LIMIT_SHARE`] of
    /// the disk's free space now; `Some(0)`: spilling is off). Objects a previous run left in
    /// `dir` are found again. Never fails: a directory that cannot be used now is reported
    /// (4203) when an object is first spilled.
    pub fn open(dir: PathBuf, limit: Option<u64>) -> SpillStore {
        let limit = limit.unwrap_or_else(|| {
            free_space(&dir)
                .map(|free| (free as f64 * DEFAULT_LIMIT_SHARE) as u64)
                .unwrap_or(0)
        });
        let store = SpillStore {
            dir,
            limit,
            state: Mutex::new(State::default()),
        };
        if let Err(error) = store.recover() {
            tracing::warn!(dir = %store.dir.display(), %error, "cannot read the spill directory");
        }
        store
    }

    /// The spill directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether objects may be spilled at all.
    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    /// Where object `id` is spilled.
    pub fn object_path(&self, id: ObjectId) -> PathBuf {
        self.dir.join(format!("{id}.obj"))
    }

    /// Replay the log, keep whole objects, drop the rest, and rewrite the log compacted.
    fn recover(&self) -> Result<()> {
        let path = self.log_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(metadata_error("read", &path, error)),
        };
        if !bytes.starts_with(MAGIC) {
            return Err(DataSystemError::NotASpillLog { path }.into());
        }
        let (records, parsed) = parse(&bytes[MAGIC.len()..]);
        if parsed + MAGIC.len() < bytes.len() {
            tracing::warn!(
                log = %path.display(),
                offset = parsed + MAGIC.len(),
                "the spill metadata log ends in a torn or damaged record; cut it off"
            );
        }
        let mut objects = HashMap::new();
        for (op, id, size) in records {
            match op {
                OP_SPILLED => {
                    objects.insert(id, size);
                }
                _ => {
                    objects.remove(&id);
                }
            }
        }
        let mut state = self.state.lock();
        for (id, size) in objects {
            let whole = std::fs::metadata(self.object_path(id)).is_ok_and(|m| m.len() == size);
            if whole {
                state
                    .objects
                    .insert(id, SpilledObject { size, holder: None });
                state.bytes += size;
            } else {
                tracing::warn!(object = %id, "a spilled object's file is missing or torn; dropped");
            }
        }
        // Files no record names: objects whose spill did not finish.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let Some(stem) = name.strip_suffix(".obj") else {
                    continue;
                };
                let known = state.objects.keys().any(|id| id.to_string() == stem);
                if !known {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // The compacted log, written aside and renamed into place.
        let temporary = self.dir.join(format!("{LOG_NAME}.tmp"));
        let write = || -> std::io::Result<File> {
            let mut file = File::create(&temporary)?;
            let mut out = MAGIC.to_vec();
            for (id, object) in &state.objects {
                out.extend_from_slice(&record(OP_SPILLED, *id, object.size));
            }
            file.write_all(&out)?;
            file.sync_data()?;
            std::fs::rename(&temporary, &path)?;
            File::open(&self.dir)?.sync_all()?;
            OpenOptions::new().append(true).open(&path)
        };
        let log = write().map_err(|error| metadata_error("rewrite", &path, error))?;
        state.log = Some(log);
        tracing::info!(
            dir = %self.dir.display(),
            objects = state.objects.len(),
            bytes = state.bytes,
            "spilled objects recovered"
        );
        Ok(())
    }

    /// The open log, created (with the directory) on first use.
    fn log<'a>(&self, state: &'a mut State) -> Result<&'a mut File> {
        if state.log.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(|error| {
                spill_disk_error("create the spill directory", &self.dir, error)
            })?;
            let path = self.log_path();
            let mut file = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .map_err(|error| metadata_error("create", &path, error))?;
            let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
            if empty {
                file.write_all(MAGIC)
                    .and_then(|()| file.sync_data())
                    .map_err(|error| metadata_error("start", &path, error))?;
            }
            state.log = Some(file);
        }
        match state.log.as_mut() {
            Some(log) => Ok(log),
            None => Err(DataSystemError::Bug(
                "the spill log vanished while it was open".to_string(),
            )
            .into()),
        }
    }

    fn append(&self, state: &mut State, op: u8, id: ObjectId, size: u64, sync: bool) -> Result<()> {
        let path = self.log_path();
        let log = self.log(state)?;
        log.write_all(&record(op, id, size))
            .and_then(|()| if sync { log.sync_data() } else { Ok(()) })
            .map_err(|error| metadata_error("append to", &path, error))
    }

    /// Write object `id` (`size` bytes of `source` at `offset`) to disk for process `holder`.
    /// 4204 if it would pass the limit or the disk is full, 4203 if it cannot be written, 4201
    /// if its record cannot be logged; nothing is left behind on failure.
    pub fn write(
        &self,
        id: ObjectId,
        source: &File,
        offset: u64,
        size: u64,
        holder: u32,
    ) -> Result<()> {
        {
            let mut state = self.state.lock();
            if state.bytes.saturating_add(size) > self.limit {
                return Err(Error::new(
                    ErrorCode::InsufficientDiskSpace,
                    format!(
                        "cannot spill object {id} of {size} bytes to {}: {} of the spill limit of \
                         {} bytes are in use; start the node with a larger --spill-limit-mb, \
                         or drop references to objects you no longer need",
                        self.dir.display(),
                        state.bytes,
                        self.limit
                    ),
                ));
            }
            // Make sure the directory and the log exist before the object's bytes go out.
            self.log(&mut state)?;
            state.bytes += size;
        }
        let path = self.object_path(id);
        let written = (|| {
            // Fault tests: the object's file cannot be written; `return(full)` plays a full
            // disk (4204), `return` any other failure (4203).
            fail::fail_point!("datasystem::spill_write", |kind: Option<String>| Err(
                injected_io_error(kind)
            ));
            let file = File::create(&path)?;
            copy_range(source, offset, &file, 0, size)?;
            file.sync_data()
        })()
        .map_err(|error| spill_disk_error("write the spilled object", &path, error));
        let mut state = self.state.lock();
        let logged = written.and_then(|()| self.append(&mut state, OP_SPILLED, id, size, true));
        if let Err(error) = logged {
            state.bytes -= size;
            drop(state);
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        state.objects.insert(
            id,
            SpilledObject {
                size,
                holder: Some(holder),
            },
        );
        tracing::debug!(object = %id, size, "spilled");
        Ok(())
    }

    /// The spilled object `id`, if any.
    pub fn get(&self, id: ObjectId) -> Option<SpilledObject> {
        self.state.lock().objects.get(&id).copied()
    }

    /// Read object `id` into `target` at `offset` (it must have room for its size). 4203 if its
    /// file cannot be read.
    pub fn read_into(&self, id: ObjectId, target: &File, offset: u64) -> Result<()> {
        let Some(object) = self.get(id) else {
            return Err(not_spilled(id, &self.dir));
        };
        let path = self.object_path(id);
        // Fault tests: the spilled object's file cannot be read back (4203); it stays on disk.
        fail::fail_point!("datasystem::spill_restore", |kind: Option<String>| Err(
            spill_disk_error("read the spilled object", &path, injected_io_error(kind))
        ));
        let file = File::open(&path)
            .map_err(|error| spill_disk_error("open the spilled object", &path, error))?;
        copy_range(&file, 0, target, offset, object.size)
            .map_err(|error| spill_disk_error("read the spilled object", &path, error))
    }

    /// Forget object `id` and delete its file. Returns whether it was spilled.
    pub fn remove(&self, id: ObjectId) -> bool {
        let mut state = self.state.lock();
        let Some(object) = state.objects.remove(&id) else {
            return false;
        };
        state.bytes -= object.size;
        // Not synced: a removal a crash takes back finds no file when the node starts again.
        if let Err(error) = self.append(&mut state, OP_REMOVED, id, object.size, false) {
            tracing::warn!(%error, "cannot log the removal of a spilled object");
        }
        drop(state);
        let path = self.object_path(id);
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %error, "cannot delete a spilled object's file");
        }
        true
    }

    /// Remove object `id` if process `pid` holds it (or nobody does). Returns whether it did.
    pub fn remove_held(&self, id: ObjectId, pid: u32) -> bool {
        let held = self
            .get(id)
            .is_some_and(|object| object.holder.is_none_or(|holder| holder == pid));
        held && self.remove(id)
    }

    /// Remove every object process `pid` holds: it left the node.
    pub fn release_process(&self, pid: u32) -> usize {
        let held: Vec<ObjectId> = self
            .state
            .lock()
            .objects
            .iter()
            .filter(|(_, object)| object.holder == Some(pid))
            .map(|(id, _)| *id)
            .collect();
        held.into_iter().filter(|id| self.remove(*id)).count()
    }

    /// What the directory holds.
    pub fn stats(&self) -> SpillStats {
        let state = self.state.lock();
        SpillStats {
            bytes: state.objects.values().map(|object| object.size).sum(),
            objects: state.objects.len(),
            limit: self.limit,
        }
    }
}

/// The error for restoring an id that is not spilled here.
pub(crate) fn not_spilled(id: ObjectId, dir: &Path) -> Error {
    Error::new(
        ErrorCode::GetOperationFailed,
        format!(
            "object {id} is not spilled on this node (spill directory {}): it was freed, or \
             spilled by another node; keep a reference to objects you still read",
            dir.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "yr-spill-{label}-{}-{}",
            std::process::id(),
            yr_common::ids::random_hex(6)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn source(bytes: &[u8]) -> File {
        let path = temp_dir("source").join("data");
        std::fs::write(&path, bytes).unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn a_spilled_object_reads_back_and_its_file_goes_when_removed() {
        let dir = temp_dir("roundtrip");
        let store = SpillStore::open(dir.clone(), Some(1 << 20));
        let id = ObjectId::generate();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        store.write(id, &source(&data), 0, 5000, 7).unwrap();
        assert_eq!(store.stats().bytes, 5000);
        assert_eq!(std::fs::read(store.object_path(id)).unwrap(), data);
        let target_path = temp_dir("target").join("data");
        std::fs::write(&target_path, [0u8; 6000]).unwrap();
        let target = OpenOptions::new()
            .read(true)
            .write(true)
            .open(target_path)
            .unwrap();
        store.read_into(id, &target, 0).unwrap();
        let mut back = vec![0u8; 5000];
        target.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert!(
            !store.remove_held(id, 8),
            "another process cannot remove it"
        );
        assert!(store.remove_held(id, 7));
        assert!(!store.object_path(id).exists());
        assert_eq!(
            store.stats(),
            SpillStats {
                bytes: 0,
                objects: 0,
                limit: 1 << 20
            }
        );
    }

    #[test]
    fn a_full_limit_is_4204_and_an_unwritable_directory_4203() {
        let dir = temp_dir("limit");
        let store = SpillStore::open(dir.join("spill"), Some(4096));
        let error = store
            .write(ObjectId::generate(), &source(&[1u8; 8192]), 0, 8192, 1)
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace);
        assert!(error.message().contains("4096"), "{error}");
        assert_eq!(store.stats().bytes, 0);
        // A directory below a regular file cannot be created, even by root.
        std::fs::write(dir.join("file"), b"x").unwrap();
        let store = SpillStore::open(dir.join("file").join("spill"), Some(1 << 20));
        let error = store
            .write(ObjectId::generate(), &source(&[1u8; 10]), 0, 10, 1)
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
        assert!(error.message().contains("--spill-dir"), "{error}");
        assert_eq!(store.stats().bytes, 0);
    }

    #[test]
    fn a_log_that_cannot_be_written_is_4201_and_leaves_no_object_behind() {
        let dir = temp_dir("log");
        // A directory where the metadata log goes: the log cannot be opened, even by root.
        std::fs::create_dir_all(dir.join(LOG_NAME)).unwrap();
        let store = SpillStore::open(dir.clone(), Some(1 << 20));
        let id = ObjectId::generate();
        let error = store
            .write(id, &source(&[1u8; 100]), 0, 100, 1)
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::RocksdbFailed, "{error}");
        assert!(error.message().contains(LOG_NAME), "{error}");
        assert!(
            !store.object_path(id).exists(),
            "the object's file was left behind"
        );
        assert_eq!(store.stats().bytes, 0);
    }

    #[test]
    fn a_reopened_store_finds_its_objects_and_drops_unfinished_ones() {
        let dir = temp_dir("reopen");
        let kept = ObjectId::generate();
        let removed = ObjectId::generate();
        {
            let store = SpillStore::open(dir.clone(), Some(1 << 20));
            store.write(kept, &source(&[3u8; 100]), 0, 100, 1).unwrap();
            store
                .write(removed, &source(&[4u8; 100]), 0, 100, 1)
                .unwrap();
            store.remove(removed);
        }
        // A file whose spill did not finish, and a torn record at the end of the log.
        std::fs::write(dir.join(format!("{}.obj", ObjectId::generate())), b"half").unwrap();
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.join(LOG_NAME))
            .unwrap();
        log.write_all(&[1, 2, 3]).unwrap();
        let store = SpillStore::open(dir.clone(), Some(1 << 20));
        assert_eq!(
            store.get(kept),
            Some(SpilledObject {
                size: 100,
                holder: None
            })
        );
        assert_eq!(store.get(removed), None);
        let files = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".obj"))
            })
            .count();
        assert_eq!(files, 1);
        // Any process may claim an object recovered from disk.
        assert!(store.remove_held(kept, 99));
        let store = SpillStore::open(dir, Some(1 << 20));
        assert_eq!(store.stats().objects, 0);
    }

    #[test]
    fn a_departed_process_loses_its_spilled_objects() {
        let store = SpillStore::open(temp_dir("departed"), Some(1 << 20));
        let (mine, theirs) = (ObjectId::generate(), ObjectId::generate());
        store.write(mine, &source(&[1u8; 10]), 0, 10, 1).unwrap();
        store.write(theirs, &source(&[1u8; 10]), 0, 10, 2).unwrap();
        assert_eq!(store.release_process(1), 1);
        assert_eq!(store.get(mine), None);
        assert!(store.get(theirs).is_some());
    }
}
