//! The replicas' internal fill endpoint (cluster profile only): `GET /_transship/fill/<digest>`
//! with Range serves another replica the bytes of a fill in progress here, as this replica's
//! own clients get them (the last byte only once the blob is verified), or the blob once it is
//! stored. Only a request carrying the replicas' shared key gets anything (401 otherwise, 404
//! outside the cluster profile); it is answered before, and never reaches, the registry API.

use std::sync::Arc;

use http::request::Parts;
use http::{Method, StatusCode};

use super::blobs::{blob_headers, plan_range};
use super::body::ResponseBody;
use super::parse_digest;
use super::response::Resp;
use crate::App;
use crate::oci::{ErrorCode, RegistryError};
use crate::proxy::cluster_fill::KEY_HEADER;
use crate::proxy::{fill, follow};
use crate::store::BlobChunks;

pub async fn serve(app: &Arc<App>, parts: &Parts, digest: &str) -> Result<Resp, RegistryError> {
    let Some(cluster) = app.proxy.cluster() else {
        return Err(RegistryError::new(
            ErrorCode::NotFound,
            format!("no such endpoint: {}", parts.uri.path()),
        ));
    };
    let presented = parts.headers.get(KEY_HEADER).map(|v| v.as_bytes());
    if !presented.is_some_and(|k| cluster.key_matches(k)) {
        return Err(RegistryError::new(
            ErrorCode::Unauthorized,
            "this endpoint is for the cluster's replicas",
        ));
    }
    let head = parts.method == Method::HEAD;
    if parts.method != Method::GET && !head {
        return Err(super::not_allowed(&parts.method).with_header("allow", "GET, HEAD"));
    }
    let digest = parse_digest(digest)?;
    let cx = app.proxy_context();
    if let Some(fill) = cx.proxy.fills.in_flight_for(&digest) {
        let mut rx = fill.subscribe();
        let size = fill::wait_for_size(&mut rx).await.map_err(|e| {
            RegistryError::new(ErrorCode::Unavailable, format!("the fill failed: {e}"))
        })?;
        let (status, start, end) = match plan_range(parts, size, head) {
            Ok(plan) => plan,
            Err(unsatisfiable) => return Ok(*unsatisfiable),
        };
        let body = ResponseBody::Stream {
            stream: Box::pin(follow::follow(cx, fill.clone(), rx, start, end)),
            remaining: end - start,
            sent: app.metrics.bytes_sent.clone(),
        };
        return Ok(respond(body, status, &digest, start, end, size));
    }
    // Not in flight: stored here (a fill that finished), or nothing to give.
    let file = app.store.open_blob(&digest)?;
    let size = file
        .metadata()
        .map_err(|e| RegistryError::internal(e.to_string()))?
        .len();
    let (status, start, end) = match plan_range(parts, size, head) {
        Ok(plan) => plan,
        Err(unsatisfiable) => return Ok(*unsatisfiable),
    };
    let chunks = BlobChunks::new(file, start, end).map_err(crate::store::StoreError::from)?;
    let body = ResponseBody::Blob(chunks, app.metrics.bytes_sent.clone());
    Ok(respond(body, status, &digest, start, end, size))
}

fn respond(
    body: ResponseBody,
    status: StatusCode,
    digest: &crate::oci::Digest,
    start: u64,
    end: u64,
    size: u64,
) -> Resp {
    let mut r = http::Response::new(body);
    *r.status_mut() = status;
    blob_headers(&mut r, digest, start, end, size);
    r
}
