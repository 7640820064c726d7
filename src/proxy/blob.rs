//! Where the bytes of a blob asked for in a mirrored repository come from. A repository only
//! sees blobs its own upstream has: a blob stored for this repository is served as it is; one
//! stored for another repository is linked here once this route's upstream confirms it with a
//! HEAD; a fill in flight is followed only by routes entitled to it (the route that started
//! it, or one its upstream confirmed); anything else starts a fill. A HEAD of a blob that is
//! not stored asks the upstream with HEAD and downloads nothing. The HTTP side serves what
//! this decides and never builds an upstream request itself.

use std::sync::Arc;

use http::{Method, StatusCode};

use super::blocking::store_work;
use super::fill::{self, Fill, FillError, Joined};
use super::{CacheOutcome, Context, MirrorRoute};
use crate::oci::{Digest, ErrorCode, RegistryError};

/// Where to get a blob's bytes from.
pub enum BlobSource {
    /// Stored and linked to the route's repository: serve it from the store.
    Stored,
    /// Not stored here; the upstream (or, in the cluster, the bucket) has it, this long (the
    /// answer to a HEAD: nothing downloaded).
    Upstream { size: u64 },
    /// Follow this fill (started by this request, or joined).
    Fill {
        fill: Arc<Fill>,
        outcome: CacheOutcome,
    },
}

/// Decides where the bytes of `digest` in `route` come from (for a HEAD when `head`).
/// `Retry-After` of a fill refused for lack of disk space: about one eviction check.
const SPACE_RETRY_AFTER_SECS: u64 = 30;

pub async fn locate(
    cx: &Context,
    route: &MirrorRoute,
    digest: &Digest,
    head: bool,
) -> Result<BlobSource, RegistryError> {
    if cx.store.blob_size(&route.local, digest)?.is_some() {
        return Ok(BlobSource::Stored);
    }
    // In the cluster, a blob another replica filled for this repository is the cache's: a
    // HEAD is answered from the shared record and a GET reads the bucket (see cluster_fill),
    // without the upstream — which an offline upstream may then be. A database that cannot
    // answer: as if the cluster had nothing. A GET that may ask the upstream leaves the look
    // to the fill, which makes it anyway.
    let offline = cx.proxy.config(route.upstream).offline;
    let in_cluster = match cx.proxy.shared_cache() {
        Some(shared) if head || offline => shared
            .cached_blob_size(&route.local, digest)
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    if head && let Some(size) = in_cluster {
        return Ok(BlobSource::Upstream { size });
    }
    if offline && in_cluster.is_none() {
        return Err(RegistryError::blob_unknown(digest));
    }
    let in_flight = cx.proxy.fills.in_flight_for(digest);
    if in_flight.is_none() && cx.store.has_blob_anywhere(digest)? {
        upstream_size(cx, route, digest).await?;
        let (store, repo, d) = (cx.store.clone(), route.local.clone(), digest.clone());
        if store_work(move || store.link_stored_blob(&repo, &d))
            .await?
            .is_some()
        {
            return Ok(BlobSource::Stored);
        }
    }
    if head {
        // A HEAD follows a fill it is entitled to (for its length), and never starts one.
        if let Some(fill) = in_flight.filter(|f| f.entitles(route)) {
            return Ok(BlobSource::Fill {
                fill,
                outcome: CacheOutcome::Coalesced,
            });
        }
        let size = upstream_size(cx, route, digest).await?.ok_or_else(|| {
            RegistryError::new(
                ErrorCode::Unavailable,
                "upstream answered HEAD without Content-Length",
            )
        })?;
        return Ok(BlobSource::Upstream { size });
    }
    if in_flight.is_none() {
        cx.store.note_space_needed();
    }
    if in_flight.is_none() && cx.store.space_low() {
        cx.metrics.space_refusals.with_label_values(&["fill"]).inc();
        return Err(RegistryError::new(
            ErrorCode::Unavailable,
            format!(
                "the cache is short of disk space and cannot fetch {digest} now; cached content is still served"
            ),
        )
        .with_header("retry-after", SPACE_RETRY_AFTER_SECS.to_string()));
    }
    let mut confirmed = false;
    loop {
        match cx.proxy.fills.join_or_start(cx, route, digest, confirmed) {
            Joined::Started(fill) => {
                return Ok(BlobSource::Fill {
                    fill,
                    outcome: CacheOutcome::Miss,
                });
            }
            Joined::Joined(fill) => {
                return Ok(BlobSource::Fill {
                    fill,
                    outcome: CacheOutcome::Coalesced,
                });
            }
            Joined::Unconfirmed => {
                upstream_size(cx, route, digest).await?;
                confirmed = true;
            }
        }
    }
}

/// Asks the route's upstream whether it has the blob (HEAD): its length if it said, or the
/// registry error the client should see.
pub(super) async fn upstream_size(
    cx: &Context,
    route: &MirrorRoute,
    digest: &Digest,
) -> Result<Option<u64>, RegistryError> {
    upstream_head(cx, route, digest).await.map_err(|e| match e {
        FillError::Upstream(why) => RegistryError::new(ErrorCode::Unavailable, why),
        e => fill_error(e, digest, cx, route),
    })
}

/// `upstream_size` as a fill sees it: the length, or why the upstream did not confirm.
pub(super) async fn upstream_head(
    cx: &Context,
    route: &MirrorRoute,
    digest: &Digest,
) -> Result<Option<u64>, FillError> {
    let resp = cx
        .proxy
        .ask(
            &cx.metrics,
            route,
            Method::HEAD,
            &format!("/blobs/{digest}"),
            &[],
        )
        .await
        .map_err(|e| FillError::Upstream(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(FillError::Status(resp.status()));
    }
    Ok(fill::content_length(resp.headers()))
}

/// What a client sees when the upstream cannot give the blob: 404 when it does not have it
/// (or will not show it), else 503 naming the upstream.
pub fn fill_error(
    e: FillError,
    digest: &Digest,
    cx: &Context,
    route: &MirrorRoute,
) -> RegistryError {
    match e {
        FillError::Status(
            StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN,
        ) => RegistryError::blob_unknown(digest),
        e => RegistryError::new(
            ErrorCode::Unavailable,
            format!(
                "cannot fetch {digest} from upstream {}: {e}",
                cx.proxy.upstream_name(route.upstream)
            ),
        ),
    }
}
