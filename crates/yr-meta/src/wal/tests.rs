//! The log's framing: checksums, and records cut or damaged anywhere.

use super::*;

#[test]
fn crc32_matches_the_ieee_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn a_record_cut_anywhere_is_torn_and_damage_before_more_data_is_corrupt() {
    let one = frame(b"hello");
    let two = frame(b"world!");
    let mut data = one.clone();
    data.extend_from_slice(&two);
    match parse_record(&data, 0) {
        Parsed::Record { payload, next } => {
            assert_eq!(payload, b"hello");
            assert_eq!(next, one.len());
        }
        _ => panic!("expected a record"),
    }
    for cut in one.len() + 1..data.len() {
        assert!(
            matches!(parse_record(&data[..cut], one.len()), Parsed::Torn(_)),
            "cut at {cut}"
        );
    }
    let mut damaged = data.clone();
    damaged[HEADER_LEN + 1] ^= 0xFF;
    assert!(matches!(parse_record(&damaged, 0), Parsed::Corrupt(_)));
    let mut damaged_last = data.clone();
    *damaged_last.last_mut().unwrap() ^= 0xFF;
    assert!(matches!(
        parse_record(&damaged_last, one.len()),
        Parsed::Torn(_)
    ));
    let mut bad_len = data.clone();
    bad_len[0] ^= 0x40;
    assert!(matches!(parse_record(&bad_len, 0), Parsed::Corrupt(_)));
    let mut zeros = data.clone();
    zeros.extend_from_slice(&[0; 40]);
    assert!(matches!(parse_record(&zeros, data.len()), Parsed::Torn(_)));
}
