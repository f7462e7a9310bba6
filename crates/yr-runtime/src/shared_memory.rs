//! This process's view of its node's shared memory: the region mapped once, the regions of it
//! that this process's values live in, and where an encoded value goes. A value whose encoding
//! is above [`INLINE_LIMIT`] is written once, straight into shared memory, and read in place by
//! every process of the node; smaller ones stay in the process (and travel inline).
//!
//! The node's data worker allocates regions and counts references to them (see
//! `yr_datasystem::shared_memory`); a [`SharedRegion`] holds one reference and gives it back
//! when dropped. In local mode nothing is installed and every value stays inline.

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use yr_common::{Error, ErrorCode, Result};

/// Encodings up to this size stay in the process (and travel inline): 100 KiB.
pub const INLINE_LIMIT: usize = 100 * 1024;

/// Where regions come from: the node's data worker.
pub trait RegionAllocator: Send + Sync {
    /// A new region of `size` bytes with one reference: its allocation id and offset.
    fn create(&self, size: u64) -> Result<(u64, u64)>;
    /// Give one reference back. Must not block: regions are dropped on any thread.
    fn release(&self, allocation: u64);
}

/// The node's region, mapped into this process.
pub struct SharedMemory {
    base: *mut u8,
    capacity: usize,
    pool_id: String,
    allocator: Box<dyn RegionAllocator>,
}

// SAFETY: the mapping is shared memory that lives as long as this value; access to its bytes
// goes through regions, each written by one creator before it is shared and read-only after.
unsafe impl Send for SharedMemory {}
// SAFETY: see above.
unsafe impl Sync for SharedMemory {}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("pool_id", &self.pool_id)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if self.capacity > 0 {
            // SAFETY: `base` and `capacity` are the mapping made in `map`.
            unsafe { libc::munmap(self.base.cast(), self.capacity) };
        }
    }
}

impl SharedMemory {
    /// Map the region at `path` (`capacity` bytes, named `pool_id`).
    pub fn map(
        path: &str,
        capacity: u64,
        pool_id: String,
        allocator: Box<dyn RegionAllocator>,
    ) -> Result<SharedMemory> {
        let unavailable = |what: String| {
            Error::new(
                ErrorCode::ConnectionFailed,
                format!(
                    "cannot map the node's shared memory at {path}: {what}; check that the node \
                     runs on this machine as the same user"
                ),
            )
        };
        let capacity_bytes = usize::try_from(capacity)
            .map_err(|_| unavailable(format!("{capacity} bytes do not fit in memory")))?;
        if capacity_bytes == 0 {
            return Ok(SharedMemory {
                base: std::ptr::null_mut(),
                capacity: 0,
                pool_id,
                allocator,
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| unavailable(e.to_string()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a shared read-write mapping of a file we opened read-write; the length is the
        // region's size, which the node set with ftruncate.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(unavailable(std::io::Error::last_os_error().to_string()));
        }
        Ok(SharedMemory {
            base: base.cast(),
            capacity: capacity_bytes,
            pool_id,
            allocator,
        })
    }

    /// Names the region; processes with the same pool id read each other's regions in place.
    pub fn pool_id(&self) -> &str {
        &self.pool_id
    }

    /// A new region of `size` bytes for this process to fill.
    pub fn create(self: &Arc<Self>, size: usize) -> Result<SharedRegion> {
        let (allocation, offset) = self.allocator.create(size as u64)?;
        self.region(allocation, offset, size as u64)
    }

    /// A region another process created, for which this process already took a reference
    /// from the node.
    pub fn adopt(
        self: &Arc<Self>,
        allocation: u64,
        offset: u64,
        size: u64,
    ) -> Result<SharedRegion> {
        self.region(allocation, offset, size)
    }

    fn region(self: &Arc<Self>, allocation: u64, offset: u64, size: u64) -> Result<SharedRegion> {
        let end = offset
            .checked_add(size)
            .filter(|end| *end <= self.capacity as u64);
        if end.is_none() {
            self.allocator.release(allocation);
            return Err(Error::new(
                ErrorCode::DatasystemFailed,
                format!(
                    "the node gave a region of {size} bytes at {offset}, outside its shared \
                     memory of {} bytes",
                    self.capacity
                ),
            ));
        }
        Ok(SharedRegion {
            memory: self.clone(),
            allocation,
            offset: offset as usize,
            size: size as usize,
        })
    }
}

/// One region of the node's shared memory that this process holds a reference to.
pub struct SharedRegion {
    memory: Arc<SharedMemory>,
    allocation: u64,
    offset: usize,
    size: usize,
}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("allocation", &self.allocation)
            .field("size", &self.size)
            .finish()
    }
}

impl SharedRegion {
    /// The region's bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.size == 0 {
            return &[];
        }
        // SAFETY: the region lies inside the mapping (checked in `region`), which outlives
        // `self` through `memory`; once shared, a region is only read.
        unsafe { std::slice::from_raw_parts(self.memory.base.add(self.offset), self.size) }
    }

    /// The region's bytes, to fill before the region is shared.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.size == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; `&mut self` means the region is not shared yet (a region
        // is shared only inside an `Arc`, after `write_encoded` returns).
        unsafe { std::slice::from_raw_parts_mut(self.memory.base.add(self.offset), self.size) }
    }

    /// The pool, allocation, offset and size, for the wire.
    pub fn location(&self) -> (&str, u64, u64, u64) {
        (
            self.memory.pool_id(),
            self.allocation,
            self.offset as u64,
            self.size as u64,
        )
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        self.memory.allocator.release(self.allocation);
    }
}

static CURRENT: RwLock<Option<Arc<SharedMemory>>> = RwLock::new(None);

/// Make `memory` this process's shared memory (`None`: values stay inline).
pub fn install(memory: Option<Arc<SharedMemory>>) {
    *CURRENT.write() = memory;
}

/// This process's shared memory, if it has one.
pub fn current() -> Option<Arc<SharedMemory>> {
    CURRENT.read().clone()
}

/// Counts the bytes written to it.
#[derive(Default)]
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Collects up to [`INLINE_LIMIT`] bytes and refuses more.
struct CappedBuffer(Vec<u8>);

impl std::io::Write for CappedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > INLINE_LIMIT {
            return Err(std::io::Error::other("above the inline limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where an encoding ended up.
pub enum Encoded {
    /// At most [`INLINE_LIMIT`] bytes, in the process.
    Inline(Vec<u8>),
    /// In the node's shared memory.
    Shared(SharedRegion),
}

/// Encode with `write` (called with a writer, possibly more than once): inline if the encoding
/// is small or there is no shared memory; otherwise measured first, then written once straight
/// into a new region, so a large value is never copied in the process.
pub fn write_encoded<E: fmt::Display>(
    mut write: impl FnMut(&mut dyn std::io::Write) -> std::result::Result<(), E>,
) -> std::result::Result<Encoded, EncodeError<E>> {
    let Some(memory) = current() else {
        let mut bytes = Vec::new();
        write(&mut bytes).map_err(EncodeError::Encode)?;
        return Ok(Encoded::Inline(bytes));
    };
    let mut small = CappedBuffer(Vec::new());
    if write(&mut small).is_ok() {
        return Ok(Encoded::Inline(small.0));
    }
    let mut counter = Counter::default();
    write(&mut counter).map_err(EncodeError::Encode)?;
    let mut region = memory.create(counter.0).map_err(EncodeError::Store)?;
    let mut target = region.as_mut_slice();
    write(&mut target).map_err(EncodeError::Encode)?;
    if !target.is_empty() {
        return Err(EncodeError::Store(Error::new(
            ErrorCode::InnerSystemError,
            "a value encoded to fewer bytes the second time; its Serialize impl must be \
             deterministic",
        )));
    }
    Ok(Encoded::Shared(region))
}

/// Why [`write_encoded`] failed.
#[derive(Debug)]
pub enum EncodeError<E> {
    /// The value could not be encoded.
    Encode(E),
    /// The shared memory refused the region (for example 4202).
    Store(Error),
}
