//! Checking the secrets callers present: a password (argon2id, with successful checks cached),
//! a JSON key file (`_json_key`, `_json_key_base64`) or an access token (`oauth2accesstoken`),
//! and the refresh tokens the token endpoint exchanges.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest as _, Sha256};

use super::identities::{Identities, Subject};
use super::records::{KIND_KEY, KIND_TOKEN, KIND_USER, KeyFile, TokenKind};
use super::secrets::{dummy_hash, secret_matches};
use crate::store::unix_now;

/// The usernames with a special meaning at login (as with GCR).
pub const JSON_KEY_USER: &str = "_json_key";
pub const JSON_KEY_BASE64_USER: &str = "_json_key_base64";
pub use crate::config::ACCESS_TOKEN_USER;

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

impl Identities {
    // ---- checking credentials -------------------------------------------------------------

    /// Checks a Basic username and password. Blocking: a password check runs argon2id, so
    /// call it from a blocking task.
    pub fn verify_basic(&self, user: &str, password: &str) -> Result<Subject, CredentialError> {
        match user {
            JSON_KEY_USER | JSON_KEY_BASE64_USER => self.verify_key_file(key_file(user, password)?),
            ACCESS_TOKEN_USER => self.verify_token(password, TokenKind::Access),
            _ => self.verify_password(user, password),
        }
    }

    /// True if `verify_basic` would answer without running argon2id.
    pub fn is_cheap(&self, user: &str, password: &str) -> bool {
        is_secret_login(user) || self.verified.contains_key(&self.cache_key(user, password))
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

    fn verify_key_file(&self, file: KeyFile) -> Result<Subject, CredentialError> {
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
        let (id, secret) = token_parts(token, kind).ok_or(CredentialError::MalformedToken)?;
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
}

/// The id and secret of a token string of `kind` (`PREFIX<id>_<secret>`).
pub(super) fn token_parts(token: &str, kind: TokenKind) -> Option<(&str, &str)> {
    token.trim().strip_prefix(kind.prefix())?.split_once('_')
}

/// The key file a `_json_key` (JSON) or `_json_key_base64` login presents.
fn key_file(user: &str, password: &str) -> Result<KeyFile, CredentialError> {
    let raw = if user == JSON_KEY_BASE64_USER {
        STANDARD
            .decode(password.trim())
            .map_err(|_| CredentialError::MalformedKeyFile)?
    } else {
        password.as_bytes().to_vec()
    };
    serde_json::from_slice(&raw).map_err(|_| CredentialError::MalformedKeyFile)
}

/// The record (kind and id) a Basic login names, whether or not it exists: a user, a key or
/// an access token. `None` when the login cannot name one.
pub(super) fn presented_record(user: &str, secret: &str) -> Option<(&'static str, String)> {
    match user {
        JSON_KEY_USER | JSON_KEY_BASE64_USER => key_file(user, secret)
            .ok()
            .map(|f| (KIND_KEY, f.private_key_id)),
        ACCESS_TOKEN_USER => {
            token_parts(secret, TokenKind::Access).map(|(id, _)| (KIND_TOKEN, id.to_string()))
        }
        _ => crate::config::validate_user_name(user)
            .ok()
            .map(|()| (KIND_USER, user.to_string())),
    }
}

impl CredentialError {
    /// True when the credential names nothing this replica holds (as opposed to a wrong
    /// secret or an expired token).
    pub fn names_nothing_known(&self) -> bool {
        matches!(
            self,
            Self::UnknownUser | Self::UnknownKey | Self::UnknownToken
        )
    }
}

/// A login name that carries a 256-bit secret rather than a password (a key file or an access
/// token): checked without argon2id, and never guessed per user.
pub fn is_secret_login(user: &str) -> bool {
    matches!(
        user,
        JSON_KEY_USER | JSON_KEY_BASE64_USER | ACCESS_TOKEN_USER
    )
}
