//! `[storage.s3]` and `[storage.postgres]`: where the cluster profile keeps blobs (an
//! S3-compatible bucket) and everything replicas must agree on (PostgreSQL), and their
//! validation. Both tables together select the cluster profile; neither keeps today's local one.
//! Secrets never sit in the file itself: the S3 secret key and the database password are read
//! from files (or, for S3, the standard `AWS_*` environment variables).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ByteSize, Secret, ServerConfig, StorageConfig, has_userinfo, redact_url};

/// The environment variables S3 credentials come from when the table names none.
pub const ENV_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const ENV_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";

/// `[storage.s3]`: the bucket that holds the cluster's blobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// `endpoint/bucket/key` rather than `bucket.endpoint/key`; what most self-hosted stores
    /// (SeaweedFS, MinIO, Ceph) expect.
    #[serde(default = "default_path_style")]
    pub path_style: bool,
    /// Keys live under `PREFIX/` (several registries may share a bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// With `secret_access_key_file`; without both, the `AWS_*` environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Answer blob GETs with a 307 to a presigned URL (clients must reach the store).
    #[serde(default)]
    pub redirect: bool,
    /// Disk this replica's local read cache of bucket blobs (`data_dir/read-cache`) may use;
    /// least recently used blobs are evicted beyond it.
    #[serde(default = "default_read_cache_max_size")]
    pub read_cache_max_size: ByteSize,
}

/// `[storage.postgres]`: the metadata database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/dbname` (or `host=... dbname=...`), without a password.
    pub url: String,
    /// The password, if the server wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Connections this replica keeps open at most.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PEM bundle of the CAs to trust for the database's certificate, instead of the web PKI's
    /// roots (a private CA should not share its trust with every public one). Whether TLS is
    /// used is the URL's `sslmode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// S3 credentials as resolved from the table or the environment.
#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_path_style() -> bool {
    true
}

fn default_read_cache_max_size() -> ByteSize {
    ByteSize(10 << 30)
}

fn default_pool_size() -> usize {
    16
}

impl StorageConfig {
    /// True when the cluster profile is selected (validation guarantees both tables or none).
    pub fn is_cluster(&self) -> bool {
        self.s3.is_some() && self.postgres.is_some()
    }
}

impl StorageConfig {
    /// The URL other replicas reach this one's internal fill endpoint at: `replica_url`, else
    /// `http(s)://<server.listen>`; `None` when listen's port is 0 (known once bound). An
    /// unspecified listen address (0.0.0.0, ::) names no address to reach: an error.
    pub fn replica_url(&self, server: &ServerConfig) -> Result<Option<String>, String> {
        if let Some(url) = &self.replica_url {
            return Ok(Some(url.trim_end_matches('/').to_string()));
        }
        let listen = server.listen;
        if listen.ip().is_unspecified() {
            return Err(format!(
                "storage.replica_url: server.listen {listen} does not say where the other replicas reach this one; set storage.replica_url (e.g. \"http://10.0.0.5:5000\")"
            ));
        }
        Ok((listen.port() != 0).then(|| replica_url_of(listen, server.tls.is_some())))
    }
}

/// `http(s)://<address>`: the replica URL of a listener bound there.
pub fn replica_url_of(listen: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{listen}")
}

/// In the cluster profile, the replica URL must be knowable and be a plain base URL; the fill
/// lease at least a second (it is renewed every third of it).
pub(super) fn validate_replica_url(
    storage: &StorageConfig,
    server: &ServerConfig,
) -> Result<(), String> {
    if !storage.is_cluster() {
        return Ok(());
    }
    if let Some(url) = storage.replica_url(server)? {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        let valid = rest.is_some_and(|r| !r.is_empty() && !r.contains(['/', '?', '#', '@', ' ']));
        if !valid {
            return Err(format!(
                "storage.replica_url {:?} must be http(s)://host:port, without a path or credentials",
                redact_url(&url)
            ));
        }
    }
    if storage.fill_lease.0 < std::time::Duration::from_secs(1) {
        return Err("storage.fill_lease must be at least 1s".into());
    }
    Ok(())
}

impl S3Config {
    /// The credentials: `access_key_id` + `secret_access_key_file`, else the environment.
    pub fn credentials(&self) -> Result<S3Credentials, String> {
        match (&self.access_key_id, &self.secret_access_key_file) {
            (Some(id), Some(file)) => Ok(S3Credentials {
                access_key_id: id.clone(),
                secret_access_key: read_secret_file(file, "storage.s3.secret_access_key_file")?
                    .into(),
            }),
            (None, None) => {
                let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
                match (var(ENV_ACCESS_KEY_ID), var(ENV_SECRET_ACCESS_KEY)) {
                    (Some(id), Some(secret)) => Ok(S3Credentials {
                        access_key_id: id,
                        secret_access_key: secret.into(),
                    }),
                    _ => Err(format!(
                        "storage.s3: no credentials: set access_key_id and secret_access_key_file, or the {ENV_ACCESS_KEY_ID} and {ENV_SECRET_ACCESS_KEY} environment variables"
                    )),
                }
            }
            _ => Err(
                "storage.s3: give access_key_id and secret_access_key_file together (or neither, to use the environment)"
                    .into(),
            ),
        }
    }
}

impl PostgresConfig {
    /// The password from `password_file`, if one is configured.
    pub fn password(&self) -> Result<Option<Secret>, String> {
        self.password_file
            .as_deref()
            .map(|f| read_secret_file(f, "storage.postgres.password_file").map(Secret::from))
            .transpose()
    }

    /// The CAs of `ca_file`, if one is configured: every certificate in it, at least one.
    pub fn ca_roots(&self) -> Result<Option<rustls::RootCertStore>, String> {
        self.ca_file.as_deref().map(read_ca_file).transpose()
    }
}

/// The certificates of a PEM bundle as trust anchors; unreadable, not PEM, no certificate or
/// one that is not a certificate is an error naming the file.
fn read_ca_file(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bad = |e: &dyn std::fmt::Display| {
        format!(
            "storage.postgres.ca_file: {} is not a usable PEM bundle of CA certificates: {e}",
            path.display()
        )
    };
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "storage.postgres.ca_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| bad(&e))?;
        roots.add(cert).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"it holds no CERTIFICATE block"));
    }
    Ok(roots)
}

/// A secret file's content without its trailing newline; empty or unreadable is an error
/// that names the file, never its content.
fn read_secret_file(path: &Path, key: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("{key}: {} is empty", path.display()));
    }
    Ok(secret.to_string())
}

/// Validates both tables: together or not at all, each well-formed, secrets readable.
pub(super) fn validate(storage: &StorageConfig) -> Result<(), String> {
    match (&storage.s3, &storage.postgres) {
        (None, None) => Ok(()),
        (Some(s3), Some(pg)) => {
            validate_s3(s3)?;
            validate_postgres(pg)
        }
        _ => Err(
            "[storage.s3] and [storage.postgres] go together (both select the cluster profile); give both or neither"
                .into(),
        ),
    }
}

fn validate_s3(s3: &S3Config) -> Result<(), String> {
    let e = &s3.endpoint;
    if !(e.starts_with("https://") || e.starts_with("http://")) || has_userinfo(e) {
        return Err(format!(
            "storage.s3.endpoint {:?} must be an http:// or https:// URL without credentials",
            redact_url(e)
        ));
    }
    bucket_name(&s3.bucket).map_err(|why| {
        format!(
            "storage.s3.bucket {:?} is not a valid bucket name: {why}",
            s3.bucket
        )
    })?;
    if s3.region.is_empty() || !s3.region.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("storage.s3.region must be a non-empty word".into());
    }
    if let Some(prefix) = &s3.prefix {
        key_prefix(prefix).map_err(|why| {
            format!("storage.s3.prefix {prefix:?} is not a valid key prefix: {why}")
        })?;
    }
    if s3.read_cache_max_size.0 == 0 {
        return Err("storage.s3.read_cache_max_size must be more than 0".into());
    }
    s3.credentials().map(drop)
}

fn validate_postgres(pg: &PostgresConfig) -> Result<(), String> {
    let parsed: tokio_postgres::Config = pg
        .url
        .parse()
        .map_err(|e| format!("storage.postgres.url is not a PostgreSQL connection string: {e}"))?;
    if parsed.get_password().is_some() {
        return Err(
            "storage.postgres.url must not hold a password: put it in password_file".into(),
        );
    }
    if pg.pool_size == 0 {
        return Err("storage.postgres.pool_size must be at least 1".into());
    }
    // A CA named means TLS is wanted: `prefer` (also the default) would take a plaintext
    // answer that anyone on the path can give, and then send the password in the clear.
    if pg.ca_file.is_some() && parsed.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Err(
            "storage.postgres.ca_file is set but the url does not say sslmode=require (sslmode=prefer, the default, accepts a plaintext answer and sslmode=disable never uses TLS): add sslmode=require".into(),
        );
    }
    pg.ca_roots()?;
    pg.password().map(drop)
}

/// S3's bucket naming rules (the strict, DNS-compatible ones every implementation accepts).
fn bucket_name(name: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&name.len()) {
        return Err("it must be 3 to 63 characters long");
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.';
    if !name.bytes().all(allowed) {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !edge(name.bytes().next()) || !edge(name.bytes().last()) {
        return Err("it must start and end with a letter or digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return Err("dots must separate letters or digits");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("it must not look like an IP address");
    }
    Ok(())
}

/// A key prefix: `/`-separated segments of safe characters, none empty, `.` or `..`.
fn key_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.len() > 512 {
        return Err("it is longer than 512 characters");
    }
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    for segment in prefix.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(
                "segments between '/' must be non-empty, not '.' or '..' (no leading or trailing '/')",
            );
        }
        if !segment.bytes().all(safe) {
            return Err("only letters, digits, '-', '_', '.' and '/' are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_url_is_the_listen_address_unless_set() {
        let config = |listen: &str, replica_url: &str| {
            let text = super::super::EMBEDDED_DEFAULT
                .replace(
                    "listen = \"127.0.0.1:5000\"",
                    &format!("listen = {listen:?}"),
                )
                .replace("# replica_url = \"http://10.0.0.5:5000\"", replica_url);
            super::super::Config::parse(&text, "test").expect("valid config")
        };
        let url = |c: &super::super::Config| c.storage.replica_url(&c.server);
        let c = config("10.1.2.3:5000", "");
        assert_eq!(url(&c), Ok(Some("http://10.1.2.3:5000".into())));
        // Port 0: known once the listener is bound.
        assert_eq!(url(&config("127.0.0.2:0", "")), Ok(None));
        assert!(url(&config("0.0.0.0:5000", "")).is_err_and(|e| e.contains("replica_url")));
        let set = "replica_url = \"http://r1.internal:5000/\"";
        assert_eq!(
            url(&config("0.0.0.0:5000", set)),
            Ok(Some("http://r1.internal:5000".into()))
        );
        assert_eq!(
            replica_url_of("[::1]:5000".parse().expect("addr"), true),
            "https://[::1]:5000"
        );
    }

    #[test]
    fn bucket_names_follow_the_s3_rules() {
        for ok in ["abc", "transship-blobs", "a.b.c", "0bucket9"] {
            assert_eq!(bucket_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Upper",
            "under_score",
            "-lead",
            "trail.",
            "a..b",
            "a.-b",
            "192.168.1.1",
        ] {
            assert!(bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_prefixes_are_plain_segments() {
        for ok in ["transship", "team/registry-1", "a.b_c"] {
            assert_eq!(key_prefix(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "/lead", "trail/", "a//b", "a/../b", ".", "sp ace", "a?b",
        ] {
            assert!(key_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
