//! The public names of identities and their secrets, in one place for callers. Each idea has
//! its own module: `identities` (who exists, roles), `credentials` (checking secrets),
//! `manage` (changes), `records` (what the index holds), `role` and `secrets` (crypto).

pub use super::credentials::{
    ACCESS_TOKEN_USER, CredentialError, JSON_KEY_BASE64_USER, JSON_KEY_USER,
};
pub use super::identities::{Identities, Subject};
pub use super::manage::{AdminError, MAX_REFRESH_TOKENS};
pub use super::records::{KeyFile, KeyInfo, MemberInfo, TokenInfo, TokenKind, UserInfo};
pub use super::role::Role;
pub use super::secrets::{hash_password, random_bytes};
pub use crate::config::{is_valid_hash, validate_user_name};
