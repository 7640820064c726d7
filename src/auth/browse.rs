//! Access decisions for the console: which projects and caches a caller may see, what it may
//! do on a page (checked without an audit line: rendering a page asks about every button),
//! and signing in with the login form, which takes people, not machines.

use std::net::IpAddr;

use super::credentials::{JSON_KEY_BASE64_USER, JSON_KEY_USER};
use super::keys::Subject;
use super::{Action, Authorizer, Caller, Denial, Identity, audit_failure};
use crate::config::{MirrorPull, ProjectConfig};
use crate::oci::RepoName;
use crate::proxy::route::Namespace;

impl Authorizer {
    /// Whether `caller` may pull anything in `project` (the project is shown on the home page).
    pub fn may_browse_project(&self, caller: &Caller, project: &ProjectConfig) -> bool {
        let caller = self.effective_caller(caller);
        let subject = match &caller.identity {
            Identity::Subject(s) => Some(s),
            _ => None,
        };
        self.project_allows(project, subject, caller.peer, Action::Pull)
    }

    /// Whether `caller` may pull through the upstream with index `upstream`.
    pub fn may_browse_upstream(&self, caller: &Caller, upstream: usize) -> bool {
        match self.mirror_pulls.get(upstream) {
            Some(MirrorPull::Anonymous) => true,
            Some(MirrorPull::Authenticated) => {
                !matches!(self.effective_caller(caller).identity, Identity::Anonymous)
            }
            None => false,
        }
    }

    /// `authorize` without the audit line, for deciding what a page offers.
    pub fn may(
        &self,
        caller: &Caller,
        repo: &RepoName,
        namespace: &Namespace<'_>,
        action: Action,
    ) -> bool {
        self.check(caller, repo, namespace, action).is_ok()
    }

    /// Checks the login form's user name and password (throttled like every login). Key
    /// files are for machines: the form refuses them, and any key-bound subject.
    pub async fn console_login(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<Subject, Denial> {
        if user == JSON_KEY_USER || user == JSON_KEY_BASE64_USER {
            audit_failure(
                peer,
                user,
                "refused: key files cannot sign in to the console",
            );
            return Err(Denial::Forbidden(
                "key files are for machines; sign in with a user password or an access token"
                    .into(),
            ));
        }
        match self.verify_password(user, password, peer).await? {
            Subject::Key { .. } => {
                audit_failure(peer, user, "refused: a key cannot sign in to the console");
                Err(Denial::Forbidden(
                    "service-account keys cannot sign in to the console".into(),
                ))
            }
            s => Ok(s),
        }
    }

    /// The caller a console session stands for, if its subject still exists (a removed user's
    /// sessions end with it).
    pub fn session_caller(&self, sub: &str, peer: IpAddr) -> Option<Caller> {
        self.identities.subject(sub).map(|s| Caller {
            peer,
            identity: Identity::Subject(s),
        })
    }
}

/// What a console session was opened with, re-checked on every request: the session ends when
/// that credential changes (a password reset, a user removed and added again) or goes (an
/// access token revoked or expired), not only at its own expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialMark {
    /// A password: a fingerprint of the stored hash it was checked against.
    Password([u8; 32]),
    /// An access token, by id.
    Token(String),
}

impl super::identities::Identities {
    /// The mark of a credential that just signed in as `user` (see `CredentialMark`).
    pub fn credential_mark(&self, user: &str, password: &str) -> Option<CredentialMark> {
        use sha2::Digest as _;
        if user == crate::config::ACCESS_TOKEN_USER {
            let rest = password
                .trim()
                .strip_prefix(super::records::TokenKind::Access.prefix())?;
            return Some(CredentialMark::Token(rest.split_once('_')?.0.to_string()));
        }
        let hash = self.password_hash_of(user)?;
        Some(CredentialMark::Password(
            sha2::Sha256::digest(hash.as_bytes()).into(),
        ))
    }

    /// Whether the credential a session was opened with still stands for `sub`.
    pub fn credential_holds(&self, mark: &CredentialMark, sub: &str) -> bool {
        use sha2::Digest as _;
        match mark {
            // A user's `sub` is their name.
            CredentialMark::Password(fp) => self
                .password_hash_of(sub)
                .is_some_and(|h| <[u8; 32]>::from(sha2::Sha256::digest(h.as_bytes())) == *fp),
            CredentialMark::Token(id) => self
                .read()
                .tokens
                .get(id)
                .is_some_and(|t| t.subject == sub && t.expires > crate::store::unix_now()),
        }
    }

    /// The stored or configured password hash of user `name`.
    fn password_hash_of(&self, name: &str) -> Option<String> {
        if let Some(u) = self.read().users.get(name) {
            return Some(u.password_hash.clone());
        }
        self.config_users.get(name).cloned()
    }
}
