//! The crypto helpers of identities: argon2id password hashes, the SHA-256 of random secrets
//! compared in constant time, and random ids and secrets from the system source.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

const ID_HEX: usize = 16;

/// An argon2id PHC string for `password` (19 MiB, 2 passes: the OWASP baseline).
pub fn hash_password(password: &str) -> String {
    let salt_bytes: [u8; 16] = random_bytes();
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .expect("argon2id with default parameters cannot fail")
}

/// A fixed hash to verify against when the user does not exist.
pub(super) fn dummy_hash() -> PasswordHash<'static> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let s = DUMMY.get_or_init(|| hash_password("transship-dummy-password"));
    PasswordHash::new(s).expect("own hash parses")
}

pub(super) fn secret_matches(secret: &str, stored_sha256_hex: &str) -> bool {
    let computed = sha256_hex(secret);
    aws_lc_rs::constant_time::verify_slices_are_equal(
        computed.as_bytes(),
        stored_sha256_hex.as_bytes(),
    )
    .is_ok()
}

pub(super) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("the system random source works");
    b
}

pub(super) fn random_id() -> String {
    hex::encode(random_bytes::<{ ID_HEX / 2 }>())
}

pub(super) fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes() {
        let h = hash_password("pw");
        assert!(h.starts_with("$argon2id$v=19$"));
        assert!(crate::config::is_valid_hash(&h));
    }
}
