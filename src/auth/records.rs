//! What identities keep in their `RecordStore` (one JSON record per user, key, token and
//! membership, under the kinds below), how records are read back into memory (`Stored`), and
//! what administrators are shown of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::role::Role;

pub(super) const ACCESS_PREFIX: &str = "tsa_";
pub(super) const REFRESH_PREFIX: &str = "tsr_";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct UserRecord {
    pub(super) password_hash: String,
    pub(super) created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeyRecord {
    pub(super) project: String,
    pub(super) role: Role,
    pub(super) name: String,
    pub(super) secret_sha256: String,
    pub(super) created: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Used as a password with the username `oauth2accesstoken`.
    Access,
    /// Handed out by the token endpoint for `offline_token`; exchanged for JWTs.
    Refresh,
}

impl TokenKind {
    /// How tokens of this kind start: tells them apart before any lookup.
    pub(super) fn prefix(self) -> &'static str {
        match self {
            Self::Access => ACCESS_PREFIX,
            Self::Refresh => REFRESH_PREFIX,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TokenRecord {
    pub(super) kind: TokenKind,
    /// `Subject::token_sub` of the owner.
    pub(super) subject: String,
    pub(super) name: String,
    pub(super) secret_sha256: String,
    pub(super) created: u64,
    pub(super) expires: u64,
    /// Nanoseconds since the epoch, strictly increasing within a process: orders tokens made
    /// in the same second (0 in records written before it existed).
    #[serde(default)]
    pub(super) created_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct MemberRecord {
    pub(super) role: Role,
}

/// The JSON key file of a service account (the password for `_json_key`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    #[serde(rename = "type")]
    pub kind: String,
    pub project_id: String,
    pub private_key_id: String,
    pub private_key: String,
    pub client_email: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    /// `config` or `index`.
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub project: String,
    pub role: Role,
    pub name: String,
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub kind: TokenKind,
    pub subject: String,
    pub name: String,
    pub created: u64,
    pub expires: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberInfo {
    pub project: String,
    pub user: String,
    pub role: Role,
    /// `config` or `index`.
    pub source: String,
}

#[derive(Default)]
pub(super) struct Stored {
    pub(super) users: BTreeMap<String, UserRecord>,
    pub(super) keys: BTreeMap<String, KeyRecord>,
    pub(super) tokens: BTreeMap<String, TokenRecord>,
    /// (project, user) → role
    pub(super) members: BTreeMap<(String, String), Role>,
}

pub(super) const KIND_USER: &str = "user";
pub(super) const KIND_KEY: &str = "key";
pub(super) const KIND_TOKEN: &str = "token";
pub(super) const KIND_MEMBER: &str = "member";

/// Every kind, in the order a full load reads them.
pub(super) const KINDS: [&str; 4] = [KIND_USER, KIND_KEY, KIND_TOKEN, KIND_MEMBER];

impl Stored {
    /// Adds or replaces the record `kind`/`id` as read from the backend. One that does not
    /// parse (written by a newer version, say) is left out rather than failing the load.
    pub(super) fn insert(&mut self, kind: &str, id: &str, value: &[u8]) {
        match kind {
            KIND_USER => {
                if let Ok(r) = serde_json::from_slice(value) {
                    self.users.insert(id.to_string(), r);
                }
            }
            KIND_KEY => {
                if let Ok(r) = serde_json::from_slice(value) {
                    self.keys.insert(id.to_string(), r);
                }
            }
            KIND_TOKEN => {
                if let Ok(r) = serde_json::from_slice(value) {
                    self.tokens.insert(id.to_string(), r);
                }
            }
            KIND_MEMBER => {
                if let (Some(k), Ok(r)) = (
                    member_key(id),
                    serde_json::from_slice::<MemberRecord>(value),
                ) {
                    self.members.insert(k, r.role);
                }
            }
            _ => {}
        }
    }

    /// Forgets the record `kind`/`id`, if held.
    pub(super) fn remove(&mut self, kind: &str, id: &str) {
        match kind {
            KIND_USER => drop(self.users.remove(id)),
            KIND_KEY => drop(self.keys.remove(id)),
            KIND_TOKEN => drop(self.tokens.remove(id)),
            KIND_MEMBER => {
                if let Some(k) = member_key(id) {
                    self.members.remove(&k);
                }
            }
            _ => {}
        }
    }
}

/// A membership record's id, `project \0 user`, as its key in `Stored::members`.
fn member_key(id: &str) -> Option<(String, String)> {
    id.split_once('\0')
        .map(|(project, user)| (project.to_string(), user.to_string()))
}

pub(super) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}
