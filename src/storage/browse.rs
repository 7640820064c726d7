//! What the console's pages read, in either profile: repositories under a prefix, a
//! repository's tags, manifests, write times, and a small blob (an image config).
//!
//! These run inside a console page build, which holds a blocking-pool thread for the whole
//! page (the console bounds how many run at once): the local arm calls `Store`'s scans
//! directly on that thread, exactly as the pages did before this seam; the cluster arm
//! awaits the database and the bucket.

use std::collections::HashMap;
use std::io::Read;

use bytes::Bytes;

use super::Storage;
use crate::cluster::browse::MANIFEST_BATCH;
use crate::oci::{Digest, RepoName};
use crate::store::{StoreError, StoredManifest};

impl Storage {
    pub async fn repo_exists(&self, repo: &RepoName) -> Result<bool, StoreError> {
        match self {
            Self::Local(s) => s.repo_exists(repo),
            Self::Cluster(c) => Ok(c.db().repo_exists(repo).await?),
        }
    }

    /// When `repo` was created, in seconds since the epoch.
    pub async fn repo_created(&self, repo: &RepoName) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Local(s) => s.repo_created(repo),
            Self::Cluster(c) => Ok(c.db().repo_created(repo).await?),
        }
    }

    /// Repositories named `<under>/…` in byte order with their creation times, at most `n`
    /// of those `visible` accepts.
    pub async fn repos_under(
        &self,
        under: &str,
        n: usize,
        visible: impl FnMut(&str) -> bool,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            Self::Local(s) => s.repos_under(under, n, visible),
            Self::Cluster(c) => Ok(c.db().repos_under(under, n, visible).await?),
        }
    }

    /// The first `n` tags of `repo` in byte order, with the digest each names.
    pub async fn tags_with_digests(
        &self,
        repo: &RepoName,
        n: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Self::Local(s) => s.tags_with_digests(repo, n),
            Self::Cluster(c) => Ok(c.db().tags_with_digests(repo, n).await?),
        }
    }

    /// The tags of `repo` naming `digest`, in byte order.
    pub async fn tags_pointing_at(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Local(s) => s.tags_pointing_at(repo, digest),
            Self::Cluster(c) => Ok(c.db().tags_of(repo, digest).await?),
        }
    }

    /// The first `n` manifests of `repo` in digest order, each handed to `f` and dropped
    /// after; returns how many were read. The cluster arm reads them a batch at a time.
    pub async fn visit_manifests(
        &self,
        repo: &RepoName,
        n: usize,
        mut f: impl FnMut(StoredManifest),
    ) -> Result<usize, StoreError> {
        let c = match self {
            Self::Local(s) => return s.visit_manifests(repo, n, f),
            Self::Cluster(c) => c,
        };
        let mut seen = 0;
        let mut after = String::new();
        while seen < n {
            let rows = c
                .db()
                .manifests_after(repo, &after, MANIFEST_BATCH.min(n - seen))
                .await?;
            let full = rows.len() == MANIFEST_BATCH.min(n - seen);
            for (digest, media_type, bytes) in rows {
                // A row whose digest does not parse is skipped, as the local scan skips one.
                if let Ok(d) = digest.parse::<Digest>() {
                    seen += 1;
                    f(StoredManifest {
                        digest: d,
                        media_type,
                        bytes: Bytes::from(bytes),
                    });
                }
                after = digest;
            }
            if !full {
                break;
            }
        }
        Ok(seen)
    }

    /// When each manifest of `repo` was written there, by digest.
    pub async fn pushed_times(&self, repo: &RepoName) -> Result<HashMap<String, u64>, StoreError> {
        match self {
            Self::Local(s) => s.pushed_times(repo),
            Self::Cluster(c) => Ok(c.db().pushed_times(repo).await?),
        }
    }

    /// When manifest `digest` was written to `repo`.
    pub async fn pushed_at(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Local(s) => s.pushed_at(repo, digest),
            Self::Cluster(c) => Ok(c.db().pushed_at(repo, digest).await?),
        }
    }

    /// The bytes of a blob `repo` links, if it is at most `limit` bytes.
    pub async fn small_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let c = match self {
            Self::Local(s) => return s.small_blob(repo, digest, limit),
            Self::Cluster(c) => c,
        };
        let size = match c.blob_size(repo, digest).await? {
            Some(size) if size <= limit => size,
            _ => return Ok(None),
        };
        // Served from this replica's read cache (fetched and verified on a miss).
        match c.open_blob(digest, size).await? {
            super::BlobSource::Memory(bytes) => Ok(Some(bytes.to_vec())),
            super::BlobSource::File(file) => {
                let mut out = Vec::new();
                file.take(limit).read_to_end(&mut out)?;
                Ok(Some(out))
            }
        }
    }
}
