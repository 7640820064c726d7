//! Every identity the registry knows: users with argon2id password hashes (from the config or
//! stored in the index), service-account keys handed out as JSON key files, access tokens and
//! refresh tokens, and the project members with their roles. Secrets other than passwords are
//! 256-bit random strings, so the index stores only their SHA-256 and compares in constant
//! time; passwords get argon2id. Everything lives in memory behind one lock and is written
//! through to a `RecordStore` (the index, synced, or the cluster's database) before a change
//! is reported done; in the cluster profile other replicas' changes arrive through `cluster`.
//! Changes are serialised by a second lock, and the durable writes happen with the first one
//! released, so credential checks never wait for the disk or the database; every change is
//! blocking and runs off the async workers.
//! Checking credentials is in `credentials`, changing identities in `manage`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::record_store::{RecordError, RecordStore};
use super::records::{KINDS, Stored};
use super::role::Role;
use super::secrets::random_bytes;
use crate::config::{Config, UserConfig};
use crate::store::{Store, StoreError};

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

pub(super) const KEY_SUB_PREFIX: &str = "key:";

/// Every identity the registry knows, and the checks of their secrets.
pub struct Identities {
    pub(super) config_users: HashMap<String, String>,
    /// (project, user) → role, from `[[project]]` owners/editors/viewers.
    pub(super) config_members: BTreeMap<(String, String), Role>,
    pub(super) projects: Vec<String>,
    pub(super) stored: RwLock<Stored>,
    /// Successful password checks: argon2id costs tens of milliseconds, and clients that use
    /// Basic auth send it on every request. Keyed by a salted hash of user and password.
    pub(super) verified: moka::sync::Cache<[u8; 32], String>,
    pub(super) cache_salt: [u8; 32],
    /// Held for the whole of a change (across its synced writes), never by readers.
    pub(super) changes: Mutex<()>,
    /// The last `TokenRecord::created_ns` handed out.
    pub(super) last_created_ns: AtomicU64,
    /// Where changes are written.
    pub(super) records: RecordStore,
}

impl Identities {
    /// Loads the config's users and members and everything stored in the index.
    pub fn load(config: &Config, store: &Arc<Store>) -> Result<Self, StoreError> {
        let mut stored = Stored::default();
        for kind in KINDS {
            for (id, v) in store.auth_records(kind)? {
                stored.insert(kind, &id, &v);
            }
        }
        Ok(Self::new(config, stored, RecordStore::Local(store.clone())))
    }

    /// Loads the config's users and members and everything in `records`, which later changes
    /// are written to.
    pub async fn load_from(config: &Config, records: RecordStore) -> Result<Self, RecordError> {
        let stored = Self::read_all(&records).await?;
        Ok(Self::new(config, stored, records))
    }

    /// Every record in `records`.
    pub(super) async fn read_all(records: &RecordStore) -> Result<Stored, RecordError> {
        let mut stored = Stored::default();
        for kind in KINDS {
            for (id, v) in records.list(kind).await? {
                stored.insert(kind, &id, &v);
            }
        }
        Ok(stored)
    }

    fn new(config: &Config, stored: Stored, records: RecordStore) -> Self {
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
            records,
        }
    }

    /// Serialises changes; see the module header.
    pub(super) fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A synced write of one record. Never under the `stored` lock: readers would wait for it.
    pub(super) fn put(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), RecordError> {
        self.assert_unlocked();
        self.records.put(kind, id, value)
    }

    /// A synced delete of one record; as `put`.
    pub(super) fn delete(&self, kind: &str, id: &str) -> Result<(), RecordError> {
        self.assert_unlocked();
        self.records.delete(kind, id)
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
    pub(super) fn next_created_ns(&self) -> u64 {
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

    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, Stored> {
        self.stored.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Stored> {
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

    pub(super) fn user_exists(&self, name: &str) -> bool {
        self.config_users.contains_key(name) || self.read().users.contains_key(name)
    }
}
