//! Handlers for mirrored repositories (names outside every project): manifests and blobs come
//! from the cache or, on a miss, from the upstream through `proxy`; responses say how they
//! were answered (`X-Cache`) and from which upstream (`OCI-Namespace`). Mirror namespaces are
//! read-only; tags list what the upstream has (under the name the client asked for), referrers
//! what is cached.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, HeaderValue, header};

use super::blobs::blob_headers;
use super::body::ResponseBody;
use super::manifests::{accept_list, manifest_response, parse_reference_to_read};
use super::response::{Resp, set};
use super::{parse_digest, query_one};
use crate::App;
use crate::oci::manifest::ParsedManifest;
use crate::oci::media::{Negotiated, negotiate};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, RepoName};
use crate::proxy::blob::{self, BlobSource};
use crate::proxy::freshness;
use crate::proxy::tag_list;
use crate::proxy::{CacheOutcome, MirrorRoute};
use crate::proxy::{fill, follow};
use crate::storage::Storage;

/// The `OCI-Namespace` header: the upstream that answered.
fn oci_namespace() -> HeaderName {
    HeaderName::from_static("oci-namespace")
}

fn mark(app: &App, r: &mut Resp, route: &MirrorRoute, kind: &str, outcome: CacheOutcome) {
    let upstream = app.proxy.upstream_name(route.upstream);
    r.headers_mut().insert(
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(outcome.as_str()),
    );
    set(r, oci_namespace(), upstream);
    app.metrics
        .cache_requests
        .with_label_values(&[upstream, kind, outcome.as_str()])
        .inc();
    let len = r
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    app.metrics
        .cache_bytes
        .with_label_values(&[upstream, kind, outcome.as_str()])
        .inc_by(len);
}

pub async fn get_manifest(
    app: &Arc<App>,
    route: &MirrorRoute,
    reference: &str,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    let reference = parse_reference_to_read(reference)?;
    let served = freshness::manifest(&app.proxy_context(), route, &reference).await?;
    let accept = accept_list(parts);
    let by_tag = matches!(reference, Reference::Tag(_));
    let served_digest = served.manifest.digest.clone();
    let (m, outcome) = match negotiate(&accept, &served.manifest.media_type, by_tag) {
        Negotiated::Serve => (served.manifest, served.outcome),
        Negotiated::NotAcceptable => {
            return Err(RegistryError::new(
                ErrorCode::ManifestUnknown,
                format!(
                    "manifest {reference} is {}, which the Accept header does not include",
                    served.manifest.media_type
                ),
            ));
        }
        Negotiated::PlatformChild => {
            let parsed = ParsedManifest::parse(&served.manifest.bytes, &served.manifest.media_type)
                .map_err(|e| RegistryError::internal(e.to_string()))?;
            let child = parsed.platform_child("linux", "amd64").ok_or_else(|| {
                RegistryError::new(
                    ErrorCode::ManifestUnknown,
                    format!("{reference} is a manifest list with no linux/amd64 image"),
                )
            })?;
            let child = freshness::manifest(
                &app.proxy_context(),
                route,
                &Reference::Digest(child.digest.clone()),
            )
            .await?;
            (child.manifest, child.outcome)
        }
    };
    // A pull: GETs only (a HEAD checks for updates and pulls nothing).
    if !head {
        app.store.note_pull(&route.local, &served_digest, true);
        if m.digest != served_digest {
            app.store.note_pull(&route.local, &m.digest, false);
        }
    }
    // A conditional GET is answered like one for a private repository: 304 with validators.
    let mut r = if super::etag_matches(parts, &m.digest.to_string()) {
        super::response::not_modified(&m.digest.to_string())
    } else {
        if !head {
            crate::events::pulled_registry(app, &route.local, &m, &reference);
        }
        manifest_response(&m, head)
    };
    mark(app, &mut r, route, "manifest", outcome);
    Ok(r)
}

/// The upstream's tags of the repository, paged with `n`/`last`, under the name the client
/// used (`asked`), not the canonical local one.
pub async fn list_tags(
    app: &Arc<App>,
    route: &MirrorRoute,
    asked: &RepoName,
    parts: &Parts,
) -> Result<Resp, RegistryError> {
    let (n, last) = super::tags::paging(parts)?;
    let list = tag_list::tags(&app.proxy_context(), route).await?;
    let page = tag_list::page(&list.tags, last.as_deref(), n);
    let ns = query_one(parts, "ns");
    let mut r = super::tags::tags_response(asked, &page, n, ns.as_deref());
    mark(app, &mut r, route, "tags", list.outcome);
    Ok(r)
}

pub async fn get_blob(
    app: &Arc<App>,
    route: &MirrorRoute,
    digest: &str,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    let digest = parse_digest(digest)?;
    let cx = app.proxy_context();
    let mut source = blob::locate(&cx, route, &digest, head).await?;
    // Recorded once the blob is known to be served (not for any digest a client makes up).
    if !head {
        app.store.note_pull(&route.local, &digest, false);
    }
    if let BlobSource::Stored = source {
        match serve_local(app, route, &digest, parts, head).await {
            // Evicted between the lookup and the open: a miss like any other.
            Err(e) if e.code == ErrorCode::BlobUnknown => {
                source = blob::locate(&cx, route, &digest, head).await?;
            }
            answer => return answer,
        }
    }
    let (fill, outcome) = match source {
        BlobSource::Stored => return serve_local(app, route, &digest, parts, head).await,
        BlobSource::Upstream { size } => {
            let mut r = http::Response::new(ResponseBody::Empty);
            blob_headers(&mut r, &digest, 0, size, size);
            mark(app, &mut r, route, "blob", CacheOutcome::Miss);
            return Ok(r);
        }
        BlobSource::Fill { fill, outcome } => (fill, outcome),
    };
    let mut rx = fill.subscribe();
    let size = fill::wait_for_size(&mut rx)
        .await
        .map_err(|e| blob::fill_error(e, &digest, &cx, route))?;
    let (status, start, end) = match super::blobs::plan_range(parts, size, head) {
        Ok(plan) => plan,
        Err(unsatisfiable) => return Ok(*unsatisfiable),
    };
    let body = if head {
        ResponseBody::Empty
    } else {
        ResponseBody::Stream {
            stream: Box::pin(follow::follow(cx, fill.clone(), rx, start, end)),
            remaining: end - start,
            sent: app.metrics.bytes_sent.clone(),
        }
    };
    let mut r = http::Response::new(body);
    *r.status_mut() = status;
    blob_headers(&mut r, &digest, start, end, size);
    mark(app, &mut r, route, "blob", outcome);
    Ok(r)
}

/// A cached blob, served like any stored blob (Range, ETag, mapped windows).
async fn serve_local(
    app: &Arc<App>,
    route: &MirrorRoute,
    digest: &Digest,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    // The pull-through cache keeps its blobs in the replica's own store in either profile
    // (`blob::locate` found it there), not in the cluster's shared storage.
    let local;
    let storage = match &app.storage {
        Storage::Local(_) => &app.storage,
        Storage::Cluster(_) => {
            local = Storage::Local(app.store.clone());
            &local
        }
    };
    let digest = digest.to_string();
    let mut r = super::blobs::get_in(app, storage, &route.local, &digest, parts, head).await?;
    mark(app, &mut r, route, "blob", CacheOutcome::Hit);
    Ok(r)
}
