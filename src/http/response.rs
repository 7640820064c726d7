//! Building responses: registry error bodies, JSON documents, and the headers every response
//! carries. Store errors become registry errors here, in one place.

use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use crate::oci::{ErrorCode, RegistryError};
use crate::store::StoreError;

pub type Resp = Response<ResponseBody>;

pub fn error_response(err: &RegistryError, head_only: bool) -> Resp {
    let body = err.to_json();
    let mut r = Response::builder()
        .status(StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    for (name, value) in &err.headers {
        r = r.header(*name, value.as_str());
    }
    let body = if head_only {
        ResponseBody::Empty
    } else {
        ResponseBody::full(body)
    };
    r.body(body).unwrap_or_else(|e| {
        // A header the error carries is not a valid header: still an error, never a 200.
        tracing::error!(error = %e, code = err.code.as_str(), "cannot build an error response");
        internal_error(head_only)
    })
}

/// A 500 with the registry error body, built without anything that can fail.
fn internal_error(head_only: bool) -> Resp {
    let body = RegistryError::internal("internal error building the response; see the server log")
        .to_json();
    let mut r = empty(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if !head_only {
        *r.body_mut() = ResponseBody::full(body);
    }
    r
}

pub fn json(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(ResponseBody::full(body.clone()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

pub fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(ResponseBody::Empty);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// 304 for a blob or manifest the client already has: its validators, no body.
pub fn not_modified(digest: &str) -> Resp {
    let mut r = empty(StatusCode::NOT_MODIFIED);
    r.headers_mut().remove(header::CONTENT_LENGTH);
    set_digest_headers(&mut r, digest);
    r
}

/// `Docker-Content-Digest` and `ETag` (the quoted digest) for content named by `digest`:
/// the two values of every blob and manifest answer, built without a format string.
pub fn set_digest_headers(r: &mut Resp, digest: &str) {
    let mut etag = String::with_capacity(digest.len() + 2);
    etag.push('"');
    etag.push_str(digest);
    etag.push('"');
    // The String's buffer becomes the header's bytes: no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(etag)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    set(
        r,
        header::HeaderName::from_static("docker-content-digest"),
        digest,
    );
}

/// Adds a header whose value came from validated data (names, digests, numbers). A value that
/// is somehow not a valid header is dropped rather than crashing the request.
pub fn set(r: &mut Resp, name: header::HeaderName, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        r.headers_mut().insert(name, v);
    }
}

pub fn append(r: &mut Resp, name: header::HeaderName, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        r.headers_mut().append(name, v);
    }
}

/// What a client refused a new upload session is told to wait: sessions free up as pushes
/// complete, which takes seconds, not minutes.
const UPLOAD_RETRY_AFTER_SECS: u64 = 10;

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BlobUnknown(d) => RegistryError::blob_unknown(&d),
            StoreError::ManifestUnknown(r) => RegistryError::manifest_unknown(&r),
            StoreError::NameUnknown(n) => RegistryError::name_unknown(&n),
            StoreError::UploadUnknown => RegistryError::upload_unknown(),
            e @ StoreError::RangeInvalid { .. } => {
                RegistryError::new(ErrorCode::RangeInvalid, e.to_string())
            }
            StoreError::SizeInvalid(m) => RegistryError::new(ErrorCode::SizeInvalid, m),
            e @ StoreError::DigestMismatch { .. } => RegistryError::digest_invalid(e.to_string()),
            StoreError::ManifestInvalid(m) => RegistryError::manifest_invalid(m),
            e @ StoreError::ManifestTooLarge { .. } => {
                RegistryError::new(ErrorCode::ManifestTooLarge, e.to_string())
            }
            StoreError::ManifestBlobUnknown(ds) => {
                let detail = serde_json::json!(
                    ds.iter()
                        .map(|d| serde_json::json!({"digest": d.to_string()}))
                        .collect::<Vec<_>>()
                );
                RegistryError::new(
                    ErrorCode::ManifestBlobUnknown,
                    StoreError::ManifestBlobUnknown(ds).to_string(),
                )
                .with_detail_json(detail.to_string())
            }
            StoreError::Body(e) if e.kind() == std::io::ErrorKind::TimedOut => RegistryError::new(
                ErrorCode::BlobUploadInvalid,
                format!(
                    "{e}; an upload keeps its last complete chunk: resume from the offset \
                     a GET on the upload URL reports"
                ),
            )
            .with_status(408),
            StoreError::TooManyUploads(m) => RegistryError::new(ErrorCode::TooManyRequests, m)
                .with_header("retry-after", UPLOAD_RETRY_AFTER_SECS.to_string()),
            StoreError::Body(e) => RegistryError::new(
                ErrorCode::BlobUploadInvalid,
                format!("error reading the request body: {e}"),
            )
            .with_status(400),
            e @ StoreError::UploadBusy => {
                RegistryError::new(ErrorCode::BlobUploadInvalid, e.to_string())
                    .with_status(409)
                    .with_header("retry-after", "1")
            }
            StoreError::DigestRefused(m) => RegistryError::digest_invalid(m),
            StoreError::Shared(m) => {
                tracing::error!(error = %m, "shared storage error");
                RegistryError::new(
                    ErrorCode::Unavailable,
                    "the registry's shared storage is unavailable; see the server log",
                )
                .with_header("retry-after", "5")
            }
            e @ StoreError::InsufficientStorage => {
                RegistryError::new(ErrorCode::InsufficientStorage, e.to_string())
            }
            StoreError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                tracing::error!(error = %e, "storage full");
                RegistryError::new(
                    ErrorCode::InsufficientStorage,
                    "the registry's disk is full; nothing was stored, try again later",
                )
            }
            e @ (StoreError::Io(_) | StoreError::Index(_)) => {
                tracing::error!(error = %e, "storage error");
                RegistryError::internal("internal storage error; see the server log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(r: Resp) -> bytes::Bytes {
        futures_util::FutureExt::now_or_never(r.into_body().collect())
            .expect("a buffered body is ready")
            .expect("body")
            .to_bytes()
    }

    #[test]
    fn an_unbuildable_error_is_a_500_with_the_error_body() {
        let err = RegistryError::denied("no").with_header("www-authenticate", "bad\nvalue");
        let r = error_response(&err, false);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let len: usize = r.headers()[header::CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = body_of(r);
        assert_eq!(body.len(), len);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNKNOWN");
        let r = error_response(&err, true);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body_of(r).is_empty());
    }

    #[test]
    fn a_buildable_error_keeps_its_status_and_headers() {
        let err = RegistryError::denied("no").with_header("retry-after", "5");
        let r = error_response(&err, false);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["retry-after"], "5");
    }
}
