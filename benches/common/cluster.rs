//! The cluster profile's side of the benchmarks: one SeaweedFS and one PostgreSQL (the tests'
//! `engines`), and the config that points a transship replica (`[storage.s3]` +
//! `[storage.postgres]`) or distribution (its `s3` driver) at them.

use std::collections::BTreeMap;
use std::path::Path;

use super::engines::{Postgres, SeaweedFs, plain_http};

/// The S3 region every client signs for (SeaweedFS accepts any).
const REGION: &str = "us-east-1";

/// One S3 store and one database server, stopped (by PID) on drop.
pub struct Engines {
    pub s3: SeaweedFs,
    pub pg: Postgres,
    /// The S3 secret, in a file for transship's `secret_access_key_file`.
    secret_file: std::path::PathBuf,
}

impl Engines {
    /// Starts both; `dir` holds the secret file.
    pub fn start(dir: &Path) -> Self {
        let s3 = SeaweedFs::start();
        let pg = Postgres::start();
        let secret_file = dir.join("s3-secret");
        std::fs::write(&secret_file, &s3.secret_access_key).expect("write the S3 secret");
        Self {
            s3,
            pg,
            secret_file,
        }
    }

    /// A new database named `name` on the server; its connection string.
    pub fn database(&self, rt: &tokio::runtime::Runtime, name: &str) -> String {
        rt.block_on(self.pg.create_database(name))
    }

    /// The TOML that makes a transship replica a cluster member on `bucket` (keys under
    /// `prefix`) and the database at `db_url`.
    pub fn transship_config(&self, bucket: &str, prefix: &str, db_url: &str) -> String {
        format!(
            "[storage.s3]\nendpoint = {:?}\nbucket = {bucket:?}\nregion = {REGION:?}\n\
             path_style = true\nprefix = {prefix:?}\naccess_key_id = {:?}\n\
             secret_access_key_file = {:?}\n\n[storage.postgres]\nurl = {db_url:?}\n\
             pool_size = 16\n",
            self.s3.endpoint,
            self.s3.access_key_id,
            self.secret_file.display().to_string(),
        )
    }

    /// Whether `bucket` holds an object at `key` (a HEAD through SeaweedFS's filer, which
    /// keeps a bucket's objects as files under `/buckets/<bucket>/`).
    pub fn holds(&self, bucket: &str, key: &str) -> bool {
        plain_http(
            &self.s3.filer,
            "HEAD",
            &format!("/buckets/{bucket}/{key}"),
            &[],
        )
        .is_ok_and(|(status, _)| status == 200)
    }

    /// distribution's `storage:` lines for its S3 driver on `bucket` under `root`: bytes
    /// proxied through the registry (no redirect to the store, as transship's default), blob
    /// descriptors cached in memory (distribution's shipped default config).
    pub fn distribution_storage(&self, bucket: &str, root: &str) -> String {
        format!(
            "  s3:\n    accesskey: {}\n    secretkey: {}\n    region: {REGION}\n    \
             regionendpoint: {}\n    forcepathstyle: true\n    bucket: {bucket}\n    \
             secure: false\n    v4auth: true\n    rootdirectory: /{root}\n  \
             cache:\n    blobdescriptor: inmemory\n  redirect:\n    disable: true\n",
            self.s3.access_key_id, self.s3.secret_access_key, self.s3.endpoint,
        )
    }
}

/// A replica's `transship_cluster_fills_total` by source, summed into `into` (from its
/// `/metrics`; nothing if this build counts no cluster fills).
pub fn add_fill_counts(base: &str, into: &mut BTreeMap<String, f64>) {
    let Ok((200, body)) = plain_http(base, "GET", "/metrics", &[]) else {
        return;
    };
    for line in String::from_utf8_lossy(&body).lines() {
        let Some(rest) = line.strip_prefix("transship_cluster_fills_total{source=\"") else {
            continue;
        };
        let parsed = rest
            .split_once("\"}")
            .and_then(|(source, value)| Some((source, value.trim().parse::<f64>().ok()?)));
        if let Some((source, value)) = parsed {
            *into.entry(source.to_string()).or_default() += value;
        }
    }
}
