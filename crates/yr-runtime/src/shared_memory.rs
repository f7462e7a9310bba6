//! This process's view of its node's shared memory: the region mapped once, the regions of it
//! that this process's values live in, and where an encoded value goes. A value whose encoding
//! is above [`INLINE_LIMIT`] is written once, straight into shared memory, and read in place by
//! every process of the node; smaller ones stay in the process (and travel inline).
//!
//! The node's data worker allocates regions and counts references to them (see
//! `yr_datasystem::shared_memory`); a [`SharedRegion`] holds one reference and gives it back
//! when dropped. In local mode nothing is installed and every value stays inline.
//!
//! When a new region does not fit in the node's free space, this process spills its own idle
//! objects to the node's disk (see `object_store::spill_idle`) and tries again; with nothing of
//! its own to spill, it asks the node to reclaim room from the node's other processes
//! ([`RegionAllocator::reclaim`]: they spill their idle objects when asked) and tries again. A
//! [`SpilledValue`] names a spilled object by its id, and [`SharedMemory::restore`] brings it
//! back into a new region when it is read.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use yr_common::{Error, ErrorCode, ObjectId, Result};

use crate::error::RuntimeError;

/// Encodings up to this size stay in the process (and travel inline): 100 KiB.
pub const INLINE_LIMIT: usize = 100 * 1024;

/// Where regions come from: the node's data worker.
pub trait RegionAllocator: Send + Sync {
    /// A new region of `size` bytes with one reference: its allocation id, offset and
    /// capability (what another node presents to pull it, see `yr_datasystem::capability`).
    fn create(&self, size: u64) -> Result<(u64, u64, Bytes)>;
    /// Give one reference back. Must not block: regions are dropped on any thread.
    fn release(&self, allocation: u64);
    /// Move `allocation`, which this process alone holds as object `object`, to the node's
    /// disk and free it. False if the node did not (another process holds it, or spilling is
    /// off); 4203/4204/4201 if the disk refused it.
    fn spill(&self, allocation: u64, object: ObjectId) -> Result<bool>;
    /// Bring spilled object `object` back into a new region with one reference: its allocation
    /// id, offset, size and capability (4202 if it does not fit now).
    fn restore(&self, object: ObjectId) -> Result<(u64, u64, u64, Bytes)>;
    /// Drop spilled object `object`. Must not block, like `release`.
    fn delete_spilled(&self, object: ObjectId);
    /// Take a reference to `allocation` for process `receiver` on this node, which this
    /// process hands the object over to (a call's result); `receiver` releases it. 4005 if
    /// `receiver` already left the node.
    fn hand_over(&self, allocation: u64, receiver: u32) -> Result<()>;
    /// Ask the node's other processes to spill idle objects of theirs until `bytes` are free:
    /// the bytes they spilled (0: none could). 4203/4204/4201 if nothing was freed because the
    /// disk refused. Blocks for as long as they take; never called on the IO thread (see
    /// [`mark_io_thread`]).
    fn reclaim(&self, bytes: u64) -> Result<u64>;
    /// Ask the node to keep `allocation`, which this process holds, for an owner on another
    /// node (a call's result for a caller there), until that owner's node pulls or drops it.
    /// A node without a data port keeps nothing for other nodes.
    fn hold_for_remote(&self, allocation: u64) -> Result<()> {
        Err(Error::new(
            ErrorCode::DatasystemFailed,
            format!("this node keeps no objects for other nodes (allocation {allocation})"),
        ))
    }
}

thread_local! {
    /// Whether this thread is the cluster backend's IO thread (see [`mark_io_thread`]).
    static IO_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Mark the current thread as the one that carries this process's traffic with its node (the
/// cluster backend's IO thread). A create or restore on it spills only this process's own idle
/// objects and never asks the node's other processes for room: their answers, and this
/// process's heartbeats, arrive on this very thread, so it must not wait for them.
pub fn mark_io_thread() {
    IO_THREAD.with(|io| io.set(true));
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

    /// A new region of `size` bytes for this process to fill; this process's idle objects are
    /// spilled to make room if needed.
    pub fn create(self: &Arc<Self>, size: usize) -> Result<SharedRegion> {
        let (allocation, offset, capability) =
            self.with_room(size as u64, |allocator| allocator.create(size as u64))?;
        self.region(allocation, offset, size as u64, capability)
    }

    /// Spilled object `spilled` back in a new region (spilling other idle objects if needed).
    pub fn restore(self: &Arc<Self>, spilled: &SpilledValue) -> Result<SharedRegion> {
        let (allocation, offset, size, capability) =
            self.with_room(spilled.size, |allocator| allocator.restore(spilled.object))?;
        self.region(allocation, offset, size, capability)
    }

    /// Run `attempt`; while it finds no room for `size` bytes (4202, though they would fit in
    /// the empty region), spill this process's idle objects, or when it has none, ask the
    /// node's other processes to spill theirs, and run it again. When nobody could spill
    /// anything, the last 4202 stands, saying so.
    fn with_room<T>(
        self: &Arc<Self>,
        size: u64,
        mut attempt: impl FnMut(&dyn RegionAllocator) -> Result<T>,
    ) -> Result<T> {
        loop {
            match attempt(&*self.allocator) {
                Err(error)
                    if error.code() == ErrorCode::SharedMemoryLimited
                        && size <= self.capacity as u64 =>
                {
                    if crate::object_store::spill_idle(self, size)? > 0 {
                        continue;
                    }
                    let others = if IO_THREAD.with(Cell::get) {
                        "the node's other processes were not asked to spill theirs (this ran \
                         on yr's IO thread, which must not wait for them)"
                    } else if self.allocator.reclaim(size)? > 0 {
                        continue;
                    } else {
                        "neither could the node's other processes spill theirs"
                    };
                    return Err(Error::new(
                        ErrorCode::SharedMemoryLimited,
                        format!(
                            "{}. This process had no idle object to spill to disk, and {others} \
                             (every object is being read or shared, or spilling is off with \
                             --spill-limit-mb 0)",
                            error.message()
                        ),
                    ));
                }
                other => return other,
            }
        }
    }

    /// Move `region` (an object this process alone reads, `object`) to the node's disk. The
    /// region is given up on success; on `Ok(None)` (the node declined) it is handed back.
    pub(crate) fn spill(
        self: &Arc<Self>,
        region: SharedRegion,
        object: ObjectId,
    ) -> (Result<Option<SpilledValue>>, Option<SharedRegion>) {
        match self.allocator.spill(region.allocation, object) {
            Ok(true) => {
                let size = region.size as u64;
                region.forget();
                (
                    Ok(Some(SpilledValue {
                        memory: self.clone(),
                        object,
                        size,
                        restored: false,
                    })),
                    None,
                )
            }
            Ok(false) => (Ok(None), Some(region)),
            Err(error) => (Err(error), Some(region)),
        }
    }

    /// A region another process created, for which this process already took a reference
    /// from the node, with its capability.
    pub fn adopt(
        self: &Arc<Self>,
        allocation: u64,
        offset: u64,
        size: u64,
        capability: Bytes,
    ) -> Result<SharedRegion> {
        self.region(allocation, offset, size, capability)
    }

    fn region(
        self: &Arc<Self>,
        allocation: u64,
        offset: u64,
        size: u64,
        capability: Bytes,
    ) -> Result<SharedRegion> {
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
            capability,
            held: true,
        })
    }
}

/// An object of this process that lives on the node's disk, not in shared memory. Dropping it
/// deletes it there.
pub struct SpilledValue {
    memory: Arc<SharedMemory>,
    object: ObjectId,
    size: u64,
    /// Set once it is back in shared memory (the node dropped its disk copy then).
    restored: bool,
}

impl fmt::Debug for SpilledValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpilledValue")
            .field("object", &self.object)
            .field("size", &self.size)
            .finish()
    }
}

impl SpilledValue {
    /// The memory it goes back to.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.memory
    }

    /// Mark it restored: the node already dropped the copy on disk.
    pub(crate) fn forget(mut self) {
        self.restored = true;
    }
}

impl Drop for SpilledValue {
    fn drop(&mut self) {
        if !self.restored {
            self.memory.allocator.delete_spilled(self.object);
        }
    }
}

/// One region of the node's shared memory that this process holds a reference to.
pub struct SharedRegion {
    memory: Arc<SharedMemory>,
    allocation: u64,
    offset: usize,
    size: usize,
    /// What another node presents to pull the region from this node's data port.
    capability: Bytes,
    /// Whether this process still holds the node's reference (false once it was spilled).
    held: bool,
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

    /// Whether the region lies in `memory`.
    pub fn is_in(&self, memory: &Arc<SharedMemory>) -> bool {
        Arc::ptr_eq(&self.memory, memory)
    }

    /// Give process `receiver` on this node a reference of its own to this region: it reads
    /// the region in place from the location it is sent, and releases it (see
    /// [`SharedMemory::adopt`]). Blocks for one round trip to the node.
    pub fn hand_over(&self, receiver: u32) -> Result<()> {
        self.memory.allocator.hand_over(self.allocation, receiver)
    }

    /// Ask the node to keep the region for an owner on another node (see
    /// [`RegionAllocator::hold_for_remote`]).
    pub fn hold_for_remote(&self) -> Result<()> {
        self.memory.allocator.hold_for_remote(self.allocation)
    }

    /// Drop the region without giving its reference back: the node already freed it.
    fn forget(mut self) {
        self.held = false;
    }

    /// The region's capability, which travels with its location to other nodes.
    pub fn capability(&self) -> &Bytes {
        &self.capability
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
        if self.held {
            self.memory.allocator.release(self.allocation);
        }
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
        return Err(EncodeError::Store(
            RuntimeError::NondeterministicEncoding.into(),
        ));
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

/// A node's memory for unit tests: one page over a temporary file, with a scripted node.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A node whose memory is full of other processes' objects: a create fits once they were
    /// asked `reclaims_to_fit` times, and each ask frees `freed_per_reclaim` bytes. A hand-over
    /// to process `departed` is refused, as for a process that left the node.
    pub(crate) struct ScriptedNode {
        pub(crate) reclaims_to_fit: u64,
        pub(crate) freed_per_reclaim: u64,
        pub(crate) reclaims: Arc<AtomicU64>,
        pub(crate) departed: u32,
    }

    impl RegionAllocator for ScriptedNode {
        fn create(&self, size: u64) -> Result<(u64, u64, Bytes)> {
            if self.reclaims.load(Ordering::SeqCst) < self.reclaims_to_fit {
                return Err(Error::new(
                    ErrorCode::SharedMemoryLimited,
                    format!("the node's shared memory is full: {size} bytes do not fit"),
                ));
            }
            Ok((1, 0, Bytes::from_static(&[7; 16])))
        }
        fn release(&self, _allocation: u64) {}
        fn spill(&self, _allocation: u64, _object: ObjectId) -> Result<bool> {
            Ok(false)
        }
        fn restore(&self, object: ObjectId) -> Result<(u64, u64, u64, Bytes)> {
            Err(Error::new(
                ErrorCode::DatasystemFailed,
                format!("{object} was never spilled"),
            ))
        }
        fn delete_spilled(&self, _object: ObjectId) {}
        fn hand_over(&self, allocation: u64, receiver: u32) -> Result<()> {
            if receiver == self.departed {
                return Err(Error::new(
                    ErrorCode::GetOperationFailed,
                    format!("process {receiver} left the node; {allocation} cannot go to it"),
                ));
            }
            Ok(())
        }
        fn reclaim(&self, _bytes: u64) -> Result<u64> {
            self.reclaims.fetch_add(1, Ordering::SeqCst);
            Ok(self.freed_per_reclaim)
        }
    }

    /// One page of shared memory named `pool` over a temporary file, run by `node`.
    pub(crate) fn memory(pool: &str, node: ScriptedNode) -> Arc<SharedMemory> {
        let path = std::env::temp_dir().join(format!(
            "yr-shm-test-{}-{}",
            std::process::id(),
            yr_common::ids::random_hex(6)
        ));
        std::fs::File::create(&path)
            .and_then(|file| file.set_len(4096))
            .unwrap();
        let memory =
            SharedMemory::map(path.to_str().unwrap(), 4096, pool.into(), Box::new(node)).unwrap();
        let _ = std::fs::remove_file(&path);
        Arc::new(memory)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::test_support::ScriptedNode;
    use super::*;

    /// A page whose creates fit after `reclaims_to_fit` reclaims of `freed_per_reclaim` bytes
    /// each; also returns the count of reclaims asked.
    fn memory(reclaims_to_fit: u64, freed_per_reclaim: u64) -> (Arc<SharedMemory>, Arc<AtomicU64>) {
        let reclaims = Arc::new(AtomicU64::new(0));
        let node = ScriptedNode {
            reclaims_to_fit,
            freed_per_reclaim,
            reclaims: reclaims.clone(),
            departed: 0,
        };
        (super::test_support::memory("test", node), reclaims)
    }

    #[test]
    fn with_nothing_of_its_own_to_spill_a_create_asks_the_others_until_it_fits() {
        let (memory, reclaims) = memory(2, 4096);
        assert!(memory.create(100).is_ok());
        assert_eq!(reclaims.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn when_the_others_free_nothing_the_4202_says_so() {
        let (memory, reclaims) = memory(u64::MAX, 0);
        let error = memory.create(100).unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert_eq!(reclaims.load(Ordering::SeqCst), 1);
        let message = error.message();
        assert!(message.contains("full"), "{message}");
        assert!(
            message.contains("neither could the node's other processes"),
            "{message}"
        );
    }

    #[test]
    fn on_the_io_thread_a_create_never_waits_for_other_processes() {
        let (memory, reclaims) = memory(1, 4096);
        let error = std::thread::spawn(move || {
            mark_io_thread();
            memory.create(100).unwrap_err()
        })
        .join()
        .unwrap();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert_eq!(reclaims.load(Ordering::SeqCst), 0);
        assert!(error.message().contains("not asked"), "{}", error.message());
    }
}
