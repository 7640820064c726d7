//! Changing identities (for `transship user|key|token|member` and the members endpoint):
//! users, service-account keys, access and refresh tokens, memberships. Each change is a
//! durable write to the identities' `RecordStore`, then an update of the in-memory copy. Every
//! change is blocking (see `record_store`): call it from the blocking pool.

use std::collections::BTreeMap;
use std::time::Duration;

use super::identities::{Identities, KEY_SUB_PREFIX, Subject};
use super::record_store::RecordError;
use super::records::{
    KIND_KEY, KIND_MEMBER, KIND_TOKEN, KIND_USER, KeyFile, KeyInfo, KeyRecord, MemberInfo,
    MemberRecord, Stored, TokenInfo, TokenKind, TokenRecord, UserInfo, UserRecord, to_json,
};
use super::role::Role;
use super::secrets::{hash_password, random_id, random_secret, sha256_hex};
use crate::config::validate_user_name;
use crate::store::{StoreError, unix_now};

/// Refresh tokens kept per identity. Every `docker login` (and every `offline_token` request)
/// stores one for `auth.refresh_token_ttl`; beyond this many, the oldest are revoked.
pub const MAX_REFRESH_TOKENS: usize = 20;

/// Why an administrative change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Records(#[from] RecordError),
}

impl Identities {
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
    pub fn set_user(&self, name: &str, password: &str) -> Result<(), AdminError> {
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
        self.put(KIND_USER, name, &to_json(&record))?;
        self.write().users.insert(name.to_string(), record);
        self.verified.invalidate_all();
        Ok(())
    }

    /// Removes a stored user with their memberships and tokens.
    pub fn remove_user(&self, name: &str) -> Result<(), AdminError> {
        if self.config_users.contains_key(name) {
            return Err(AdminError::Invalid(format!(
                "user {name} is declared in the config file; remove it there"
            )));
        }
        let _change = self.change();
        if !self.read().users.contains_key(name) {
            return Err(AdminError::NotFound(format!("no user {name}")));
        }
        self.delete(KIND_USER, name)?;
        self.write().users.remove(name);
        let members: Vec<_> = self
            .read()
            .members
            .keys()
            .filter(|(_, u)| u == name)
            .cloned()
            .collect();
        for (project, user) in members {
            self.delete(KIND_MEMBER, &format!("{project}\0{user}"))?;
            self.write().members.remove(&(project, user));
        }
        self.drop_tokens_of(name)?;
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
    pub fn create_key(&self, project: &str, role: Role, name: &str) -> Result<KeyFile, AdminError> {
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
        self.put(KIND_KEY, &id, &to_json(&record))?;
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
    pub fn revoke_key(&self, id: &str) -> Result<(), AdminError> {
        let _change = self.change();
        self.forget(KIND_KEY, id, |s| &mut s.keys)?;
        self.drop_tokens_of(&format!("{KEY_SUB_PREFIX}{id}"))?;
        Ok(())
    }

    /// Issues an access or refresh token for `subject`; returns `(id, token)`. The token string
    /// is shown once; only its hash is kept.
    pub fn create_token(
        &self,
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
        self.put(KIND_TOKEN, &id, &to_json(&record))?;
        self.write().tokens.insert(id.clone(), record);
        if kind == TokenKind::Refresh {
            self.drop_oldest_refresh_tokens(&sub)?;
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

    pub fn revoke_token(&self, id: &str) -> Result<(), AdminError> {
        let _change = self.change();
        self.forget(KIND_TOKEN, id, |s| &mut s.tokens)
    }

    /// Removes the `kind` record `id` from the index, then from `table` in memory; the caller
    /// holds the change lock. An unknown id is `NotFound` ("no key …", "no token …").
    fn forget<T>(
        &self,
        kind: &'static str,
        id: &str,
        table: impl Fn(&mut Stored) -> &mut BTreeMap<String, T>,
    ) -> Result<(), AdminError> {
        if !table(&mut self.write()).contains_key(id) {
            return Err(AdminError::NotFound(format!("no {kind} {id}")));
        }
        self.delete(kind, id)?;
        table(&mut self.write()).remove(id);
        Ok(())
    }

    /// Drops expired tokens from the index; returns how many.
    pub fn prune_expired(&self) -> Result<usize, RecordError> {
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
            self.forget_token(id)?;
        }
        Ok(expired.len())
    }

    /// Deletes one token from the index, then from memory. The caller holds `change`.
    fn forget_token(&self, id: &str) -> Result<(), RecordError> {
        self.delete(KIND_TOKEN, id)?;
        self.write().tokens.remove(id);
        Ok(())
    }

    /// Deletes every token whose owner is `subject` (a `Subject::token_sub`). The caller holds
    /// `change`.
    fn drop_tokens_of(&self, subject: &str) -> Result<(), RecordError> {
        let ids: Vec<String> = self
            .read()
            .tokens
            .iter()
            .filter(|(_, t)| t.subject == subject)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.forget_token(&id)?;
        }
        Ok(())
    }

    /// Revokes `subject`'s oldest refresh tokens beyond `MAX_REFRESH_TOKENS`. The caller holds
    /// `change`.
    fn drop_oldest_refresh_tokens(&self, subject: &str) -> Result<(), RecordError> {
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
            self.forget_token(&id)?;
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

    pub fn set_member(&self, project: &str, user: &str, role: Role) -> Result<(), AdminError> {
        self.require_project(project)?;
        let _change = self.change();
        if !self.user_exists(user) {
            return Err(AdminError::NotFound(format!("no user {user}")));
        }
        self.put(
            KIND_MEMBER,
            &format!("{project}\0{user}"),
            &to_json(&MemberRecord { role }),
        )?;
        self.write()
            .members
            .insert((project.to_string(), user.to_string()), role);
        Ok(())
    }

    pub fn remove_member(&self, project: &str, user: &str) -> Result<(), AdminError> {
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
        self.delete(KIND_MEMBER, &format!("{project}\0{user}"))?;
        self.write().members.remove(&k);
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::credentials::{
        ACCESS_TOKEN_USER, CredentialError, JSON_KEY_BASE64_USER, JSON_KEY_USER,
    };
    use crate::config::Config;
    use crate::store::Store;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use std::sync::Arc;

    fn setup() -> (tempfile::TempDir, Arc<Store>, Identities) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), crate::store::StoreOptions::default()).unwrap());
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
        ids.set_user("alice", "alicepassword").unwrap();
        assert!(matches!(
            ids.set_user("bob", "short"),
            Err(AdminError::Invalid(_))
        ));
        assert!(ids.set_user("root", "whatever-long").is_err());
        assert!(ids.set_user("_json_key", "whatever-long").is_err());
        ids.set_member("team", "alice", Role::Viewer).unwrap();
        assert!(ids.set_member("nope", "alice", Role::Viewer).is_err());
        let key = ids.create_key("team", Role::Editor, "ci").unwrap();
        let key_json = serde_json::to_string(&key).unwrap();
        let (tid, token) = ids
            .create_token(
                &Subject::User("alice".into()),
                TokenKind::Access,
                Duration::from_secs(3600),
                "",
            )
            .unwrap();
        drop(ids);
        drop(store);

        // Everything survives a restart.
        let store =
            Arc::new(Store::open(dir.path(), crate::store::StoreOptions::default()).unwrap());
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
        ids.revoke_key(&key.private_key_id).unwrap();
        assert_eq!(
            ids.verify_basic(JSON_KEY_USER, &key_json),
            Err(CredentialError::UnknownKey)
        );
        ids.revoke_token(&tid).unwrap();
        assert_eq!(
            ids.verify_basic(ACCESS_TOKEN_USER, &token),
            Err(CredentialError::UnknownToken)
        );
        ids.remove_user("alice").unwrap();
        assert_eq!(
            ids.verify_basic("alice", "alicepassword"),
            Err(CredentialError::UnknownUser)
        );
        assert_eq!(ids.role(&alice, "team"), None);
        assert!(ids.is_empty());
    }

    #[test]
    fn expired_tokens_fail_and_are_pruned() {
        let (_dir, _store, ids) = setup();
        let root = Subject::User("root".into());
        let (_, t) = ids
            .create_token(&root, TokenKind::Refresh, Duration::from_secs(1), "")
            .unwrap();
        assert_eq!(ids.verify_token(&t, TokenKind::Refresh), Ok(root));
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(
            ids.verify_token(&t, TokenKind::Refresh),
            Err(CredentialError::ExpiredToken)
        );
        assert_eq!(ids.prune_expired().unwrap(), 1);
        assert!(ids.tokens().is_empty());
    }

    #[test]
    fn refresh_tokens_beyond_the_bound_drop_the_oldest() {
        let (_dir, _store, ids) = setup();
        let root = Subject::User("root".into());
        let hour = Duration::from_secs(3600);
        let (_, access) = ids
            .create_token(&root, TokenKind::Access, hour, "")
            .unwrap();
        let made: Vec<String> = (0..MAX_REFRESH_TOKENS + 5)
            .map(|_| {
                ids.create_token(&root, TokenKind::Refresh, hour, "login")
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
        let (_dir, _store, ids) = setup();
        ids.set_user("alice", "alicepassword").unwrap();
        ids.set_member("team", "alice", Role::Editor).unwrap();
        let alice = Subject::User("alice".into());
        let hour = Duration::from_secs(3600);
        for kind in [TokenKind::Access, TokenKind::Refresh] {
            ids.create_token(&alice, kind, hour, "").unwrap();
        }
        let key = ids.create_key("team", Role::Editor, "ci").unwrap();
        let sa = ids
            .verify_basic(JSON_KEY_USER, &serde_json::to_string(&key).unwrap())
            .unwrap();
        ids.create_token(&sa, TokenKind::Refresh, hour, "").unwrap();
        ids.remove_user("alice").unwrap();
        ids.revoke_key(&key.private_key_id).unwrap();
        assert!(ids.tokens().is_empty());
        assert!(ids.members("team").iter().all(|m| m.user != "alice"));
    }
}
