//! The cluster profile's storage: metadata in PostgreSQL (`cluster::pg::Db`), blob bytes in
//! the S3 bucket (`cluster::objects::Objects`), push sessions any replica continues
//! (`cluster::uploads::Uploads`), and this replica's read cache of bucket blobs in its data
//! directory (`read_cache`), from which blobs are served as local files.
//!
//! Nothing here is remembered across requests that another replica could change, except
//! blob links for `LINK_TTL`: a blob GET is the hot path, and a link deleted on another
//! replica may still be served here for that long (a deleted blob's bytes stay in the bucket
//! until GC, so what is served is never wrong bytes). Tags and manifests are read from the
//! database on every request, so every replica agrees on them the moment a push returns.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::BlobSource;
use super::read_cache::{ReadCache, ReadCacheError};
use crate::cluster::manifests::NewManifest;
use crate::cluster::manifests::PutManifestError;
use crate::cluster::objects::Objects;
use crate::cluster::pg::{Db, PgError};
use crate::cluster::uploads::{SessionId, Uploads, UploadsError};
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::store::uploads::ChunkSpec;
use crate::store::{Page, PutManifest, StoreError, StoredManifest, check_manifest};

/// How long a replica trusts a blob link it read from the database.
const LINK_TTL: Duration = Duration::from_secs(1);
/// How long a redirect's presigned URL works: long enough for a client to start a large
/// download, short enough that a URL copied out of a log soon stops working.
const REDIRECT_VALIDITY: Duration = Duration::from_secs(15 * 60);
/// Largest blob kept in memory.
const SMALL_BLOB_MAX: u64 = 64 << 10;
/// Blob links remembered at once.
const LINK_CACHE_ENTRIES: u64 = 100_000;

/// What a replica's `ClusterStore` takes from the config.
pub struct ClusterStoreOptions {
    pub max_manifest_size: u64,
    /// `storage.small_blob_cache`: memory for small blobs' bytes.
    pub small_blob_cache: u64,
    /// `[storage.s3] redirect`.
    pub redirect: bool,
    /// How this replica names itself in leases.
    pub replica: String,
}

/// The cluster profile's shared storage, as one replica sees it.
pub struct ClusterStore {
    db: Db,
    objects: Objects,
    uploads: Uploads,
    cache: ReadCache,
    /// `repo\0digest` → size, for `LINK_TTL`.
    links: moka::sync::Cache<String, u64>,
    /// Small blobs' verified bytes (`storage.small_blob_cache`; `None` when 0): immutable by
    /// digest, so kept whatever happens to links (every GET checks its link first).
    small: Option<moka::sync::Cache<Digest, Bytes>>,
    max_manifest_size: u64,
    /// `[storage.s3] redirect`: blob GETs answered with a presigned URL.
    redirect: bool,
    /// How this replica names itself in leases.
    replica: String,
    /// What goes into the event outbox (`cluster_events`).
    pub(super) events: super::cluster_events::EventRecorder,
    /// The pull-through cache's tags as last read, for `LINK_TTL` (`cluster_cache`).
    pub(super) cache_tags: moka::sync::Cache<String, super::cluster_cache::SharedTag>,
    /// Unix seconds until which the cache's lookups skip the database (0: reachable).
    pub(super) cache_db_down_until: std::sync::atomic::AtomicU64,
}

/// Whether `id` could be a cluster upload session's id.
pub fn valid_upload_id(id: &str) -> bool {
    SessionId::parse(id).is_some()
}

fn shared(e: impl std::fmt::Display) -> StoreError {
    StoreError::Shared(e.to_string())
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        shared(e)
    }
}

fn link_key(repo: &RepoName, digest: &Digest) -> String {
    format!("{repo}\0{digest}")
}

/// What a client sees of a failed upload operation.
fn upload_error(e: UploadsError) -> StoreError {
    match e {
        UploadsError::NotFound => StoreError::UploadUnknown,
        UploadsError::InUse | UploadsError::Lost => StoreError::UploadBusy,
        UploadsError::OffsetMismatch { offset, .. } => StoreError::RangeInvalid { size: offset },
        UploadsError::DigestMismatch { expected, actual } => {
            StoreError::DigestMismatch { expected, actual }
        }
        e @ UploadsError::AlgorithmMismatch { .. } => StoreError::DigestRefused(e.to_string()),
        e @ UploadsError::TooMany { .. } => StoreError::TooManyUploads(e.to_string()),
        e @ UploadsError::TooLarge => StoreError::SizeInvalid(e.to_string()),
        UploadsError::Source(e) => match e.downcast::<std::io::Error>() {
            Ok(io) if io.get_ref().is_some_and(|i| i.is::<LengthMismatch>()) => {
                StoreError::SizeInvalid(io.to_string())
            }
            Ok(io) => StoreError::Body(*io),
            Err(e) => StoreError::Body(std::io::Error::other(e)),
        },
        e => shared(e),
    }
}

/// The file's bytes if they are `size` long and hash to `digest` (`None` otherwise). Reads
/// are positional: the read cache hands requests that shared one fetch clones of one file
/// descriptor, whose cursor they share.
fn read_verified(
    file: std::fs::File,
    digest: &Digest,
    size: u64,
) -> Result<Option<Bytes>, StoreError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
    if let Err(e) = file.read_exact_at(&mut buf, 0) {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e.into()),
        };
    }
    // A byte past `size` means a longer file.
    let longer = file.read_at(&mut [0u8; 1], size)? > 0;
    let ok = !longer && Digest::of(digest.algorithm(), &buf) == *digest;
    Ok(ok.then(|| Bytes::from(buf)))
}

fn session(id: &str) -> Result<SessionId, StoreError> {
    SessionId::parse(id).ok_or(StoreError::UploadUnknown)
}

impl ClusterStore {
    pub fn new(
        db: Db,
        objects: Objects,
        uploads: Uploads,
        cache: ReadCache,
        options: ClusterStoreOptions,
    ) -> Self {
        let ClusterStoreOptions {
            max_manifest_size,
            small_blob_cache,
            redirect,
            replica,
        } = options;
        Self {
            db,
            objects,
            uploads,
            cache,
            links: moka::sync::Cache::builder()
                .max_capacity(LINK_CACHE_ENTRIES)
                .time_to_live(LINK_TTL)
                .build(),
            small: (small_blob_cache > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(small_blob_cache)
                    .weigher(|_: &Digest, v: &Bytes| {
                        // Bookkeeping counts too (as in the local profile's cache).
                        u32::try_from(v.len() + 400).unwrap_or(u32::MAX)
                    })
                    .build()
            }),
            max_manifest_size,
            redirect,
            replica,
            events: Default::default(),
            cache_tags: moka::sync::Cache::builder()
                .max_capacity(LINK_CACHE_ENTRIES)
                .time_to_live(LINK_TTL)
                .build(),
            cache_db_down_until: Default::default(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    pub fn read_cache(&self) -> &ReadCache {
        &self.cache
    }

    pub fn max_manifest_size(&self) -> u64 {
        self.max_manifest_size
    }

    // ---- reads --------------------------------------------------------------------------

    pub async fn blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let k = link_key(repo, digest);
        if let Some(size) = self.links.get(&k) {
            return Ok(Some(size));
        }
        let size = self.db.blob_size(repo, digest).await?;
        if let Some(size) = size {
            self.links.insert(k, size);
        }
        Ok(size)
    }

    /// The blob's bytes: a small blob from memory (read once from the read cache and hashed
    /// again before it is kept), anything else as a local file from the read cache.
    pub async fn open_blob(&self, digest: &Digest, size: u64) -> Result<BlobSource, StoreError> {
        if size > SMALL_BLOB_MAX || self.small.is_none() {
            return self.open_file(digest, size).await.map(BlobSource::File);
        }
        if let Some(bytes) = self.small.as_ref().and_then(|c| c.get(digest)) {
            return Ok(BlobSource::Memory(bytes));
        }
        // A copy damaged at rest is dropped and fetched again from the bucket, once.
        for _ in 0..2 {
            let file = self.open_file(digest, size).await?;
            let d = digest.clone();
            let verified = tokio::task::spawn_blocking(move || read_verified(file, &d, size))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
            if let Some(bytes) = verified {
                if let Some(c) = &self.small {
                    c.insert(digest.clone(), bytes.clone());
                }
                return Ok(BlobSource::Memory(bytes));
            }
            tracing::warn!(%digest, "the read cache's copy was damaged; fetching it again");
            self.cache.remove(digest);
        }
        Err(shared(format!(
            "{digest} does not match its digest after a fresh fetch from the bucket"
        )))
    }

    /// The blob as a local file: from the read cache, or fetched from the bucket into it
    /// (verified before it is served; concurrent misses share one fetch).
    async fn open_file(&self, digest: &Digest, size: u64) -> Result<std::fs::File, StoreError> {
        if let Some(file) = self.cache.open_cached(digest, size) {
            return Ok(file);
        }
        let objects = self.objects.clone();
        let d = digest.clone();
        let fetched = self
            .cache
            .get_or_fetch(digest, size, move || async move {
                objects.get_range(&d, 0..size).await
            })
            .await;
        match fetched {
            Ok(file) => Ok(file),
            Err(e) => {
                // Local disk trouble is reported like the local profile's (ENOSPC included).
                if let ReadCacheError::Io { source, .. } = &e {
                    return Err(StoreError::Io(std::io::Error::new(
                        source.kind(),
                        e.to_string(),
                    )));
                }
                // Gone from the bucket (collected while a link was still cached here): the
                // blob is unknown, not the storage broken.
                if let Ok(None) = self.objects.head(digest).await {
                    self.links.invalidate_all();
                    return Err(StoreError::BlobUnknown(digest.clone()));
                }
                Err(shared(e))
            }
        }
    }

    /// A presigned URL for the blob, when blob GETs are redirected to the bucket.
    pub async fn redirect_url(&self, digest: &Digest) -> Result<Option<String>, StoreError> {
        if !self.redirect {
            return Ok(None);
        }
        let url = self
            .objects
            .presign_get(digest, REDIRECT_VALIDITY)
            .await
            .map_err(shared)?;
        Ok(Some(url))
    }

    pub async fn resolve_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<Digest>, StoreError> {
        Ok(self.db.tag(repo, tag).await?)
    }

    pub async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        Ok(self
            .db
            .manifest(repo, digest)
            .await?
            .map(|(media_type, body)| {
                Arc::new(StoredManifest {
                    digest: digest.clone(),
                    media_type,
                    bytes: Bytes::from(body),
                })
            }))
    }

    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Page>, StoreError> {
        Ok(self
            .db
            .list_tags(repo, last, n)
            .await?
            .map(|(items, more)| Page { items, more }))
    }

    pub async fn catalog(
        &self,
        last: Option<&str>,
        n: usize,
        visible: impl FnMut(&str) -> bool + Send,
    ) -> Result<Page, StoreError> {
        let (items, more) = self.db.catalog(last, n, visible).await?;
        Ok(Page { items, more })
    }

    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        Ok(self.db.referrers(repo, subject, artifact_type).await?)
    }

    // ---- changes ------------------------------------------------------------------------

    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        bytes: Bytes,
        content_type: &str,
        extra_tags: &[Tag],
    ) -> Result<PutManifest, StoreError> {
        let (parsed, digest, tags) = check_manifest(
            reference,
            &bytes,
            content_type,
            extra_tags,
            self.max_manifest_size,
        )?;
        let (blobs, children) = references(&parsed);
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        let descriptor = subject
            .as_ref()
            .map(|_| parsed.referrer_descriptor(&digest, bytes.len() as u64));
        let manifest = NewManifest {
            repo,
            digest: &digest,
            media_type: &parsed.media_type,
            body: &bytes,
            blobs: &blobs,
            children: &children,
            subject: subject.as_ref(),
            // What the referrers API filters on: the config's media type stands in for an
            // image manifest without its own (as the local profile's descriptors say).
            artifact_type: parsed.effective_artifact_type(),
            referrer_descriptor: descriptor.as_ref(),
            tags: &tags,
            pushed: true,
        };
        let events = self.push_events(repo, &digest, &parsed.media_type, bytes.len(), &tags);
        match self.db.put_manifest_recording(&manifest, &events).await {
            Ok(()) => {
                self.events_committed(&events);
                Ok(PutManifest {
                    digest,
                    subject,
                    tags,
                })
            }
            Err(PutManifestError::Missing(missing)) => {
                Err(StoreError::ManifestBlobUnknown(missing))
            }
            Err(PutManifestError::Pg(e)) => Err(e.into()),
        }
    }

    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), StoreError> {
        let found = match reference {
            Reference::Tag(t) => {
                let events = std::sync::OnceLock::new();
                let found = self
                    .db
                    .delete_tag_recording(repo, t, |d| {
                        events
                            .get_or_init(|| self.tag_delete_events(repo, t, d))
                            .clone()
                    })
                    .await?;
                self.events_committed(events.get().map_or(&[], Vec::as_slice));
                found
            }
            Reference::Digest(d) => {
                let events = self.manifest_delete_events(repo, d).await?;
                let found = self.db.delete_manifest_recording(repo, d, &events).await?;
                self.events_committed(&events);
                found
            }
        };
        if !found {
            return Err(StoreError::ManifestUnknown(match reference {
                Reference::Tag(t) => format!("{repo}:{t}"),
                Reference::Digest(d) => format!("{repo}@{d}"),
            }));
        }
        Ok(())
    }

    /// Unlinks the blob from `repo`; its bytes stay in the bucket (and in read caches, which
    /// only serve a blob a repository links) until GC.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        let key = link_key(repo, digest);
        self.links.invalidate(&key);
        let unlinked = self.db.unlink_blob(repo, digest).await?;
        // Again: a GET here between the first invalidation and the delete cached it anew.
        self.links.invalidate(&key);
        if !unlinked {
            return Err(StoreError::BlobUnknown(digest.clone()));
        }
        Ok(())
    }

    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.db.mount_blob(repo, from, digest).await?)
    }

    // ---- uploads ------------------------------------------------------------------------

    pub async fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        client: &str,
    ) -> Result<String, StoreError> {
        let id = self
            .uploads
            .start(repo, algorithm, Some(client))
            .await
            .map_err(upload_error)?;
        Ok(id.to_string())
    }

    pub async fn upload_size(&self, repo: &RepoName, id: &str) -> Result<u64, StoreError> {
        self.uploads
            .offset(repo, session(id)?)
            .await
            .map_err(upload_error)
    }

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
        let id = session(id)?;
        let expected = spec.declared_len()?;
        let offset = match spec.range {
            Some((start, _)) => start,
            // A chunk without a range goes at the end, wherever that is now; a concurrent
            // append elsewhere makes this one fail with the session's real size.
            None => self.uploads.offset(repo, id).await.map_err(upload_error)?,
        };
        if expected == Some(0) {
            return Ok(offset);
        }
        let bytes = exact_length(body, expected);
        self.uploads
            .append(repo, id, offset, bytes)
            .await
            .map_err(upload_error)
    }

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
        self.append_upload(repo, id, spec, body).await?;
        let size = self
            .uploads
            .finish(repo, session(id)?, digest)
            .await
            .map_err(upload_error)?;
        self.links.insert(link_key(repo, digest), size);
        Ok(size)
    }

    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        self.uploads
            .cancel(repo, session(id)?)
            .await
            .map_err(upload_error)
    }
}

/// A body longer or shorter than its declared length (answered as `SIZE_INVALID`).
#[derive(Debug)]
struct LengthMismatch(String);

impl std::fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LengthMismatch {}

fn length_mismatch(kind: std::io::ErrorKind, what: String) -> std::io::Error {
    std::io::Error::new(kind, LengthMismatch(what))
}

/// `body`, failing if it is longer or shorter than `expected` (when a length was declared).
/// The session keeps what was recorded before the failure (whole parts): the 416 of the
/// client's retry, or a status request, tells where it stands.
fn exact_length<'a, S>(
    body: &'a mut S,
    expected: Option<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'a
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send,
{
    let mut seen = 0u64;
    let mut ended = false;
    futures_util::stream::poll_fn(move |cx| {
        if ended {
            return std::task::Poll::Ready(None);
        }
        match body.poll_next_unpin(cx) {
            std::task::Poll::Ready(Some(Ok(chunk))) => {
                seen += chunk.len() as u64;
                if expected.is_some_and(|n| seen > n) {
                    ended = true;
                    return std::task::Poll::Ready(Some(Err(length_mismatch(
                        std::io::ErrorKind::InvalidData,
                        "the body is longer than its declared length".into(),
                    ))));
                }
                std::task::Poll::Ready(Some(Ok(chunk)))
            }
            std::task::Poll::Ready(None) => {
                ended = true;
                match expected {
                    Some(n) if seen < n => std::task::Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the body ended after {seen} of its {n} declared bytes"),
                    )))),
                    _ => std::task::Poll::Ready(None),
                }
            }
            other => other,
        }
    })
}

/// What a manifest references: its blobs (config, layers) and child manifests (an index's).
pub(super) fn references(
    parsed: &crate::oci::manifest::ParsedManifest,
) -> (Vec<Digest>, Vec<Digest>) {
    let blobs = parsed
        .referenced_blobs()
        .map(|d| d.digest.clone())
        .collect();
    let children = parsed
        .child_manifests()
        .iter()
        .map(|d| d.digest.clone())
        .collect();
    (blobs, children)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    async fn collect(
        chunks: Vec<&'static [u8]>,
        expected: Option<u64>,
    ) -> Result<Vec<u8>, std::io::Error> {
        let mut body = stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c))));
        let mut out = Vec::new();
        let mut s = std::pin::pin!(exact_length(&mut body, expected));
        while let Some(item) = s.next().await {
            out.extend_from_slice(&item?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_body_must_have_its_declared_length() {
        assert_eq!(collect(vec![b"ab", b"c"], Some(3)).await.unwrap(), b"abc");
        assert_eq!(collect(vec![b"ab", b"c"], None).await.unwrap(), b"abc");
        let short = collect(vec![b"ab"], Some(3)).await.unwrap_err();
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
        let long = collect(vec![b"ab", b"cd"], Some(3)).await.unwrap_err();
        assert_eq!(long.kind(), std::io::ErrorKind::InvalidData);
    }
}
