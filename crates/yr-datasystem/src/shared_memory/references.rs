//! Allocations and their references: creating an object, presenting its capability, retaining
//! and handing it over to the node's known processes, releasing references (one by one, or all
//! of a departed process), and freeing an allocation when its last reference goes.

use std::collections::HashMap;

use yr_common::{Error, ErrorCode, Result};

use crate::capability::{self, Capability};

use super::allocator::{Allocation, Allocator};
use super::{freed, no_such_object, SharedMemoryStore, ALIGNMENT, MAX_REMOTE_HOLDS, REMOTE_HOLDER};

impl SharedMemoryStore {
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

    /// Keep allocation `id` for an owner on another node (a call's result for a caller
    /// there), taken by process `giver`, which must hold it (1001 otherwise, 4005 if it was
    /// freed). The hold lasts until [`Self::release_remote_hold`], or until
    /// [`MAX_REMOTE_HOLDS`] newer holds push it out.
    pub fn hold_for_remote(&self, id: u64, giver: u32) -> Result<()> {
        {
            let mut allocator = self.allocator.lock();
            match allocator.allocations.get_mut(&id) {
                Some(allocation) if allocation.holders.contains_key(&giver) => {
                    *allocation.holders.entry(REMOTE_HOLDER).or_default() += 1;
                }
                Some(_) => {
                    return Err(Error::new(
                        ErrorCode::ParamInvalid,
                        format!(
                            "process {giver} holds no reference to shared-memory object {id}; \
                             only a process that holds an object asks the node to keep it"
                        ),
                    ))
                }
                None => return Err(freed(id)),
            }
        }
        let pushed_out = {
            let mut holds = self.remote_holds.lock();
            holds.push_back(id);
            if holds.len() > MAX_REMOTE_HOLDS {
                holds.pop_front()
            } else {
                None
            }
        };
        if let Some(oldest) = pushed_out {
            tracing::warn!(
                allocation = oldest,
                limit = MAX_REMOTE_HOLDS,
                "dropped the oldest result held for another node's owner: too many held"
            );
            self.release(&[oldest], REMOTE_HOLDER);
        }
        Ok(())
    }

    /// Drop the hold kept for another node's owner on allocation `id`, for a peer that
    /// presents its capability and size. Nothing happens if there is no such hold (it was
    /// pushed out, or dropped already), or the presentation does not match.
    pub fn release_remote_hold(&self, id: u64, presented: &[u8], size: u64) {
        let matches = {
            let allocator = self.allocator.lock();
            allocator.allocations.get(&id).is_some_and(|allocation| {
                capability::matches(&allocation.capability, presented) && allocation.size == size
            })
        };
        if !matches {
            return;
        }
        let held = {
            let mut holds = self.remote_holds.lock();
            match holds.iter().position(|held| *held == id) {
                Some(position) => holds.remove(position).is_some(),
                None => false,
            }
        };
        if held {
            self.release(&[id], REMOTE_HOLDER);
        }
    }

    /// How many results the node holds for owners on other nodes.
    pub fn remote_holds(&self) -> usize {
        self.remote_holds.lock().len()
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

    pub(super) fn free(allocator: &mut Allocator, id: u64) {
        let Some(allocation) = allocator.allocations.remove(&id) else {
            return;
        };
        allocator.used -= allocation.reserved;
        allocator.give_back(allocation.offset, allocation.reserved);
        allocator.freed_since_reclaim = Some(std::time::Instant::now());
    }
}
