//! Repository names, tags and references: never panic, and what parses prints back as given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::oci::{Reference, RepoName, Tag};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = s.parse::<RepoName>() {
        assert_eq!(name.as_str(), s);
        assert!(name.components().all(|c| !c.is_empty()));
        let _ = name.is_within("local");
    }
    if let Ok(tag) = s.parse::<Tag>() {
        assert_eq!(tag.as_str(), s);
        assert!(!tag.as_str().contains(':'));
    }
    if let Ok(r) = s.parse::<Reference>() {
        assert_eq!(r.to_string(), s);
    }
});
