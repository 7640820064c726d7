//! The storage behind the registry API, in either profile: `Local` (this host's RocksDB index
//! and blob files, `store`) or `Cluster` (PostgreSQL and an S3 bucket shared by several
//! replicas, with a read cache in each replica's data directory). Handlers call these async
//! methods and never learn which profile serves them.
//!
//! Enum dispatch, not a trait object: two implementations known at compile time, no boxed
//! future per call. The local arm calls `Store` exactly as the handlers did before the seam
//! existed: point reads (moka or RocksDB, microseconds) inline on the async worker, synced
//! writes on the blocking pool. What only one profile has (fsck, scrub, the pull-through
//! cache's bookkeeping) stays on that profile's type, reached through `local()`. The cluster
//! arm's futures are boxed: they are large (database and bucket round trips), and unboxed they
//! would make every local request's future as large.

pub mod browse;
pub mod cluster;
pub mod cluster_cache;
pub mod cluster_events;
pub mod cluster_metrics;
pub mod cluster_setup;
pub mod read_cache;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::store::uploads::{ChunkSpec, parse_upload_id};
use crate::store::{Page, PutManifest, Store, StoreError, StoredManifest};
pub use cluster::ClusterStore;

/// Where the registry's content and metadata live.
#[derive(Clone)]
pub enum Storage {
    Local(Arc<Store>),
    Cluster(Arc<ClusterStore>),
}

/// Runs blocking store work (synced writes, fsync, renames) on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io(std::io::Error::other(format!(
            "storage task failed: {e}"
        )))),
    }
}

/// A blob's bytes as a local file, ready to be served in mapped windows; or, for a small blob
/// of the local profile, its verified bytes from memory.
pub enum BlobSource {
    File(std::fs::File),
    Memory(Bytes),
}

impl Storage {
    /// The local profile's store, for what only it has.
    pub fn local(&self) -> Option<&Arc<Store>> {
        match self {
            Self::Local(s) => Some(s),
            Self::Cluster(_) => None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The largest manifest a push may send.
    pub fn max_manifest_size(&self) -> u64 {
        match self {
            Self::Local(s) => s.options().max_manifest_size,
            Self::Cluster(c) => c.max_manifest_size(),
        }
    }

    // ---- reads --------------------------------------------------------------------------

    /// The size of `digest` if `repo` may read it.
    pub async fn blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Local(s) => s.blob_size(repo, digest),
            Self::Cluster(c) => Box::pin(c.blob_size(repo, digest)).await,
        }
    }

    /// The bytes of a blob whose size `blob_size` gave. A small local blob comes from memory
    /// (read and verified on the blocking pool the first time); anything else is a file.
    pub async fn open_blob(&self, digest: &Digest, size: u64) -> Result<BlobSource, StoreError> {
        match self {
            Self::Local(s) => {
                if s.small_blob_fits(size) {
                    let cached = match s.cached_small_blob(digest) {
                        Some(bytes) => Some(bytes),
                        None => {
                            let (s, d) = (s.clone(), digest.clone());
                            off_runtime(move || s.load_small_blob(&d, size)).await?
                        }
                    };
                    // A length other than the record's reads the file instead.
                    if let Some(bytes) = cached.filter(|b| b.len() as u64 == size) {
                        return Ok(BlobSource::Memory(bytes));
                    }
                }
                s.open_blob(digest).map(BlobSource::File)
            }
            Self::Cluster(c) => Box::pin(c.open_blob(digest, size)).await,
        }
    }

    /// Where to send a client for a blob's bytes instead of serving them (the cluster
    /// profile with `redirect = true`: a presigned URL of the bucket).
    pub async fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>, StoreError> {
        match self {
            Self::Local(_) => Ok(None),
            Self::Cluster(c) => Box::pin(c.redirect_url(digest)).await,
        }
    }

    /// Resolves a reference to a digest: digests as they are, tags through the tag index.
    pub async fn resolve(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>, StoreError> {
        match (self, reference) {
            (_, Reference::Digest(d)) => Ok(Some(d.clone())),
            (Self::Local(s), Reference::Tag(t)) => s.resolve_tag(repo, t),
            (Self::Cluster(c), Reference::Tag(t)) => Box::pin(c.resolve_tag(repo, t)).await,
        }
    }

    /// The manifest `digest` in `repo`.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        match self {
            Self::Local(s) => s.manifest(repo, digest),
            Self::Cluster(c) => Box::pin(c.manifest(repo, digest)).await,
        }
    }

    /// Tags of `repo` in byte order after `last`, at most `n`; `None` for an unknown
    /// repository.
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Page>, StoreError> {
        match self {
            Self::Local(s) => s.list_tags(repo, last, n),
            Self::Cluster(c) => Box::pin(c.list_tags(repo, last, n)).await,
        }
    }

    /// Repository names in byte order after `last`, at most `n`, of those `visible` admits.
    pub async fn catalog(
        &self,
        last: Option<&str>,
        n: usize,
        visible: impl FnMut(&str) -> bool + Send,
    ) -> Result<Page, StoreError> {
        match self {
            Self::Local(s) => s.catalog(last, n, visible),
            Self::Cluster(c) => Box::pin(c.catalog(last, n, visible)).await,
        }
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        match self {
            Self::Local(s) => s.referrers(repo, subject, artifact_type),
            Self::Cluster(c) => Box::pin(c.referrers(repo, subject, artifact_type)).await,
        }
    }

    // ---- manifests and blobs: changes ----------------------------------------------------

    /// Validates and stores a manifest byte-exact with its tags.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        content_type: String,
        extra_tags: Vec<Tag>,
    ) -> Result<PutManifest, StoreError> {
        match self {
            Self::Local(s) => {
                let (s, repo, reference) = (s.clone(), repo.clone(), reference.clone());
                off_runtime(move || {
                    s.put_manifest(&repo, &reference, bytes, &content_type, &extra_tags)
                })
                .await
            }
            Self::Cluster(c) => {
                Box::pin(c.put_manifest(repo, reference, bytes, &content_type, &extra_tags)).await
            }
        }
    }

    /// Deletes a manifest by digest (with every tag pointing at it) or a tag by name.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), StoreError> {
        match self {
            Self::Local(s) => {
                let (s, repo, reference) = (s.clone(), repo.clone(), reference.clone());
                off_runtime(move || s.delete_manifest(&repo, &reference)).await
            }
            Self::Cluster(c) => Box::pin(c.delete_manifest(repo, reference)).await,
        }
    }

    /// Removes `repo`'s link to a blob; the bytes go when GC finds nothing else uses them.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        match self {
            Self::Local(s) => {
                let (s, repo, digest) = (s.clone(), repo.clone(), digest.clone());
                off_runtime(move || s.delete_blob(&repo, &digest)).await
            }
            Self::Cluster(c) => Box::pin(c.delete_blob(repo, digest)).await,
        }
    }

    /// Links a blob `from` another repository into `repo`; `None` if `from` lacks it.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Local(s) => {
                let (s, repo, from, digest) =
                    (s.clone(), repo.clone(), from.clone(), digest.clone());
                off_runtime(move || s.mount_blob(&repo, &from, &digest)).await
            }
            Self::Cluster(c) => Box::pin(c.mount_blob(repo, from, digest)).await,
        }
    }

    // ---- uploads ------------------------------------------------------------------------

    /// Whether `id` has the shape of this profile's upload ids (anything else is unknown).
    pub fn valid_upload_id(&self, id: &str) -> bool {
        match self {
            Self::Local(_) => parse_upload_id(id).is_some(),
            Self::Cluster(_) => cluster::valid_upload_id(id),
        }
    }

    /// Refuses new pushed bytes while the data directory is short of space. The cluster's
    /// pushed bytes go to the bucket, whose space is not this host's to judge.
    pub fn room_for_push(&self) -> Result<(), StoreError> {
        match self {
            Self::Local(s) => s.room_for_push(),
            Self::Cluster(_) => Ok(()),
        }
    }

    /// Starts an upload session for `client` (whose session cap it counts against).
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        client: &str,
    ) -> Result<String, StoreError> {
        match self {
            Self::Local(s) => {
                let (s, repo, client) = (s.clone(), repo.clone(), client.to_string());
                off_runtime(move || s.start_upload(&repo, algorithm, Some(&client))).await
            }
            Self::Cluster(c) => Box::pin(c.start_upload(repo, algorithm, client)).await,
        }
    }

    /// Bytes received so far by an upload session.
    pub async fn upload_size(&self, repo: &RepoName, id: &str) -> Result<u64, StoreError> {
        match self {
            Self::Local(s) => s.upload_size(repo, id).await,
            Self::Cluster(c) => Box::pin(c.upload_size(repo, id)).await,
        }
    }

    /// Appends one request's body (as `spec` bounds it); returns the session's new size.
    pub async fn append_upload<S>(
        &self,
        repo: &RepoName,
        id: &str,
        spec: ChunkSpec,
        body: &mut S,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    {
        match self {
            Self::Local(s) => {
                let up = s.lock_upload(repo, id).await?;
                Ok(up.append(spec, body).await?.size())
            }
            Self::Cluster(c) => Box::pin(c.append_upload(repo, id, spec, body)).await,
        }
    }

    /// Appends a last chunk (possibly empty) and completes the upload as `digest`; returns
    /// the blob's size.
    pub async fn complete_upload<S>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        spec: ChunkSpec,
        body: &mut S,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
    {
        match self {
            Self::Local(s) => {
                // The session stays locked from the append through the commit.
                let up = s.lock_upload(repo, id).await?;
                let up = up.append(spec, body).await?;
                let (s, d) = (s.clone(), digest.clone());
                off_runtime(move || s.commit_upload(up, &d)).await
            }
            Self::Cluster(c) => Box::pin(c.complete_upload(repo, id, digest, spec, body)).await,
        }
    }

    /// Cancels an upload session and drops what it received.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        match self {
            Self::Local(s) => {
                let up = s.lock_upload(repo, id).await?;
                let s = s.clone();
                off_runtime(move || s.cancel_upload(up)).await
            }
            Self::Cluster(c) => Box::pin(c.cancel_upload(repo, id)).await,
        }
    }
}
