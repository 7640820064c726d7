//! A manifest the cache cannot answer alone (not cached, or a tag past `tag_ttl`): one upstream
//! lookup per repository and reference at a time (`ManifestMisses`, a single-flight map), so
//! concurrent pulls of a cold image cost one HEAD/GET upstream (on Docker Hub a manifest GET
//! is a pull), not one per client. The lookup:
//! - by digest: fetched and cached; an upstream 404 is remembered for `not_found_ttl`;
//! - by tag: revalidated with a HEAD and fetched by digest only when it moved; a tag the
//!   upstream no longer has is forgotten (no stale copy of a deleted tag) and its 404
//!   remembered;
//! - upstream 429, 5xx, timeouts and connection errors: the cached tag while it is within
//!   `stale_if_error`, else a clean 503.
//!
//! A lookup runs as its own task: it finishes (bounded by the upstream timeouts) and leaves the
//! map even when every client that asked has gone, and a panic inside it is a 503 for those
//! waiting, never a poisoned entry.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::Context;
use super::ask::Miss;
use super::cache_state::{self, CachedTag, TagUpdate};
use super::freshness::{Served, tag_is_fresh, within_stale_if_error};
use super::manifest_fetch::{fetch_manifest, head_tag};
use super::{CacheOutcome, MirrorRoute};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, Tag};

type SharedLookup = Shared<BoxFuture<'static, Result<Served, RegistryError>>>;

/// The manifest lookups running upstream, by `local repository \0 reference`, each with the
/// id of the task that runs it.
#[derive(Default)]
pub struct ManifestMisses {
    inflight: Mutex<HashMap<String, (u64, SharedLookup)>>,
    next_id: AtomicU64,
}

/// Removes a lookup's entry when its task ends, however it ends; only its own entry, never
/// one a later lookup put under the same key.
struct Leave {
    cx: Context,
    key: String,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let mut inflight = self
            .cx
            .proxy
            .manifest_misses
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if inflight
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            inflight.remove(&self.key);
        }
    }
}

impl ManifestMisses {
    /// How many lookups are running.
    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Resolves a miss, joining the lookup already running for the same repository and
    /// reference (its `Miss` outcome is reported as `Coalesced` to those who joined).
    pub async fn resolve(
        &self,
        cx: &Context,
        route: &MirrorRoute,
        reference: &Reference,
    ) -> Result<Served, RegistryError> {
        let (lookup, joined) = self.join_or_start(cx, route, reference, false);
        let served = lookup.await?;
        Ok(if joined && served.outcome == CacheOutcome::Miss {
            Served {
                outcome: CacheOutcome::Coalesced,
                ..served
            }
        } else {
            served
        })
    }

    /// Asks the upstream about `tag` now, however recently it was confirmed (a warm list's
    /// check): a HEAD, and a GET only if the tag moved. Joins a lookup already running.
    pub async fn revalidate(
        &self,
        cx: &Context,
        route: &MirrorRoute,
        tag: &Tag,
    ) -> Result<Served, RegistryError> {
        let (lookup, _) = self.join_or_start(cx, route, &Reference::Tag(tag.clone()), true);
        lookup.await
    }

    /// The running lookup for this key (`true`), or a new one (`false`) that removes itself
    /// from the map when it ends. `revalidate` skips the `tag_ttl` shortcut.
    fn join_or_start(
        &self,
        cx: &Context,
        route: &MirrorRoute,
        reference: &Reference,
        revalidate: bool,
    ) -> (SharedLookup, bool) {
        let key = format!("{}\0{reference}", route.local);
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, running)) = inflight.get(&key) {
            return (running.clone(), true);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let leave = Leave {
            cx: cx.clone(),
            key: key.clone(),
            id,
        };
        let (cx2, route2, ref2) = (cx.clone(), route.clone(), reference.clone());
        // The task's `Leave` waits for this lock, so it cannot remove the entry before it is in.
        let task = tokio::spawn(async move {
            let _leave = leave;
            look_up(&cx2, &route2, &ref2, revalidate).await
        });
        let lookup = async move {
            task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "manifest lookup task failed");
                Err(RegistryError::new(
                    ErrorCode::Unavailable,
                    "the manifest lookup failed; try again",
                ))
            })
        }
        .boxed()
        .shared();
        inflight.insert(key, (id, lookup.clone()));
        (lookup, false)
    }
}

fn unavailable(cx: &Context, route: &MirrorRoute, why: &str) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unavailable,
        format!(
            "upstream {} is unavailable and nothing usable is cached: {why}",
            cx.proxy.upstream_name(route.upstream)
        ),
    )
}

fn not_found(route: &MirrorRoute, reference: &dyn Display, repository: bool) -> RegistryError {
    if repository {
        RegistryError::name_unknown(&format!(
            "{} (upstream does not know the repository)",
            route.remote
        ))
    } else {
        RegistryError::manifest_unknown(&format!(
            "{}:{reference} (not found upstream)",
            route.remote
        ))
    }
}

/// The full lookup: cache, then upstream (run once per repository and reference at a time).
async fn look_up(
    cx: &Context,
    route: &MirrorRoute,
    reference: &Reference,
    revalidate: bool,
) -> Result<Served, RegistryError> {
    match reference {
        Reference::Digest(digest) => digest_miss(cx, route, digest).await,
        Reference::Tag(tag) => tag_miss(cx, route, tag, revalidate).await,
    }
}

/// A manifest by digest: immutable, so cached means served; else fetched once.
async fn digest_miss(
    cx: &Context,
    route: &MirrorRoute,
    digest: &Digest,
) -> Result<Served, RegistryError> {
    if let Some(m) = cache_state::manifest(cx, &route.local, digest).await? {
        return Ok(Served::hit(m));
    }
    let reference = digest.to_string();
    if cx.proxy.config(route.upstream).offline || cx.proxy.recently_not_found(route, &reference) {
        return Err(not_found(route, digest, false));
    }
    match fetch_manifest(cx, route, &reference, Some(digest), None).await {
        Ok(m) => Ok(Served::miss(m)),
        Err(Miss::NotFound { repository }) => {
            cx.proxy.remember_not_found(route, &reference);
            Err(not_found(route, digest, repository))
        }
        Err(Miss::Unavailable(why)) => Err(unavailable(cx, route, &why)),
        Err(Miss::Invalid(why)) => Err(RegistryError::new(ErrorCode::Unavailable, why)),
    }
}

/// A manifest by tag: still fresh here (unless `revalidate`), or revalidated with the upstream.
async fn tag_miss(
    cx: &Context,
    route: &MirrorRoute,
    tag: &Tag,
    revalidate: bool,
) -> Result<Served, RegistryError> {
    let config = cx.proxy.config(route.upstream);
    let read = cache_state::tag(cx, &route.local, tag).await?;
    let (cached, seen) = (read.cached, read.named);
    match &cached {
        Some(c) if (!revalidate || config.offline) && tag_is_fresh(config, c.checked) => {
            return Ok(Served::hit(c.manifest.clone()));
        }
        None if config.offline || cx.proxy.recently_not_found(route, tag.as_str()) => {
            return Err(not_found(route, tag, false));
        }
        _ => {}
    }
    let cached = cached.as_ref();
    let update = TagUpdate {
        tag,
        seen: seen.as_ref(),
    };
    match head_tag(cx, route, tag).await {
        Ok(Some(digest)) => tag_points_at(cx, route, update, cached, digest).await,
        // No digest in the HEAD answer: GET by tag.
        Ok(None) => match fetch_manifest(cx, route, tag.as_str(), None, Some(update)).await {
            Ok(m) => Ok(Served::miss(m)),
            Err(miss) => tag_lookup_failed(cx, route, tag, cached, miss).await,
        },
        Err(miss) => tag_lookup_failed(cx, route, tag, cached, miss).await,
    }
}

/// The upstream says `tag` points at `digest`: confirm the cached tag, re-point it at a
/// manifest cached already, or fetch the manifest by digest.
async fn tag_points_at(
    cx: &Context,
    route: &MirrorRoute,
    update: TagUpdate<'_>,
    cached: Option<&CachedTag>,
    digest: Digest,
) -> Result<Served, RegistryError> {
    let tag = update.tag;
    if let Some(c) = cached
        && c.manifest.digest == digest
    {
        cache_state::confirm(cx, &route.local, tag, &digest).await?;
        return Ok(Served::hit(c.manifest.clone()));
    }
    if let Some(m) = cache_state::manifest(cx, &route.local, &digest).await? {
        let m = cache_state::put(
            cx,
            &route.local,
            &m.digest,
            &m.media_type,
            m.bytes.clone(),
            Some(update),
        )
        .await?;
        return Ok(Served::hit(m));
    }
    match fetch_manifest(cx, route, &digest.to_string(), Some(&digest), Some(update)).await {
        Ok(m) => Ok(Served::miss(m)),
        // The tag exists upstream but its manifest does not: 404 for now, the tag is kept.
        Err(Miss::NotFound { repository }) => Err(not_found(route, tag, repository)),
        Err(Miss::Unavailable(why) | Miss::Invalid(why)) => {
            stale_or_unavailable(cx, route, tag, cached, &why)
        }
    }
}

/// Asking the upstream about a tag failed: a tag it no longer has is forgotten, otherwise the
/// cached copy may still serve.
async fn tag_lookup_failed(
    cx: &Context,
    route: &MirrorRoute,
    tag: &Tag,
    cached: Option<&CachedTag>,
    miss: Miss,
) -> Result<Served, RegistryError> {
    match miss {
        Miss::NotFound { repository } => tag_gone(cx, route, tag, cached, repository).await,
        Miss::Unavailable(why) | Miss::Invalid(why) => {
            stale_or_unavailable(cx, route, tag, cached, &why)
        }
    }
}

/// The cached copy of a tag while it is within `stale_if_error`, else a clean 503.
fn stale_or_unavailable(
    cx: &Context,
    route: &MirrorRoute,
    tag: &Tag,
    cached: Option<&CachedTag>,
    why: &str,
) -> Result<Served, RegistryError> {
    match cached {
        Some(c) if within_stale_if_error(cx.proxy.config(route.upstream), c.checked) => {
            tracing::warn!(repo = %route.local, %tag, %why, "serving a stale tag");
            Ok(Served::stale(c.manifest.clone()))
        }
        _ => Err(unavailable(cx, route, why)),
    }
}

/// Upstream says the tag does not exist (any more), or refuses to say: forget it and remember
/// the 404 briefly — unless the tag is pinned, which keeps serving what it resolved to.
async fn tag_gone(
    cx: &Context,
    route: &MirrorRoute,
    tag: &Tag,
    cached: Option<&CachedTag>,
    repository: bool,
) -> Result<Served, RegistryError> {
    let forgotten = cache_state::forget(cx, &route.local, tag).await?;
    if !forgotten && let Some(c) = cached {
        tracing::warn!(repo = %route.local, %tag, "the upstream no longer serves a pinned tag; serving the pinned image");
        return Ok(Served::stale(c.manifest.clone()));
    }
    cx.proxy.remember_not_found(route, tag.as_str());
    Err(not_found(route, tag, repository))
}
