//! Blob uploads: POST (session, single-POST monolithic `?digest=`, or `?mount=&from=`), PATCH
//! (chunked with `Content-Range`, or streamed with no length as `docker push` sends), PUT
//! `?digest=` (optional final chunk), GET status and DELETE. Every 202 carries `Location`,
//! `Range: 0-<last>` (`0-0` when empty) and `Docker-Upload-UUID`.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, StatusCode, header};

use super::body::RequestBody;
use super::response::{Resp, empty, set};
use super::{parse_digest, query_one};
use crate::App;
use crate::auth::{Action, Caller, Identity};
use crate::oci::range::parse_content_range;
use crate::oci::{Algorithm, Digest, ErrorCode, RegistryError, RepoName};
use crate::store::StoreError;
use crate::store::uploads::ChunkSpec;

fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn chunk_spec(parts: &Parts) -> Result<ChunkSpec, RegistryError> {
    let range = match parts.headers.get(header::CONTENT_RANGE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(parse_content_range)
                .ok_or_else(|| {
                    RegistryError::new(
                        ErrorCode::RangeInvalid,
                        "invalid Content-Range: expected <start>-<end>, inclusive, no unit",
                    )
                })?,
        ),
    };
    Ok(ChunkSpec {
        range,
        content_length: content_length(parts),
    })
}

/// `Location`, `Range: 0-<last>` (`0-0` when empty) and `Docker-Upload-UUID` of a session.
fn add_session_headers(r: &mut Resp, repo: &RepoName, id: &str, size: u64) {
    set(
        r,
        header::LOCATION,
        format!("/v2/{repo}/blobs/uploads/{id}"),
    );
    set(r, header::RANGE, format!("0-{}", size.saturating_sub(1)));
    set(r, HeaderName::from_static("docker-upload-uuid"), id);
}

/// 202/204 with the session's location and progress.
fn session_response(status: StatusCode, repo: &RepoName, id: &str, size: u64) -> Resp {
    let mut r = empty(status);
    add_session_headers(&mut r, repo, id, size);
    r
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Resp {
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        format!("/v2/{repo}/blobs/{digest}"),
    );
    set(
        &mut r,
        HeaderName::from_static("docker-content-digest"),
        digest.to_string(),
    );
    r
}

fn upload_id<'a>(app: &App, id: &'a str) -> Result<&'a str, RegistryError> {
    if app.storage.valid_upload_id(id) {
        Ok(id)
    } else {
        Err(RegistryError::upload_unknown())
    }
}

/// An out-of-order chunk: 416, and the session's real progress so the client can resume.
fn with_progress(e: StoreError, repo: &RepoName, id: &str) -> Result<Resp, RegistryError> {
    if let StoreError::RangeInvalid { size } = e {
        let err: RegistryError = e.into();
        let mut r = super::response::error_response(&err, false);
        add_session_headers(&mut r, repo, id, size);
        return Ok(r);
    }
    Err(e.into())
}

/// Whose per-client session cap a new upload counts against: the authenticated identity, or
/// the address of an anonymous caller.
fn client_key(caller: &Caller) -> String {
    match &caller.identity {
        Identity::Subject(s) => format!("sub:{}", s.token_sub()),
        Identity::Token(c) if !c.sub.is_empty() => format!("sub:{}", c.sub),
        // An IPv6 host owns its /64: a new address per session is still the same client.
        _ => format!("addr:{}", crate::auth::throttle::host_key(caller.peer)),
    }
}

/// Starts a session.
async fn new_session(
    app: &Arc<App>,
    repo: &RepoName,
    algorithm: Algorithm,
    caller: &Caller,
) -> Result<String, RegistryError> {
    let client = client_key(caller);
    Ok(app.storage.start_upload(repo, algorithm, &client).await?)
}

/// Appends `body` and commits the upload; the session is locked throughout.
async fn complete(
    app: &Arc<App>,
    repo: &RepoName,
    id: &str,
    digest: &Digest,
    spec: ChunkSpec,
    body: &mut RequestBody,
) -> Result<u64, StoreError> {
    room_for_push(app)?;
    app.storage
        .complete_upload(repo, id, digest, spec, body)
        .await
}

/// Refuses to take more pushed bytes while the data directory is short of space (counted).
fn room_for_push(app: &App) -> Result<(), StoreError> {
    app.storage.room_for_push().inspect_err(|_| {
        app.metrics
            .space_refusals
            .with_label_values(&["push"])
            .inc();
    })
}

/// Cancels a session and drops what it received.
async fn cancel_session(app: &Arc<App>, repo: &RepoName, id: &str) -> Result<(), RegistryError> {
    Ok(app.storage.cancel_upload(repo, id).await?)
}

pub async fn start(
    app: &Arc<App>,
    repo: &RepoName,
    parts: &Parts,
    caller: &Caller,
    mut body: RequestBody,
) -> Result<Resp, RegistryError> {
    if let Some(mount) = query_one(parts, "mount") {
        let digest = parse_digest(&mount)?;
        // Mount only from a repository the caller may pull (push on this one was checked
        // already); otherwise fall back to an upload session, which reveals nothing about the
        // other repository.
        let from = query_one(parts, "from").and_then(|f| f.parse::<RepoName>().ok());
        if let Some(from) = from.filter(|f| {
            let namespace = app.proxy.namespace(f, None);
            app.auth
                .authorize(caller, f, &namespace, Action::Pull)
                .is_ok()
        }) && app
            .storage
            .mount_blob(repo, &from, &digest)
            .await?
            .is_some()
        {
            return Ok(blob_created(repo, &digest));
        }
    }
    if let Some(d) = query_one(parts, "digest") {
        // Single-POST monolithic upload.
        let digest = parse_digest(&d)?;
        let id = new_session(app, repo, digest.algorithm(), caller).await?;
        let spec = ChunkSpec {
            range: None,
            content_length: content_length(parts),
        };
        let result = complete(app, repo, &id, &digest, spec, &mut body).await;
        if result.is_err() {
            let _ = cancel_session(app, repo, &id).await;
        }
        result?;
        return Ok(blob_created(repo, &digest));
    }
    let algorithm = match query_one(parts, "digest-algorithm") {
        None => Algorithm::Sha256,
        Some(a) => Algorithm::parse(&a).ok_or_else(|| {
            RegistryError::digest_invalid(format!(
                "unsupported digest-algorithm {a:?}: use sha256 or sha512"
            ))
        })?,
    };
    room_for_push(app)?;
    let id = new_session(app, repo, algorithm, caller).await?;
    let mut size = 0;
    if content_length(parts).is_some_and(|n| n > 0) {
        // A body on a plain POST is the first chunk.
        let spec = ChunkSpec {
            range: None,
            content_length: content_length(parts),
        };
        size = app
            .storage
            .append_upload(repo, &id, spec, &mut body)
            .await?;
    }
    Ok(session_response(StatusCode::ACCEPTED, repo, &id, size))
}

pub async fn status(app: &Arc<App>, repo: &RepoName, id: &str) -> Result<Resp, RegistryError> {
    let id = upload_id(app, id)?;
    let size = app.storage.upload_size(repo, id).await?;
    Ok(session_response(StatusCode::NO_CONTENT, repo, id, size))
}

pub async fn patch(
    app: &Arc<App>,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
    mut body: RequestBody,
) -> Result<Resp, RegistryError> {
    let id = upload_id(app, id)?;
    let spec = chunk_spec(parts)?;
    let appended = match room_for_push(app) {
        Err(e) => Err(e),
        Ok(()) => app.storage.append_upload(repo, id, spec, &mut body).await,
    };
    match appended {
        Ok(size) => Ok(session_response(StatusCode::ACCEPTED, repo, id, size)),
        Err(e) => with_progress(e, repo, id),
    }
}

pub async fn put(
    app: &Arc<App>,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
    mut body: RequestBody,
) -> Result<Resp, RegistryError> {
    let id = upload_id(app, id)?;
    let digest = query_one(parts, "digest").ok_or_else(|| {
        RegistryError::digest_invalid(
            "the digest query parameter is required to complete an upload",
        )
    })?;
    let digest = parse_digest(&digest)?;
    let spec = chunk_spec(parts)?;
    match complete(app, repo, id, &digest, spec, &mut body).await {
        Ok(_) => Ok(blob_created(repo, &digest)),
        Err(e) => with_progress(e, repo, id),
    }
}

pub async fn cancel(app: &Arc<App>, repo: &RepoName, id: &str) -> Result<Resp, RegistryError> {
    let id = upload_id(app, id)?;
    cancel_session(app, repo, id).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_clients_are_counted_per_host() {
        let at = |ip: &str| client_key(&Caller::anonymous(ip.parse().unwrap()));
        assert_eq!(at("2001:db8:1:2::1"), at("2001:db8:1:2:ffff::7"));
        assert_ne!(at("2001:db8:1:2::1"), at("2001:db8:1:3::1"));
        assert_eq!(at("::ffff:192.0.2.1"), at("192.0.2.1"));
        assert_ne!(at("192.0.2.1"), at("192.0.2.2"));
    }
}
