//! Manifest GET/HEAD (with Accept negotiation), PUT (byte-exact, validated, multi-tag) and
//! DELETE (by digest: the manifest and its tags; by tag: the tag).

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, StatusCode, header};

use super::body::{RequestBody, ResponseBody, drain, read_limited};
use super::response::{Resp, append, empty, set};
use super::{etag_matches, query_all};
use crate::App;
use crate::oci::manifest::ParsedManifest;
use crate::oci::media::{AcceptList, Negotiated, negotiate};
use crate::oci::name::ReferenceError;
use crate::oci::{ErrorCode, Reference, RegistryError, RepoName, Tag};
use crate::store::{StoreError, StoredManifest};

/// Most tags one `PUT ...?tag=` may set (the spec asks for at least 10).
const MAX_TAGS_PER_PUT: usize = 100;

fn docker_content_digest() -> HeaderName {
    HeaderName::from_static("docker-content-digest")
}

/// Parses a reference for a read or delete: a malformed tag names nothing that can exist, so
/// it is unknown (404, as conformance v1.1.1 expects); a malformed digest stays a 400.
pub fn parse_reference_to_read(s: &str) -> Result<Reference, RegistryError> {
    parse_reference(s).map_err(|e| match e.code {
        ErrorCode::TagInvalid => RegistryError::manifest_unknown(&format!("{s} ({})", e.message)),
        _ => e,
    })
}

pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    s.parse().map_err(|e| match e {
        ReferenceError::Tag(t) => RegistryError::new(ErrorCode::TagInvalid, t.to_string()),
        ReferenceError::Digest(d) => RegistryError::digest_invalid(d.to_string()),
    })
}

/// Every `Accept` line of the request, merged (moby and podman send several).
pub fn accept_list(parts: &Parts) -> AcceptList {
    AcceptList::from_headers(
        parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// The stored bytes with their exact media type.
pub fn manifest_response(m: &StoredManifest, head: bool) -> Resp {
    manifest_response_with(m, head, &m.digest.to_string())
}

/// `manifest_response` with the digest already written out.
fn manifest_response_with(m: &StoredManifest, head: bool, digest: &str) -> Resp {
    let body = if head {
        ResponseBody::Empty
    } else {
        ResponseBody::Full(Some(m.bytes.clone()))
    };
    let mut r = http::Response::new(body);
    // Room for every header the answer gets (here and in `handle`): no regrowth.
    r.headers_mut().reserve(10);
    r.headers_mut().insert(
        header::CONTENT_LENGTH,
        http::HeaderValue::from(m.bytes.len()),
    );
    set(&mut r, header::CONTENT_TYPE, &m.media_type);
    super::response::set_digest_headers(&mut r, digest);
    r
}

pub async fn get(
    app: &Arc<App>,
    repo: &RepoName,
    reference: &str,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    let reference = parse_reference_to_read(reference)?;
    let unknown = || RegistryError::manifest_unknown(&format!("{repo}:{reference}"));
    let digest = app
        .storage
        .resolve(repo, &reference)
        .await?
        .ok_or_else(unknown)?;
    let m = app
        .storage
        .manifest(repo, &digest)
        .await?
        .ok_or_else(unknown)?;
    let accept = accept_list(parts);
    let by_tag = matches!(reference, Reference::Tag(_));
    let m = match negotiate(&accept, &m.media_type, by_tag) {
        Negotiated::Serve => m,
        Negotiated::NotAcceptable => {
            return Err(RegistryError::new(
                ErrorCode::ManifestUnknown,
                format!(
                    "manifest {reference} is {}, which the Accept header does not include",
                    m.media_type
                ),
            ));
        }
        Negotiated::PlatformChild => {
            let parsed = ParsedManifest::parse(&m.bytes, &m.media_type)
                .map_err(|e| RegistryError::internal(e.to_string()))?;
            let child = parsed.platform_child("linux", "amd64").ok_or_else(|| {
                RegistryError::new(ErrorCode::ManifestUnknown, format!("{reference} is a manifest list with no linux/amd64 image, and the Accept header does not include manifest lists"))
            })?;
            let child = app
                .storage
                .manifest(repo, &child.digest)
                .await?
                .ok_or_else(unknown)?;
            if !accept.accepts(&child.media_type) {
                return Err(RegistryError::manifest_invalid(format!(
                    "the linux/amd64 image of {reference} is {}, which the Accept header does not include",
                    child.media_type
                )));
            }
            child
        }
    };
    let digest = m.digest.to_string();
    if etag_matches(parts, &digest) {
        return Ok(super::response::not_modified(&digest));
    }
    if !head {
        crate::events::pulled(app, repo, &m, &reference);
    }
    Ok(manifest_response_with(&m, head, &digest))
}

/// The 304 for a conditional GET whose `If-None-Match` names this manifest: no body, and the
/// validators a 200 would carry (`ETag`, `Docker-Content-Digest`), so caches can refresh them.
pub async fn put(
    app: &Arc<App>,
    repo: &RepoName,
    reference: &str,
    parts: &Parts,
    mut body: RequestBody,
) -> Result<Resp, RegistryError> {
    let reference = parse_reference(reference)?;
    let query_tags = query_all(parts, "tag");
    if query_tags.len() > MAX_TAGS_PER_PUT {
        return Err(RegistryError::new(
            ErrorCode::TagInvalid,
            format!("at most {MAX_TAGS_PER_PUT} tags per request"),
        )
        .with_status(414));
    }
    let extra_tags = query_tags
        .iter()
        .map(|t| {
            t.parse::<Tag>()
                .map_err(|e| RegistryError::new(ErrorCode::TagInvalid, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let limit = app.storage.max_manifest_size();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || RegistryError::from(StoreError::ManifestTooLarge { limit });
    // Oversized: answer 413, after draining a bounded amount so the client can read it.
    let drain_cap = limit.saturating_mul(4);
    if declared.is_some_and(|n| n > limit) {
        if declared.is_some_and(|n| n <= drain_cap) {
            drain(&mut body, drain_cap).await;
        }
        return Err(too_large());
    }
    let bytes = match read_limited(&mut body, limit).await {
        Ok(bytes) => bytes,
        Err(None) => {
            drain(&mut body, drain_cap).await;
            return Err(too_large());
        }
        Err(Some(e)) => return Err(StoreError::Body(e).into()),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let put = app
        .storage
        .put_manifest(repo, &reference, bytes, content_type, extra_tags.clone())
        .await?;
    let mut r = empty(StatusCode::CREATED);
    let digest = put.digest.to_string();
    set(
        &mut r,
        header::LOCATION,
        format!("/v2/{repo}/manifests/{digest}"),
    );
    set(&mut r, docker_content_digest(), &digest);
    if let Some(s) = &put.subject {
        set(
            &mut r,
            HeaderName::from_static("oci-subject"),
            s.to_string(),
        );
    }
    for t in &extra_tags {
        append(&mut r, HeaderName::from_static("oci-tag"), t.as_str());
    }
    Ok(r)
}

pub async fn delete(
    app: &Arc<App>,
    repo: &RepoName,
    reference: &str,
) -> Result<Resp, RegistryError> {
    let reference = parse_reference_to_read(reference)?;
    app.storage.delete_manifest(repo, &reference).await?;
    Ok(empty(StatusCode::ACCEPTED))
}
