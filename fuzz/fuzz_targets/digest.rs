//! Digests: never panic; what parses prints back as given and names a known algorithm.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::oci::Digest;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.hex().len(), d.algorithm().hex_len());
        let again: Digest = d.to_string().parse().expect("a printed digest parses");
        assert_eq!(again, d);
    }
});
