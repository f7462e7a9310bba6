//! Giving freed pages back to the kernel: hole punching once no object was freed for
//! [`RECLAIM_AFTER`], and the bytes the kernel holds for the region now.

use std::os::fd::AsRawFd;

use super::{SharedMemoryStore, RECLAIM_AFTER};

impl SharedMemoryStore {
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
}
