//! The content key of an executable ([`binary_hash`]): a driver registers its binary under it,
//! and a node checks with it that the binary it runs is the driver's. Computing it reads the
//! whole file: blocking work, which async callers run on a blocking thread.

use std::collections::HashMap;

/// The content key of the executable at `path`: a 128-bit hash of its bytes and its length, so
/// that a node can tell whether its copy is the driver's and fetch the driver's otherwise. The
/// hash is fast, not cryptographic: nodes trust their cluster. Results are cached per path, size
/// and modification time.
pub fn binary_hash(path: &std::path::Path) -> String {
    /// (path, size, modification time) → content key.
    type Cache = HashMap<(std::path::PathBuf, u64, u128), String>;
    static CACHE: parking_lot::Mutex<Option<Cache>> = parking_lot::Mutex::new(None);
    let Ok(metadata) = std::fs::metadata(path) else {
        return String::new();
    };
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let key = (path.to_path_buf(), metadata.len(), modified);
    if let Some(hash) = CACHE.lock().get_or_insert_with(HashMap::new).get(&key) {
        return hash.clone();
    }
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let hash = content_hash(&bytes);
    CACHE
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(key, hash.clone());
    hash
}

fn content_hash(bytes: &[u8]) -> String {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    let (mut a, mut b) = (
        K1 ^ bytes.len() as u64,
        K2.rotate_left(17) ^ bytes.len() as u64,
    );
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        a = (a ^ word).wrapping_mul(K1).rotate_left(31);
        b = (b ^ word.rotate_left(23)).wrapping_mul(K2).rotate_left(29);
    }
    for &byte in chunks.remainder() {
        a = (a ^ u64::from(byte)).wrapping_mul(K1);
        b = (b ^ u64::from(byte)).wrapping_mul(K2);
    }
    let mix = |mut x: u64| {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    };
    format!(
        "{:016x}{:016x}-{:x}",
        mix(a ^ b.rotate_left(7)),
        mix(b ^ a),
        bytes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_content_and_a_missing_file_has_none() {
        let dir = std::env::temp_dir().join(format!("yr-binary-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        std::fs::write(&a, b"the same bytes").unwrap();
        std::fs::write(&b, b"the same bytes").unwrap();
        std::fs::write(&c, b"other bytes").unwrap();
        assert_eq!(binary_hash(&a), binary_hash(&b));
        assert_ne!(binary_hash(&a), binary_hash(&c));
        assert!(
            binary_hash(&a).ends_with("-e"),
            "the key ends with the length in hex"
        );
        assert_eq!(binary_hash(&dir.join("missing")), "");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
