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
//!
//! The log's records and its replay are `log`; this module writes, reads and removes objects.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, ObjectId, Result};

use crate::error::DataSystemError;
use crate::l2::disk_error;

mod log;
#[cfg(test)]
mod tests;

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
