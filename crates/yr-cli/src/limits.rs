//! The node's resource flags checked against the host before anything starts: shared memory
//! cannot exceed the host's physical memory (nor `--memory`), the spill limit cannot exceed
//! the disk, and no figure may overflow when it is converted (MB to bytes, millicores to the
//! signed deltas the node reports). `--cpu` and `--memory` are logical amounts and may exceed
//! the host (benchmarks start nodes with `--cpu 1000000 --memory 500000`).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::daemon::{physical_memory_mb, CapacityArgs, DataArgs};

/// The largest `--cpu`, in millicores (a billion cores): sums and signed deltas stay exact.
pub const MAX_CPU_MILLICORES: u64 = 1_000_000_000_000;
/// The largest `--memory` in MB: 2^43 MB is 2^63 bytes, so a byte count still fits.
pub const MAX_MEMORY_MB: u64 = 1 << 43;
/// The largest MB figure whose byte count fits in a u64.
pub const MAX_BYTES_MB: u64 = u64::MAX >> 20;

/// Check the flags of `yr start` and `yr node`. `session_dir` is where the node keeps its data
/// by default (for the disk that the spill limit is checked against).
pub fn check(capacity: &CapacityArgs, data: &DataArgs, session_dir: &Path) -> anyhow::Result<()> {
    if let Some(cpu) = capacity.cpu {
        if cpu > MAX_CPU_MILLICORES {
            bail!(
                "--cpu {cpu} is too large: it counts millicores (1000 per core), at most \
                 {MAX_CPU_MILLICORES}; this host has {} cores",
                host_cores()
            );
        }
    }
    if let Some(memory) = capacity.memory {
        if memory > MAX_MEMORY_MB {
            bail!(
                "--memory {memory} is too large: it counts MB, at most {MAX_MEMORY_MB}; this \
                 host has {} MB of physical memory",
                physical_memory_mb()
            );
        }
    }
    if let Some(shared) = data.shared_memory_mb {
        let physical = physical_memory_mb();
        if shared > physical {
            bail!(
                "--shared-memory-mb {shared} exceeds this host's physical memory ({physical} \
                 MB); give at most {physical}"
            );
        }
        if let Some(memory) = capacity.memory {
            if shared > memory {
                bail!(
                    "--shared-memory-mb {shared} exceeds the node's --memory {memory}; shared \
                     memory is part of the node's memory, give at most {memory}"
                );
            }
        }
    }
    if let Some(limit) = data.spill_limit_mb {
        if limit > MAX_BYTES_MB {
            bail!("--spill-limit-mb {limit} is too large: at most {MAX_BYTES_MB} MB");
        }
        let spill_dir = data
            .spill_dir
            .clone()
            .or_else(|| data.data_dir.as_ref().map(|d| d.join("spill")))
            .unwrap_or_else(|| session_dir.join("data").join("spill"));
        if let Some((disk, mb)) = disk_size_mb(&spill_dir) {
            if limit > mb {
                bail!(
                    "--spill-limit-mb {limit} exceeds the size of the disk that holds {} ({} \
                     has {mb} MB); give at most {mb}, or 0 to turn spilling off",
                    spill_dir.display(),
                    disk.display()
                );
            }
        }
    }
    Ok(())
}

/// The node's shared memory in MB when `--shared-memory-mb` is not given: a third of its
/// memory, but no more than the host's physical memory (`--memory` may be a logical figure far
/// above it).
pub fn default_shared_memory_mb(memory_mb: u64) -> u64 {
    (memory_mb / 3).min(physical_memory_mb())
}

fn host_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The size in MB of the file system that holds `path` (or its nearest existing ancestor), and
/// that ancestor.
fn disk_size_mb(path: &Path) -> Option<(PathBuf, u64)> {
    let existing = path.ancestors().find(|p| p.exists())?.to_path_buf();
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let bytes = (stat.f_blocks as u128) * (stat.f_frsize as u128);
    Some((existing, (bytes >> 20).min(u128::from(u64::MAX)) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(cpu: Option<u64>, memory: Option<u64>) -> CapacityArgs {
        CapacityArgs {
            cpu,
            memory,
            resources: None,
            labels: Vec::new(),
        }
    }

    fn data(shared: Option<u64>, spill_limit: Option<u64>) -> DataArgs {
        DataArgs {
            data_dir: None,
            l2_redis: None,
            shared_memory_mb: shared,
            spill_dir: None,
            spill_limit_mb: spill_limit,
            kv_quota_mb: None,
        }
    }

    fn error(capacity: CapacityArgs, data: DataArgs) -> String {
        check(&capacity, &data, Path::new("/tmp"))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn logical_cpu_and_memory_above_the_host_are_allowed() {
        check(
            &capacity(Some(1_000_000), Some(500_000)),
            &data(None, None),
            Path::new("/tmp"),
        )
        .expect("benchmark figures");
    }

    #[test]
    fn shared_memory_above_the_host_or_the_node_memory_is_refused() {
        let message = error(capacity(None, None), data(Some(99_999_999_999), None));
        assert!(
            message.contains("--shared-memory-mb 99999999999")
                && message.contains(&physical_memory_mb().to_string()),
            "{message}"
        );
        let message = error(capacity(None, Some(100)), data(Some(200), None));
        assert!(message.contains("--memory 100"), "{message}");
        check(
            &capacity(None, Some(8_192)),
            &data(Some(64), Some(0)),
            Path::new("/tmp"),
        )
        .expect("small figures");
    }

    #[test]
    fn figures_that_overflow_are_refused() {
        let message = error(capacity(Some(u64::MAX), None), data(None, None));
        assert!(message.contains("--cpu 18446744073709551615"), "{message}");
        let message = error(capacity(None, Some(u64::MAX)), data(None, None));
        assert!(message.contains("--memory"), "{message}");
        let message = error(capacity(None, None), data(None, Some(u64::MAX)));
        assert!(message.contains("--spill-limit-mb"), "{message}");
        let message = error(capacity(None, None), data(None, Some(MAX_BYTES_MB)));
        assert!(
            message.contains("exceeds the size of the disk"),
            "{message}"
        );
    }

    #[test]
    fn the_default_shared_memory_stays_within_the_host() {
        assert_eq!(default_shared_memory_mb(300), 100);
        assert!(default_shared_memory_mb(u64::MAX) <= physical_memory_mb());
    }
}
