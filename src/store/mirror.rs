//! Storage operations of the pull-through cache. Cached manifests are stored byte-exact like
//! pushed ones, but their blobs are fetched on demand, so they are not required to be present.
//! Mirror tags carry the time they were last confirmed upstream (`tag_checks`), and every
//! resolution observed is kept in `tag_history`.

use std::sync::Arc;

use bytes::Bytes;

use super::index::{
    self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_TAG_CHECKS, CF_TAG_HISTORY, CF_TAGS,
    key,
};
use super::outbox::EventKind;
use super::{Store, StoreError, StoredManifest, unix_now};
use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, RepoName, Tag};

/// Microseconds since the epoch: history keys stay distinct for resolutions a second apart.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Store {
    /// Stores a manifest fetched from upstream (already verified against `digest`) in the
    /// cache repository `repo`, optionally pointing `tag` at it, in one synced batch.
    pub fn put_cached_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
        tag: Option<&Tag>,
    ) -> Result<Arc<StoredManifest>, StoreError> {
        let parsed = ParsedManifest::parse(&bytes, media_type)
            .map_err(|e| StoreError::ManifestInvalid(e.to_string()))?;
        let digest_key = digest.to_string();
        let manifest_key = key(&[repo.as_str(), &digest_key]);
        let now = unix_now();
        let _gc = self.read_gc_lock();
        let mut batch = self.index.batch();
        batch.put(
            CF_MANIFESTS,
            &manifest_key,
            &super::encode_manifest(&parsed.media_type, &bytes),
        );
        batch.put(index::CF_PUSHED, &manifest_key, &index::encode_u64s(&[now]));
        for d in parsed.referenced_blobs() {
            batch.put(
                CF_BLOB_REFS,
                &key(&[&d.digest.to_string(), repo.as_str(), &digest_key]),
                b"",
            );
        }
        self.note_repo(&mut batch, repo, now)?;
        let tag_key = tag.map(|t| key(&[repo.as_str(), t.as_str()]));
        if let (Some(t), Some(k)) = (tag, &tag_key) {
            batch.put(CF_TAGS, k, digest_key.as_bytes());
            batch.put(CF_TAG_CHECKS, k, &index::encode_u64s(&[now]));
            let mut h = key(&[repo.as_str(), t.as_str()]);
            h.push(0);
            h.extend_from_slice(&unix_micros().to_be_bytes());
            batch.put(CF_TAG_HISTORY, &h, digest_key.as_bytes());
            self.follow_tag_pin(&mut batch, repo, t, digest)?;
        }
        // The manifest's stripe too, across the write and the hot-cache insert: an eviction
        // holds it while it re-checks and removes the manifest, so the two never interleave.
        let _stripes = self.lock_stripes(
            tag_key
                .iter()
                .map(|k| k.as_slice())
                .chain([manifest_key.as_slice()]),
        );
        // Fetched (or re-pointed) now: a pull, as eviction orders and re-checks them.
        let pulls = self
            .index
            .get(index::CF_ACCESS, &manifest_key)?
            .and_then(|v| index::decode_u64s::<2>(index::CF_ACCESS, &v).ok())
            .map_or(0, |[_, n]| n);
        batch.put(
            index::CF_ACCESS,
            &manifest_key,
            &index::encode_u64s(&[now, pulls]),
        );
        let size = bytes.len();
        let _fill = self.record_events(&mut batch, EventKind::CacheFill, || {
            self.manifest_fill_events(repo, digest, &parsed.media_type, size, tag)
        });
        let _moved = self.record_events(&mut batch, EventKind::TagMoved, || {
            self.tag_moved_events(repo, tag, digest, &parsed.media_type, size)
        });
        self.index.write_synced(batch)?;
        if let Some(k) = &tag_key {
            self.tags.insert(k.clone(), digest.clone());
        }
        let m = Arc::new(StoredManifest {
            digest: digest.clone(),
            media_type: parsed.media_type,
            bytes,
        });
        self.manifests.insert(manifest_key.clone(), m.clone());
        Ok(m)
    }

    /// A cached tag and when upstream last confirmed it (unix seconds).
    pub fn cached_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<(Digest, u64)>, StoreError> {
        let Some(digest) = self.resolve_tag(repo, tag)? else {
            return Ok(None);
        };
        let k = key(&[repo.as_str(), tag.as_str()]);
        let checked = self
            .index
            .get_with(CF_TAG_CHECKS, &k, |v| {
                index::decode_u64s::<1>(CF_TAG_CHECKS, v)
            })?
            .transpose()?
            .map_or(0, |[t]| t);
        Ok(Some((digest, checked)))
    }

    /// Records that upstream confirmed `tag` still points where it did.
    pub fn confirm_cached_tag(&self, repo: &RepoName, tag: &Tag) -> Result<(), StoreError> {
        let mut batch = self.index.batch();
        batch.put(
            CF_TAG_CHECKS,
            &key(&[repo.as_str(), tag.as_str()]),
            &index::encode_u64s(&[unix_now()]),
        );
        Ok(self.index.write_relaxed(batch)?)
    }

    /// Forgets a cached tag that upstream no longer has — unless it is pinned: a pin keeps
    /// what the tag resolved to being served, whatever the upstream says (or whether its
    /// credentials still work). Returns whether it was forgotten.
    pub fn forget_cached_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, StoreError> {
        if self.is_tag_pinned(repo, tag)? {
            return Ok(false);
        }
        let k = key(&[repo.as_str(), tag.as_str()]);
        let _g = self.lock_stripe(&k);
        let mut batch = self.index.batch();
        batch.delete(CF_TAGS, &k);
        batch.delete(CF_TAG_CHECKS, &k);
        self.index.write_synced(batch)?;
        self.tags.invalidate(&k);
        Ok(true)
    }

    /// The observed resolutions of a mirror tag, oldest first: `(unix microseconds, digest)`.
    pub fn tag_history(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let p = index::prefix(&[repo.as_str(), tag.as_str()]);
        let mut out = Vec::new();
        self.index.scan(CF_TAG_HISTORY, &p, None, |k, v| {
            if let Ok(t) = <[u8; 8]>::try_from(&k[p.len()..]) {
                out.push((
                    u64::from_be_bytes(t),
                    String::from_utf8_lossy(v).into_owned(),
                ));
            }
            true
        })?;
        Ok(out)
    }

    /// Links a blob the store already holds into `repo` (a cache repository whose upstream
    /// confirmed it has the blob). Returns its size, or `None` if the store lacks it.
    pub fn link_stored_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, StoreError> {
        let _gc = self.read_gc_lock();
        let digest_key = digest.to_string();
        let Some(size) = self.global_blob_size(digest)? else {
            return Ok(None);
        };
        if !self.blobs.contains(digest) {
            return Ok(None);
        }
        let now = unix_now();
        let mut batch = self.index.batch();
        self.link_blob(&mut batch, &digest_key, size, repo, now, false)?;
        self.index.write_synced(batch)?;
        Ok(Some(size))
    }

    /// Whether the blob is in the store at all (any repository).
    pub fn has_blob_anywhere(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.index.exists(CF_BLOBS, digest.to_string().as_bytes())?)
    }

    /// Whether `repo` has a link to the blob (without the hot cache).
    pub fn is_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self
            .index
            .exists(CF_LINKS, &key(&[repo.as_str(), &digest.to_string()]))?)
    }
}
