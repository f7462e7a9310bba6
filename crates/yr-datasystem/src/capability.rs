//! Object capabilities: 128 random bits given to each shared-memory allocation when it is
//! created. Another node reads an object from this node's data port only by presenting its
//! capability, which travels with the object's location (`SharedLocation.capability`) and is
//! never derived from anything a peer can see. Random bytes come from the kernel's `getrandom`
//! in batches (one system call per [`BATCH`] bytes), falling back to `/dev/urandom`.

use std::io::Read;

/// Bytes in a capability.
pub const CAPABILITY_LEN: usize = 16;

/// An allocation's capability.
pub type Capability = [u8; CAPABILITY_LEN];

/// Random bytes fetched from the kernel at once.
const BATCH: usize = 4096;

/// A buffer of random bytes from the kernel, handed out a capability at a time. Owned by the
/// store's allocator, under its lock.
pub struct CapabilitySource {
    buffer: Box<[u8; BATCH]>,
    /// Bytes of `buffer` already handed out (all of them: it must be refilled).
    used: usize,
}

impl std::fmt::Debug for CapabilitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapabilitySource(<secret>)")
    }
}

impl Default for CapabilitySource {
    fn default() -> CapabilitySource {
        CapabilitySource {
            buffer: Box::new([0u8; BATCH]),
            used: BATCH,
        }
    }
}

impl CapabilitySource {
    /// A new capability; an error only if the kernel gives no random bytes at all.
    pub fn draw(&mut self) -> std::io::Result<Capability> {
        if self.used + CAPABILITY_LEN > BATCH {
            fill_random(&mut self.buffer[..])?;
            self.used = 0;
        }
        let mut capability = [0u8; CAPABILITY_LEN];
        capability.copy_from_slice(&self.buffer[self.used..self.used + CAPABILITY_LEN]);
        // Handed-out bytes do not stay in memory longer than needed.
        self.buffer[self.used..self.used + CAPABILITY_LEN].fill(0);
        self.used += CAPABILITY_LEN;
        Ok(capability)
    }
}

/// Fill `buffer` with random bytes from the kernel.
fn fill_random(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got > 0 {
            filled += got as usize;
            continue;
        }
        let error = std::io::Error::last_os_error();
        match error.kind() {
            std::io::ErrorKind::Interrupted => continue,
            // A kernel without getrandom(2): the device gives the same bytes.
            _ => {
                return std::fs::File::open("/dev/urandom")
                    .and_then(|mut random| random.read_exact(&mut buffer[filled..]))
            }
        }
    }
    Ok(())
}

/// Whether `presented` is `expected`, compared in constant time.
pub fn matches(expected: &Capability, presented: &[u8]) -> bool {
    yr_common::auth::constant_time_eq(expected, presented)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_distinct_and_compare_exactly() {
        let mut source = CapabilitySource::default();
        let mut seen = std::collections::HashSet::new();
        // More than one batch.
        for _ in 0..2 * BATCH / CAPABILITY_LEN {
            let capability = source.draw().expect("random bytes");
            assert!(seen.insert(capability), "a capability repeated");
        }
        let capability = source.draw().expect("random bytes");
        assert!(matches(&capability, &capability));
        let mut other = capability;
        other[15] ^= 1;
        assert!(!matches(&capability, &other));
        assert!(!matches(&capability, &capability[..15]));
        assert!(!matches(&capability, &[]));
    }
}
