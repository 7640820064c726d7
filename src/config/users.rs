//! What a user name and a password hash may look like, in the config file and for
//! `transship user`.

use argon2::Params;
use argon2::password_hash::PasswordHash;

/// The user name with which an access token logs in (as with GCR): no user may have it.
pub const ACCESS_TOKEN_USER: &str = "oauth2accesstoken";

/// A user name: lower-case letters, digits and `._@-`, starting with a letter or digit, so it
/// can never collide with `_json_key` and friends.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._@-".contains(&b));
    if !ok {
        return Err(format!(
            "invalid user name {name:?}: 1-64 of a-z 0-9 . _ @ -, starting with a letter or digit"
        ));
    }
    if name == ACCESS_TOKEN_USER {
        return Err(format!("{name} is reserved for access tokens"));
    }
    Ok(())
}

/// True if `hash` is an argon2id PHC string this build can verify.
pub fn is_valid_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        h.algorithm.as_str() == "argon2id" && Params::try_from(&h).is_ok() && h.hash.is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hashes() {
        assert!(!is_valid_hash("$2y$10$abcdefghijklmnopqrstuv"));
        assert!(!is_valid_hash("plain"));
        assert!(validate_user_name("alice@example.com").is_ok());
        for bad in ["", "Alice", "_json_key", "a b", "oauth2accesstoken"] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
    }
}
