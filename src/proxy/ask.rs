//! Asking the route's upstream about a repository's manifests and tags: the request goes out
//! only if the upstream has not asked us to wait (`Retry-After`), anything but 200 becomes a
//! `Miss` saying what it means for the cache, and bodies are read with a size cap and a
//! deadline.

use bytes::Bytes;
use http::{HeaderName, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use super::Context;
use super::MirrorRoute;
use super::upstream::HEADER_TIMEOUT;

/// Why an upstream lookup failed.
#[derive(Debug, Clone)]
pub enum Miss {
    /// The upstream does not have it: 404 (`repository: false`), or 401/403 after the token
    /// dance, which is how Docker Hub answers for a repository that does not exist.
    NotFound { repository: bool },
    /// Worth serving stale content for: rate limit, server error, timeout, unreachable.
    Unavailable(String),
    /// The upstream answered with something that is not what was asked for.
    Invalid(String),
}

impl Miss {
    fn from_status(status: StatusCode, headers: &http::HeaderMap) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::NotFound { repository: false },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Self::NotFound { repository: true },
            StatusCode::TOO_MANY_REQUESTS => {
                let after = headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("unknown");
                Self::Unavailable(format!(
                    "upstream rate limit reached (Retry-After: {after})"
                ))
            }
            s => Self::Unavailable(format!("upstream answered {s}")),
        }
    }
}

/// Sends `method /v2/<remote><suffix>` upstream unless it asked us to wait; a 200 response or
/// the `Miss` its status means.
pub async fn ask(
    cx: &Context,
    route: &MirrorRoute,
    method: Method,
    suffix: &str,
    headers: &[(HeaderName, &str)],
) -> Result<http::Response<hyper::body::Incoming>, Miss> {
    if let Some(wait) = cx.proxy.client(route.upstream).rate_limited_for() {
        return Err(Miss::Unavailable(format!(
            "upstream rate limit: it asked us to wait {}s more (Retry-After)",
            wait.as_secs() + 1
        )));
    }
    let resp = cx
        .proxy
        .ask(&cx.metrics, route, method, suffix, headers)
        .await
        .map_err(|e| Miss::Unavailable(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(Miss::from_status(resp.status(), resp.headers()));
    }
    Ok(resp)
}

/// Reads a response body of at most `limit` bytes within the header timeout; `what` names it
/// in errors.
pub async fn read_body(
    body: hyper::body::Incoming,
    limit: usize,
    what: &str,
) -> Result<Bytes, Miss> {
    Ok(
        tokio::time::timeout(HEADER_TIMEOUT, Limited::new(body, limit).collect())
            .await
            .map_err(|_| Miss::Unavailable(format!("upstream stalled sending {what}")))?
            .map_err(|e| {
                Miss::Invalid(format!(
                    "upstream sent {what} that is unreadable or over {limit} bytes: {e}"
                ))
            })?
            .to_bytes(),
    )
}
