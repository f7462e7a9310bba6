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

mod access;
mod allocator;
mod reclaim;
mod references;
mod spilling;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, Result};

use crate::spill::SpillStore;

use allocator::Allocator;

/// Allocations start on page boundaries, so freeing one can give its pages back.
pub const ALIGNMENT: u64 = 4096;

/// Freed pages go back to the kernel once no object was freed for this long.
pub const RECLAIM_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

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
    /// Allocations the node holds for owners on other nodes (call results not pulled yet),
    /// oldest first, at most [`MAX_REMOTE_HOLDS`].
    remote_holds: Mutex<std::collections::VecDeque<u64>>,
}

/// The most results a node holds for owners on other nodes at once. A newer hold pushes out
/// the oldest one (its owner's get finds it gone: recomputed from its lineage, or 4005).
pub const MAX_REMOTE_HOLDS: usize = 4096;

/// The holder id under which a node keeps results for owners on other nodes (no process has
/// this pid).
pub const REMOTE_HOLDER: u32 = u32::MAX;

/// The answer to a read of an object that is not there, or not as presented: the same for a
/// wrong capability, a wrong size and a freed object, and naming neither id nor size.
pub fn no_such_object() -> Error {
    Error::new(
        ErrorCode::GetOperationFailed,
        "the node holds no object that matches this read (it was freed, or the location is \
         stale or not this object's); ask the object's owner for it again",
    )
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
            remote_holds: Mutex::new(std::collections::VecDeque::new()),
        })
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
    fn a_node_keeps_at_most_its_bound_of_holds_for_other_nodes_and_pushes_out_the_oldest() {
        let store =
            SharedMemoryStore::new((MAX_REMOTE_HOLDS as u64 + 2) * ALIGNMENT, "test").unwrap();
        // Only a holder asks the node to keep an object.
        let (first, _) = store.create(1, 1).unwrap();
        assert_eq!(
            store.hold_for_remote(first, 2).unwrap_err().code(),
            ErrorCode::ParamInvalid
        );
        let mut held = Vec::new();
        for _ in 0..=MAX_REMOTE_HOLDS {
            let (id, _) = store.create(1, 1).unwrap();
            store.hold_for_remote(id, 1).unwrap();
            store.release(&[id], 1);
            held.push(id);
        }
        // One more than the bound: the oldest was pushed out and freed.
        assert_eq!(store.remote_holds(), MAX_REMOTE_HOLDS);
        assert!(!store.holds(held[0]));
        assert!(store.holds(held[1]));
        // A release needs the capability and the size; a second one changes nothing.
        let capability = store.capability_of(held[1]).unwrap();
        store.release_remote_hold(held[1], &capability, 2);
        assert!(store.holds(held[1]));
        store.release_remote_hold(held[1], &capability, 1);
        assert!(!store.holds(held[1]));
        store.release_remote_hold(held[1], &capability, 1);
        assert_eq!(store.remote_holds(), MAX_REMOTE_HOLDS - 1);
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
}
