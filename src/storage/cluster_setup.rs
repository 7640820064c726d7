//! Turns the config's `[storage.s3]` and `[storage.postgres]` into a connected `ClusterStore`:
//! the database reachable and migrated, the bucket client built, this replica's read cache
//! opened in its data directory. The `cluster` layer never sees the `Config`; this is where
//! its option structs are filled in.

use std::time::Duration;

use super::cluster::{ClusterStore, ClusterStoreOptions};
use super::read_cache::{ReadCache, ReadCacheOptions};
use crate::BuildError;
use crate::cluster::objects::{Objects, S3Options};
use crate::cluster::pg::{Db, PgOptions};
use crate::cluster::uploads::{UploadOptions, Uploads};
use crate::config::Config;

/// Bytes per multipart part of a push or fill: S3's 10,000-part limit puts the largest blob
/// at 80 GiB, and a replica holds at most a part or two of each upload in memory.
const PART_SIZE: usize = 8 << 20;
/// How long a push request holds its upload session without renewing it: a replica that dies
/// mid-request blocks that session this long.
const UPLOAD_LEASE: Duration = Duration::from_secs(30);

fn failed(what: &str, e: impl std::error::Error) -> BuildError {
    BuildError::Cluster(format!("{what}: {}", with_causes(&e)))
}

/// `e`'s message and the causes it leaves out: tokio-postgres keeps why a connection failed
/// (a server without TLS, a refused login) in its source only.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

/// Connects the cluster profile's shared storage for this replica.
pub async fn connect(config: &Config) -> Result<ClusterStore, BuildError> {
    let Some(s3) = &config.storage.s3 else {
        return Err(BuildError::Cluster("[storage.s3] is required".into()));
    };
    let db = open_migrated_db(config).await?;
    let credentials = s3.credentials().map_err(BuildError::Cluster)?;
    let objects = Objects::new(&S3Options {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        region: s3.region.clone(),
        path_style: s3.path_style,
        prefix: s3.prefix.clone(),
        access_key_id: credentials.access_key_id,
        secret_access_key: credentials.secret_access_key.expose().to_string(),
        part_size: PART_SIZE,
    })
    .map_err(|e| failed("cannot use the bucket of [storage.s3]", e))?;
    let replica = replica_name(config);
    let uploads = Uploads::new(
        db.clone(),
        objects.clone(),
        UploadOptions {
            replica: replica.clone(),
            lease: UPLOAD_LEASE,
            max_sessions: config.uploads.max_sessions,
            max_sessions_per_client: config.uploads.max_sessions_per_client,
        },
    );
    let cache = ReadCache::open(ReadCacheOptions::in_data_dir(
        &config.server.data_dir,
        s3.read_cache_max_size.0,
    ))
    .map_err(|e| failed("cannot open the read cache", e))?;
    Ok(ClusterStore::new(
        db,
        objects,
        uploads,
        cache,
        ClusterStoreOptions {
            max_manifest_size: config.storage.max_manifest_size.0,
            small_blob_cache: config.storage.small_blob_cache.0,
            redirect: s3.redirect,
            replica,
        },
    ))
}

/// The cluster's database for what needs only it (the offline identity commands): its schema
/// must be this binary's already, since only a starting replica migrates it.
pub async fn open_db(config: &Config) -> Result<Db, BuildError> {
    let options = pg_options(config)?;
    Db::open_current(&options)
        .await
        .map_err(|e| failed("cannot use the database of [storage.postgres]", e))
}

/// The database, migrated to this binary's schema.
async fn open_migrated_db(config: &Config) -> Result<Db, BuildError> {
    let options = pg_options(config)?;
    Db::open(&options)
        .await
        .map_err(|e| failed("cannot open the database of [storage.postgres]", e))
}

fn pg_options(config: &Config) -> Result<PgOptions, BuildError> {
    let Some(pg) = &config.storage.postgres else {
        return Err(BuildError::Cluster("[storage.postgres] is required".into()));
    };
    let password = pg.password().map_err(BuildError::Cluster)?;
    Ok(PgOptions {
        url: pg.url.clone(),
        password: password.map(|p| p.expose().to_string()),
        pool_size: pg.pool_size,
        ca_roots: pg.ca_roots().map_err(BuildError::Cluster)?,
    })
}

/// How this replica names itself in leases: host name and listening address.
fn replica_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}@{}", config.server.listen)
}
