//! The cache requests in the cluster profile: the listing, eviction on demand, pins and tag
//! history act on the shared database and bucket (`cluster::cache_list`, `cache_evict`,
//! `cache_pins`), so they hold for every replica. Answers have the local profile's shapes.

use super::{
    CacheAnswer, CacheError, CacheRequest, ImageRef, check_platforms, history, image_ref, listing,
    need_tag, need_target, not_evictable, not_pinnable, pinned, unpinned,
};
use crate::App;
use crate::cluster::cache_evict::{ClusterEvictReport, Selection, evict_now_recording};
use crate::cluster::cache_list::ClusterImage;
use crate::cluster::cache_pins::{CachePinError, ClusterPin, PinOf};
use crate::oci::Digest;
use crate::storage::cluster::ClusterStore;
use crate::store::evict::EvictReport;
use crate::store::inventory::{CacheUsage, CachedImage};
use crate::store::pins::{PinInfo, PinRecord, PinTarget};
use crate::store::{StoreError, unix_now};

fn shared(e: impl std::fmt::Display) -> CacheError {
    CacheError::Store(StoreError::Shared(e.to_string()))
}

fn pin_of(target: PinTarget) -> PinOf {
    match target {
        PinTarget::Digest(d) => PinOf::Digest(d),
        PinTarget::Tag(t) => PinOf::Tag(t),
    }
}

/// The local report's shape (`usage.cached_bytes`: the shared cached bytes after the pass).
fn report(r: ClusterEvictReport) -> EvictReport {
    EvictReport {
        usage: CacheUsage {
            cached_bytes: r.cached_bytes_after,
            ..CacheUsage::default()
        },
        images_evicted: r.images_evicted,
        manifests_removed: r.manifests_removed,
        blobs_removed: r.blobs_removed,
        bytes_freed: r.bytes_freed,
        took_census: true,
        ..EvictReport::default()
    }
}

fn cached_image(i: ClusterImage) -> CachedImage {
    CachedImage {
        upstream: String::new(),
        repository: i.repository,
        digest: i.digest,
        media_type: i.media_type,
        tags: i.tags,
        children: i.children,
        own_bytes: i.own_bytes,
        shared_bytes: i.shared_bytes,
        last_pulled: i.last_pulled,
        pulls: i.pulls,
        pinned: i.pinned.to_string(),
    }
}

fn pin_info(p: ClusterPin) -> PinInfo {
    PinInfo {
        repository: p.repository,
        digest: p.digest,
        tag: p.tag,
        record: PinRecord {
            pinned_at: p.pinned_at,
            platforms: p.platforms,
            via_tag: p.via_tag,
        },
    }
}

/// The digest an image reference names (a tag resolved through the database).
async fn resolve(c: &ClusterStore, r: &ImageRef, image: &str) -> Result<Digest, CacheError> {
    match need_target(r, image)? {
        PinTarget::Digest(d) => Ok(d),
        PinTarget::Tag(t) => c
            .db()
            .tag(&r.repo, &t)
            .await
            .map_err(shared)?
            .ok_or_else(|| CacheError::NotFound(format!("{image} is not cached"))),
    }
}

/// Answers one request against the shared state.
pub(super) async fn apply(
    app: &App,
    c: &ClusterStore,
    req: CacheRequest,
) -> Result<CacheAnswer, CacheError> {
    let (db, objects) = (c.db(), c.objects());
    match req {
        CacheRequest::Evict {
            image: Some(image),
            older_than_secs: None,
        } => {
            let r = image_ref(app, &image)?;
            let digest = resolve(c, &r, &image).await?;
            let done = evict_now_recording(
                db,
                objects,
                Selection::Image(&r.repo, &digest),
                &|repo, root, tag| c.evict_events(repo, root, tag),
            )
            .await
            .map_err(shared)?;
            if done.images_evicted == 0 {
                return Err(not_evictable(&image));
            }
            Ok(CacheAnswer::Evicted {
                report: report(done),
            })
        }
        CacheRequest::Evict {
            image: None,
            older_than_secs: Some(age),
        } => {
            let cutoff = unix_now().saturating_sub(age);
            let done = evict_now_recording(
                db,
                objects,
                Selection::PulledBefore(cutoff),
                &|repo, root, tag| c.evict_events(repo, root, tag),
            )
            .await
            .map_err(shared)?;
            Ok(CacheAnswer::Evicted {
                report: report(done),
            })
        }
        CacheRequest::Evict { .. } => Err(CacheError::Invalid(
            "give either an image or an age (--older-than), not both or neither".into(),
        )),
        CacheRequest::Pin { image, platforms } => {
            let r = image_ref(app, &image)?;
            check_platforms(&platforms)?;
            let what = pin_of(need_target(&r, &image)?);
            let digest = db
                .pin(&r.repo, &what, &platforms)
                .await
                .map_err(|e| match e {
                    CachePinError::NotCached(_) => not_pinnable(&image),
                    e => shared(e),
                })?;
            Ok(pinned(&r, &digest))
        }
        CacheRequest::Unpin { image } => {
            let r = image_ref(app, &image)?;
            let what = pin_of(need_target(&r, &image)?);
            let removed = db.unpin(&r.repo, &what).await.map_err(shared)?;
            unpinned(&image, usize::try_from(removed).unwrap_or(usize::MAX))
        }
        CacheRequest::Pins => Ok(CacheAnswer::Pins {
            pins: db
                .pins()
                .await
                .map_err(shared)?
                .into_iter()
                .map(pin_info)
                .collect(),
        }),
        CacheRequest::List { upstream, sort } => {
            let found = db.cached_images().await.map_err(shared)?;
            let totals = db.cache_usage().await.map_err(shared)?;
            let usage = CacheUsage {
                cached_bytes: totals.cached_bytes,
                images: totals.images,
                // Bytes evicting the wholly pinned images would free; pushed bytes are not
                // counted in the cluster.
                pinned_bytes: found
                    .iter()
                    .filter(|i| i.pinned == "yes")
                    .map(|i| i.own_bytes)
                    .sum(),
                pushed_bytes: 0,
            };
            let images = found.into_iter().map(cached_image).collect();
            Ok(listing(app, images, usage, upstream, sort))
        }
        CacheRequest::History { image } => {
            let r = image_ref(app, &image)?;
            let tag = need_tag(&r, &image)?;
            let resolutions = db.cache_tag_history(&r.repo, &tag).await.map_err(shared)?;
            Ok(history(&r, &tag, resolutions))
        }
    }
}
