//! Manifests of mirrored repositories, the cache side: by-digest manifests are immutable cache
//! entries; a tag is served locally while the upstream confirmed it less than `tag_ttl` ago
//! (always, when the upstream is `offline`), and a revalidation that fails may still serve it
//! while it is within `stale_if_error`. This module owns those age rules and the hot path that
//! needs neither the upstream nor coalescing; everything else is a miss (`manifest_miss`).

use std::sync::Arc;

use super::Context;
use super::{CacheOutcome, MirrorRoute};
use crate::config::UpstreamConfig;
use crate::oci::{Reference, RegistryError};
use crate::store::{StoredManifest, unix_now};

/// A manifest and how it was found.
#[derive(Clone)]
pub struct Served {
    pub manifest: Arc<StoredManifest>,
    pub outcome: CacheOutcome,
}

impl Served {
    pub fn hit(manifest: Arc<StoredManifest>) -> Self {
        Self {
            manifest,
            outcome: CacheOutcome::Hit,
        }
    }

    pub fn miss(manifest: Arc<StoredManifest>) -> Self {
        Self {
            manifest,
            outcome: CacheOutcome::Miss,
        }
    }

    pub fn stale(manifest: Arc<StoredManifest>) -> Self {
        Self {
            manifest,
            outcome: CacheOutcome::Stale,
        }
    }
}

/// Seconds since the upstream last confirmed a tag (`checked`, Unix seconds).
fn age(checked: u64) -> u64 {
    unix_now().saturating_sub(checked)
}

/// A tag confirmed at `checked` may be served without asking the upstream.
pub fn tag_is_fresh(config: &UpstreamConfig, checked: u64) -> bool {
    config.offline || age(checked) < config.tag_ttl.0.as_secs()
}

/// A tag confirmed at `checked` may still be served when the upstream cannot be asked.
pub fn within_stale_if_error(config: &UpstreamConfig, checked: u64) -> bool {
    age(checked) <= config.stale_if_error.0.as_secs()
}

/// The manifest for `reference` in the mirrored repository, from cache or upstream.
pub async fn manifest(
    cx: &Context,
    route: &MirrorRoute,
    reference: &Reference,
) -> Result<Served, RegistryError> {
    // The hot path: cached and fresh, no upstream, no coalescing bookkeeping.
    if let Some(served) = cached_and_fresh(cx, route, reference)? {
        return Ok(served);
    }
    cx.proxy.manifest_misses.resolve(cx, route, reference).await
}

/// The cached manifest if it can be served without asking the upstream.
fn cached_and_fresh(
    cx: &Context,
    route: &MirrorRoute,
    reference: &Reference,
) -> Result<Option<Served>, RegistryError> {
    match reference {
        Reference::Digest(d) => Ok(cx.store.manifest(&route.local, d)?.map(Served::hit)),
        // Tags are the cluster's: served here only as this replica last read one (within the
        // second it is kept) with its manifest already copied here; otherwise the lookup
        // reads the database.
        Reference::Tag(tag) => {
            let read = match cx.proxy.shared_cache() {
                Some(shared) => shared
                    .recently_read_tag(&route.local, tag)
                    .map(|t| (t.digest, t.checked)),
                None => cx.store.cached_tag(&route.local, tag)?,
            };
            let Some((digest, checked)) = read else {
                return Ok(None);
            };
            if !tag_is_fresh(cx.proxy.config(route.upstream), checked) {
                return Ok(None);
            }
            Ok(cx.store.manifest(&route.local, &digest)?.map(Served::hit))
        }
    }
}
