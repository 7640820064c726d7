//! Where the cache's manifests and tags are read and written. In the local profile that is the
//! replica's `Store`. In the cluster profile the shared database is the truth — a tag one
//! replica confirmed or moved is fresh, or moved, on every replica, and a manifest one replica
//! fetched is served by all without asking the upstream again — and the replica's `Store`
//! keeps its own copy of what it served (its blobs fill there, and its local budget evicts
//! them together).

use std::sync::Arc;

use bytes::Bytes;

use super::Context;
use super::blocking::store_work;
use crate::oci::{Digest, RegistryError, RepoName, Tag};
use crate::store::StoredManifest;

/// A cached tag: its manifest and when the upstream last confirmed it (unix seconds).
pub struct CachedTag {
    pub manifest: Arc<StoredManifest>,
    pub checked: u64,
}

/// Whether reads must go to the shared database (the cluster profile).
pub fn is_shared(cx: &Context) -> bool {
    cx.proxy.shared_cache().is_some()
}

/// The cached manifest `digest` of `repo`: this replica's copy, else the cluster's (kept
/// here from then on).
pub async fn manifest(
    cx: &Context,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<Arc<StoredManifest>>, RegistryError> {
    if let Some(m) = cx.store.manifest(repo, digest)? {
        return Ok(Some(m));
    }
    let Some(shared) = cx.proxy.shared_cache() else {
        return Ok(None);
    };
    match shared.cached_manifest(repo, digest).await? {
        Some(m) => keep_here(cx, repo, &m, None).await.map(Some),
        None => Ok(None),
    }
}

/// The cached tag: from the cluster (with its manifest), or from this replica's store.
pub async fn tag(
    cx: &Context,
    repo: &RepoName,
    tag: &Tag,
) -> Result<Option<CachedTag>, RegistryError> {
    let Some(shared) = cx.proxy.shared_cache() else {
        let Some((digest, checked)) = cx.store.cached_tag(repo, tag)? else {
            return Ok(None);
        };
        return Ok(cx
            .store
            .manifest(repo, &digest)?
            .map(|manifest| CachedTag { manifest, checked }));
    };
    let Some(t) = shared.cached_tag(repo, tag).await? else {
        return Ok(None);
    };
    let manifest = match cx.store.manifest(repo, &t.digest)? {
        Some(m) => m,
        None => match t.manifest {
            Some(m) => keep_here(cx, repo, &m, None).await?,
            // Tagged but no longer held (evicted meanwhile): a miss.
            None => return Ok(None),
        },
    };
    Ok(Some(CachedTag {
        manifest,
        checked: t.checked,
    }))
}

/// Stores a manifest fetched from the upstream (verified), pointing `tag` at it if given: in
/// the cluster first (every replica serves it from then on), then in this replica's store.
pub async fn put(
    cx: &Context,
    repo: &RepoName,
    digest: &Digest,
    media_type: &str,
    bytes: Bytes,
    tag: Option<&Tag>,
) -> Result<Arc<StoredManifest>, RegistryError> {
    if let Some(shared) = cx.proxy.shared_cache() {
        shared
            .put_cached_manifest(repo, digest, media_type, &bytes, tag)
            .await?;
    }
    let m = StoredManifest {
        digest: digest.clone(),
        media_type: media_type.to_string(),
        bytes,
    };
    keep_here(cx, repo, &m, tag).await
}

/// Writes the manifest (and tag) to this replica's store.
async fn keep_here(
    cx: &Context,
    repo: &RepoName,
    m: &StoredManifest,
    tag: Option<&Tag>,
) -> Result<Arc<StoredManifest>, RegistryError> {
    let (store, repo, tag) = (cx.store.clone(), repo.clone(), tag.cloned());
    let (digest, media_type, bytes) = (m.digest.clone(), m.media_type.clone(), m.bytes.clone());
    store_work(move || store.put_cached_manifest(&repo, &digest, &media_type, bytes, tag.as_ref()))
        .await
}

/// The upstream confirmed that `tag` still names `digest`.
pub async fn confirm(
    cx: &Context,
    repo: &RepoName,
    tag: &Tag,
    digest: &Digest,
) -> Result<(), RegistryError> {
    if let Some(shared) = cx.proxy.shared_cache() {
        // Tags are read from the cluster only: this replica's copy needs no confirmation.
        return Ok(shared.confirm_cached_tag(repo, tag, digest).await?);
    }
    let (store, repo, tag) = (cx.store.clone(), repo.clone(), tag.clone());
    store_work(move || store.confirm_cached_tag(&repo, &tag)).await
}

/// The upstream no longer has `tag`: forgets it unless pinned (in the cluster, by a pin on
/// any replica). Returns whether it is gone.
pub async fn forget(cx: &Context, repo: &RepoName, tag: &Tag) -> Result<bool, RegistryError> {
    let forgotten = match cx.proxy.shared_cache() {
        Some(shared) => shared.forget_cached_tag(repo, tag).await?,
        None => true,
    };
    if !forgotten {
        return Ok(false);
    }
    let (store, repo, tag) = (cx.store.clone(), repo.clone(), tag.clone());
    let here = store_work(move || store.forget_cached_tag(&repo, &tag)).await?;
    // In the cluster the shared pin decides; this replica's own pins only keep its copy.
    Ok(here || is_shared(cx))
}
