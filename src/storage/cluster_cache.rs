//! The pull-through cache's shared state, as the proxy asks for it in the cluster profile:
//! manifests and tags every replica reads from the database (so a tag one replica confirmed
//! or moved is fresh, or moved, on all of them), and the cache's events (`cache.fill` of a
//! manifest, `tag.moved`) recorded in the shared outbox in the change's own transaction.
//! Errors are the local profile's (`StoreError`): a database failure is 503.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::cluster::ClusterStore;
use crate::cluster::cache::{CachedManifest, CachedPut, PullRecord};
use crate::cluster::pg::PgError;
use crate::cluster::tags::TagMove;
use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, RepoName, Tag};
use crate::store::outbox::{self, EventKind, EventRecord};
use crate::store::{StoreError, StoredManifest, unix_now};

/// A cache tag and when the upstream last confirmed it (unix seconds), with its manifest if
/// the repository holds it.
#[derive(Clone)]
pub struct SharedTag {
    pub digest: Digest,
    pub checked: u64,
    pub manifest: Option<Arc<StoredManifest>>,
}

impl ClusterStore {
    /// Stores a manifest fetched from the upstream (verified against `digest`) in the cache
    /// repository, optionally pointing `tag` at it (unless another replica moved it since it
    /// was read as naming `tag_seen`), for every replica.
    pub async fn put_cached_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: &Bytes,
        tag: Option<&Tag>,
        tag_seen: Option<&Digest>,
    ) -> Result<(), StoreError> {
        let parsed = ParsedManifest::parse(bytes, media_type)
            .map_err(|e| StoreError::ManifestInvalid(e.to_string()))?;
        let (blobs, children) = super::cluster::references(&parsed);
        let m = CachedManifest {
            repo,
            digest,
            media_type: &parsed.media_type,
            body: bytes,
            blobs: &blobs,
            children: &children,
            tag,
            tag_seen,
        };
        let mut recorded = Vec::new();
        if let Some(t) = tag {
            self.cache_tags.invalidate(&tag_key(repo, t));
        }
        self.reach(self.db().put_cached_manifest(&m, |put| {
            recorded = self.cache_put_events(&m, put);
            recorded.clone()
        }))
        .await?;
        self.events_committed(&recorded);
        Ok(())
    }

    /// `cache.fill` for a manifest new in the repository, `tag.moved` for a tag that named
    /// another digest: the local profile's records.
    fn cache_put_events(&self, m: &CachedManifest<'_>, put: &CachedPut) -> Vec<Vec<u8>> {
        let record = |kind: EventKind, previous: Option<&Digest>| -> Vec<Vec<u8>> {
            self.encode_events(kind, || {
                vec![EventRecord {
                    previous: previous.map(Digest::to_string),
                    ..outbox::manifest_event(
                        kind,
                        m.repo,
                        m.digest,
                        m.media_type,
                        m.body.len(),
                        m.tag,
                    )
                }]
            })
        };
        let mut events = Vec::new();
        if put.new_here {
            events.extend(record(EventKind::CacheFill, None));
        }
        if let Some(TagMove::Moved { previous }) = &put.tag {
            events.extend(record(EventKind::TagMoved, Some(previous)));
        }
        events
    }

    /// Records a blob the cluster fetched from the upstream (once for all replicas) as the
    /// cache repository's, with its `cache.fill` event in the same transaction, if its object
    /// is still in the bucket (`Db::record_filled_blob`); whether it was recorded.
    pub async fn link_filled_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, StoreError> {
        let events = self.encode_events(EventKind::CacheFill, || {
            outbox::blob_fill_events(repo, digest, size, None)
        });
        let recorded = self
            .db()
            .record_filled_blob(self.objects(), repo, digest, size, &events)
            .await
            .map_err(|e| StoreError::Shared(e.to_string()))?;
        if recorded {
            self.events_committed(&events);
        }
        Ok(recorded)
    }

    /// What the cluster's eviction records for an image it removes: `cache.evict` naming its
    /// root and a tag it had, as the local profile's eviction does.
    pub fn evict_events(&self, repo: &str, root: &str, tag: Option<&str>) -> Vec<Vec<u8>> {
        self.encode_events(EventKind::CacheEvict, || {
            vec![EventRecord {
                digest: Some(root.to_string()),
                tag: tag.map(str::to_string),
                ..EventRecord::new(EventKind::CacheEvict, repo)
            }]
        })
    }

    /// The size of a blob the cluster holds for the cache repository (filled by any replica).
    pub async fn cached_blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        self.reach(self.db().blob_size(repo, digest)).await
    }

    /// The manifest `digest`, if the cache repository holds it.
    pub async fn cached_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, StoreError> {
        Ok(self
            .reach(self.db().manifest(repo, digest))
            .await?
            .map(|(media_type, body)| StoredManifest {
                digest: digest.clone(),
                media_type,
                bytes: Bytes::from(body),
            }))
    }

    /// The cache tag as this replica read it within the last `LINK_TTL`, if it did: no I/O.
    pub fn recently_read_tag(&self, repo: &RepoName, tag: &Tag) -> Option<SharedTag> {
        self.cache_tags.get(&tag_key(repo, tag))
    }

    /// The cache tag as every replica sees it, read at most once per `LINK_TTL` (1 s) on this
    /// replica while it stays the same: a hot tag costs the database one query a second, not
    /// one per pull, and another replica's move or confirmation is seen within that second
    /// (well inside any `tag_ttl`). This replica's own changes drop the entry at once.
    pub async fn cached_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<SharedTag>, StoreError> {
        if let Some(t) = self.recently_read_tag(repo, tag) {
            return Ok(Some(t));
        }
        let key = tag_key(repo, tag);
        let Some(t) = self.reach(self.db().cached_tag(repo, tag)).await? else {
            return Ok(None);
        };
        let manifest = t.manifest.map(|(media_type, body)| {
            Arc::new(StoredManifest {
                digest: t.digest.clone(),
                media_type,
                bytes: Bytes::from(body),
            })
        });
        let t = SharedTag {
            digest: t.digest,
            // The database's age as a time by this replica's clock: no skew between them.
            checked: t
                .confirmed_ago
                .map_or(0, |ago| unix_now().saturating_sub(ago)),
            manifest,
        };
        self.cache_tags.insert(key, t.clone());
        Ok(Some(t))
    }

    /// The upstream confirmed that `tag` still names `digest`.
    pub async fn confirm_cached_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        self.cache_tags.invalidate(&tag_key(repo, tag));
        self.reach(self.db().confirm_cached_tag(repo, tag, digest))
            .await
    }

    /// Forgets a tag the upstream no longer has, unless pinned; whether it is gone.
    pub async fn forget_cached_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, StoreError> {
        self.cache_tags.invalidate(&tag_key(repo, tag));
        self.reach(self.db().forget_cached_tag(repo, tag)).await
    }

    /// Adds this replica's pulls of cached manifests to the shared record.
    pub async fn record_pulls(&self, mut pulls: Vec<PullRecord>) -> Result<u64, StoreError> {
        Ok(self.db().record_pulls(&mut pulls).await?)
    }
}

/// After the database could not be reached, how long the cache's lookups go to this
/// replica's copy at once instead of each waiting for a connection.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

impl ClusterStore {
    /// Runs a database call of the cache's request path, unless the database was found
    /// unreachable less than `UNREACHABLE_FOR` ago (the caller falls back at once then).
    async fn reach<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, PgError>>,
    ) -> Result<T, StoreError> {
        if unix_now() < self.cache_db_down_until.load(Ordering::Relaxed) {
            return Err(StoreError::Shared(
                "the database was unreachable moments ago".into(),
            ));
        }
        let result = call.await;
        if let Err(PgError::Pool(_)) = &result {
            let until = unix_now() + UNREACHABLE_FOR.as_secs();
            self.cache_db_down_until.store(until, Ordering::Relaxed);
        }
        Ok(result?)
    }
}

fn tag_key(repo: &RepoName, tag: &Tag) -> String {
    format!("{repo}\0{tag}")
}
