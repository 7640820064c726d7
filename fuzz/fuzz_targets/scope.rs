//! Token scopes (`repository:team/app:pull,push`): never panic; a parsed entry prints back to
//! an entry that parses to the same access.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::auth::scope::{Access, parse_all};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // One `scope` query value per line.
    if let Ok(all) = parse_all(s.lines()) {
        assert!(all.len() <= 64);
        for access in all {
            let printed = access.to_string();
            let again = Access::parse(&printed).expect("a printed scope parses");
            assert_eq!(again, access, "{printed:?}");
        }
    }
});
