//! Who is calling, and what they may do. A request is first authenticated (no credentials,
//! Basic with a password / JSON key file / access token, or a Bearer token from our token
//! endpoint) and then authorized per repository:
//! - under a declared project, by the caller's role (owner, editor, viewer) or, for Bearer
//!   tokens, by the token's `access` claim; anonymous access follows the project's `anonymous`
//!   level, only for clients in its `anonymous_from` networks (loopback by default);
//! - anywhere else (a mirror namespace), pull follows the upstream's `pull` policy and push or
//!   delete is never allowed. Credentials a Docker daemon meant for Docker Hub arrive here too
//!   (moby#42022): where anonymous pull is allowed they are ignored, not rejected.
//!
//! With no users or keys at all and a listener beyond loopback, pushes are refused outright.
//! Every denial logs one audit line (`target: audit`) with who, what and why; secrets never.

mod admins;
mod browse;
pub use browse::CredentialMark;
mod cluster;
mod credentials;
mod identities;
pub mod jwt;
pub mod keys;
mod manage;
pub mod record_store;
mod records;
mod role;
pub mod scope;
mod secrets;
pub mod throttle;
pub mod token;

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::config::{AnonymousAccess, Config, MirrorPull, ProjectConfig};
use crate::oci::RepoName;
use crate::proxy::route::{MirrorRoute, Namespace, RouteError, Router};
use crate::store::{Store, StoreError};
use jwt::{Claims, TokenSigner};
use keys::{Identities, Role, Subject};
use scope::Access;
use throttle::LoginThrottle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Delete => "delete",
        }
    }

    /// The token scope actions a request needs (distribution's `appendAccessRecords`).
    pub fn scope_actions(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "pull,push",
            Self::Delete => "delete",
        }
    }
}

/// The token resource type and action that let a token manage a project's members:
/// `project:<project>:admin`, granted by the token endpoint to the project's owners only.
pub const PROJECT_SCOPE: &str = "project";
pub const ADMIN_ACTION: &str = "admin";

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Identity {
    Anonymous,
    /// Basic credentials: a password, a JSON key file or an access token.
    Subject(Subject),
    /// A token from our token endpoint; its `access` claim is what it may do.
    Token(Arc<Claims>),
}

/// The caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: IpAddr,
    pub identity: Identity,
}

impl Caller {
    pub fn anonymous(peer: IpAddr) -> Self {
        Self {
            peer,
            identity: Identity::Anonymous,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.identity {
            Identity::Anonymous => write!(f, "anonymous"),
            Identity::Subject(s) => write!(f, "{s}"),
            Identity::Token(c) if c.sub.is_empty() => write!(f, "anonymous token"),
            Identity::Token(c) => write!(f, "token of {}", c.sub),
        }
    }
}

/// Why a request is not let through; the HTTP layer turns it into 401/403/429.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No, bad or insufficient credentials: 401 with a challenge. `error` is the challenge's
    /// `error` parameter (`invalid_token`, `insufficient_scope`).
    Unauthenticated {
        message: String,
        error: Option<&'static str>,
    },
    /// Authenticated, but not allowed: 403 DENIED.
    Forbidden(String),
    /// Too many failed logins from this address or for this user: 429 with `Retry-After`.
    Throttled { retry_after: u64 },
    /// Too many password checks running and waiting at once: 429 with `Retry-After`.
    Busy { retry_after: u64 },
    /// An `Authorization` header that does not parse: 400 (RFC 6750 `invalid_request`).
    Malformed(String),
}

impl Denial {
    fn unauthenticated(message: impl Into<String>) -> Self {
        Self::Unauthenticated {
            message: message.into(),
            error: None,
        }
    }
}

/// The access-control side of the app: identities, token signing, throttling and policy.
pub struct Authorizer {
    /// Where names live: the same resolver the proxy routes with.
    router: Arc<Router>,
    /// Each upstream's pull policy, by index.
    mirror_pulls: Vec<MirrorPull>,
    pub identities: Arc<Identities>,
    pub signer: TokenSigner,
    pub throttle: LoginThrottle,
    /// Listening beyond loopback: with no identities, pushes are refused.
    exposed: bool,
    pub config: crate::config::AuthConfig,
}

/// The most a Basic `Authorization` header may carry (a JSON key file fits many times over).
const MAX_AUTHORIZATION: usize = 16 * 1024;

impl Authorizer {
    pub fn new(
        config: &Config,
        store: &Arc<Store>,
        router: Arc<Router>,
    ) -> Result<Self, AuthBuildError> {
        let identities = Arc::new(Identities::load(config, store)?);
        let signer = TokenSigner::open(
            &config.server.data_dir,
            &config.auth.issuer,
            &config.auth.service,
        )?;
        Ok(Self::assemble(config, identities, signer, router))
    }

    /// The parts both profiles share around their identities and signer.
    fn assemble(
        config: &Config,
        identities: Arc<Identities>,
        signer: TokenSigner,
        router: Arc<Router>,
    ) -> Self {
        Self {
            router,
            mirror_pulls: config.upstreams.iter().map(|u| u.pull).collect(),
            identities,
            signer,
            throttle: LoginThrottle::new(config.auth.max_failed_logins, config.auth.lockout.0),
            exposed: config.listens_beyond_loopback(),
            config: config.auth.clone(),
        }
    }

    /// The pull policy of a mirror namespace. A name that resolves to no upstream is answered
    /// with an error by the mirror handler whatever the policy, so it counts as anonymous here.
    fn mirror_pull(&self, route: &Result<MirrorRoute, RouteError>) -> MirrorPull {
        route
            .as_ref()
            .map_or(MirrorPull::Anonymous, |r| self.mirror_pulls[r.upstream])
    }

    /// True if credentials on requests in `namespace` are optional extras: a mirror namespace
    /// open to anonymous pulls, where bad credentials are ignored rather than refused.
    pub fn lenient_for(&self, namespace: &Namespace<'_>) -> bool {
        match namespace {
            Namespace::Mirror(route) => self.mirror_pull(route) == MirrorPull::Anonymous,
            Namespace::Project(_) => false,
        }
    }

    /// True when nobody could authenticate and the listener is reachable from other hosts.
    pub fn pushes_locked(&self) -> bool {
        self.exposed && self.identities.is_empty()
    }

    // ---- authentication -------------------------------------------------------------------

    /// Works out who sent `authorization`. With `lenient` (see `lenient_for`) the caller is
    /// anonymous whatever the header says.
    pub async fn authenticate(
        &self,
        authorization: Option<&http::HeaderValue>,
        peer: IpAddr,
        lenient: bool,
    ) -> Result<Caller, Denial> {
        // Where anonymous pull is allowed, credentials are not even looked at: they would
        // change nothing, and Docker Hub credentials must not fail or lock anyone out.
        let Some(header) = authorization.filter(|_| !lenient) else {
            return Ok(Caller::anonymous(peer));
        };
        let identity = self.authenticate_header(header, peer).await?;
        Ok(Caller { peer, identity })
    }

    async fn authenticate_header(
        &self,
        header: &http::HeaderValue,
        peer: IpAddr,
    ) -> Result<Identity, Denial> {
        match parse_authorization(header)? {
            Presented::Bearer(token) => {
                self.signer
                    .verify(&token)
                    .map(Identity::Token)
                    .map_err(|e| {
                        audit_failure(peer, "bearer token", &e.to_string());
                        Denial::Unauthenticated {
                            message: e.to_string(),
                            error: Some("invalid_token"),
                        }
                    })
            }
            Presented::Basic { user, password } => self
                .verify_password(&user, &password, peer)
                .await
                .map(Identity::Subject),
        }
    }

    /// Checks Basic credentials with throttling; shared by requests and the token endpoint.
    pub async fn verify_password(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<Subject, Denial> {
        // Key files and access tokens are 256-bit secrets: only passwords are guessed per user.
        let password_user = !credentials::is_secret_login(user);
        if let Some(retry_after) = self.throttle.refused(peer, password_user.then_some(user)) {
            audit_failure(peer, user, "refused: too many failed logins");
            return Err(Denial::Throttled { retry_after });
        }
        // A password check's turn is held until its failure is counted, so the next guess in
        // line sees it.
        let mut turn = None;
        let result = if self.identities.is_cheap(user, password) {
            self.identities.verify_basic(user, password)
        } else {
            let permit = self.throttle.check_permit().await.map_err(|_| {
                audit_failure(peer, user, "refused: too many password checks at once");
                Denial::Busy { retry_after: 1 }
            })?;
            // Ask again now it is our turn: guesses sent in parallel all passed the first
            // check before any of them failed.
            if let Some(retry_after) = self.throttle.refused(peer, password_user.then_some(user)) {
                audit_failure(peer, user, "refused: too many failed logins");
                return Err(Denial::Throttled { retry_after });
            }
            let (ids, u, p) = (
                self.identities.clone(),
                user.to_string(),
                password.to_string(),
            );
            // The turn moves into the check and back out, so it ends with the check even if
            // this request is dropped meanwhile.
            match tokio::task::spawn_blocking(move || (ids.verify_basic(&u, &p), permit)).await {
                Ok((result, permit)) => {
                    turn = Some(permit);
                    result
                }
                Err(_) => Err(keys::CredentialError::WrongPassword),
            }
        };
        // In the cluster profile, a credential made on another replica a moment ago may not
        // have reached this one yet.
        let result = match result {
            Err(e) if e.names_nothing_known() => self.recheck_unknown(user, password, e).await,
            other => other,
        };
        match result {
            Ok(subject) => {
                if password_user {
                    self.throttle.succeeded(user);
                }
                Ok(subject)
            }
            Err(e) => {
                audit_failure(peer, user, &e.to_string());
                // Only a real user's wrong password counts against the user: made-up names
                // would fill memory and lock out nobody.
                let counted = (e == keys::CredentialError::WrongPassword).then_some(user);
                let delay = self.throttle.failed(peer, counted);
                drop(turn);
                tokio::time::sleep(delay).await;
                Err(Denial::unauthenticated("invalid username or password"))
            }
        }
    }

    // ---- authorization --------------------------------------------------------------------

    /// The anonymous level of `project` for a client at `peer`.
    fn anonymous_level(project: &ProjectConfig, peer: IpAddr) -> AnonymousAccess {
        if project.anonymous_from.iter().any(|n| n.contains(peer)) {
            project.anonymous
        } else {
            AnonymousAccess::None
        }
    }

    /// What a subject (or anonymous, for `None`) may do in a project, ignoring tokens.
    fn project_allows(
        &self,
        project: &ProjectConfig,
        subject: Option<&Subject>,
        peer: IpAddr,
        action: Action,
    ) -> bool {
        let anonymous = match Self::anonymous_level(project, peer) {
            AnonymousAccess::None => false,
            AnonymousAccess::Pull => action == Action::Pull,
            AnonymousAccess::Push => true,
        };
        let role = subject.and_then(|s| self.identities.role(s, project.name.get_ref().as_str()));
        let by_role = match role {
            None => false,
            Some(Role::Viewer) => action == Action::Pull,
            Some(Role::Editor | Role::Owner) => true,
        };
        anonymous || by_role
    }

    /// Decides whether `caller` may do `action` on `repo`, which lives in `namespace` (resolved
    /// once per request by the proxy's router); logs an audit line when not.
    pub fn authorize(
        &self,
        caller: &Caller,
        repo: &RepoName,
        namespace: &Namespace<'_>,
        action: Action,
    ) -> Result<(), Denial> {
        self.check(caller, repo, namespace, action)
            .inspect_err(|d| {
                audit_denial(caller, &format!("{} {repo}", action.as_str()), d);
            })
    }

    fn check(
        &self,
        caller: &Caller,
        repo: &RepoName,
        namespace: &Namespace<'_>,
        action: Action,
    ) -> Result<(), Denial> {
        let project = match namespace {
            Namespace::Mirror(route) => return self.check_mirror(caller, repo, route, action),
            Namespace::Project(p) => p,
        };
        if action != Action::Pull && self.pushes_locked() {
            return Err(Denial::Forbidden(
                "pushes are refused: transship listens beyond loopback and has no users; create one with `transship user add`".into(),
            ));
        }
        match &caller.identity {
            Identity::Token(claims) => {
                // A token grants no more than its subject's role now, or anonymous access
                // from where it is used: minted on loopback or on a network with anonymous
                // push (or behind a proxy that looked like one), it must not carry that
                // network's rights elsewhere; and a member removed since keeps nothing.
                let subject = (!claims.sub.is_empty())
                    .then(|| self.identities.subject(&claims.sub))
                    .flatten();
                if !claims.allows("repository", repo.as_str(), action.as_str()) {
                    Err(Denial::Unauthenticated {
                        message: format!("token does not grant {} on {repo}", action.as_str()),
                        error: Some("insufficient_scope"),
                    })
                } else if !self.project_allows(project, subject.as_ref(), caller.peer, action) {
                    Err(Denial::Unauthenticated {
                        message: format!(
                            "{} {repo} is not allowed for this token from this address",
                            action.as_str()
                        ),
                        error: Some("insufficient_scope"),
                    })
                } else {
                    Ok(())
                }
            }
            Identity::Anonymous => {
                if self.project_allows(project, None, caller.peer, action) {
                    Ok(())
                } else {
                    Err(Denial::unauthenticated(format!(
                        "authentication required to {} {repo}",
                        action.as_str()
                    )))
                }
            }
            Identity::Subject(s) => {
                if self.project_allows(project, Some(s), caller.peer, action) {
                    Ok(())
                } else {
                    Err(Denial::Forbidden(format!(
                        "{s} may not {} {repo}",
                        action.as_str()
                    )))
                }
            }
        }
    }

    fn check_mirror(
        &self,
        caller: &Caller,
        repo: &RepoName,
        route: &Result<MirrorRoute, RouteError>,
        action: Action,
    ) -> Result<(), Denial> {
        if action != Action::Pull {
            return Err(Denial::Forbidden(format!(
                "{repo} is not under a project: mirror namespaces are read-only (push to a project, e.g. local/{})",
                repo.components().last().unwrap_or("image")
            )));
        }
        match self.mirror_pull(route) {
            MirrorPull::Anonymous => Ok(()),
            MirrorPull::Authenticated => match &caller.identity {
                Identity::Subject(_) => Ok(()),
                Identity::Token(c)
                    if !c.sub.is_empty() && c.allows("repository", repo.as_str(), "pull") =>
                {
                    Ok(())
                }
                Identity::Token(c) if !c.sub.is_empty() => Err(Denial::Unauthenticated {
                    message: format!("token does not grant pull on {repo}"),
                    error: Some("insufficient_scope"),
                }),
                _ => Err(Denial::unauthenticated(format!(
                    "this mirror requires authentication to pull {repo}"
                ))),
            },
        }
    }

    /// `GET /v2/` and the catalog need a caller we know (any valid token counts).
    pub fn require_authenticated(&self, caller: &Caller) -> Result<(), Denial> {
        match caller.identity {
            Identity::Anonymous => Err(Denial::unauthenticated("authentication required")),
            _ => Ok(()),
        }
    }

    /// Managing a project's members takes its owner role, proven directly (Basic credentials)
    /// or by a token that grants `project:<project>:admin` to a subject who is still an owner.
    /// A token's subject alone is not enough: a token asked for pulls must not manage members.
    pub fn require_owner(&self, caller: &Caller, project: &str) -> Result<(), Denial> {
        self.check_owner(caller, project).inspect_err(|d| {
            audit_denial(caller, &format!("manage members of {project}"), d);
        })
    }

    fn check_owner(&self, caller: &Caller, project: &str) -> Result<(), Denial> {
        let subject = match &caller.identity {
            Identity::Anonymous => return Err(Denial::unauthenticated("authentication required")),
            Identity::Subject(s) => s.clone(),
            Identity::Token(c) => {
                if !c.allows(PROJECT_SCOPE, project, ADMIN_ACTION) {
                    return Err(Denial::Unauthenticated {
                        message: format!(
                            "token does not grant {PROJECT_SCOPE}:{project}:{ADMIN_ACTION}"
                        ),
                        error: Some("insufficient_scope"),
                    });
                }
                self.identities
                    .subject(&c.sub)
                    .ok_or_else(|| Denial::Unauthenticated {
                        message: "the token's identity no longer exists".into(),
                        error: Some("invalid_token"),
                    })?
            }
        };
        if self.identities.role(&subject, project) == Some(Role::Owner) {
            Ok(())
        } else {
            Err(Denial::Forbidden(format!(
                "{subject} is not an owner of project {project}"
            )))
        }
    }

    /// True if `caller` authenticated directly as an owner of the declared project `project`.
    fn owns(&self, caller: &Caller, project: &str) -> bool {
        let Identity::Subject(s) = &caller.identity else {
            return false;
        };
        self.router
            .projects()
            .iter()
            .any(|p| p.name.get_ref().as_str() == project)
            && self.identities.role(s, project) == Some(Role::Owner)
    }

    /// The catalog: anyone may ask (the listing is filtered); a token must carry the scope.
    pub fn authorize_catalog(&self, caller: &Caller) -> Result<(), Denial> {
        match &caller.identity {
            Identity::Token(c) if !c.allows("registry", "catalog", "*") => {
                Err(Denial::Unauthenticated {
                    message: "token does not grant registry:catalog:*".into(),
                    error: Some("insufficient_scope"),
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether `caller` may see `repo` in the catalog: they could pull it. For a token, what
    /// its subject may pull now. A cached mirror repository is decided by the pull policy of
    /// the upstream it was cached from, so anonymous callers see only those of upstreams with
    /// `pull = "anonymous"`; one whose upstream (or project) is gone from the config is shown
    /// to nobody (its name now leads elsewhere, and its old policy is unknown).
    pub fn may_list(&self, caller: &Caller, repo: &str) -> bool {
        let Ok(repo) = repo.parse::<RepoName>() else {
            return false;
        };
        let namespace = self.router.namespace(&repo, None);
        if let Namespace::Mirror(route) = &namespace
            && !route.as_ref().is_ok_and(|route| route.local == repo)
        {
            return false;
        }
        let as_subject = self.effective_caller(caller);
        self.check(&as_subject, &repo, &namespace, Action::Pull)
            .is_ok()
    }

    /// A token's caller re-expressed as its subject (or anonymous), for listing and granting.
    fn effective_caller(&self, caller: &Caller) -> Caller {
        match &caller.identity {
            Identity::Token(c) => Caller {
                peer: caller.peer,
                identity: self
                    .identities
                    .subject(&c.sub)
                    .map_or(Identity::Anonymous, Identity::Subject),
            },
            _ => caller.clone(),
        }
    }

    /// The part of `requested` that `caller` may have: never an error for asking too much.
    pub fn grant(&self, caller: &Caller, requested: &[Access]) -> Vec<Access> {
        let mut out: Vec<Access> = Vec::new();
        for want in requested {
            let actions: Vec<String> = match want.kind.as_str() {
                "repository" => {
                    let Ok(repo) = want.name.parse::<RepoName>() else {
                        continue;
                    };
                    // A token scope names a repository without `?ns=`.
                    let namespace = self.router.namespace(&repo, None);
                    Action::ALL
                        .into_iter()
                        .filter(|a| want.allows(a.as_str()))
                        .filter(|a| self.check(caller, &repo, &namespace, *a).is_ok())
                        .map(|a| a.as_str().to_string())
                        .collect()
                }
                "registry" if want.name == "catalog" && want.allows("*") => vec!["*".into()],
                PROJECT_SCOPE if want.allows(ADMIN_ACTION) && self.owns(caller, &want.name) => {
                    vec![ADMIN_ACTION.into()]
                }
                _ => Vec::new(),
            };
            if actions.is_empty() {
                continue;
            }
            match out
                .iter_mut()
                .find(|a| a.kind == want.kind && a.name == want.name)
            {
                Some(a) => {
                    for act in actions {
                        if !a.actions.contains(&act) {
                            a.actions.push(act);
                        }
                    }
                }
                None => out.push(Access {
                    kind: want.kind.clone(),
                    name: want.name.clone(),
                    actions,
                }),
            }
        }
        out
    }

    /// Projects that let anonymous clients push (from their `anonymous_from` networks).
    pub fn anonymous_push_projects(&self) -> Vec<&str> {
        self.router
            .projects()
            .iter()
            .filter(|p| p.anonymous == AnonymousAccess::Push)
            .map(|p| p.name.get_ref().as_str())
            .collect()
    }

    /// Projects that let anonymous clients outside loopback push: worth a warning at startup.
    pub fn open_to_the_network(&self) -> Vec<&str> {
        self.router
            .projects()
            .iter()
            .filter(|p| {
                p.anonymous == AnonymousAccess::Push
                    && p.anonymous_from
                        .iter()
                        .any(|n| !["127.0.0.0/8", "::1/128"].contains(&n.to_string().as_str()))
            })
            .map(|p| p.name.get_ref().as_str())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthBuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] jwt::KeyError),
    #[error(transparent)]
    Records(#[from] record_store::RecordError),
    #[error(transparent)]
    Db(#[from] crate::cluster::pg::PgError),
}

/// What an `Authorization` header presents.
pub enum Presented {
    Basic { user: String, password: String },
    Bearer(String),
}

/// Parses an `Authorization` header (size-limited, Basic or Bearer) without checking it.
pub fn parse_authorization(header: &http::HeaderValue) -> Result<Presented, Denial> {
    if header.len() > MAX_AUTHORIZATION {
        return Err(Denial::Malformed("Authorization header too large".into()));
    }
    let value = header
        .to_str()
        .map_err(|_| Denial::Malformed("Authorization header is not ASCII".into()))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Presented::Bearer(rest.to_string()))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let (user, password) = decode_basic(rest)?;
        Ok(Presented::Basic { user, password })
    } else {
        Err(Denial::Malformed(
            "unsupported Authorization scheme; use Basic or Bearer".into(),
        ))
    }
}

/// Decodes `base64(user:password)`.
fn decode_basic(b64: &str) -> Result<(String, String), Denial> {
    let raw = STANDARD
        .decode(b64)
        .map_err(|_| Denial::Malformed("Basic credentials are not valid base64".into()))?;
    let text = String::from_utf8(raw)
        .map_err(|_| Denial::Malformed("Basic credentials are not UTF-8".into()))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| Denial::Malformed("Basic credentials lack a ':'".into()))?;
    Ok((user.to_string(), password.to_string()))
}

fn audit_failure(peer: IpAddr, user: &str, why: &str) {
    // The user name is printed escaped and cut short: it is attacker-controlled input.
    let user: String = user.chars().take(64).collect();
    tracing::warn!(target: "audit", %peer, user = ?user, why, "audit: login failed");
}

fn audit_denial(caller: &Caller, what: &str, denial: &Denial) {
    let why = match denial {
        Denial::Unauthenticated { message, .. }
        | Denial::Forbidden(message)
        | Denial::Malformed(message) => message.as_str(),
        Denial::Throttled { .. } => "too many failed logins",
        Denial::Busy { .. } => "too many password checks at once",
    };
    tracing::warn!(target: "audit", peer = %caller.peer, who = %caller, what, why, "audit: access denied");
}

/// `user:password` for tests and the CLI.
pub fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}
