//! The TOML configuration: schema, embedded defaults and validation. `config/transship.toml` is
//! both the documented example and the embedded default, so the docs cannot drift from the
//! code. Every value is validated while it is deserialised, so a bad file fails with the key,
//! the line and what was expected; cross-key rules (duplicates, overlaps) point at the line of
//! the offending name.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::oci::RepoName;

mod notify;
mod storage;
mod units;
mod users;
mod warm;
pub use notify::{NotifyConfig, NotifyEvent, NotifyFormat};
pub use storage::{PostgresConfig, S3Config, S3Credentials, replica_url_of};
use units::serialize_redacted;
pub use units::{ByteSize, HumanDuration, IpNet, Percent, REDACTED, Secret};
pub use users::{ACCESS_TOKEN_USER, is_valid_hash, validate_user_name};
pub use warm::WarmConfig;

/// The documented example config; also what `transship serve` runs with when given no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/transship.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub uploads: UploadsConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub scrub: ScrubConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default, rename = "project")]
    pub projects: Vec<ProjectConfig>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default, rename = "user", skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
    /// Images the server keeps current on its own (`[[warm]]`).
    #[serde(default, rename = "warm", skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<WarmConfig>,
    /// Webhook endpoints for registry events.
    #[serde(default, rename = "notify", skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifyConfig>,
}

/// The token service and login hardening.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The `service` of challenges and the `aud` of tokens.
    #[serde(default = "default_service")]
    pub service: String,
    /// The `iss` of tokens.
    #[serde(default = "default_service")]
    pub issuer: String,
    /// The token endpoint URL put in challenges; default: built from each request's Host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// Lifetime of the JWTs the token endpoint issues.
    #[serde(default = "default_token_ttl")]
    pub token_ttl: HumanDuration,
    /// Lifetime of refresh tokens (`docker login` stores one as its identity token).
    #[serde(default = "default_refresh_ttl")]
    pub refresh_token_ttl: HumanDuration,
    /// Failed logins from one address before further attempts are refused.
    #[serde(default = "default_max_failed_logins")]
    pub max_failed_logins: u32,
    /// How long failures are remembered, and how long an address stays refused.
    #[serde(default = "default_lockout")]
    pub lockout: HumanDuration,
    /// Users who administer the whole registry: the cache inventory, pins and
    /// eviction under `/transship/v1/cache/`. Owning a project does not make one an admin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            service: default_service(),
            issuer: default_service(),
            realm: None,
            token_ttl: default_token_ttl(),
            refresh_token_ttl: default_refresh_ttl(),
            max_failed_logins: default_max_failed_logins(),
            lockout: default_lockout(),
            admins: Vec::new(),
        }
    }
}

fn default_service() -> String {
    "transship".into()
}
fn default_token_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_refresh_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(90 * 24 * 3600))
}
fn default_max_failed_logins() -> u32 {
    10
}
fn default_lockout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// A user declared in the config (more can be added with `transship user add`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An argon2id PHC string, as printed by `transship user hash`. Never rendered: a hash
    /// lets anyone who sees it guess passwords offline.
    #[serde(serialize_with = "serialize_redacted")]
    pub password_hash: String,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password_hash", &REDACTED)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Reverse proxies (IPs or CIDRs) whose `X-Forwarded-For` names the client; default none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Serve HTTPS with these files; without it the listener speaks plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// Certificate and key files (PEM) for HTTPS. Both are re-read on SIGHUP and when they change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./transship-data")
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            shutdown_timeout: default_shutdown_timeout(),
            log_format: LogFormat::default(),
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub manifest_cache: ByteSize,
    pub max_manifest_size: ByteSize,
    /// Memory for small blobs (up to 64 KiB each) served without reading their files.
    pub small_blob_cache: ByteSize,
    /// The cluster profile's bucket (with `postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
    /// The cluster profile's metadata database (with `s3`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConfig>,
    /// The cluster profile: where the other replicas reach this one's internal fill endpoint
    /// (default `http://<server.listen>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_url: Option<String>,
    /// The cluster profile: how long a replica's claim on a cold fill lasts unrenewed (how
    /// long the others wait for a replica that died mid-fill).
    pub fill_lease: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            manifest_cache: ByteSize(64 << 20),
            max_manifest_size: ByteSize(4 << 20),
            small_blob_cache: ByteSize(4 << 20),
            s3: None,
            postgres: None,
            replica_url: None,
            fill_lease: HumanDuration(Duration::from_secs(15)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadsConfig {
    pub abandon_after: HumanDuration,
    pub reap_interval: HumanDuration,
    /// Upload sessions open at once, all clients together (429 beyond it).
    pub max_sessions: usize,
    /// Upload sessions open at once per client (identity, or address when anonymous).
    pub max_sessions_per_client: usize,
    /// A request body that sends nothing for this long is abandoned (408).
    pub body_idle_timeout: HumanDuration,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        Self {
            abandon_after: HumanDuration(Duration::from_secs(24 * 3600)),
            reap_interval: HumanDuration(Duration::from_secs(600)),
            max_sessions: 4096,
            max_sessions_per_client: 512,
            body_idle_timeout: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    pub interval: HumanDuration,
    pub grace_period: HumanDuration,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration(Duration::from_secs(3600)),
            grace_period: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

/// The periodic re-hash of stored blobs (`store::scrub`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubConfig {
    /// Time between the starts of two passes; zero turns scrubbing off.
    pub interval: HumanDuration,
    /// Bytes read per second at most; zero means no limit.
    pub rate: ByteSize,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self {
            interval: HumanDuration(Duration::from_secs(24 * 3600)),
            rate: ByteSize(50 << 20),
        }
    }
}

/// The pull-through cache's lifecycle: its byte budget, eviction and tag-history retention
/// (`store::evict`). Pushed content never counts against the budget and is never evicted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of cached (mirror) blobs allowed; unset means no budget (only `min_free_disk`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Once over `max_size`, evict until cached bytes are at most this share of it.
    pub evict_to: Percent,
    /// Evict cached content while the data directory's filesystem has less free space than
    /// this; when nothing more can be evicted, refuse new fills (503) and pushes (507).
    pub min_free_disk: ByteSize,
    /// How often the budget and the free space are checked (a fill that crosses the budget
    /// also starts a check at once).
    pub check_interval: HumanDuration,
    /// How often the in-memory record of pulls is written to the index (a crash loses at
    /// most this much of it).
    pub access_flush_interval: HumanDuration,
    /// Tag-resolution history older than this is dropped.
    pub history_max_age: HumanDuration,
    /// At most this many history entries are kept per tag (the newest).
    pub history_max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: None,
            evict_to: Percent(90),
            min_free_disk: ByteSize(1 << 30),
            check_interval: HumanDuration(Duration::from_secs(10)),
            access_flush_interval: HumanDuration(Duration::from_secs(60)),
            history_max_age: HumanDuration(Duration::from_secs(90 * 24 * 3600)),
            history_max_entries: 1000,
        }
    }
}

/// Who may do what without credentials in a project.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousAccess {
    #[default]
    None,
    Pull,
    Push,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub name: Spanned<RepoName>,
    #[serde(default)]
    pub anonymous: AnonymousAccess,
    #[serde(default = "loopback_networks")]
    pub anonymous_from: Vec<IpNet>,
    /// Users with each role (more can be added with `transship member add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub editors: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub viewers: Vec<String>,
}

/// Who may pull through an upstream's mirror namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorPull {
    /// Anyone, with or without credentials.
    #[default]
    Anonymous,
    /// Any authenticated user, key or token.
    Authenticated,
}

fn loopback_networks() -> Vec<IpNet> {
    vec![
        IpNet::from_str("127.0.0.0/8").expect("literal"),
        IpNet::from_str("::1/128").expect("literal"),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: Spanned<RepoName>,
    pub url: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub default: bool,
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: HumanDuration,
    #[serde(default = "default_stale_if_error")]
    pub stale_if_error: HumanDuration,
    #[serde(default)]
    pub offline: bool,
    /// Who may pull through this upstream.
    #[serde(default)]
    pub pull: MirrorPull,
    /// How long an upstream 404 is remembered before asking again.
    #[serde(default = "default_not_found_ttl")]
    pub not_found_ttl: HumanDuration,
    /// Upstream account (e.g. a Docker Hub user, for its higher pull limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A file holding the password (first line), instead of `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for this upstream (added to the webpki roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Blob downloads from this upstream at once; more wait their turn.
    #[serde(default = "default_max_concurrent_fills")]
    pub max_concurrent_fills: usize,
}

fn default_max_concurrent_fills() -> usize {
    32
}

impl UpstreamConfig {
    /// `(username, password)` if credentials are configured; reads `password_file`.
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        let Some(user) = &self.username else {
            return Ok(None);
        };
        let password = match (&self.password, &self.password_file) {
            (Some(p), None) => p.expose().to_string(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            _ => return Err("set exactly one of password and password_file with username".into()),
        };
        Ok(Some((user.clone(), password)))
    }
}

fn default_not_found_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_tag_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_stale_if_error() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEFAULT, "embedded default")
            .expect("the embedded default config is valid")
    }

    /// Loads a config file over the embedded defaults (see `parse_over_defaults`).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_over_defaults(&text, &path.display().to_string())
    }

    /// Parses a config file that holds only what differs from the embedded defaults: a key
    /// or table it leaves out has its default value, and a list it does not declare at all
    /// (`[[project]]`, `[[upstream]]`, `[[user]]`) is the defaults' list. A list it declares
    /// replaces the defaults' list rather than extending it, so a file can drop the default
    /// `local` project or `docker.io` upstream (`project = []` declares none).
    pub fn parse_over_defaults(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config = Self::deserialize_document(text, origin)?;
        let declared: toml::Table = toml::from_str(text).unwrap_or_default();
        let defaults = Self::embedded();
        if !declared.contains_key("project") {
            config.projects = defaults.projects;
        }
        if !declared.contains_key("upstream") {
            config.upstreams = defaults.upstreams;
        }
        if !declared.contains_key("user") {
            config.users = defaults.users;
        }
        config
            .validate(text)
            .map_err(|message| ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })?;
        Ok(config)
    }

    /// Parses and validates one config document as written: omitted keys and tables take
    /// their defaults, omitted lists are empty. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config = Self::deserialize_document(text, origin)?;
        config
            .validate(text)
            .map_err(|message| ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })?;
        Ok(config)
    }

    fn deserialize_document(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default();
            // Type errors quote the value: never for a line that holds a secret.
            let message = match e.span() {
                Some(s) if holds_secret(text, s.start) => {
                    format!("invalid value for a secret (not shown; {SECRET_HINT})")
                }
                _ => e.message().to_string(),
            };
            ConfigError::Invalid {
                origin: format!("{origin}{location}"),
                message,
            }
        })
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        let at = |s: &Spanned<RepoName>| line_of(text, s.span().start);
        for (i, p) in self.projects.iter().enumerate() {
            for q in &self.projects[..i] {
                let (a, b) = (p.name.get_ref(), q.name.get_ref());
                if a.is_within(b.as_str()) || b.is_within(a.as_str()) {
                    return Err(format!(
                        "line {}: project.name {:?} overlaps project {:?} (line {}); projects must not nest",
                        at(&p.name),
                        a.as_str(),
                        b.as_str(),
                        at(&q.name)
                    ));
                }
            }
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if !(u.url.starts_with("https://") || u.url.starts_with("http://")) {
                return Err(format!(
                    "line {}: upstream.url {:?} must start with https:// or http://",
                    at(&u.name),
                    redact_url(&u.url)
                ));
            }
            if has_userinfo(&u.url) {
                return Err(format!(
                    "line {}: upstream.url {:?} must not hold credentials: use username and password or password_file",
                    at(&u.name),
                    redact_url(&u.url)
                ));
            }
            for v in &self.upstreams[..i] {
                if u.name.get_ref() == v.name.get_ref() {
                    return Err(format!(
                        "line {}: upstream.name {:?} is declared twice",
                        at(&u.name),
                        u.name.get_ref().as_str()
                    ));
                }
            }
            if let Some(p) = self
                .projects
                .iter()
                .find(|p| p.name.get_ref().is_within(u.name.get_ref().as_str()))
            {
                return Err(format!(
                    "line {}: project {:?} lies inside upstream namespace {:?}",
                    at(&p.name),
                    p.name.get_ref().as_str(),
                    u.name.get_ref().as_str()
                ));
            }
        }
        for u in &self.upstreams {
            let both = u.password.is_some() && u.password_file.is_some();
            let orphan =
                u.username.is_none() && (u.password.is_some() || u.password_file.is_some());
            let missing = u.username.is_some() && u.password.is_none() && u.password_file.is_none();
            if both || orphan || missing {
                return Err(format!(
                    "line {}: upstream {:?}: give username with exactly one of password and password_file",
                    at(&u.name),
                    u.name.get_ref().as_str()
                ));
            }
        }
        if let Some(u) = self.upstreams.iter().find(|u| u.max_concurrent_fills == 0) {
            return Err(format!(
                "line {}: upstream {:?}: max_concurrent_fills must be at least 1",
                at(&u.name),
                u.name.get_ref().as_str()
            ));
        }
        self.validate_auth()?;
        if self.cache.check_interval.0 < Duration::from_secs(1)
            || self.cache.access_flush_interval.0 < Duration::from_secs(1)
        {
            return Err(
                "cache.check_interval and cache.access_flush_interval must be at least 1s".into(),
            );
        }
        if self.cache.history_max_entries == 0 {
            return Err("cache.history_max_entries must be at least 1".into());
        }
        warm::validate(self)?;
        notify::validate(&self.notify)?;
        storage::validate(&self.storage)?;
        storage::validate_replica_url(&self.storage, &self.server)?;
        if self.upstreams.iter().filter(|u| u.default).count() > 1 {
            return Err("more than one upstream has default = true; at most one may".into());
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        for (i, u) in self.users.iter().enumerate() {
            validate_user_name(&u.name).map_err(|e| format!("user: {e}"))?;
            if self.users[..i].iter().any(|v| v.name == u.name) {
                return Err(format!("user {:?} is declared twice", u.name));
            }
            if !is_valid_hash(&u.password_hash) {
                return Err(format!(
                    "user {:?}: password_hash is not an argon2id hash (make one with `transship user hash`)",
                    u.name
                ));
            }
        }
        for p in &self.projects {
            for user in p.owners.iter().chain(&p.editors).chain(&p.viewers) {
                validate_user_name(user)
                    .map_err(|e| format!("project {:?}: {e}", p.name.get_ref().as_str()))?;
            }
        }
        let a = &self.auth;
        if let Some(realm) = &a.realm
            && (!(realm.starts_with("https://") || realm.starts_with("http://"))
                || has_userinfo(realm))
        {
            return Err(format!(
                "auth.realm {:?} must be an absolute http:// or https:// URL without credentials",
                redact_url(realm)
            ));
        }
        let token_like = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        };
        if !token_like(&a.service) || !token_like(&a.issuer) {
            return Err(
                "auth.service and auth.issuer must be non-empty, without spaces or quotes".into(),
            );
        }
        if a.token_ttl.0 < Duration::from_secs(60) {
            return Err(
                "auth.token_ttl must be at least 60s (clients reject shorter tokens)".into(),
            );
        }
        if a.max_failed_logins == 0 {
            return Err("auth.max_failed_logins must be at least 1".into());
        }
        Ok(())
    }

    /// True if the listener may be reached from other machines.
    pub fn listens_beyond_loopback(&self) -> bool {
        !self.server.listen.ip().is_loopback()
    }

    /// Renders the effective config as TOML (for `check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn project(&self, name: &RepoName) -> Option<&ProjectConfig> {
        project_of(&self.projects, name)
    }
}

/// Keys whose values are secrets: never quoted in an error.
const SECRET_KEYS: &[&str] = &["password", "password_hash", "secret"];
const SECRET_HINT: &str = "password and password_hash take a string";

/// True if the line holding `offset` assigns a secret key.
fn holds_secret(text: &str, offset: usize) -> bool {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    line.split([',', '{'])
        .filter_map(|part| part.split_once('='))
        .any(|(key, _)| SECRET_KEYS.contains(&key.trim().trim_matches('"')))
}

/// The authority part of an `http(s)://` URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

/// True if a URL carries `user[:password]@`.
fn has_userinfo(url: &str) -> bool {
    authority(url).contains('@')
}

/// The URL with any `user:password@` replaced, for messages.
fn redact_url(url: &str) -> String {
    match authority(url).rsplit_once('@') {
        Some((userinfo, _)) => url.replacen(&format!("{userinfo}@"), &format!("{REDACTED}@"), 1),
        None => url.to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The project of `projects` that `name` is under, if any.
pub fn project_of<'a>(projects: &'a [ProjectConfig], name: &RepoName) -> Option<&'a ProjectConfig> {
    projects
        .iter()
        .find(|p| name.is_within(p.name.get_ref().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_as_documented() {
        let c = Config::embedded();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.server.data_dir, PathBuf::from("./transship-data"));
        assert_eq!(c.projects.len(), 1);
        assert_eq!(c.projects[0].name.get_ref().as_str(), "local");
        assert_eq!(c.projects[0].anonymous, AnonymousAccess::Push);
        assert!(
            c.upstreams
                .iter()
                .any(|u| u.name.get_ref().as_str() == "docker.io" && u.default)
        );
        assert_eq!(c.storage.max_manifest_size.0, 4 << 20);
        assert!(c.users.is_empty() && c.projects[0].owners.is_empty());
        assert_eq!(c.upstreams[0].pull, MirrorPull::Anonymous);
        assert_eq!(c.auth.service, "transship");
        assert_eq!(c.auth.token_ttl.0, Duration::from_secs(300));
        assert!(c.auth.realm.is_none());
        // The rendered config parses back to the same thing.
        let again = Config::parse(&c.to_toml(), "rendered").unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn errors_name_key_and_line() {
        let text = "[server]\nlisten = \"127.0.0.1:5000\"\ndata_dir = \"d\"\nshutdown_timeout = \"10 parsecs\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("duration"), "{e}");
        let text = "[server]\nlisten = \"nope\"\ndata_dir = \"d\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let text = "[server]\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\nlisten_typo = 1\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("listen_typo") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn cross_key_rules() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\n";
        let nested = format!("{base}[[project]]\nname = \"a\"\n[[project]]\nname = \"a/b\"\n");
        let e = Config::parse(&nested, "t").unwrap_err().to_string();
        assert!(e.contains("line 7") && e.contains("nest"), "{e}");
        for (extra, wanted) in [
            ("[[project]]\nname = \"Bad\"\n", "line 5"),
            (
                "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\n[[upstream]]\nname = \"x.io\"\nurl = \"https://y.io\"\n",
                "twice",
            ),
            (
                "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\n[[project]]\nname = \"x.io/p\"\n",
                "inside upstream",
            ),
            (
                "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\nmax_concurrent_fills = 0\n",
                "max_concurrent_fills",
            ),
            (
                "[[user]]\nname = \"a\"\npassword_hash = \"plain\"\n",
                "argon2id",
            ),
            (
                "[[user]]\nname = \"Admin\"\npassword_hash = \"x\"\n",
                "invalid user name",
            ),
            ("[auth]\ntoken_ttl = \"10s\"\n", "at least 60s"),
            ("[auth]\nrealm = \"/v2/token\"\n", "absolute"),
            ("[auth]\nservice = \"a b\"\n", "auth.service"),
            ("[auth]\nmax_failed_logins = 0\n", "at least 1"),
            (
                "[[project]]\nname = \"p\"\nowners = [\"Bad User\"]\n",
                "project \"p\"",
            ),
        ] {
            let e = Config::parse(&format!("{base}{extra}"), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(wanted), "{extra}: {e}");
        }
    }

    #[test]
    fn a_file_holds_only_what_differs_from_the_defaults() {
        let c = Config::parse_over_defaults("[gc]\ninterval = \"2h\"\n", "t").unwrap();
        let d = Config::embedded();
        assert_eq!(c.gc.interval.0, Duration::from_secs(7200));
        assert_eq!(c.server.listen, d.server.listen);
        assert_eq!(c.server.data_dir, d.server.data_dir);
        assert_eq!(c.gc.grace_period, d.gc.grace_period);
        // Lists not declared are the defaults'; everything else matches the defaults too.
        let mut expected = d.clone();
        expected.gc.interval = c.gc.interval;
        assert_eq!(c.to_toml(), expected.to_toml());
        // An empty file is the embedded default.
        assert_eq!(
            Config::parse_over_defaults("", "t").unwrap().to_toml(),
            d.to_toml()
        );
        // A declared list replaces the defaults' list.
        let c = Config::parse_over_defaults("[[project]]\nname = \"team\"\n", "t").unwrap();
        assert_eq!(c.projects.len(), 1);
        assert_eq!(c.projects[0].name.get_ref().as_str(), "team");
        assert_eq!(c.upstreams.len(), d.upstreams.len());
        let c = Config::parse_over_defaults("project = []\nupstream = []\n", "t").unwrap();
        assert!(c.projects.is_empty() && c.upstreams.is_empty());
        // Without [server], the one-document parse also takes the defaults.
        let c = Config::parse("[gc]\ninterval = \"2h\"\n", "t").unwrap();
        assert_eq!(c.server.listen, d.server.listen);
        assert!(c.projects.is_empty());
    }

    #[test]
    fn secrets_are_never_rendered() {
        let hash = crate::auth::keys::hash_password("correct horse");
        let text = format!(
            "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\nusername = \"me\"\npassword = \"hunter2-secret\"\n[[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n"
        );
        let c = Config::parse_over_defaults(&text, "t").unwrap();
        assert_eq!(
            c.upstreams[0].credentials().unwrap(),
            Some(("me".into(), "hunter2-secret".into()))
        );
        for shown in [c.to_toml(), format!("{c:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains(&hash), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
        // A secret of the wrong type is not quoted back.
        let text = "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\nusername = \"me\"\npassword = 918273645\n";
        let e = Config::parse(text, "t").unwrap_err().to_string();
        assert!(!e.contains("918273645") && e.contains("line 5"), "{e}");
        // Credentials in a URL are refused, and not echoed.
        let text = "[[upstream]]\nname = \"x.io\"\nurl = \"https://me:hunter2@x.io/v2\"\n";
        let e = Config::parse(text, "t").unwrap_err().to_string();
        assert!(!e.contains("hunter2") && e.contains("credentials"), "{e}");
        let e = Config::parse("[auth]\nrealm = \"https://a:hunter2@x/token\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn units() {
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!("7d".parse::<HumanDuration>().unwrap().to_string(), "7d");
        assert_eq!("90s".parse::<HumanDuration>().unwrap().to_string(), "90s");
        assert!("1w".parse::<HumanDuration>().is_err());
        assert_eq!("64 MiB".parse::<ByteSize>().unwrap().0, 64 << 20);
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
        assert!("1PB".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn networks() {
        let lo: IpNet = "127.0.0.0/8".parse().unwrap();
        assert!(lo.contains("127.1.2.3".parse().unwrap()));
        assert!(lo.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!lo.contains("10.0.0.1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        let one: IpNet = "192.0.2.1".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.1/32");
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
        assert_eq!("::1".parse::<IpNet>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/".parse::<IpNet>().is_err());
        assert!(
            "::1/128"
                .parse::<IpNet>()
                .unwrap()
                .contains("::1".parse().unwrap())
        );
    }

    #[test]
    fn scrub_defaults_and_off_switch() {
        let c = Config::embedded();
        assert_eq!(c.scrub.interval.0, Duration::from_secs(24 * 3600));
        assert_eq!(c.scrub.rate.0, 50 << 20);
        let base = "[server]\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\n";
        let c = Config::parse(base, "t.toml").unwrap();
        assert_eq!(c.scrub.interval.0, Duration::from_secs(24 * 3600));
        let c = Config::parse(&format!("{base}[scrub]\ninterval = \"0\"\n"), "t.toml").unwrap();
        assert!(c.scrub.interval.0.is_zero());
        assert_eq!(c.scrub.rate.0, 50 << 20);
        let e = Config::parse(&format!("{base}[scrub]\nrate = \"fast\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5"), "{e}");
    }
}
