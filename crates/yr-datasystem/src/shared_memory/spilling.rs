//! Spilling idle objects to the node's [`SpillStore`]: which allocations may go (one that the
//! asking process alone holds), moving one to disk and freeing its range, choosing the
//! processes to ask when the region is full, restoring a spilled object into a new allocation,
//! and dropping a spilled object its owner freed.

use std::collections::HashMap;

use yr_common::{ObjectId, Result};

use crate::data_port::TRANSFER_HOLDER;
use crate::spill::{not_spilled, SpillStore};

use super::allocator::only_holder;
use super::SharedMemoryStore;

impl SharedMemoryStore {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_memory::ALIGNMENT;
    use yr_common::ErrorCode;

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
