//! The node's shared-memory object store: one `memfd` region of fixed capacity, carved into
//! page-aligned allocations by a first-fit allocator. The node's drivers and runtimes map the
//! region through `/proc/<node pid>/fd/<fd>` and read and write objects in place; this store only
//! hands out regions and counts references to them. Freed pages are given back to the kernel
//! (hole punching) once no object was freed for [`RECLAIM_AFTER`]: until then they are reused
//! warm by the next objects (a fresh page costs a fault and zeroing on first write), and after
//! that memory is back at its baseline.
//!
//! An object larger than the whole region is 4202 with both sizes. So is an object that does not
//! fit in the free space now: its creator then asks to spill its own idle objects
//! ([`SharedMemoryStore::spill`]: allowed only for an allocation that the asking process alone
//! holds, once), moving them to the node's [`SpillStore`], and tries again. A creator with
//! nothing of its own to spill asks the node to reclaim room from the processes that alone hold
//! objects ([`SharedMemoryStore::spill_candidates`], asked by `reclaim`). An owner that reads a
//! spilled object asks for it back ([`SharedMemoryStore::restore`]), into a new allocation.
//!
//! Each allocation has a random capability ([`crate::capability`]): another node's pull must
//! present it ([`SharedMemoryStore::retain_presented`]); allocation ids are sequential and
//! say nothing. The processes of the node that talk to the store are known
//! ([`SharedMemoryStore::note_client`]): an object is handed over only to one of them, by a
//! process that holds it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, ObjectId, Result};

use crate::capability::{self, Capability, CapabilitySource};
use crate::data_port::TRANSFER_HOLDER;
use crate::spill::{not_spilled, SpillStore};

/// Allocations start on page boundaries, so freeing one can give its pages back.
pub const ALIGNMENT: u64 = 4096;

/// Freed pages go back to the kernel once no object was freed for this long.
pub const RECLAIM_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// One allocation: where it lies and how many references keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Allocation {
    offset: u64,
    /// The size asked for.
    size: u64,
    /// The size taken from the region (`size` rounded up to the alignment).
    reserved: u64,
    /// References by the process holding them.
    holders: HashMap<u32, u32>,
    /// What another node presents to read it.
    capability: Capability,
}

#[derive(Debug, Default)]
struct Allocator {
    /// Free ranges by offset, never adjacent (they are merged).
    free: BTreeMap<u64, u64>,
    allocations: HashMap<u64, Allocation>,
    next_id: u64,
    used: u64,
    /// When an object was last freed, if its pages were not given back since.
    freed_since_reclaim: Option<std::time::Instant>,
    capabilities: CapabilitySource,
}

impl Allocator {
    fn new(capacity: u64) -> Allocator {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Allocator {
            free,
            allocations: HashMap::new(),
            next_id: 1,
            used: 0,
            freed_since_reclaim: None,
            capabilities: CapabilitySource::default(),
        }
    }

    /// The first free range that fits `reserved` bytes, split off.
    fn take(&mut self, reserved: u64) -> Option<u64> {
        let (&offset, &length) = self.free.iter().find(|(_, &length)| length >= reserved)?;
        self.free.remove(&offset);
        if length > reserved {
            self.free.insert(offset + reserved, length - reserved);
        }
        Some(offset)
    }

    /// Give `[offset, offset + length)` back, merged with its free neighbours.
    fn give_back(&mut self, mut offset: u64, mut length: u64) {
        if let Some((&before, &before_length)) = self.free.range(..offset).next_back() {
            if before + before_length == offset {
                self.free.remove(&before);
                offset = before;
                length += before_length;
            }
        }
        if let Some(&after_length) = self.free.get(&(offset + length)) {
            self.free.remove(&(offset + length));
            length += after_length;
        }
        self.free.insert(offset, length);
    }
}

/// What the store holds, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedMemoryStats {
    /// The region's size in bytes.
    pub capacity: u64,
    /// Bytes taken by live allocations (rounded up to pages).
    pub used: u64,
    /// Live allocations.
    pub objects: usize,
    /// Bytes of objects spilled to disk.
    pub spilled_bytes: u64,
    /// Objects spilled to disk.
    pub spilled_objects: usize,
}

/// The node's shared-memory region and its allocations.
#[derive(Debug)]
pub struct SharedMemoryStore {
    /// The memfd region.
    file: std::fs::File,
    capacity: u64,
    pool_id: String,
    allocator: Mutex<Allocator>,
    spill: Option<SpillStore>,
    /// The node's processes that talk to the store and have not left: objects are handed
    /// over only to them.
    clients: Mutex<std::collections::HashSet<u32>>,
}

/// The answer to a read of an object that is not there, or not as presented: the same for a
/// wrong capability, a wrong size and a freed object, and naming neither id nor size.
pub fn no_such_object() -> Error {
    Error::new(
        ErrorCode::GetOperationFailed,
        "the node holds no object that matches this read (it was freed, or the location is \
         stale or not this object's); ask the object's owner for it again",
    )
}

/// Whether process `pid` holds the only reference to `allocation`.
fn only_holder(allocation: &Allocation, pid: u32) -> bool {
    allocation.holders.len() == 1 && allocation.holders.get(&pid) == Some(&1)
}

fn disk_error(what: &str, error: std::io::Error) -> Error {
    Error::new(
        ErrorCode::SharedMemoryLimited,
        format!("{what}: {error}; check the node's memory limits and --shared-memory-mb"),
    )
}

/// Allocation `id` is not live.
fn freed(id: u64) -> Error {
    Error::new(
        ErrorCode::GetOperationFailed,
        format!(
            "shared-memory object {id} was freed: its holders dropped every reference or left \
             the node"
        ),
    )
}

fn transfer_error(what: &str, id: u64, error: std::io::Error) -> Error {
    Error::new(
        ErrorCode::DatasystemFailed,
        format!("cannot {what} shared-memory object {id}: {error}"),
    )
}

impl SharedMemoryStore {
    /// A region of `capacity` bytes (0 disables shared memory: every create is 4202), without
    /// spilling.
    pub fn new(capacity: u64, pool_id: impl Into<String>) -> Result<SharedMemoryStore> {
        Self::with_spill(capacity, pool_id, None)
    }

    /// A region of `capacity` bytes whose idle objects may be spilled to `spill`.
    pub fn with_spill(
        capacity: u64,
        pool_id: impl Into<String>,
        spill: Option<SpillStore>,
    ) -> Result<SharedMemoryStore> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"yr-objects".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(disk_error(
                "cannot create the node's shared memory",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a file descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let length = libc::off_t::try_from(capacity).map_err(|_| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("a shared memory of {capacity} bytes is too large"),
            )
        })?;
        // SAFETY: ftruncate on a valid fd with a non-negative length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), length) } != 0 {
            return Err(disk_error(
                &format!("cannot size the node's shared memory to {capacity} bytes"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(SharedMemoryStore {
            file: std::fs::File::from(fd),
            capacity,
            pool_id: pool_id.into(),
            allocator: Mutex::new(Allocator::new(capacity)),
            spill,
            clients: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// The spill directory, if objects may be spilled.
    pub fn spill_store(&self) -> Option<&SpillStore> {
        self.spill.as_ref().filter(|spill| spill.enabled())
    }

    /// The region as a file, to copy objects to and from disk.
    fn region_file(&self) -> &std::fs::File {
        &self.file
    }

    /// Move allocation `id`, which process `pid` holds alone and knows as object `object`, to
    /// disk and free its range: the process gives up its mapping of it. Returns false (and does
    /// nothing) if spilling is off or another reference exists; 4203/4204/4201 if the disk
    /// refuses it (the allocation then stays).
    pub fn spill(&self, id: u64, object: ObjectId, pid: u32) -> Result<bool> {
        let Some(spill) = self.spill_store() else {
            return Ok(false);
        };
        let (offset, size) = match self.allocator.lock().allocations.get(&id) {
            Some(allocation) if only_holder(allocation, pid) => {
                (allocation.offset, allocation.size)
            }
            _ => return Ok(false),
        };
        // Written outside the lock: the holder does not touch the range meanwhile, and a reader
        // that retains it in between keeps it (the copy on disk is dropped below).
        spill.write(object, self.region_file(), offset, size, pid)?;
        let mut allocator = self.allocator.lock();
        let alone = allocator
            .allocations
            .get(&id)
            .is_some_and(|allocation| only_holder(allocation, pid));
        if !alone {
            drop(allocator);
            spill.remove(object);
            return Ok(false);
        }
        Self::free(&mut allocator, id);
        Ok(true)
    }

    /// The processes other than `asking` that alone hold allocations which could be spilled,
    /// with the bytes they alone hold, most bytes first (ties by pid, so the order is stable).
    /// Empty when spilling is off. References the node keeps itself while it sends an object to
    /// another node ([`TRANSFER_HOLDER`]) are never counted: no process can give them up.
    pub fn spill_candidates(&self, asking: u32) -> Vec<(u32, u64)> {
        if self.spill_store().is_none() {
            return Vec::new();
        }
        let mut alone: HashMap<u32, u64> = HashMap::new();
        for allocation in self.allocator.lock().allocations.values() {
            let Some((&pid, _)) = allocation.holders.iter().next() else {
                continue;
            };
            if pid != asking && pid != TRANSFER_HOLDER && only_holder(allocation, pid) {
                *alone.entry(pid).or_default() += allocation.size;
            }
        }
        let mut candidates: Vec<(u32, u64)> = alone.into_iter().collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        candidates
    }

    /// Bring spilled object `object` back into a new allocation held by process `pid`: its
    /// allocation id, offset and size. 4202 if it does not fit now (the caller spills others
    /// and asks again); its copy on disk goes once it is back.
    pub fn restore(&self, object: ObjectId, pid: u32) -> Result<(u64, u64, u64)> {
        let Some(spill) = self.spill.as_ref() else {
            return Err(not_spilled(object, std::path::Path::new("(none)")));
        };
        let Some(spilled) = spill.get(object) else {
            return Err(not_spilled(object, spill.dir()));
        };
        let (id, offset) = self.create(spilled.size, pid)?;
        let read = spill.read_into(object, self.region_file(), offset);
        if let Err(error) = read {
            self.release(&[id], pid);
            return Err(error);
        }
        spill.remove(object);
        Ok((id, offset, spilled.size))
    }

    /// Drop spilled object `object` of process `pid`: its owner freed it.
    pub fn delete_spilled(&self, object: ObjectId, pid: u32) {
        if let Some(spill) = &self.spill {
            spill.remove_held(object, pid);
        }
    }

    /// The path another process of this machine opens to map the region.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd())
    }

    /// The region's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Names the region; processes with the same pool id share it.
    pub fn pool_id(&self) -> &str {
        &self.pool_id
    }

    /// Reserve `size` bytes with one reference held by process `pid`. Returns the
    /// allocation's id and offset.
    pub fn create(&self, size: u64, pid: u32) -> Result<(u64, u64)> {
        if size > self.capacity {
            return Err(Error::new(
                ErrorCode::SharedMemoryLimited,
                format!(
                    "an object of {size} bytes does not fit in the node's shared memory of {} \
                     bytes; start the node with a larger --shared-memory-mb or split the object",
                    self.capacity
                ),
            ));
        }
        let reserved = size.max(1).div_ceil(ALIGNMENT) * ALIGNMENT;
        let mut allocator = self.allocator.lock();
        let Some(offset) = allocator.take(reserved) else {
            return Err(Error::new(
                ErrorCode::SharedMemoryLimited,
                format!(
                    "the node's shared memory is full: an object of {size} bytes does not fit, \
                     {} of {} bytes are in use by {} objects; drop references to objects you no \
                     longer need or start the node with a larger --shared-memory-mb",
                    allocator.used,
                    self.capacity,
                    allocator.allocations.len()
                ),
            ));
        };
        let capability = match allocator.capabilities.draw() {
            Ok(capability) => capability,
            Err(error) => {
                allocator.give_back(offset, reserved);
                return Err(Error::new(
                    ErrorCode::DatasystemFailed,
                    format!(
                        "cannot draw a random capability for a new shared-memory object:                          {error}; check that the kernel's random source works"
                    ),
                ));
            }
        };
        let id = allocator.next_id;
        allocator.next_id += 1;
        allocator.used += reserved;
        allocator.allocations.insert(
            id,
            Allocation {
                offset,
                size,
                reserved,
                holders: HashMap::from([(pid, 1)]),
                capability,
            },
        );
        Ok((id, offset))
    }

    /// The capability of allocation `id` (4005 if it was freed).
    pub fn capability_of(&self, id: u64) -> Result<Capability> {
        let allocator = self.allocator.lock();
        allocator
            .allocations
            .get(&id)
            .map(|allocation| allocation.capability)
            .ok_or_else(|| freed(id))
    }

    /// Add a reference held by `holder` to allocation `id` for a reader that presents
    /// `capability` and expects `size` bytes (another node's pull). Returns the offset. A
    /// freed object, a wrong capability and a wrong size are the same [`no_such_object`].
    pub fn retain_presented(
        &self,
        id: u64,
        presented: &[u8],
        size: u64,
        holder: u32,
    ) -> Result<u64> {
        let mut allocator = self.allocator.lock();
        match allocator.allocations.get_mut(&id) {
            Some(allocation)
                if capability::matches(&allocation.capability, presented)
                    && allocation.size == size =>
            {
                *allocation.holders.entry(holder).or_default() += 1;
                Ok(allocation.offset)
            }
            _ => Err(no_such_object()),
        }
    }

    /// Process `pid` of this node talks to the store (it connected on the node's socket):
    /// objects may be handed over to it until it leaves ([`Self::release_process`]).
    pub fn note_client(&self, pid: u32) {
        self.clients.lock().insert(pid);
    }

    /// Add a reference held by process `pid` to an allocation. Returns its offset and size.
    pub fn retain(&self, id: u64, pid: u32) -> Result<(u64, u64)> {
        let mut allocator = self.allocator.lock();
        match allocator.allocations.get_mut(&id) {
            Some(allocation) => {
                *allocation.holders.entry(pid).or_default() += 1;
                Ok((allocation.offset, allocation.size))
            }
            None => Err(Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "shared-memory object {id} was freed: its owner dropped every reference; \
                     keep a reference to the object while others read it"
                ),
            )),
        }
    }

    /// Add a reference to an allocation for process `receiver`, taken by process `giver`, which
    /// holds the object and hands it over (a call's result). Refused (4005) unless `receiver`
    /// is a process of this node that talks to the store and has not left ([`Self::note_client`]):
    /// its references would never be given back. Refused (1001) if `giver` holds no reference:
    /// nobody pins another's object for a third process. Returns the offset and size.
    pub fn retain_for(&self, id: u64, receiver: u32, giver: u32) -> Result<(u64, u64)> {
        if !self.clients.lock().contains(&receiver) {
            return Err(Error::new(
                ErrorCode::GetOperationFailed,
                format!(
                    "process {receiver} is not a process of this node that uses its shared \
                     memory (it left the node, or never connected); shared-memory object {id} \
                     cannot be handed over to it"
                ),
            ));
        }
        let mut allocator = self.allocator.lock();
        match allocator.allocations.get_mut(&id) {
            Some(allocation) if allocation.holders.contains_key(&giver) => {
                *allocation.holders.entry(receiver).or_default() += 1;
                Ok((allocation.offset, allocation.size))
            }
            Some(_) => Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "process {giver} holds no reference to shared-memory object {id}; only a \
                     process that holds an object hands it over"
                ),
            )),
            None => Err(freed(id)),
        }
    }

    /// Drop a reference of process `pid` to each allocation; those left with none are freed.
    /// Unknown ids and references the process does not hold are ignored (a release may race
    /// with the node forgetting a departed process's references).
    pub fn release(&self, ids: &[u64], pid: u32) {
        let mut allocator = self.allocator.lock();
        for id in ids {
            let Some(allocation) = allocator.allocations.get_mut(id) else {
                continue;
            };
            let Some(count) = allocation.holders.get_mut(&pid) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                allocation.holders.remove(&pid);
            }
            if allocation.holders.is_empty() {
                Self::free(&mut allocator, *id);
            }
        }
    }

    /// Drop every reference process `pid` holds: it left the node.
    pub fn release_process(&self, pid: u32) {
        self.clients.lock().remove(&pid);
        let mut allocator = self.allocator.lock();
        let mut emptied = Vec::new();
        for (id, allocation) in allocator.allocations.iter_mut() {
            if allocation.holders.remove(&pid).is_some() && allocation.holders.is_empty() {
                emptied.push(*id);
            }
        }
        if !emptied.is_empty() {
            tracing::debug!(
                pid,
                objects = emptied.len(),
                "freed the shared memory of a departed process"
            );
        }
        for id in emptied {
            Self::free(&mut allocator, id);
        }
        drop(allocator);
        if let Some(spill) = &self.spill {
            spill.release_process(pid);
        }
    }

    fn free(allocator: &mut Allocator, id: u64) {
        let Some(allocation) = allocator.allocations.remove(&id) else {
            return;
        };
        allocator.used -= allocation.reserved;
        allocator.give_back(allocation.offset, allocation.reserved);
        allocator.freed_since_reclaim = Some(std::time::Instant::now());
    }

    /// Give the pages of free ranges back to the kernel if no object was freed for
    /// [`RECLAIM_AFTER`]. Returns whether it did. The node calls this periodically.
    pub fn reclaim_idle(&self) -> bool {
        let mut allocator = self.allocator.lock();
        let idle = allocator
            .freed_since_reclaim
            .is_some_and(|freed| freed.elapsed() >= RECLAIM_AFTER);
        if !idle {
            return false;
        }
        allocator.freed_since_reclaim = None;
        // Under the lock, so no free range is handed out while its pages go.
        for (&offset, &length) in &allocator.free {
            self.punch_hole(offset, length);
        }
        true
    }

    /// Give a freed range's pages back to the kernel.
    fn punch_hole(&self, offset: u64, length: u64) {
        let (Ok(offset), Ok(length)) =
            (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return;
        };
        // SAFETY: fallocate on a valid fd; punching a hole only drops the range's pages.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
        };
        if punched != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot give freed shared memory back to the kernel"
            );
        }
    }

    /// Bytes of the region the kernel holds in memory now (pages written and not freed).
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: fstat on a valid fd into a zeroed struct.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.file.as_raw_fd(), &mut stat) } != 0 {
            return 0;
        }
        u64::try_from(stat.st_blocks).unwrap_or(0) * 512
    }

    /// Where allocation `id` lies and how large it is, if it is live.
    fn bounds(&self, id: u64) -> Result<(u64, u64)> {
        let allocator = self.allocator.lock();
        allocator
            .allocations
            .get(&id)
            .map(|a| (a.offset, a.size))
            .ok_or_else(|| {
                Error::new(
                    ErrorCode::GetOperationFailed,
                    format!(
                        "shared-memory object {id} was freed: its holders dropped every reference \
                         or left the node"
                    ),
                )
            })
    }

    /// The size of allocation `id`, if it is live (4005 if not).
    pub fn size_of(&self, id: u64) -> Result<u64> {
        self.bounds(id).map(|(_, size)| size)
    }

    /// Whether allocation `id` is live.
    pub fn holds(&self, id: u64) -> bool {
        self.allocator.lock().allocations.contains_key(&id)
    }

    /// Copy bytes of allocation `id`, from `from` on, into `buffer`. The caller holds a
    /// reference, so the range stays allocated while it reads.
    pub fn read_at(&self, id: u64, from: u64, buffer: &mut [u8]) -> Result<()> {
        let (offset, size) = self.bounds(id)?;
        self.check_range(id, from, buffer.len(), size)?;
        self.file
            .read_exact_at(buffer, offset + from)
            .map_err(|error| transfer_error("read", id, error))
    }

    /// Copy `data` into allocation `id`, from `from` on. The caller holds a reference.
    pub fn write_at(&self, id: u64, from: u64, data: &[u8]) -> Result<()> {
        let (offset, size) = self.bounds(id)?;
        self.check_range(id, from, data.len(), size)?;
        self.file
            .write_all_at(data, offset + from)
            .map_err(|error| transfer_error("write", id, error))
    }

    /// The region's file and the file offset of bytes `from..from + length` of allocation
    /// `id`, for a transfer that moves them with `sendfile` or `splice` (see `data_port`). The
    /// caller holds a reference, so the range stays allocated while it is used.
    pub fn file_range(&self, id: u64, from: u64, length: u64) -> Result<(BorrowedFd<'_>, u64)> {
        let (offset, size) = self.bounds(id)?;
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        self.check_range(id, from, length, size)?;
        Ok((self.file.as_fd(), offset + from))
    }

    fn check_range(&self, id: u64, from: u64, length: usize, size: u64) -> Result<()> {
        if from.saturating_add(length as u64) > size {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!(
                    "bytes {from}..{} are outside shared-memory object {id} of {size} bytes",
                    from.saturating_add(length as u64)
                ),
            ));
        }
        Ok(())
    }

    /// What the store holds.
    pub fn stats(&self) -> SharedMemoryStats {
        let spilled = self
            .spill
            .as_ref()
            .map(SpillStore::stats)
            .unwrap_or_default();
        let allocator = self.allocator.lock();
        SharedMemoryStats {
            capacity: self.capacity,
            used: allocator.used,
            objects: allocator.allocations.len(),
            spilled_bytes: spilled.bytes,
            spilled_objects: spilled.objects,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_larger_than_the_region_is_4202_with_both_sizes() {
        let store = SharedMemoryStore::new(1 << 20, "test").unwrap();
        let error = store.create(2 << 20, 1).unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert!(error.message().contains(&(2u64 << 20).to_string()));
        assert!(error.message().contains(&(1u64 << 20).to_string()));
    }

    #[test]
    fn a_full_region_is_4202_and_freed_space_is_reused() {
        let store = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        let (a, _) = store.create(2 * ALIGNMENT, 1).unwrap();
        let (b, _) = store.create(2 * ALIGNMENT, 1).unwrap();
        let error = store.create(1, 1).unwrap_err();
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
        assert!(error.message().contains("full"));
        store.release(&[a], 1);
        let (_, offset) = store.create(ALIGNMENT + 1, 1).unwrap();
        assert_eq!(offset, 0);
        store.release(&[b], 1);
        assert_eq!(store.stats().objects, 1);
    }

    #[test]
    fn freed_neighbours_merge_into_one_range() {
        let store = SharedMemoryStore::new(3 * ALIGNMENT, "test").unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|_| store.create(ALIGNMENT, 1).unwrap().0)
            .collect();
        store.release(&[ids[0]], 1);
        store.release(&[ids[2]], 1);
        store.release(&[ids[1]], 1);
        assert_eq!(store.stats().used, 0);
        assert_eq!(store.create(3 * ALIGNMENT, 1).unwrap().1, 0);
    }

    #[test]
    fn an_allocation_lives_until_its_last_reference_is_released() {
        let store = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        let (id, offset) = store.create(100, 1).unwrap();
        assert_eq!(store.retain(id, 2).unwrap(), (offset, 100));
        store.release(&[id], 1);
        // A process cannot release a reference it does not hold.
        store.release(&[id], 1);
        assert_eq!(store.stats().objects, 1);
        store.release(&[id], 2);
        assert_eq!(store.stats().objects, 0);
        assert_eq!(
            store.retain(id, 2).unwrap_err().code(),
            ErrorCode::GetOperationFailed
        );
    }

    #[test]
    fn an_object_is_handed_over_to_a_live_process_but_not_to_a_departed_one() {
        let store = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        store.note_client(1);
        store.note_client(2);
        let (id, offset) = store.create(100, 1).unwrap();
        // Process 1 hands the object to process 2, then drops its own reference.
        assert_eq!(store.retain_for(id, 2, 1).unwrap(), (offset, 100));
        store.release(&[id], 1);
        assert_eq!(store.stats().objects, 1);
        store.release(&[id], 2);
        assert_eq!(store.stats().objects, 0);

        let (id, _) = store.create(100, 1).unwrap();
        store.note_client(3);
        store.release_process(3);
        let refused = store.retain_for(id, 3, 1).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::GetOperationFailed);
        assert!(refused.message().contains("left the node"), "{refused}");
        // A process that never connected gets nothing either.
        let stranger = store.retain_for(id, 4242, 1).unwrap_err();
        assert_eq!(stranger.code(), ErrorCode::GetOperationFailed);
        // Nor does a process hand over what it does not hold.
        let not_held = store.retain_for(id, 2, 2).unwrap_err();
        assert_eq!(not_held.code(), ErrorCode::ParamInvalid, "{not_held}");
        store.release(&[id], 1);
        assert_eq!(
            store.stats().objects,
            0,
            "a refused hand-over holds nothing"
        );
    }

    #[test]
    fn a_read_from_another_node_needs_the_capability_and_size_and_learns_nothing_else() {
        let store = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        let (id, offset) = store.create(100, 1).unwrap();
        let capability = store.capability_of(id).unwrap();
        let (other, _) = store.create(100, 1).unwrap();
        assert_ne!(store.capability_of(other).unwrap(), capability);
        let mut wrong = capability;
        wrong[0] ^= 0x80;
        let answers = [
            store.retain_presented(id, &wrong, 100, 0).unwrap_err(),
            store.retain_presented(id, &capability, 99, 0).unwrap_err(),
            store
                .retain_presented(id, &capability[..8], 100, 0)
                .unwrap_err(),
            store.retain_presented(99, &capability, 100, 0).unwrap_err(),
        ];
        for answer in &answers {
            assert_eq!(answer.to_string(), answers[0].to_string());
            assert_eq!(answer.code(), ErrorCode::GetOperationFailed);
            assert!(!answer.message().contains("100"), "{answer}");
        }
        assert_eq!(
            store.retain_presented(id, &capability, 100, 0).unwrap(),
            offset
        );
        store.release(&[id], 0);
        store.release(&[id, other], 1);
        assert_eq!(store.stats().objects, 0);
    }

    #[test]
    fn a_departed_process_gives_back_every_reference_it_held() {
        let store = SharedMemoryStore::new(8 * ALIGNMENT, "test").unwrap();
        let (own, _) = store.create(ALIGNMENT, 7).unwrap();
        let (shared, _) = store.create(ALIGNMENT, 8).unwrap();
        store.retain(shared, 7).unwrap();
        store.release_process(7);
        assert_eq!(store.stats().objects, 1);
        assert!(store.retain(own, 8).is_err());
        store.release(&[shared], 8);
        assert_eq!(store.stats().objects, 0);
    }

    #[test]
    fn freed_pages_go_back_to_the_kernel() {
        let store = SharedMemoryStore::new(64 * ALIGNMENT, "test").unwrap();
        let (id, offset) = store.create(32 * ALIGNMENT, 1).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(store.path())
            .unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&vec![7u8; 32 * ALIGNMENT as usize], offset)
            .unwrap();
        assert!(store.resident_bytes() >= 32 * ALIGNMENT);
        store.release(&[id], 1);
        // Kept warm for reuse at first, then given back.
        assert!(store.resident_bytes() >= 32 * ALIGNMENT);
        assert!(!store.reclaim_idle());
        std::thread::sleep(RECLAIM_AFTER);
        assert!(store.reclaim_idle());
        assert_eq!(store.resident_bytes(), 0);
    }

    fn spilling_store(capacity: u64, limit: u64) -> (SharedMemoryStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "yr-shm-spill-{}-{}",
            std::process::id(),
            yr_common::ids::random_hex(6)
        ));
        let spill = SpillStore::open(dir.clone(), Some(limit));
        (
            SharedMemoryStore::with_spill(capacity, "test", Some(spill)).unwrap(),
            dir,
        )
    }

    fn write(store: &SharedMemoryStore, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        store.region_file().write_all_at(bytes, offset).unwrap();
    }

    fn read(store: &SharedMemoryStore, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; len];
        store.region_file().read_exact_at(&mut out, offset).unwrap();
        out
    }

    #[test]
    fn a_spilled_object_frees_its_range_and_comes_back_intact() {
        let (store, dir) = spilling_store(2 * ALIGNMENT, 1 << 20);
        let object = ObjectId::generate();
        let (id, offset) = store.create(2 * ALIGNMENT, 1).unwrap();
        let data: Vec<u8> = (0..2 * ALIGNMENT).map(|i| (i % 253) as u8).collect();
        write(&store, offset, &data);
        assert!(store.spill(id, object, 1).unwrap());
        let stats = store.stats();
        assert_eq!((stats.used, stats.objects), (0, 0));
        assert_eq!(
            (stats.spilled_bytes, stats.spilled_objects),
            (2 * ALIGNMENT, 1)
        );
        assert!(dir.join(format!("{object}.obj")).exists());
        // The freed range serves another object; the spilled one cannot come back meanwhile.
        let (other, _) = store.create(ALIGNMENT, 2).unwrap();
        assert_eq!(
            store.restore(object, 1).unwrap_err().code(),
            ErrorCode::SharedMemoryLimited
        );
        assert_eq!(store.stats().spilled_objects, 1);
        store.release(&[other], 2);
        let (back, offset, size) = store.restore(object, 1).unwrap();
        assert_eq!(size, 2 * ALIGNMENT);
        assert_eq!(read(&store, offset, size as usize), data);
        assert_eq!(store.stats().spilled_objects, 0);
        assert!(!dir.join(format!("{object}.obj")).exists());
        store.release(&[back], 1);
        assert_eq!(store.stats().objects, 0);
    }

    #[test]
    fn only_an_allocation_its_owner_alone_holds_is_spilled() {
        let (store, _dir) = spilling_store(4 * ALIGNMENT, 1 << 20);
        let (id, _) = store.create(ALIGNMENT, 1).unwrap();
        store.retain(id, 2).unwrap();
        assert!(!store.spill(id, ObjectId::generate(), 1).unwrap());
        assert!(!store.spill(id, ObjectId::generate(), 2).unwrap());
        store.release(&[id], 2);
        assert!(store.spill(id, ObjectId::generate(), 1).unwrap());
        // Without a spill directory nothing is spilled.
        let plain = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        let (id, _) = plain.create(ALIGNMENT, 1).unwrap();
        assert!(!plain.spill(id, ObjectId::generate(), 1).unwrap());
    }

    #[test]
    fn a_failed_spill_keeps_the_object_in_memory() {
        let (store, _dir) = spilling_store(4 * ALIGNMENT, ALIGNMENT);
        let (id, _) = store.create(2 * ALIGNMENT, 1).unwrap();
        let error = store.spill(id, ObjectId::generate(), 1).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace);
        assert_eq!(store.stats().objects, 1);
        assert_eq!(store.stats().spilled_objects, 0);
    }

    #[test]
    fn spilled_objects_go_with_their_holder_or_when_deleted() {
        let (store, dir) = spilling_store(4 * ALIGNMENT, 1 << 20);
        let (a, b) = (ObjectId::generate(), ObjectId::generate());
        let (first, _) = store.create(ALIGNMENT, 1).unwrap();
        let (second, _) = store.create(ALIGNMENT, 1).unwrap();
        assert!(store.spill(first, a, 1).unwrap());
        assert!(store.spill(second, b, 1).unwrap());
        store.delete_spilled(a, 2);
        assert_eq!(store.stats().spilled_objects, 2, "only the holder deletes");
        store.delete_spilled(a, 1);
        assert_eq!(store.stats().spilled_objects, 1);
        store.release_process(1);
        assert_eq!(store.stats().spilled_objects, 0);
        let left = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".obj"))
            })
            .count();
        assert_eq!(left, 0);
    }

    #[test]
    fn a_store_reopened_on_the_same_directory_restores_by_object_id() {
        let dir = std::env::temp_dir().join(format!(
            "yr-shm-restart-{}-{}",
            std::process::id(),
            yr_common::ids::random_hex(6)
        ));
        let object = ObjectId::generate();
        let data = vec![42u8; 3 * ALIGNMENT as usize];
        {
            let spill = SpillStore::open(dir.clone(), Some(1 << 20));
            let store = SharedMemoryStore::with_spill(4 * ALIGNMENT, "a", Some(spill)).unwrap();
            let (id, offset) = store.create(data.len() as u64, 1).unwrap();
            write(&store, offset, &data);
            assert!(store.spill(id, object, 1).unwrap());
        }
        let spill = SpillStore::open(dir, Some(1 << 20));
        let store = SharedMemoryStore::with_spill(4 * ALIGNMENT, "b", Some(spill)).unwrap();
        assert_eq!(store.stats().spilled_objects, 1);
        let (_, offset, size) = store.restore(object, 9).unwrap();
        assert_eq!(read(&store, offset, size as usize), data);
    }
}
