//! The TOML configuration: schema, embedded defaults and validation. `config/transship.toml` is
//! both the documented example and the embedded default, so the docs cannot drift from the
//! code. Every value is validated while it is deserialised, so a bad file fails with the key,
//! the line and what was expected; cross-key rules (duplicates, overlaps) point at the line of
//! the offending name.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use crate::oci::RepoName;

/// The documented example config; also what `transship serve` runs with when given no file.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/transship.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub uploads: UploadsConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub scrub: ScrubConfig,
    #[serde(default, rename = "project")]
    pub projects: Vec<ProjectConfig>,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default, rename = "user", skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An argon2id PHC string, as printed by `transship user hash`.
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    #[serde(default)]
    pub log_format: LogFormat,
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            manifest_cache: ByteSize(64 << 20),
            max_manifest_size: ByteSize(4 << 20),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadsConfig {
    pub abandon_after: HumanDuration,
    pub reap_interval: HumanDuration,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        Self {
            abandon_after: HumanDuration(Duration::from_secs(24 * 3600)),
            reap_interval: HumanDuration(Duration::from_secs(600)),
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
    pub password: Option<String>,
    /// A file holding the password (first line), instead of `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for this upstream (added to the webpki roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl UpstreamConfig {
    /// `(username, password)` if credentials are configured; reads `password_file`.
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        let Some(user) = &self.username else {
            return Ok(None);
        };
        let password = match (&self.password, &self.password_file) {
            (Some(p), None) => p.clone(),
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

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a config document. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|s| format!(" (line {})", line_of(text, s.start)))
                .unwrap_or_default();
            ConfigError::Invalid {
                origin: format!("{origin}{location}"),
                message: e.message().to_string(),
            }
        })?;
        config
            .validate(text)
            .map_err(|message| ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })?;
        Ok(config)
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
                    u.url
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
        self.validate_auth()?;
        if self.upstreams.iter().filter(|u| u.default).count() > 1 {
            return Err("more than one upstream has default = true; at most one may".into());
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        for (i, u) in self.users.iter().enumerate() {
            crate::auth::keys::validate_user_name(&u.name).map_err(|e| format!("user: {e}"))?;
            if self.users[..i].iter().any(|v| v.name == u.name) {
                return Err(format!("user {:?} is declared twice", u.name));
            }
            if !crate::auth::keys::is_valid_hash(&u.password_hash) {
                return Err(format!(
                    "user {:?}: password_hash is not an argon2id hash (make one with `transship user hash`)",
                    u.name
                ));
            }
        }
        for p in &self.projects {
            for user in p.owners.iter().chain(&p.editors).chain(&p.viewers) {
                crate::auth::keys::validate_user_name(user)
                    .map_err(|e| format!("project {:?}: {e}", p.name.get_ref().as_str()))?;
            }
        }
        let a = &self.auth;
        if let Some(realm) = &a.realm
            && !(realm.starts_with("https://") || realm.starts_with("http://"))
        {
            return Err(format!(
                "auth.realm {realm:?} must be an absolute http:// or https:// URL"
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
        self.projects
            .iter()
            .find(|p| name.is_within(p.name.get_ref().as_str()))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A duration written as `250ms`, `30s`, `5m`, `1h`, `7d` (or `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Self(Duration::ZERO));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid duration {s:?}: expected e.g. \"30s\", \"5m\", \"1h\", \"7d\"")
        })?;
        let secs = match unit {
            "ms" => return Ok(Self(Duration::from_millis(n))),
            "s" => n,
            "m" => n.saturating_mul(60),
            "h" => n.saturating_mul(3600),
            "d" => n.saturating_mul(86_400),
            _ => {
                return Err(format!(
                    "invalid duration unit in {s:?}: use ms, s, m, h or d"
                ));
            }
        };
        Ok(Self(Duration::from_secs(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let secs = d.as_secs();
        if d.subsec_millis() != 0 || (secs == 0 && !d.is_zero()) {
            write!(f, "{}ms", d.as_millis())
        } else if secs == 0 {
            f.write_str("0")
        } else if secs.is_multiple_of(86_400) {
            write!(f, "{}d", secs / 86_400)
        } else if secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else {
            write!(f, "{secs}s")
        }
    }
}

/// A byte count written as an integer or with a unit: `4MiB`, `64 MiB`, `1GiB`, `512KiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected e.g. \"4MiB\", \"512KiB\", \"2GiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KiB, MiB, GiB or TiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err =
            || format!("invalid network {s:?}: expected CIDR like \"10.0.0.0/8\" or \"::1/128\"");
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let prefix: u8 = p.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum StrOrInt { S(String), I(u64) }
                match StrOrInt::deserialize(d)? {
                    StrOrInt::S(s) => s.parse().map_err(serde::de::Error::custom),
                    StrOrInt::I(i) => i.to_string().parse().map_err(serde::de::Error::custom),
                }
            }
        }
    )*};
}
serde_via_str!(HumanDuration, ByteSize, IpNet);

impl Serialize for RepoName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RepoName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
        let bad_name = format!("{base}[[project]]\nname = \"Bad\"\n");
        assert!(
            Config::parse(&bad_name, "t")
                .unwrap_err()
                .to_string()
                .contains("line 5")
        );
        let dup = format!(
            "{base}[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\n[[upstream]]\nname = \"x.io\"\nurl = \"https://y.io\"\n"
        );
        assert!(
            Config::parse(&dup, "t")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let inside = format!(
            "{base}[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\n[[project]]\nname = \"x.io/p\"\n"
        );
        assert!(
            Config::parse(&inside, "t")
                .unwrap_err()
                .to_string()
                .contains("inside upstream")
        );
        for (extra, wanted) in [
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
