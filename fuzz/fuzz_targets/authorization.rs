//! `Authorization` headers (Basic and Bearer) and bearer tokens (JWTs) checked against a real
//! signing key: never panic, never accept a token this key did not sign.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use transship::auth::jwt::TokenSigner;
use transship::auth::{Presented, basic_header, parse_authorization};

fn signer() -> &'static TokenSigner {
    static SIGNER: OnceLock<TokenSigner> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("transship-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("key dir");
        TokenSigner::open(&dir, "transship", "transship").expect("signing key")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        match parse_authorization(&value) {
            Ok(Presented::Basic { user, password }) => {
                // What decodes re-encodes to a header that decodes the same.
                let again = http::HeaderValue::from_str(&basic_header(&user, &password))
                    .expect("an encoded header is valid");
                match parse_authorization(&again) {
                    Ok(Presented::Basic {
                        user: u,
                        password: p,
                    }) => {
                        assert_eq!((u, p), (user, password));
                    }
                    _ => panic!("re-encoded Basic credentials do not parse"),
                }
            }
            Ok(Presented::Bearer(token)) => {
                assert!(signer().verify(&token).is_err(), "accepted a forged token");
            }
            Err(_) => {}
        }
    }
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(signer().verify(token).is_err(), "accepted a forged token");
    }
});
