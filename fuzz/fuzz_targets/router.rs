//! Request paths → routes: never panic; every route has a fixed label, and a repository name
//! comes from the path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::http::router::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let route = parse(path);
    assert!(!route.label().is_empty());
    let _ = route.allow();
    if let Some(name) = route.name() {
        assert!(!name.is_empty(), "{path:?} -> {route:?}");
        let _ = name.parse::<transship::oci::RepoName>();
    }
});
