//! The first-fit allocator of the region: free ranges by offset (merged when neighbours are
//! freed), the live allocations with their references and capabilities, and the bytes in use.

use std::collections::{BTreeMap, HashMap};

use crate::capability::{Capability, CapabilitySource};

/// One allocation: where it lies and how many references keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Allocation {
    pub(super) offset: u64,
    /// The size asked for.
    pub(super) size: u64,
    /// The size taken from the region (`size` rounded up to the alignment).
    pub(super) reserved: u64,
    /// References by the process holding them.
    pub(super) holders: HashMap<u32, u32>,
    /// What another node presents to read it.
    pub(super) capability: Capability,
}

#[derive(Debug, Default)]
pub(super) struct Allocator {
    /// Free ranges by offset, never adjacent (they are merged).
    pub(super) free: BTreeMap<u64, u64>,
    pub(super) allocations: HashMap<u64, Allocation>,
    pub(super) next_id: u64,
    pub(super) used: u64,
    /// When an object was last freed, if its pages were not given back since.
    pub(super) freed_since_reclaim: Option<std::time::Instant>,
    pub(super) capabilities: CapabilitySource,
}

impl Allocator {
    pub(super) fn new(capacity: u64) -> Allocator {
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
    pub(super) fn take(&mut self, reserved: u64) -> Option<u64> {
        let (&offset, &length) = self.free.iter().find(|(_, &length)| length >= reserved)?;
        self.free.remove(&offset);
        if length > reserved {
            self.free.insert(offset + reserved, length - reserved);
        }
        Some(offset)
    }

    /// Give `[offset, offset + length)` back, merged with its free neighbours.
    pub(super) fn give_back(&mut self, mut offset: u64, mut length: u64) {
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

/// Whether process `pid` holds the only reference to `allocation`.
pub(super) fn only_holder(allocation: &Allocation, pid: u32) -> bool {
    allocation.holders.len() == 1 && allocation.holders.get(&pid) == Some(&1)
}
