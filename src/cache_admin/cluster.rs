//! The cache requests in the cluster profile: eviction on demand and pins act on the shared
//! database and bucket (`cluster::cache_evict`, `cluster::cache_pins`), so they hold for every
//! replica. Answers have the local profile's shapes.

use super::{
    CacheAnswer, CacheError, CacheRequest, ImageRef, check_platforms, image_ref, need_target,
    not_evictable, not_pinnable, pinned, unpinned,
};
use crate::App;
use crate::cluster::cache_evict::{ClusterEvictReport, Selection, evict_now};
use crate::cluster::cache_pins::{CachePinError, ClusterPin, PinOf};
use crate::oci::Digest;
use crate::storage::cluster::ClusterStore;
use crate::store::evict::EvictReport;
use crate::store::inventory::CacheUsage;
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
            let done = evict_now(db, objects, Selection::Image(&r.repo, &digest))
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
            let done = evict_now(db, objects, Selection::PulledBefore(cutoff))
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
        CacheRequest::List { .. } | CacheRequest::History { .. } => Err(CacheError::Invalid(
            "`cache ls` and `cache history` show this replica's local cache only in the cluster profile: not available yet".into(),
        )),
    }
}
