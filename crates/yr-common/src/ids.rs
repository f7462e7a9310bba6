//! Ids: objects, requests, instances and jobs. An object id is 16 bytes: 8 bytes that are random
//! per process and 8 bytes of a per-process counter, so ids made by different drivers and
//! runtimes never collide and making one costs an atomic increment.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The id of an object: a value produced by `put` or by a call.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(u128);

impl ObjectId {
    /// A new id, unique across processes.
    pub fn generate() -> ObjectId {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        let sequence = COUNTER.fetch_add(1, Ordering::Relaxed);
        ObjectId((u128::from(process_salt()) << 64) | u128::from(sequence))
    }

    /// The id's 16 bytes, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id with these 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> ObjectId {
        ObjectId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// 64 bits that differ between processes: time, pid and an address mixed by splitmix64.
fn process_salt() -> u64 {
    static SALT: OnceLock<u64> = OnceLock::new();
    *SALT.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        let address = &local as *const u8 as u64;
        splitmix64(nanos ^ (u64::from(std::process::id()) << 32) ^ address)
    })
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A short random hex string, for generated instance and job ids.
pub fn random_hex(len: usize) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let word = splitmix64(ObjectId::generate().0 as u64 ^ process_salt());
        out.push_str(&format!("{word:016x}"));
    }
    out.truncate(len);
    out
}
