//! `Accept` header lines and negotiation against every stored manifest type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::oci::media::{self, AcceptList, Negotiated, negotiate};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // One header line per input line, as a client sending several `Accept` headers.
    let accept = AcceptList::from_headers(s.lines());
    for stored in [
        media::OCI_MANIFEST,
        media::OCI_INDEX,
        media::DOCKER_MANIFEST_V2,
        media::DOCKER_MANIFEST_LIST,
    ] {
        let by_tag = negotiate(&accept, stored, true);
        let by_digest = negotiate(&accept, stored, false);
        if accept.accepts(stored) {
            assert_eq!(by_tag, Negotiated::Serve);
            assert_eq!(by_digest, Negotiated::Serve);
        }
        assert_ne!(by_digest, Negotiated::PlatformChild);
    }
    let _ = media::essence(s);
});
