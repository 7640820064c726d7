//! `Range` (blob GET) and `Content-Range` (upload PATCH): never panic, and a partial range
//! always lies inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::oci::range::{RangeOutcome, interpret_range, parse_content_range};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    // Small and huge bodies both.
    for len in [len, len % 10_000, 0, 1] {
        match interpret_range(header, len) {
            RangeOutcome::Partial { start, end } => {
                assert!(start <= end, "{header:?} {len}: {start} > {end}");
                assert!(end < len, "{header:?} {len}: end {end} past the body");
            }
            RangeOutcome::Full | RangeOutcome::Unsatisfiable => {}
        }
    }
    if let Some((start, end)) = parse_content_range(header) {
        assert!(start <= end);
    }
});
