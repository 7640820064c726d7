//! Manifests from the upstream: HEAD a tag for its digest (free against Docker Hub's pull
//! limit), GET a manifest (all four manifest types accepted), verify it against the digest it
//! was asked by and the one the upstream announced, and store it byte-exact with its media
//! type. An HTML error page or anything else that is not a manifest is never stored.

use std::sync::Arc;

use http::{Method, header};

use super::Context;
use super::MirrorRoute;
use super::ask::{Miss, ask, read_body};
use super::cache_state::TagUpdate;
use crate::oci::manifest::ParsedManifest;
use crate::oci::media::{self, ALL_MANIFEST_TYPES};
use crate::oci::{Digest, Tag};
use crate::store::StoredManifest;

/// Largest manifest accepted from an upstream (containerd's limit, a little over 4 MiB).
pub const MAX_UPSTREAM_MANIFEST: usize = 4 * 1048 * 1048;

async fn ask_manifest(
    cx: &Context,
    route: &MirrorRoute,
    method: Method,
    reference: &str,
) -> Result<http::Response<hyper::body::Incoming>, Miss> {
    ask(
        cx,
        route,
        method,
        &format!("/manifests/{reference}"),
        &[(header::ACCEPT, ALL_MANIFEST_TYPES)],
    )
    .await
}

/// HEAD the tag upstream: its digest, `None` if the answer carries none.
pub async fn head_tag(
    cx: &Context,
    route: &MirrorRoute,
    tag: &Tag,
) -> Result<Option<Digest>, Miss> {
    let resp = ask_manifest(cx, route, Method::HEAD, tag.as_str()).await?;
    Ok(resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok()))
}

/// GET a manifest upstream, verify it, store it (pointing `tag` at it if given).
pub async fn fetch_manifest(
    cx: &Context,
    route: &MirrorRoute,
    reference: &str,
    expected: Option<&Digest>,
    tag: Option<TagUpdate<'_>>,
) -> Result<Arc<StoredManifest>, Miss> {
    let resp = ask_manifest(cx, route, Method::GET, reference).await?;
    let (parts, body) = resp.into_parts();
    let bytes = read_body(body, MAX_UPSTREAM_MANIFEST, "a manifest").await?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media::essence)
        .unwrap_or_default();
    let header_type = if media::is_manifest_type(&content_type) {
        content_type.clone()
    } else {
        String::new()
    };
    let parsed = ParsedManifest::parse(&bytes, &header_type).map_err(|e| {
        Miss::Invalid(format!(
            "upstream sent {content_type:?} that is not a usable manifest: {e}"
        ))
    })?;
    let digest = match expected {
        Some(d) => Digest::of(d.algorithm(), &bytes),
        None => Digest::sha256_of(&bytes),
    };
    let announced = parts
        .headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let mismatch = expected.is_some_and(|d| *d != digest)
        || announced
            .as_ref()
            .is_some_and(|a| a.algorithm() == digest.algorithm() && *a != digest);
    if mismatch {
        cx.metrics
            .digest_mismatches
            .with_label_values(&[cx.proxy.upstream_name(route.upstream)])
            .inc();
        return Err(Miss::Invalid(format!(
            "upstream manifest for {reference} does not match its digest; not cached"
        )));
    }
    super::cache_state::put(cx, &route.local, &digest, &parsed.media_type, bytes, tag)
        .await
        .map_err(|e| Miss::Invalid(e.message))
}
