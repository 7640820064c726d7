//! The storage engine both jobs share: a RocksDB index (`index`) over a content-addressed blob
//! store (`blobs`), upload sessions (`uploads`), garbage collection (`gc`), consistency
//! checks (`fsck`) and the online re-hash of stored blobs (`scrub`), with moka hot caches in
//! front of the index. It offers the operations the
//! handlers need and knows nothing about HTTP.
//!
//! Consistency rules:
//! - The index never points at bytes that are not durably complete and verified: files are
//!   committed (fsync + rename + dir fsync) before the synced write batch that names them.
//! - Hot caches hold only positive answers. A cache miss reads the index and fills the cache
//!   while holding the key's stripe lock; every change of a cached key happens under the same
//!   lock, so a reader can never re-insert a value a writer just replaced.
//! - `gc_lock`: commits and manifest pushes hold it shared; GC and scrub hold it exclusively
//!   while they re-check and drop a blob from the index, so a blob is never collected under a
//!   push that references it.

pub mod access;
pub mod auth_records;
pub mod blobs;
pub mod browse;
pub mod evict;
pub mod fsck;
pub mod gc;
pub mod import;
pub mod index;
pub mod inventory;
pub mod mirror;
pub mod outbox;
pub mod pagecache;
pub mod pins;
pub mod scrub;
pub mod small_blobs;
pub mod uploads;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use moka::sync::Cache;

use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, Reference, RepoName, Tag};
use blobs::BlobStore;
use index::{
    CF_BLOB_REFS, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_REFERRERS, CF_REPOS, CF_TAGS, Index,
    IndexError, key, prefix,
};

pub use blobs::{BlobChunks, READ_WINDOW, WritebackKick};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(Digest),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(RepoName),
    #[error("blob upload unknown to registry")]
    UploadUnknown,
    #[error("chunk out of order: the upload holds {size} bytes, the next chunk must start there")]
    RangeInvalid { size: u64 },
    #[error("{0}")]
    SizeInvalid(String),
    #[error("digest mismatch: content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest exceeds the {limit}-byte limit")]
    ManifestTooLarge { limit: u64 },
    #[error("manifest references content this repository does not have: {}", list(.0))]
    ManifestBlobUnknown(Vec<Digest>),
    #[error("error reading the request body: {0}")]
    Body(std::io::Error),
    #[error("too many upload sessions: {0}")]
    TooManyUploads(String),
    #[error(
        "the registry is short of disk space (below cache.min_free_disk, with nothing more it may evict); pushes are refused until space is freed"
    )]
    InsufficientStorage,
    /// Another request (on this or another replica) is writing to the upload session.
    #[error("another request is writing to this upload session; retry when it ends")]
    UploadBusy,
    #[error("{0}")]
    DigestRefused(String),
    /// The cluster profile's shared database or bucket failed or cannot be reached.
    #[error("shared storage: {0}")]
    Shared(String),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
}

fn list(ds: &[Digest]) -> String {
    ds.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Settings the store needs from the config.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub manifest_cache_bytes: u64,
    /// `storage.small_blob_cache`: memory for small blobs served without a file read.
    pub small_blob_cache_bytes: u64,
    pub max_manifest_size: u64,
    pub gc_grace: Duration,
    pub upload_abandon_after: Duration,
    /// `cache.max_size`: a fill that takes cached bytes past it wakes the eviction loop.
    pub cache_max_size: Option<u64>,
    /// `cache.min_free_disk`: a fill or upload that starts with less free space wakes it too.
    pub cache_min_free_disk: u64,
    pub upload_limits: uploads::UploadLimits,
    /// The event kinds some notification endpoint wants: only these are recorded.
    pub event_kinds: outbox::Kinds,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            manifest_cache_bytes: 64 << 20,
            small_blob_cache_bytes: small_blobs::DEFAULT_CAPACITY,
            max_manifest_size: 4 << 20,
            gc_grace: Duration::from_secs(3600),
            upload_abandon_after: Duration::from_secs(24 * 3600),
            cache_max_size: None,
            cache_min_free_disk: 0,
            upload_limits: uploads::UploadLimits::default(),
            event_kinds: outbox::Kinds::default(),
        }
    }
}

/// A manifest as stored: exact bytes and media type.
#[derive(Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a successful manifest push reports back.
#[derive(Debug)]
pub struct PutManifest {
    pub digest: Digest,
    pub subject: Option<Digest>,
    pub tags: Vec<Tag>,
}

/// A page of a sorted listing (tags, catalog).
#[derive(Debug)]
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

const STRIPES: usize = 64;

/// Second value of a `CF_LINKS` record made by a push (`[linked_at, LINK_PUSHED]`); other
/// links hold `[linked_at]` only.
const LINK_PUSHED: u64 = 1;

pub struct Store {
    data_dir: PathBuf,
    pub(crate) index: Index,
    pub(crate) blobs: BlobStore,
    pub(crate) uploads: uploads::Uploads,
    options: StoreOptions,
    manifests: Cache<Vec<u8>, Arc<StoredManifest>>,
    tags: Cache<Vec<u8>, Digest>,
    links: Cache<Vec<u8>, u64>,
    stripes: Vec<Mutex<()>>,
    gc_lock: RwLock<()>,
    stored_bytes: AtomicU64,
    blob_count: AtomicU64,
    /// Pulls of cached content not yet written to the index.
    access: access::AccessLog,
    /// Set by an eviction pass that could not restore `cache.min_free_disk`.
    space_low: AtomicBool,
    /// What the last eviction census counted.
    usage_seen: Mutex<inventory::CacheUsage>,
    /// Bumped whenever a blob enters or leaves the index (`blob_changes`), and its value
    /// when the last census began: equal means a census would find what that one found.
    blob_changes: AtomicU64,
    census_changes: AtomicU64,
    /// Pushed bytes the last census counted: stored minus this estimates cached bytes.
    pushed_seen: AtomicU64,
    /// Unix time of the last census.
    census_at: AtomicU64,
    /// Held by a GC run or an eviction pass for its whole length: one sweep at a time.
    sweep_lock: Mutex<()>,
    /// Woken when a fill takes stored bytes past `cache_max_size`.
    eviction_wanted: tokio::sync::Notify,
    outbox: outbox::Outbox,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens (creating) the store under `data_dir`: `index/`, `blobs/`, `ingest/`.
    pub fn open(data_dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)?;
        let index = Index::open(&data_dir.join("index"))?;
        let blobs =
            BlobStore::open(data_dir)?.with_small_blob_cache(options.small_blob_cache_bytes);
        let manifests = Cache::builder()
            .max_capacity(options.manifest_cache_bytes)
            .weigher(|k: &Vec<u8>, v: &Arc<StoredManifest>| {
                u32::try_from(k.len() + v.bytes.len() + v.media_type.len() + 128)
                    .unwrap_or(u32::MAX)
            })
            .build();
        let small = (options.manifest_cache_bytes / 512).max(1024);
        let outbox = outbox::Outbox::open(&index, options.event_kinds)?;
        let store = Self {
            data_dir: data_dir.to_path_buf(),
            uploads: uploads::Uploads::new(options.upload_limits),
            manifests,
            tags: Cache::new(small),
            links: Cache::new(small * 4),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            gc_lock: RwLock::new(()),
            stored_bytes: AtomicU64::new(0),
            blob_count: AtomicU64::new(0),
            access: access::AccessLog::new(),
            space_low: AtomicBool::new(false),
            usage_seen: Mutex::new(inventory::CacheUsage::default()),
            blob_changes: AtomicU64::new(0),
            census_changes: AtomicU64::new(u64::MAX),
            pushed_seen: AtomicU64::new(0),
            census_at: AtomicU64::new(0),
            sweep_lock: Mutex::new(()),
            eviction_wanted: tokio::sync::Notify::new(),
            outbox,
            index,
            blobs,
            options,
        };
        store.recount()?;
        store.recover_uploads()?;
        Ok(store)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Resolves when a fill took stored bytes past the cache budget (see `commit_blob`).
    pub async fn eviction_wanted(&self) {
        self.eviction_wanted.notified().await
    }

    /// Bytes and number of blobs in the content-addressed store.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.stored_bytes.load(Ordering::Relaxed),
            self.blob_count.load(Ordering::Relaxed),
        )
    }

    fn recount(&self) -> Result<(), StoreError> {
        let (mut bytes, mut count) = (0u64, 0u64);
        let mut bad = None;
        self.index.scan(CF_BLOBS, b"", None, |k, v| {
            match index::decode_u64s::<2>(CF_BLOBS, v) {
                Ok([size, _]) => {
                    bytes += size;
                    count += 1;
                    true
                }
                Err(e) => {
                    bad = Some((String::from_utf8_lossy(k).into_owned(), e));
                    false
                }
            }
        })?;
        if let Some((_, e)) = bad {
            return Err(e.into());
        }
        self.stored_bytes.store(bytes, Ordering::Relaxed);
        self.blob_count.store(count, Ordering::Relaxed);
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(self.index.flush()?)
    }

    fn stripe_of(&self, key: &[u8]) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() as usize) % STRIPES
    }

    fn lock_stripe(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        self.stripes[self.stripe_of(key)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the stripes of several keys in a fixed order (no deadlock between writers).
    fn lock_stripes<'a>(
        &'a self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<MutexGuard<'a, ()>> {
        let mut idx: Vec<usize> = keys.into_iter().map(|k| self.stripe_of(k)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Excludes every commit, mount and manifest push (they hold it shared): GC and scrub
    /// hold it only to re-check and drop blobs from the index, never across a disk wait.
    fn write_gc_lock(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gc_lock.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_gc_lock(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gc_lock.read().unwrap_or_else(|p| p.into_inner())
    }

    // ---- repositories ------------------------------------------------------------------

    pub fn repo_exists(&self, repo: &RepoName) -> Result<bool, StoreError> {
        Ok(self.index.exists(CF_REPOS, repo.as_str().as_bytes())?)
    }

    fn note_repo(
        &self,
        batch: &mut index::IndexBatch<'_>,
        repo: &RepoName,
        now: u64,
    ) -> Result<(), StoreError> {
        if !self.repo_exists(repo)? {
            batch.put(
                CF_REPOS,
                repo.as_str().as_bytes(),
                &index::encode_u64s(&[now]),
            );
        }
        Ok(())
    }

    // ---- blobs -------------------------------------------------------------------------

    /// The size of `digest` if `repo` may read it.
    pub fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let k = key(&[repo.as_str(), &digest.to_string()]);
        if let Some(size) = self.links.get(&k) {
            return Ok(Some(size));
        }
        let _g = self.lock_stripe(&k);
        if !self.index.exists(CF_LINKS, &k)? {
            return Ok(None);
        }
        let size = self.global_blob_size(digest)?;
        if let Some(size) = size {
            self.links.insert(k, size);
        }
        Ok(size)
    }

    fn global_blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let rec = self
            .index
            .get_with(CF_BLOBS, digest.to_string().as_bytes(), |v| {
                index::decode_u64s::<2>(CF_BLOBS, v)
            })?;
        Ok(rec.transpose()?.map(|[size, _]| size))
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<std::fs::File, StoreError> {
        match self.blobs.open_blob(digest) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::BlobUnknown(digest.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Adds to `batch`: the blob record (with `linked_at = now`, which restarts its GC grace
    /// period), `repo`'s link to it, and the repository if it is new. `pushed` marks a link
    /// made by a push into `repo` (an upload or a mount), which GC keeps while the push's
    /// manifest may still arrive (see `kept_for_push`).
    fn link_blob(
        &self,
        batch: &mut index::IndexBatch<'_>,
        digest_key: &str,
        size: u64,
        repo: &RepoName,
        now: u64,
        pushed: bool,
    ) -> Result<(), StoreError> {
        batch.put(
            CF_BLOBS,
            digest_key.as_bytes(),
            &index::encode_u64s(&[size, now]),
        );
        let link = if pushed {
            index::encode_u64s(&[now, LINK_PUSHED])
        } else {
            index::encode_u64s(&[now])
        };
        batch.put(CF_LINKS, &key(&[repo.as_str(), digest_key]), &link);
        self.note_repo(batch, repo, now)
    }

    /// Whether GC must keep a blob because of this `CF_LINKS` value: a link made by a push
    /// protects its blob for the longer of the GC grace period and `upload_abandon_after`
    /// (how long the registry waits on an idle push), so a manifest that arrives after the
    /// grace period but while its push could still be going on finds its blobs.
    pub(crate) fn kept_for_push(&self, link_value: &[u8], now: u64) -> bool {
        let window = self
            .options
            .gc_grace
            .max(self.options.upload_abandon_after)
            .as_secs();
        matches!(
            index::decode_u64s::<2>(CF_LINKS, link_value),
            Ok([linked_at, LINK_PUSHED]) if linked_at > now.saturating_sub(window)
        )
    }

    /// Moves a verified, fsynced ingest file into the CAS and links it to `repo`, in one synced
    /// batch (which also ends the upload session `upload_id`, if any).
    pub fn commit_blob(
        &self,
        ingest: &Path,
        digest: &Digest,
        size: u64,
        repo: &RepoName,
        upload_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let _gc = self.read_gc_lock();
        let digest_key = digest.to_string();
        let known = self.index.exists(CF_BLOBS, digest_key.as_bytes())?;
        self.blobs.commit_ingest(ingest, digest)?;
        let now = unix_now();
        let mut batch = self.index.batch();
        self.link_blob(
            &mut batch,
            &digest_key,
            size,
            repo,
            now,
            upload_id.is_some(),
        )?;
        if let Some(id) = upload_id {
            batch.delete(index::CF_UPLOADS, id.as_bytes());
        }
        let _events = self.record_events(&mut batch, outbox::EventKind::CacheFill, || {
            outbox::blob_fill_events(repo, digest, size, upload_id)
        });
        self.index.write_synced(batch)?;
        if !known {
            let stored = self.stored_bytes.fetch_add(size, Ordering::Relaxed) + size;
            self.blob_changes.fetch_add(1, Ordering::Relaxed);
            self.blob_count.fetch_add(1, Ordering::Relaxed);
            let cached = stored.saturating_sub(self.pushed_seen.load(Ordering::Relaxed));
            if upload_id.is_none() && self.options.cache_max_size.is_some_and(|m| cached > m) {
                self.eviction_wanted.notify_one();
            }
        }
        Ok(())
    }

    /// Links a blob `from` one repository into `repo` (cross-repository mount). Returns the
    /// size, or `None` if `from` does not have the blob (the client then uploads it).
    pub fn mount_blob(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let _gc = self.read_gc_lock();
        let digest_key = digest.to_string();
        if !self
            .index
            .exists(CF_LINKS, &key(&[from.as_str(), &digest_key]))?
        {
            return Ok(None);
        }
        let Some(size) = self.global_blob_size(digest)? else {
            return Ok(None);
        };
        let now = unix_now();
        let mut batch = self.index.batch();
        self.link_blob(&mut batch, &digest_key, size, repo, now, true)?;
        self.index.write_synced(batch)?;
        Ok(Some(size))
    }

    /// Removes `repo`'s link to a blob. The bytes go when GC finds nothing else uses them.
    pub fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        let k = key(&[repo.as_str(), &digest.to_string()]);
        let _g = self.lock_stripe(&k);
        if !self.index.exists(CF_LINKS, &k)? {
            return Err(StoreError::BlobUnknown(digest.clone()));
        }
        let mut batch = self.index.batch();
        batch.delete(CF_LINKS, &k);
        self.index.write_synced(batch)?;
        self.links.invalidate(&k);
        Ok(())
    }

    // ---- manifests and tags --------------------------------------------------------------

    /// Resolves a reference to a digest: digests as they are, tags through the tag index.
    pub fn resolve(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>, StoreError> {
        match reference {
            Reference::Digest(d) => Ok(Some(d.clone())),
            Reference::Tag(t) => self.resolve_tag(repo, t),
        }
    }

    pub fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, StoreError> {
        let k = key(&[repo.as_str(), tag.as_str()]);
        if let Some(d) = self.tags.get(&k) {
            return Ok(Some(d));
        }
        let _g = self.lock_stripe(&k);
        let Some(raw) = self.index.get(CF_TAGS, &k)? else {
            return Ok(None);
        };
        let digest: Digest = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| IndexError::Corrupt {
                cf: CF_TAGS,
                what: format!("tag {repo}:{tag}"),
            })?;
        self.tags.insert(k, digest.clone());
        Ok(Some(digest))
    }

    /// The manifest `digest` in `repo`.
    pub fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        let k = key(&[repo.as_str(), &digest.to_string()]);
        if let Some(m) = self.manifests.get(&k) {
            return Ok(Some(m));
        }
        let _g = self.lock_stripe(&k);
        let Some(raw) = self.index.get(CF_MANIFESTS, &k)? else {
            return Ok(None);
        };
        let (media_type, bytes) = decode_manifest(&raw)?;
        let m = Arc::new(StoredManifest {
            digest: digest.clone(),
            media_type,
            bytes: Bytes::from(bytes),
        });
        self.manifests.insert(k, m.clone());
        Ok(Some(m))
    }

    /// Validates and stores a manifest byte-exact, with its tags, reverse references and
    /// referrers entry, in one synced batch.
    pub fn put_manifest(
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
            self.options.max_manifest_size,
        )?;
        let digest_key = digest.to_string();

        let _gc = self.read_gc_lock();
        let mut missing = Vec::new();
        for d in parsed.referenced_blobs() {
            // The link and the blob itself: a link GC left behind when it collected the blob
            // in the same instant must not let a manifest point at bytes that are gone. Under
            // the GC read lock neither can go away before this manifest's batch is written.
            let digest_key = d.digest.to_string();
            if !self
                .index
                .exists(CF_LINKS, &key(&[repo.as_str(), &digest_key]))?
                || !self.index.exists(CF_BLOBS, digest_key.as_bytes())?
            {
                missing.push(d.digest.clone());
            }
        }
        for d in parsed.child_manifests() {
            if !self
                .index
                .exists(CF_MANIFESTS, &key(&[repo.as_str(), &d.digest.to_string()]))?
            {
                missing.push(d.digest.clone());
            }
        }
        if !missing.is_empty() {
            return Err(StoreError::ManifestBlobUnknown(missing));
        }

        let now = unix_now();
        let manifest_key = key(&[repo.as_str(), &digest_key]);
        let tag_keys: Vec<Vec<u8>> = tags
            .iter()
            .map(|t| key(&[repo.as_str(), t.as_str()]))
            .collect();
        let mut batch = self.index.batch();
        batch.put(
            CF_MANIFESTS,
            &manifest_key,
            &encode_manifest(&parsed.media_type, &bytes),
        );
        batch.put(index::CF_PUSHED, &manifest_key, &index::encode_u64s(&[now]));
        for k in &tag_keys {
            batch.put(CF_TAGS, k, digest_key.as_bytes());
        }
        for d in parsed.referenced_blobs() {
            batch.put(
                CF_BLOB_REFS,
                &key(&[&d.digest.to_string(), repo.as_str(), &digest_key]),
                b"",
            );
        }
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        if let Some(s) = &subject {
            let desc = parsed.referrer_descriptor(&digest, bytes.len() as u64);
            batch.put(
                CF_REFERRERS,
                &key(&[repo.as_str(), &s.to_string(), &digest_key]),
                desc.to_string().as_bytes(),
            );
        }
        self.note_repo(&mut batch, repo, now)?;

        let _stripes = self.lock_stripes(tag_keys.iter().map(|k| k.as_slice()));
        // Numbered under the tags' locks: events of one tag are in the order of its writes.
        let _events = self.record_events(&mut batch, outbox::EventKind::Push, || {
            outbox::push_events(repo, &digest, &parsed.media_type, bytes.len(), &tags)
        });
        self.index.write_synced(batch)?;
        for k in &tag_keys {
            self.tags.insert(k.clone(), digest.clone());
        }
        Ok(PutManifest {
            digest,
            subject,
            tags,
        })
    }

    /// Deletes a manifest by digest (with every tag pointing at it) or a tag by name.
    pub fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), StoreError> {
        match reference {
            Reference::Tag(t) => {
                let k = key(&[repo.as_str(), t.as_str()]);
                let _g = self.lock_stripe(&k);
                if !self.index.exists(CF_TAGS, &k)? {
                    return Err(StoreError::ManifestUnknown(format!("{repo}:{t}")));
                }
                let mut batch = self.index.batch();
                batch.delete(CF_TAGS, &k);
                let _events = self.record_events(&mut batch, outbox::EventKind::Delete, || {
                    self.tag_delete_events(repo, t)
                });
                self.index.write_synced(batch)?;
                self.tags.invalidate(&k);
                Ok(())
            }
            Reference::Digest(d) => self.delete_manifest_digest(repo, d),
        }
    }

    fn delete_manifest_digest(&self, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        let digest_key = digest.to_string();
        let manifest_key = key(&[repo.as_str(), &digest_key]);
        let Some(raw) = self.index.get(CF_MANIFESTS, &manifest_key)? else {
            return Err(StoreError::ManifestUnknown(format!("{repo}@{digest}")));
        };
        let (media_type, bytes) = decode_manifest(&raw)?;
        let mut tag_keys = Vec::new();
        self.index
            .scan(CF_TAGS, &prefix(&[repo.as_str()]), None, |k, v| {
                if v == digest_key.as_bytes() {
                    tag_keys.push(k.to_vec());
                }
                true
            })?;
        let mut batch = self.index.batch();
        batch.delete(CF_MANIFESTS, &manifest_key);
        batch.delete(index::CF_PUSHED, &manifest_key);
        for k in &tag_keys {
            batch.delete(CF_TAGS, k);
        }
        // The stored bytes passed validation when pushed; if they no longer parse, the reverse
        // entries are left for fsck rather than guessed at.
        if let Ok(parsed) = ParsedManifest::parse(&bytes, &media_type) {
            for d in parsed.referenced_blobs() {
                batch.delete(
                    CF_BLOB_REFS,
                    &key(&[&d.digest.to_string(), repo.as_str(), &digest_key]),
                );
            }
            if let Some(s) = &parsed.subject {
                batch.delete(
                    CF_REFERRERS,
                    &key(&[repo.as_str(), &s.digest.to_string(), &digest_key]),
                );
            }
        }
        let _stripes = self.lock_stripes(
            tag_keys
                .iter()
                .map(|k| k.as_slice())
                .chain([manifest_key.as_slice()]),
        );
        let _events = self.record_events(&mut batch, outbox::EventKind::Delete, || {
            let size = bytes.len();
            vec![outbox::manifest_event(
                outbox::EventKind::Delete,
                repo,
                digest,
                &media_type,
                size,
                None,
            )]
        });
        self.index.write_synced(batch)?;
        self.manifests.invalidate(&manifest_key);
        for k in &tag_keys {
            self.tags.invalidate(k);
        }
        Ok(())
    }

    /// Tags of `repo` in ASCII order after `last`, at most `n`. `None` if the repository is
    /// unknown.
    pub fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Page>, StoreError> {
        let p = prefix(&[repo.as_str()]);
        let page = self.page(CF_TAGS, &p, last, n)?;
        if page.items.is_empty() && last.is_none() && !self.repo_exists(repo)? {
            return Ok(None);
        }
        Ok(Some(page))
    }

    /// Repository names in ASCII order after `last`, at most `n`.
    pub fn catalog(
        &self,
        last: Option<&str>,
        n: usize,
        mut visible: impl FnMut(&str) -> bool,
    ) -> Result<Page, StoreError> {
        let mut items = Vec::new();
        let mut more = false;
        let start = last.map(|l| l.as_bytes().to_vec());
        self.index.scan(CF_REPOS, b"", start.as_deref(), |k, _| {
            let Ok(name) = std::str::from_utf8(k) else {
                return true;
            };
            if last == Some(name) || !visible(name) {
                return true;
            }
            if items.len() == n {
                more = true;
                return false;
            }
            items.push(name.to_string());
            true
        })?;
        Ok(Page { items, more })
    }

    fn page(
        &self,
        cf: &'static str,
        p: &[u8],
        last: Option<&str>,
        n: usize,
    ) -> Result<Page, StoreError> {
        let start = last.map(|l| [p, l.as_bytes()].concat());
        let mut items = Vec::new();
        let mut more = false;
        self.index.scan(cf, p, start.as_deref(), |k, _| {
            let Ok(item) = std::str::from_utf8(&k[p.len()..]) else {
                return true;
            };
            if last == Some(item) {
                return true;
            }
            if items.len() == n {
                more = true;
                return false;
            }
            items.push(item.to_string());
            true
        })?;
        Ok(Page { items, more })
    }

    /// Descriptors of manifests in `repo` whose subject is `subject`, optionally filtered by
    /// artifact type.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut out = Vec::new();
        self.index.scan(
            CF_REFERRERS,
            &prefix(&[repo.as_str(), &subject.to_string()]),
            None,
            |_, v| {
                if let Ok(desc) = serde_json::from_slice::<serde_json::Value>(v)
                    && artifact_type.is_none_or(|t| {
                        desc.get("artifactType").and_then(|a| a.as_str()) == Some(t)
                    })
                {
                    out.push(desc);
                }
                true
            },
        )?;
        Ok(out)
    }
}

/// What every profile checks of a pushed manifest before storing it: its size, that it
/// parses, and its digest (the one named, or sha256 for a tag); with the tags it sets, the
/// reference's first.
pub fn check_manifest(
    reference: &Reference,
    bytes: &[u8],
    content_type: &str,
    extra_tags: &[Tag],
    limit: u64,
) -> Result<(ParsedManifest, Digest, Vec<Tag>), StoreError> {
    if bytes.len() as u64 > limit {
        return Err(StoreError::ManifestTooLarge { limit });
    }
    let parsed = ParsedManifest::parse(bytes, content_type)
        .map_err(|e| StoreError::ManifestInvalid(e.to_string()))?;
    let digest = match reference {
        Reference::Digest(expected) => {
            let actual = Digest::of(expected.algorithm(), bytes);
            if actual != *expected {
                return Err(StoreError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
            actual
        }
        Reference::Tag(_) => Digest::sha256_of(bytes),
    };
    let mut tags: Vec<Tag> = extra_tags.to_vec();
    if let Reference::Tag(t) = reference {
        tags.insert(0, t.clone());
    }
    tags.dedup();
    Ok((parsed, digest, tags))
}

fn encode_manifest(media_type: &str, bytes: &[u8]) -> Vec<u8> {
    let mt = media_type.as_bytes();
    let mut v = Vec::with_capacity(2 + mt.len() + bytes.len());
    v.extend_from_slice(&(mt.len().min(u16::MAX as usize) as u16).to_be_bytes());
    v.extend_from_slice(&mt[..mt.len().min(u16::MAX as usize)]);
    v.extend_from_slice(bytes);
    v
}

pub(crate) fn decode_manifest(raw: &[u8]) -> Result<(String, Vec<u8>), IndexError> {
    let corrupt = || IndexError::Corrupt {
        cf: CF_MANIFESTS,
        what: "truncated manifest record".into(),
    };
    let len = u16::from_be_bytes(
        raw.get(..2)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    ) as usize;
    let mt = raw.get(2..2 + len).ok_or_else(corrupt)?;
    let mt = std::str::from_utf8(mt).map_err(|_| corrupt())?.to_string();
    Ok((mt, raw[2 + len..].to_vec()))
}
