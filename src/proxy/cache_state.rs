//! Where the cache's manifests and tags are read and written. In the local profile that is the
//! replica's `Store`. In the cluster profile the shared database is the truth — a tag one
//! replica confirmed or moved is fresh, or moved, on every replica, and a manifest one replica
//! fetched is served by all without asking the upstream again — and the replica's `Store`
//! keeps its own copy of what it served (its blobs fill there, and its local budget evicts
//! them together). If the database cannot be reached, the replica carries on with its own
//! copy as the local profile does (logged), as its fills do: the cache keeps serving.

use std::sync::Arc;

use bytes::Bytes;

use super::Context;
use super::blocking::store_work;
use crate::oci::{Digest, RegistryError, RepoName, Tag};
use crate::store::{StoreError, StoredManifest};

/// A cached tag: its manifest and when the upstream last confirmed it (unix seconds).
pub struct CachedTag {
    pub manifest: Arc<StoredManifest>,
    pub checked: u64,
}

/// What a lookup read of a tag.
pub struct TagRead {
    /// The tag with its manifest, if the cache can serve it.
    pub cached: Option<CachedTag>,
    /// The digest the tag named (even without its manifest): a move back from a newer answer
    /// is refused against it (`TagUpdate::seen`).
    pub named: Option<Digest>,
}

/// A tag to point at a stored manifest, and what it named when the lookup read it.
#[derive(Clone, Copy)]
pub struct TagUpdate<'a> {
    pub tag: &'a Tag,
    pub seen: Option<&'a Digest>,
}

/// The cluster's answer, or `None` (logged) if the database failed: the caller then uses this
/// replica's copy.
fn or_local<T>(result: Result<T, StoreError>, what: &str) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "{what}: the cluster's cache state is unavailable; using this replica's copy");
            None
        }
    }
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
    match or_local(
        shared.cached_manifest(repo, digest).await,
        "reading a cached manifest",
    ) {
        Some(Some(m)) => keep_here(cx, repo, &m, None).await.map(Some),
        _ => Ok(None),
    }
}

/// The cached tag: from the cluster (with its manifest), or from this replica's store.
pub async fn tag(cx: &Context, repo: &RepoName, tag: &Tag) -> Result<TagRead, RegistryError> {
    let shared = match cx.proxy.shared_cache() {
        Some(shared) => or_local(shared.cached_tag(repo, tag).await, "reading a cached tag"),
        None => None,
    };
    let Some(shared) = shared else {
        return local_tag(cx, repo, tag);
    };
    let Some(t) = shared else {
        return Ok(TagRead {
            cached: None,
            named: None,
        });
    };
    let manifest = match cx.store.manifest(repo, &t.digest)? {
        Some(m) => Some(m),
        None => match &t.manifest {
            Some(m) => Some(keep_here(cx, repo, m, None).await?),
            // Tagged but no longer held (evicted meanwhile): a miss.
            None => None,
        },
    };
    Ok(TagRead {
        cached: manifest.map(|manifest| CachedTag {
            manifest,
            checked: t.checked,
        }),
        named: Some(t.digest),
    })
}

fn local_tag(cx: &Context, repo: &RepoName, tag: &Tag) -> Result<TagRead, RegistryError> {
    let Some((digest, checked)) = cx.store.cached_tag(repo, tag)? else {
        return Ok(TagRead {
            cached: None,
            named: None,
        });
    };
    Ok(TagRead {
        cached: cx
            .store
            .manifest(repo, &digest)?
            .map(|manifest| CachedTag { manifest, checked }),
        named: Some(digest),
    })
}

/// Stores a manifest fetched from the upstream (verified), pointing `tag` at it if given: in
/// the cluster first (every replica serves it from then on), then in this replica's store.
pub async fn put(
    cx: &Context,
    repo: &RepoName,
    digest: &Digest,
    media_type: &str,
    bytes: Bytes,
    tag: Option<TagUpdate<'_>>,
) -> Result<Arc<StoredManifest>, RegistryError> {
    if let Some(shared) = cx.proxy.shared_cache() {
        let put = shared
            .put_cached_manifest(
                repo,
                digest,
                media_type,
                &bytes,
                tag.map(|t| t.tag),
                tag.and_then(|t| t.seen),
            )
            .await;
        or_local(put, "caching a manifest");
    }
    let m = StoredManifest {
        digest: digest.clone(),
        media_type: media_type.to_string(),
        bytes,
    };
    keep_here(cx, repo, &m, tag.map(|t| t.tag)).await
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

/// The upstream confirmed that `tag` still names `digest`: in the cluster, and in this
/// replica's copy (what it serves while the database is unreachable).
pub async fn confirm(
    cx: &Context,
    repo: &RepoName,
    tag: &Tag,
    digest: &Digest,
) -> Result<(), RegistryError> {
    if let Some(shared) = cx.proxy.shared_cache() {
        or_local(
            shared.confirm_cached_tag(repo, tag, digest).await,
            "confirming a cached tag",
        );
    }
    let (store, repo, tag) = (cx.store.clone(), repo.clone(), tag.clone());
    store_work(move || store.confirm_cached_tag(&repo, &tag)).await
}

/// The upstream no longer has `tag`: forgets it unless pinned (in the cluster, by a pin on
/// any replica). Returns whether it is gone.
pub async fn forget(cx: &Context, repo: &RepoName, tag: &Tag) -> Result<bool, RegistryError> {
    let shared = match cx.proxy.shared_cache() {
        Some(shared) => or_local(
            shared.forget_cached_tag(repo, tag).await,
            "forgetting a cached tag",
        ),
        None => None,
    };
    if shared == Some(false) {
        return Ok(false);
    }
    let (store, repo, tag) = (cx.store.clone(), repo.clone(), tag.clone());
    let here = store_work(move || store.forget_cached_tag(&repo, &tag)).await?;
    // The cluster's pins decide when it answered; this replica's own pins keep only its copy.
    Ok(shared.unwrap_or(here))
}
