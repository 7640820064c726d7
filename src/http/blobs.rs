//! Blob GET/HEAD (with Range, ETag, If-None-Match) and DELETE. Serving a cached blob is the
//! hot path: two cache lookups, one `open`, then the file streams out in mapped windows.

use std::sync::Arc;

use http::request::Parts;
use http::{StatusCode, header};

use super::body::ResponseBody;
use super::response::{Resp, empty, set};
use super::{etag_matches, parse_digest};
use crate::App;
use crate::oci::range::{RangeOutcome, interpret_range};
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};
use crate::storage::BlobSource;
use crate::store::BlobChunks;

pub async fn get(
    app: &Arc<App>,
    repo: &RepoName,
    digest: &str,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    get_in(app, &app.storage, repo, digest, parts, head).await
}

/// `get` from `storage` (the pull-through cache serves from the replica's own store).
pub async fn get_in(
    app: &Arc<App>,
    storage: &crate::storage::Storage,
    repo: &RepoName,
    digest: &str,
    parts: &Parts,
    head: bool,
) -> Result<Resp, RegistryError> {
    let digest = parse_digest(digest)?;
    let Some(size) = storage.blob_size(repo, &digest).await? else {
        // Manifests are content too: some clients fetch them through the blobs endpoint.
        if let Some(m) = storage.manifest(repo, &digest).await? {
            let mut r = super::manifests::manifest_response(&m, head);
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("max-age=31536000"),
            );
            return Ok(r);
        }
        return Err(RegistryError::blob_unknown(&digest));
    };
    let digest_str = digest.to_string();
    if etag_matches(parts, &digest_str) {
        return Ok(super::response::not_modified(&digest_str));
    }
    if !head && let Some(url) = storage.blob_redirect(&digest).await? {
        // The bucket serves the bytes (and the client's Range) itself.
        let mut r = empty(StatusCode::TEMPORARY_REDIRECT);
        set(&mut r, header::LOCATION, url);
        super::response::set_digest_headers(&mut r, &digest_str);
        return Ok(r);
    }
    let (status, start, end) = match plan_range(parts, size, head) {
        Ok(plan) => plan,
        Err(unsatisfiable) => return Ok(*unsatisfiable),
    };
    let body = if head {
        ResponseBody::Empty
    } else {
        match storage.open_blob(&digest, size).await? {
            // `end <= size`, the length of these verified bytes.
            BlobSource::Memory(bytes) => {
                ResponseBody::full(bytes.slice(start as usize..end as usize))
            }
            BlobSource::File(file) => ResponseBody::Blob(
                BlobChunks::new(file, start, end).map_err(crate::store::StoreError::from)?,
                app.metrics.bytes_sent.clone(),
            ),
        }
    };
    let mut r = http::Response::new(body);
    // Room for every header the answer gets (here and in `handle`): no regrowth.
    r.headers_mut().reserve(10);
    *r.status_mut() = status;
    blob_headers_with(&mut r, &digest_str, start, end, size);
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("max-age=31536000"),
    );
    Ok(r)
}

/// What a blob GET answers for its `Range` header: `(status, start, end)` with `end`
/// exclusive, or the ready 416 response (with `Content-Range: bytes */<size>`).
pub fn plan_range(
    parts: &Parts,
    size: u64,
    head: bool,
) -> Result<(StatusCode, u64, u64), Box<Resp>> {
    let range = parts
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    match range.map(|h| interpret_range(h, size)) {
        None | Some(RangeOutcome::Full) => Ok((StatusCode::OK, 0, size)),
        Some(RangeOutcome::Partial { start, end }) => {
            Ok((StatusCode::PARTIAL_CONTENT, start, end + 1))
        }
        Some(RangeOutcome::Unsatisfiable) => {
            let err = RegistryError::new(
                ErrorCode::RangeInvalid,
                format!("requested range not satisfiable for a blob of {size} bytes"),
            );
            let mut r = super::response::error_response(&err, head);
            set(&mut r, header::CONTENT_RANGE, format!("bytes */{size}"));
            Err(Box::new(r))
        }
    }
}

/// The headers of a blob body (bytes `start..end` of `size`): type, length, ranges, ETag,
/// digest, and `Content-Range` for a partial body.
pub fn blob_headers(r: &mut Resp, digest: &Digest, start: u64, end: u64, size: u64) {
    blob_headers_with(r, &digest.to_string(), start, end, size);
}

/// `blob_headers` with the digest already written out.
fn blob_headers_with(r: &mut Resp, digest: &str, start: u64, end: u64, size: u64) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, http::HeaderValue::from(end - start));
    h.insert(
        header::ACCEPT_RANGES,
        http::HeaderValue::from_static("bytes"),
    );
    super::response::set_digest_headers(r, digest);
    if end - start != size {
        set(
            r,
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        );
    }
}

pub async fn delete(app: &Arc<App>, repo: &RepoName, digest: &str) -> Result<Resp, RegistryError> {
    let digest = parse_digest(digest)?;
    app.storage.delete_blob(repo, &digest).await?;
    Ok(empty(StatusCode::ACCEPTED))
}
