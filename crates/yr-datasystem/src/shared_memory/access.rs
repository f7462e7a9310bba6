//! Reading and writing objects in place: where a live allocation lies, checked ranges of it, and
//! copies to and from it (or the region's file and offset, for `sendfile` and `splice`).

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use yr_common::{Error, ErrorCode, Result};

use super::{transfer_error, SharedMemoryStore};

impl SharedMemoryStore {
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
}
