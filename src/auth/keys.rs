//! Identities and their secrets: users with argon2id password hashes (from the config or
//! stored in the index), service-account keys handed out as JSON key files, access tokens and
//! refresh tokens, and the project members with their roles. Secrets other than passwords are
//! 256-bit random strings, so the index stores only their SHA-256 and compares in constant
//! time; passwords get argon2id. Everything lives in memory behind one lock and is written
//! through to the index (synced) before a change is reported done. Changes are serialised by
//! a second lock, and the synced writes happen with the first one released, so credential
//! checks never wait for the disk; every change is blocking and runs off the async workers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{Config, UserConfig};
use crate::store::{Store, StoreError, unix_now};

/// What a member may do in a project. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// pull
    Viewer,
    /// pull, push, delete
    Editor,
    /// pull, push, delete, manage members
    Owner,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "editor" => Ok(Self::Editor),
            "owner" => Ok(Self::Owner),
            other => Err(format!(
                "unknown role {other:?}: use owner, editor or viewer"
            )),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Owner => "owner",
        }
    }
}

/// Who authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    /// A service account: bound to one project with one role.
    Key {
        id: String,
        project: String,
        role: Role,
    },
}

impl Subject {
    /// The token `sub` claim; `Identities::subject` maps it back.
    pub fn token_sub(&self) -> String {
        match self {
            Self::User(name) => name.clone(),
            Self::Key { id, .. } => format!("{KEY_SUB_PREFIX}{id}"),
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(name) => write!(f, "user {name}"),
            Self::Key { id, project, .. } => write!(f, "key {id} of {project}"),
        }
    }
}

const KEY_SUB_PREFIX: &str = "key:";

/// The usernames with a special meaning at login (as with GCR).
pub const JSON_KEY_USER: &str = "_json_key";
pub const JSON_KEY_BASE64_USER: &str = "_json_key_base64";
pub const ACCESS_TOKEN_USER: &str = "oauth2accesstoken";

/// Refresh tokens kept per identity. Every `docker login` (and every `offline_token` request)
/// stores one for `auth.refresh_token_ttl`; beyond this many, the oldest are revoked.
pub const MAX_REFRESH_TOKENS: usize = 20;

const ACCESS_PREFIX: &str = "tsa_";
const REFRESH_PREFIX: &str = "tsr_";
const ID_HEX: usize = 16;

/// Why credentials were not accepted. The message is for the audit log, never for the client
/// beyond "invalid credentials".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("unknown user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("malformed key file")]
    MalformedKeyFile,
    #[error("unknown or revoked key")]
    UnknownKey,
    #[error("wrong key secret")]
    WrongKeySecret,
    #[error("malformed token")]
    MalformedToken,
    #[error("unknown or revoked token")]
    UnknownToken,
    #[error("expired token")]
    ExpiredToken,
    #[error("token of a removed identity")]
    OrphanToken,
}

/// Why an administrative change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserRecord {
    password_hash: String,
    created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    project: String,
    role: Role,
    name: String,
    secret_sha256: String,
    created: u64,
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
    fn prefix(self) -> &'static str {
        match self {
            Self::Access => ACCESS_PREFIX,
            Self::Refresh => REFRESH_PREFIX,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    kind: TokenKind,
    /// `Subject::token_sub` of the owner.
    subject: String,
    name: String,
    secret_sha256: String,
    created: u64,
    expires: u64,
    /// Nanoseconds since the epoch, strictly increasing within a process: orders tokens made
    /// in the same second (0 in records written before it existed).
    #[serde(default)]
    created_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberRecord {
    role: Role,
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
struct Stored {
    users: BTreeMap<String, UserRecord>,
    keys: BTreeMap<String, KeyRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    /// (project, user) → role
    members: BTreeMap<(String, String), Role>,
}

const KIND_USER: &str = "user";
const KIND_KEY: &str = "key";
const KIND_TOKEN: &str = "token";
const KIND_MEMBER: &str = "member";

/// Every identity the registry knows, and the checks of their secrets.
pub struct Identities {
    config_users: HashMap<String, String>,
    /// (project, user) → role, from `[[project]]` owners/editors/viewers.
    config_members: BTreeMap<(String, String), Role>,
    projects: Vec<String>,
    stored: RwLock<Stored>,
    /// Successful password checks: argon2id costs tens of milliseconds, and clients that use
    /// Basic auth send it on every request. Keyed by a salted hash of user and password.
    verified: moka::sync::Cache<[u8; 32], String>,
    cache_salt: [u8; 32],
    /// Held for the whole of a change (across its synced writes), never by readers.
    changes: Mutex<()>,
    /// The last `TokenRecord::created_ns` handed out.
    last_created_ns: AtomicU64,
}

impl Identities {
    /// Loads the config's users and members and everything stored in the index.
    pub fn load(config: &Config, store: &Store) -> Result<Self, StoreError> {
        let mut stored = Stored::default();
        for (id, v) in store.auth_records(KIND_USER)? {
            if let Ok(r) = serde_json::from_slice(&v) {
                stored.users.insert(id, r);
            }
        }
        for (id, v) in store.auth_records(KIND_KEY)? {
            if let Ok(r) = serde_json::from_slice(&v) {
                stored.keys.insert(id, r);
            }
        }
        for (id, v) in store.auth_records(KIND_TOKEN)? {
            if let Ok(r) = serde_json::from_slice(&v) {
                stored.tokens.insert(id, r);
            }
        }
        for (id, v) in store.auth_records(KIND_MEMBER)? {
            if let (Some((project, user)), Ok(r)) = (
                id.split_once('\0'),
                serde_json::from_slice::<MemberRecord>(&v),
            ) {
                stored
                    .members
                    .insert((project.to_string(), user.to_string()), r.role);
            }
        }
        Ok(Self::new(config, stored))
    }

    fn new(config: &Config, stored: Stored) -> Self {
        let config_users = config
            .users
            .iter()
            .map(|u: &UserConfig| (u.name.clone(), u.password_hash.clone()))
            .collect();
        let mut config_members = BTreeMap::new();
        for p in &config.projects {
            let name = p.name.get_ref().as_str().to_string();
            for (list, role) in [
                (&p.viewers, Role::Viewer),
                (&p.editors, Role::Editor),
                (&p.owners, Role::Owner),
            ] {
                for user in list {
                    let slot = config_members
                        .entry((name.clone(), user.clone()))
                        .or_insert(role);
                    *slot = (*slot).max(role);
                }
            }
        }
        Self {
            config_users,
            config_members,
            projects: config
                .projects
                .iter()
                .map(|p| p.name.get_ref().as_str().to_string())
                .collect(),
            stored: RwLock::new(stored),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            cache_salt: random_bytes(),
            changes: Mutex::new(()),
            last_created_ns: AtomicU64::new(0),
        }
    }

    /// Serialises changes; see the module header.
    fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A synced write of one record. Never under the `stored` lock: readers would wait for it.
    fn put(&self, store: &Store, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.assert_unlocked();
        store.put_auth_record(kind, id, value)
    }

    /// A synced delete of one record; as `put`.
    fn delete(&self, store: &Store, kind: &str, id: &str) -> Result<(), StoreError> {
        self.assert_unlocked();
        store.delete_auth_record(kind, id).map(drop)
    }

    #[cfg(test)]
    fn assert_unlocked(&self) {
        assert!(
            self.stored.try_write().is_ok(),
            "a synced write while the identities lock is held"
        );
    }

    #[cfg(not(test))]
    fn assert_unlocked(&self) {}

    /// A fresh `created_ns`, above every one given before.
    fn next_created_ns(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut last = self.last_created_ns.load(Ordering::Acquire);
        loop {
            let next = now.max(last.saturating_add(1));
            match self.last_created_ns.compare_exchange(
                last,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Stored> {
        self.stored.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Stored> {
        self.stored.write().unwrap_or_else(|p| p.into_inner())
    }

    /// True when no user and no service-account key exists: nobody can authenticate.
    pub fn is_empty(&self) -> bool {
        let s = self.read();
        self.config_users.is_empty() && s.users.is_empty() && s.keys.is_empty()
    }

    /// The role of `subject` in `project` (a declared project name), if any.
    pub fn role(&self, subject: &Subject, project: &str) -> Option<Role> {
        match subject {
            Subject::User(user) => {
                let k = (project.to_string(), user.clone());
                let stored = self.read().members.get(&k).copied();
                stored.max(self.config_members.get(&k).copied())
            }
            Subject::Key {
                project: p, role, ..
            } => (p == project).then_some(*role),
        }
    }

    /// Maps a token's `sub` back to a current identity (`None` if it was removed).
    pub fn subject(&self, sub: &str) -> Option<Subject> {
        if let Some(id) = sub.strip_prefix(KEY_SUB_PREFIX) {
            let s = self.read();
            let k = s.keys.get(id)?;
            return Some(Subject::Key {
                id: id.to_string(),
                project: k.project.clone(),
                role: k.role,
            });
        }
        self.user_exists(sub)
            .then(|| Subject::User(sub.to_string()))
    }

    fn user_exists(&self, name: &str) -> bool {
        self.config_users.contains_key(name) || self.read().users.contains_key(name)
    }

    // ---- checking credentials -------------------------------------------------------------

    /// Checks a Basic username and password. Blocking: a password check runs argon2id, so
    /// call it from a blocking task.
    pub fn verify_basic(&self, user: &str, password: &str) -> Result<Subject, CredentialError> {
        match user {
            JSON_KEY_USER => self.verify_key_file(password.as_bytes()),
            JSON_KEY_BASE64_USER => {
                let raw = STANDARD
                    .decode(password.trim())
                    .map_err(|_| CredentialError::MalformedKeyFile)?;
                self.verify_key_file(&raw)
            }
            ACCESS_TOKEN_USER => self.verify_token(password, TokenKind::Access),
            _ => self.verify_password(user, password),
        }
    }

    /// True if `verify_basic` would answer without running argon2id.
    pub fn is_cheap(&self, user: &str, password: &str) -> bool {
        matches!(
            user,
            JSON_KEY_USER | JSON_KEY_BASE64_USER | ACCESS_TOKEN_USER
        ) || self.verified.contains_key(&self.cache_key(user, password))
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn verify_password(&self, user: &str, password: &str) -> Result<Subject, CredentialError> {
        let key = self.cache_key(user, password);
        if self.verified.get(&key).is_some_and(|u| u == user) && self.user_exists(user) {
            return Ok(Subject::User(user.to_string()));
        }
        let hash = self
            .config_users
            .get(user)
            .cloned()
            .or_else(|| self.read().users.get(user).map(|r| r.password_hash.clone()));
        let Some(hash) = hash else {
            // Spend the same time as a real check, so timing does not reveal which users exist.
            let _ = Argon2::default().verify_password(password.as_bytes(), &dummy_hash());
            return Err(CredentialError::UnknownUser);
        };
        let parsed = PasswordHash::new(&hash).map_err(|_| CredentialError::WrongPassword)?;
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .map_err(|_| CredentialError::WrongPassword)?;
        self.verified.insert(key, user.to_string());
        Ok(Subject::User(user.to_string()))
    }

    fn verify_key_file(&self, raw: &[u8]) -> Result<Subject, CredentialError> {
        let file: KeyFile =
            serde_json::from_slice(raw).map_err(|_| CredentialError::MalformedKeyFile)?;
        let s = self.read();
        let record = s
            .keys
            .get(&file.private_key_id)
            .ok_or(CredentialError::UnknownKey)?;
        if !secret_matches(&file.private_key, &record.secret_sha256) {
            return Err(CredentialError::WrongKeySecret);
        }
        Ok(Subject::Key {
            id: file.private_key_id,
            project: record.project.clone(),
            role: record.role,
        })
    }

    /// Checks an access or refresh token string and returns its owner.
    pub fn verify_token(&self, token: &str, kind: TokenKind) -> Result<Subject, CredentialError> {
        let rest = token
            .trim()
            .strip_prefix(kind.prefix())
            .ok_or(CredentialError::MalformedToken)?;
        let (id, secret) = rest
            .split_once('_')
            .ok_or(CredentialError::MalformedToken)?;
        let record = self
            .read()
            .tokens
            .get(id)
            .filter(|r| r.kind == kind)
            .cloned()
            .ok_or(CredentialError::UnknownToken)?;
        if !secret_matches(secret, &record.secret_sha256) {
            return Err(CredentialError::UnknownToken);
        }
        if record.expires <= unix_now() {
            return Err(CredentialError::ExpiredToken);
        }
        self.subject(&record.subject)
            .ok_or(CredentialError::OrphanToken)
    }

    // ---- administration ---------------------------------------------------------------------

    pub fn users(&self) -> Vec<UserInfo> {
        let mut out: Vec<UserInfo> = self
            .config_users
            .keys()
            .map(|n| UserInfo {
                name: n.clone(),
                source: "config".into(),
            })
            .collect();
        out.extend(self.read().users.keys().map(|n| UserInfo {
            name: n.clone(),
            source: "index".into(),
        }));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Adds a user, or sets the password of a stored one.
    pub fn set_user(&self, store: &Store, name: &str, password: &str) -> Result<(), AdminError> {
        validate_user_name(name).map_err(AdminError::Invalid)?;
        if self.config_users.contains_key(name) {
            return Err(AdminError::Invalid(format!(
                "user {name} is declared in the config file; change it there"
            )));
        }
        if password.chars().count() < 8 {
            return Err(AdminError::Invalid(
                "passwords need at least 8 characters".into(),
            ));
        }
        let record = UserRecord {
            password_hash: hash_password(password),
            created: unix_now(),
        };
        let _change = self.change();
        self.put(store, KIND_USER, name, &to_json(&record))?;
        self.write().users.insert(name.to_string(), record);
        self.verified.invalidate_all();
        Ok(())
    }

    /// Removes a stored user with their memberships and tokens.
    pub fn remove_user(&self, store: &Store, name: &str) -> Result<(), AdminError> {
        if self.config_users.contains_key(name) {
            return Err(AdminError::Invalid(format!(
                "user {name} is declared in the config file; remove it there"
            )));
        }
        let _change = self.change();
        if !self.read().users.contains_key(name) {
            return Err(AdminError::NotFound(format!("no user {name}")));
        }
        self.delete(store, KIND_USER, name)?;
        self.write().users.remove(name);
        let members: Vec<_> = self
            .read()
            .members
            .keys()
            .filter(|(_, u)| u == name)
            .cloned()
            .collect();
        for (project, user) in members {
            self.delete(store, KIND_MEMBER, &format!("{project}\0{user}"))?;
            self.write().members.remove(&(project, user));
        }
        self.drop_tokens_of(store, name)?;
        self.verified.invalidate_all();
        Ok(())
    }

    fn require_project(&self, project: &str) -> Result<(), AdminError> {
        if self.projects.iter().any(|p| p == project) {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!(
                "no project {project} in the config (declared: {})",
                self.projects.join(", ")
            )))
        }
    }

    /// Creates a service-account key and returns its key file (the only copy of the secret).
    pub fn create_key(
        &self,
        store: &Store,
        project: &str,
        role: Role,
        name: &str,
    ) -> Result<KeyFile, AdminError> {
        self.require_project(project)?;
        let name = if name.is_empty() { "key" } else { name };
        validate_label(name).map_err(AdminError::Invalid)?;
        let id = random_id();
        let secret = random_secret();
        let record = KeyRecord {
            project: project.to_string(),
            role,
            name: name.to_string(),
            secret_sha256: sha256_hex(&secret),
            created: unix_now(),
        };
        let _change = self.change();
        self.put(store, KIND_KEY, &id, &to_json(&record))?;
        self.write().keys.insert(id.clone(), record);
        Ok(KeyFile {
            kind: "service_account".into(),
            project_id: project.to_string(),
            client_email: format!("{name}@{project}.transship"),
            private_key_id: id,
            private_key: secret,
            role,
        })
    }

    pub fn keys(&self) -> Vec<KeyInfo> {
        self.read()
            .keys
            .iter()
            .map(|(id, k)| KeyInfo {
                id: id.clone(),
                project: k.project.clone(),
                role: k.role,
                name: k.name.clone(),
                created: k.created,
            })
            .collect()
    }

    /// Revokes a key and every refresh token it obtained.
    pub fn revoke_key(&self, store: &Store, id: &str) -> Result<(), AdminError> {
        let _change = self.change();
        if !self.read().keys.contains_key(id) {
            return Err(AdminError::NotFound(format!("no key {id}")));
        }
        self.delete(store, KIND_KEY, id)?;
        self.write().keys.remove(id);
        self.drop_tokens_of(store, &format!("{KEY_SUB_PREFIX}{id}"))?;
        Ok(())
    }

    /// Issues an access or refresh token for `subject`; returns `(id, token)`. The token string
    /// is shown once; only its hash is kept.
    pub fn create_token(
        &self,
        store: &Store,
        subject: &Subject,
        kind: TokenKind,
        ttl: Duration,
        name: &str,
    ) -> Result<(String, String), AdminError> {
        let _change = self.change();
        if self.subject(&subject.token_sub()).is_none() {
            return Err(AdminError::NotFound(format!("no {subject}")));
        }
        validate_label(if name.is_empty() { "token" } else { name })
            .map_err(AdminError::Invalid)?;
        if ttl < Duration::from_secs(1) {
            return Err(AdminError::Invalid(
                "token lifetime must be at least 1s".into(),
            ));
        }
        let id = random_id();
        let secret = random_secret();
        let now = unix_now();
        let record = TokenRecord {
            kind,
            subject: subject.token_sub(),
            name: name.to_string(),
            secret_sha256: sha256_hex(&secret),
            created: now,
            expires: now.saturating_add(ttl.as_secs()),
            created_ns: self.next_created_ns(),
        };
        let sub = record.subject.clone();
        self.put(store, KIND_TOKEN, &id, &to_json(&record))?;
        self.write().tokens.insert(id.clone(), record);
        if kind == TokenKind::Refresh {
            self.drop_oldest_refresh_tokens(store, &sub)?;
        }
        Ok((id.clone(), format!("{}{id}_{secret}", kind.prefix())))
    }

    pub fn tokens(&self) -> Vec<TokenInfo> {
        self.read()
            .tokens
            .iter()
            .map(|(id, t)| TokenInfo {
                id: id.clone(),
                kind: t.kind,
                subject: t.subject.clone(),
                name: t.name.clone(),
                created: t.created,
                expires: t.expires,
            })
            .collect()
    }

    pub fn revoke_token(&self, store: &Store, id: &str) -> Result<(), AdminError> {
        let _change = self.change();
        if !self.read().tokens.contains_key(id) {
            return Err(AdminError::NotFound(format!("no token {id}")));
        }
        self.delete(store, KIND_TOKEN, id)?;
        self.write().tokens.remove(id);
        Ok(())
    }

    /// Drops expired tokens from the index; returns how many.
    pub fn prune_expired(&self, store: &Store) -> Result<usize, StoreError> {
        let _change = self.change();
        let now = unix_now();
        let expired: Vec<String> = self
            .read()
            .tokens
            .iter()
            .filter(|(_, t)| t.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.delete(store, KIND_TOKEN, id)?;
            self.write().tokens.remove(id);
        }
        Ok(expired.len())
    }

    /// Deletes every token whose owner is `subject` (a `Subject::token_sub`). The caller holds
    /// `change`.
    fn drop_tokens_of(&self, store: &Store, subject: &str) -> Result<(), StoreError> {
        let ids: Vec<String> = self
            .read()
            .tokens
            .iter()
            .filter(|(_, t)| t.subject == subject)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.delete(store, KIND_TOKEN, &id)?;
            self.write().tokens.remove(&id);
        }
        Ok(())
    }

    /// Revokes `subject`'s oldest refresh tokens beyond `MAX_REFRESH_TOKENS`. The caller holds
    /// `change`.
    fn drop_oldest_refresh_tokens(&self, store: &Store, subject: &str) -> Result<(), StoreError> {
        let mut theirs: Vec<((u64, u64), String)> = self
            .read()
            .tokens
            .iter()
            .filter(|(_, t)| t.kind == TokenKind::Refresh && t.subject == subject)
            .map(|(id, t)| ((t.created, t.created_ns), id.clone()))
            .collect();
        if theirs.len() <= MAX_REFRESH_TOKENS {
            return Ok(());
        }
        theirs.sort();
        let excess = theirs.len() - MAX_REFRESH_TOKENS;
        for (_, id) in theirs.into_iter().take(excess) {
            self.delete(store, KIND_TOKEN, &id)?;
            self.write().tokens.remove(&id);
        }
        Ok(())
    }

    pub fn members(&self, project: &str) -> Vec<MemberInfo> {
        let mut out: Vec<MemberInfo> = self
            .config_members
            .iter()
            .filter(|((p, _), _)| p == project)
            .map(|((p, u), r)| MemberInfo {
                project: p.clone(),
                user: u.clone(),
                role: *r,
                source: "config".into(),
            })
            .collect();
        out.extend(
            self.read()
                .members
                .iter()
                .filter(|((p, _), _)| p == project)
                .map(|((p, u), r)| MemberInfo {
                    project: p.clone(),
                    user: u.clone(),
                    role: *r,
                    source: "index".into(),
                }),
        );
        out
    }

    pub fn set_member(
        &self,
        store: &Store,
        project: &str,
        user: &str,
        role: Role,
    ) -> Result<(), AdminError> {
        self.require_project(project)?;
        let _change = self.change();
        if !self.user_exists(user) {
            return Err(AdminError::NotFound(format!("no user {user}")));
        }
        self.put(
            store,
            KIND_MEMBER,
            &format!("{project}\0{user}"),
            &to_json(&MemberRecord { role }),
        )?;
        self.write()
            .members
            .insert((project.to_string(), user.to_string()), role);
        Ok(())
    }

    pub fn remove_member(
        &self,
        store: &Store,
        project: &str,
        user: &str,
    ) -> Result<(), AdminError> {
        let k = (project.to_string(), user.to_string());
        let _change = self.change();
        if !self.read().members.contains_key(&k) {
            let why = if self.config_members.contains_key(&k) {
                "; that membership is declared in the config file"
            } else {
                ""
            };
            return Err(AdminError::NotFound(format!(
                "{user} is not a stored member of {project}{why}"
            )));
        }
        self.delete(store, KIND_MEMBER, &format!("{project}\0{user}"))?;
        self.write().members.remove(&k);
        Ok(())
    }
}

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

fn validate_label(label: &str) -> Result<(), String> {
    if label.len() <= 64
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "invalid name {label:?}: up to 64 of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// An argon2id PHC string for `password` (19 MiB, 2 passes: the OWASP baseline).
pub fn hash_password(password: &str) -> String {
    let salt_bytes: [u8; 16] = random_bytes();
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes is a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .expect("argon2id with default parameters cannot fail")
}

/// True if `hash` is an argon2id PHC string this build can verify.
pub fn is_valid_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        h.algorithm.as_str() == "argon2id" && Params::try_from(&h).is_ok() && h.hash.is_some()
    })
}

/// A fixed hash to verify against when the user does not exist.
fn dummy_hash() -> PasswordHash<'static> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let s = DUMMY.get_or_init(|| hash_password("transship-dummy-password"));
    PasswordHash::new(s).expect("own hash parses")
}

fn secret_matches(secret: &str, stored_sha256_hex: &str) -> bool {
    let computed = sha256_hex(secret);
    aws_lc_rs::constant_time::verify_slices_are_equal(
        computed.as_bytes(),
        stored_sha256_hex.as_bytes(),
    )
    .is_ok()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("the system random source works");
    b
}

fn random_id() -> String {
    hex::encode(random_bytes::<{ ID_HEX / 2 }>())
}

fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Store, Identities) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::store::StoreOptions::default()).unwrap();
        let config = Config::parse(
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[user]]\nname = \"root\"\npassword_hash = \"{}\"\n[[project]]\nname = \"team\"\nowners = [\"root\"]\n",
                hash_password("rootpassword")
            ),
            "t",
        )
        .unwrap();
        let ids = Identities::load(&config, &store).unwrap();
        (dir, store, ids)
    }

    #[test]
    fn users_keys_tokens_members_round_trip_through_the_index() {
        let (dir, store, ids) = setup();
        assert!(!ids.is_empty());
        assert_eq!(
            ids.verify_basic("root", "rootpassword"),
            Ok(Subject::User("root".into()))
        );
        assert!(ids.is_cheap("root", "rootpassword"), "cached after success");
        assert_eq!(
            ids.verify_basic("root", "wrong"),
            Err(CredentialError::WrongPassword)
        );
        assert_eq!(
            ids.verify_basic("nobody", "x"),
            Err(CredentialError::UnknownUser)
        );
        ids.set_user(&store, "alice", "alicepassword").unwrap();
        assert!(matches!(
            ids.set_user(&store, "bob", "short"),
            Err(AdminError::Invalid(_))
        ));
        assert!(ids.set_user(&store, "root", "whatever-long").is_err());
        assert!(ids.set_user(&store, "_json_key", "whatever-long").is_err());
        ids.set_member(&store, "team", "alice", Role::Viewer)
            .unwrap();
        assert!(
            ids.set_member(&store, "nope", "alice", Role::Viewer)
                .is_err()
        );
        let key = ids.create_key(&store, "team", Role::Editor, "ci").unwrap();
        let key_json = serde_json::to_string(&key).unwrap();
        let (tid, token) = ids
            .create_token(
                &store,
                &Subject::User("alice".into()),
                TokenKind::Access,
                Duration::from_secs(3600),
                "",
            )
            .unwrap();
        drop(ids);
        drop(store);

        // Everything survives a restart.
        let store = Store::open(dir.path(), crate::store::StoreOptions::default()).unwrap();
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[project]]\nname = \"team\"\n",
            "t",
        )
        .unwrap();
        let ids = Identities::load(&config, &store).unwrap();
        let alice = Subject::User("alice".into());
        assert_eq!(
            ids.verify_basic("alice", "alicepassword"),
            Ok(alice.clone())
        );
        assert_eq!(ids.role(&alice, "team"), Some(Role::Viewer));
        let sa = ids.verify_basic(JSON_KEY_USER, &key_json).unwrap();
        assert_eq!(ids.role(&sa, "team"), Some(Role::Editor));
        assert_eq!(ids.role(&sa, "other"), None);
        let b64 = STANDARD.encode(&key_json);
        assert_eq!(ids.verify_basic(JSON_KEY_BASE64_USER, &b64), Ok(sa.clone()));
        assert_eq!(
            ids.verify_basic(ACCESS_TOKEN_USER, &token),
            Ok(alice.clone())
        );
        assert_eq!(ids.subject(&sa.token_sub()), Some(sa.clone()));

        // Tampering and revocation.
        let mut forged = key.clone();
        forged.private_key = random_secret();
        assert_eq!(
            ids.verify_basic(JSON_KEY_USER, &serde_json::to_string(&forged).unwrap()),
            Err(CredentialError::WrongKeySecret)
        );
        assert_eq!(
            ids.verify_basic(JSON_KEY_USER, &key_json[..key_json.len() / 2]),
            Err(CredentialError::MalformedKeyFile)
        );
        assert_eq!(
            ids.verify_basic(ACCESS_TOKEN_USER, &format!("{token}x")),
            Err(CredentialError::UnknownToken)
        );
        assert_eq!(
            ids.verify_token(&token, TokenKind::Refresh),
            Err(CredentialError::MalformedToken),
            "an access token is not a refresh token"
        );
        ids.revoke_key(&store, &key.private_key_id).unwrap();
        assert_eq!(
            ids.verify_basic(JSON_KEY_USER, &key_json),
            Err(CredentialError::UnknownKey)
        );
        ids.revoke_token(&store, &tid).unwrap();
        assert_eq!(
            ids.verify_basic(ACCESS_TOKEN_USER, &token),
            Err(CredentialError::UnknownToken)
        );
        ids.remove_user(&store, "alice").unwrap();
        assert_eq!(
            ids.verify_basic("alice", "alicepassword"),
            Err(CredentialError::UnknownUser)
        );
        assert_eq!(ids.role(&alice, "team"), None);
        assert!(ids.is_empty());
    }

    #[test]
    fn expired_tokens_fail_and_are_pruned() {
        let (_dir, store, ids) = setup();
        let root = Subject::User("root".into());
        let (_, t) = ids
            .create_token(
                &store,
                &root,
                TokenKind::Refresh,
                Duration::from_secs(1),
                "",
            )
            .unwrap();
        assert_eq!(ids.verify_token(&t, TokenKind::Refresh), Ok(root));
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(
            ids.verify_token(&t, TokenKind::Refresh),
            Err(CredentialError::ExpiredToken)
        );
        assert_eq!(ids.prune_expired(&store).unwrap(), 1);
        assert!(ids.tokens().is_empty());
    }

    #[test]
    fn refresh_tokens_beyond_the_bound_drop_the_oldest() {
        let (_dir, store, ids) = setup();
        let root = Subject::User("root".into());
        let hour = Duration::from_secs(3600);
        let (_, access) = ids
            .create_token(&store, &root, TokenKind::Access, hour, "")
            .unwrap();
        let made: Vec<String> = (0..MAX_REFRESH_TOKENS + 5)
            .map(|_| {
                ids.create_token(&store, &root, TokenKind::Refresh, hour, "login")
                    .unwrap()
                    .1
            })
            .collect();
        let refresh = ids
            .tokens()
            .iter()
            .filter(|t| t.kind == TokenKind::Refresh)
            .count();
        assert_eq!(refresh, MAX_REFRESH_TOKENS);
        for old in &made[..5] {
            assert_eq!(
                ids.verify_token(old, TokenKind::Refresh),
                Err(CredentialError::UnknownToken)
            );
        }
        for kept in &made[5..] {
            assert_eq!(ids.verify_token(kept, TokenKind::Refresh), Ok(root.clone()));
        }
        assert_eq!(
            ids.verify_token(&access, TokenKind::Access),
            Ok(root),
            "access tokens are not refresh tokens"
        );
    }

    #[test]
    fn changes_never_hold_the_lock_across_synced_writes() {
        // `put` and `delete` assert (under cfg(test)) that the lock is free.
        let (_dir, store, ids) = setup();
        ids.set_user(&store, "alice", "alicepassword").unwrap();
        ids.set_member(&store, "team", "alice", Role::Editor)
            .unwrap();
        let alice = Subject::User("alice".into());
        let hour = Duration::from_secs(3600);
        for kind in [TokenKind::Access, TokenKind::Refresh] {
            ids.create_token(&store, &alice, kind, hour, "").unwrap();
        }
        let key = ids.create_key(&store, "team", Role::Editor, "ci").unwrap();
        let sa = ids
            .verify_basic(JSON_KEY_USER, &serde_json::to_string(&key).unwrap())
            .unwrap();
        ids.create_token(&store, &sa, TokenKind::Refresh, hour, "")
            .unwrap();
        ids.remove_user(&store, "alice").unwrap();
        ids.revoke_key(&store, &key.private_key_id).unwrap();
        assert!(ids.tokens().is_empty());
        assert!(ids.members("team").iter().all(|m| m.user != "alice"));
    }

    #[test]
    fn hashes() {
        let h = hash_password("pw");
        assert!(h.starts_with("$argon2id$v=19$"));
        assert!(is_valid_hash(&h));
        assert!(!is_valid_hash("$2y$10$abcdefghijklmnopqrstuv"));
        assert!(!is_valid_hash("plain"));
        assert!(validate_user_name("alice@example.com").is_ok());
        for bad in ["", "Alice", "_json_key", "a b", "oauth2accesstoken"] {
            assert!(validate_user_name(bad).is_err(), "{bad}");
        }
    }
}
