//! A record's framing on disk: the CRC-32 of the header and the payload, framing a payload,
//! and parsing one record back (whole, torn at the end of a file, or corrupt).

use super::*;

/// CRC-32 (IEEE 802.3, the zlib/`crc32fast` polynomial). Also checks the data worker's spill
/// log records.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Frames `payload` as one record.
pub(super) fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32(&len).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What parsing one record found.
pub(super) enum Parsed<'a> {
    Record {
        payload: &'a [u8],
        next: usize,
    },
    End,
    /// The file ends in the middle of a record, or in zeros: a torn final write.
    Torn(String),
    Corrupt(String),
}

pub(super) fn parse_record(data: &[u8], offset: usize) -> Parsed<'_> {
    let rest = &data[offset..];
    if rest.is_empty() {
        return Parsed::End;
    }
    if rest.iter().all(|&b| b == 0) {
        return Parsed::Torn(format!("{} zero bytes", rest.len()));
    }
    if rest.len() < HEADER_LEN {
        return Parsed::Torn(format!("a {}-byte partial header", rest.len()));
    }
    let len_bytes: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
    let header_crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let payload_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
    if crc32(&len_bytes) != header_crc {
        return Parsed::Corrupt("record header checksum mismatch".to_string());
    }
    let len = u32::from_le_bytes(len_bytes);
    if len > MAX_RECORD_LEN {
        return Parsed::Corrupt(format!("record length {len} is too large"));
    }
    let end = HEADER_LEN + len as usize;
    if rest.len() < end {
        return Parsed::Torn(format!(
            "a record of {len} bytes with only {} present",
            rest.len() - HEADER_LEN
        ));
    }
    let payload = &rest[HEADER_LEN..end];
    if crc32(payload) != payload_crc {
        // A torn write leaves a bad final record; damage followed by more data is corruption.
        if rest[end..].iter().all(|&b| b == 0) {
            return Parsed::Torn("a final record with a bad checksum".to_string());
        }
        return Parsed::Corrupt("record checksum mismatch".to_string());
    }
    Parsed::Record {
        payload,
        next: offset + end,
    }
}
