//! `/transship/v1/cache/…`: the cache inventory and control as JSON, for registry admins
//! (`auth.admins`, Basic credentials). The same requests as `transship cache …`:
//! - `GET images[?upstream=U&sort=size|last-pulled|pulls]` → `{"images": [...], "usage": {...}}`
//! - `GET history?image=nginx:latest` → every digest the tag resolved to, and when
//! - `GET pins`; `POST pins` with `{"image": "...", "platforms": [...]}`; `DELETE pins?image=...`
//! - `POST evict` with `{"image": "..."}` or `{"older_than": "30d"}`

use std::sync::Arc;

use http::request::Parts;
use http::{Method, StatusCode};
use serde::Deserialize;

use super::body::{RequestBody, read_limited};
use super::query_one;
use super::response::{Resp, json};
use crate::App;
use crate::auth::Caller;
use crate::cache_admin::{CacheAnswer, CacheError, CacheRequest, SortKey};
use crate::config::HumanDuration;
use crate::oci::{ErrorCode, RegistryError};

/// Request bodies here are small JSON objects.
const MAX_BODY: u64 = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictBody {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    older_than: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    image: String,
    #[serde(default)]
    platforms: Vec<String>,
}

fn bad(message: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, message).with_status(400)
}

fn required(parts: &Parts, name: &str) -> Result<String, RegistryError> {
    query_one(parts, name).ok_or_else(|| bad(format!("the {name} query parameter is required")))
}

async fn body_json<T: serde::de::DeserializeOwned>(
    body: &mut RequestBody,
) -> Result<T, RegistryError> {
    let raw = read_limited(body, MAX_BODY)
        .await
        .map_err(|_| bad("the body must be a small JSON object"))?;
    serde_json::from_slice(&raw).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

pub async fn serve(
    app: &Arc<App>,
    parts: &Parts,
    mut body: RequestBody,
    caller: &Caller,
    what: &str,
) -> Result<Resp, RegistryError> {
    if let Err(d) = app.auth.require_admin(caller) {
        let unauthenticated = matches!(d, crate::auth::Denial::Unauthenticated { .. });
        let e = super::token::denial_error(app, parts, d, None);
        // Only Basic credentials administer the cache: challenge for them, not for a token.
        return Err(if unauthenticated {
            RegistryError {
                headers: Vec::new(),
                ..e
            }
            .with_header(
                "www-authenticate",
                "Basic realm=\"transship cache administration\"",
            )
        } else {
            e
        });
    }
    if parts.method == Method::POST
        && !parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
    {
        // Also keeps a browser holding an admin's Basic credentials from being driven by a
        // plain HTML form here.
        return Err(bad(
            "POST bodies here are JSON: send Content-Type: application/json",
        ));
    }
    let req = match (&parts.method, what) {
        (&Method::GET | &Method::HEAD, "images") => {
            let sort = match query_one(parts, "sort").as_deref() {
                None | Some("last-pulled") => SortKey::LastPulled,
                Some("size") => SortKey::Size,
                Some("pulls") => SortKey::Pulls,
                Some(other) => {
                    return Err(bad(format!(
                        "sort={other:?}: expected size, last-pulled or pulls"
                    )));
                }
            };
            CacheRequest::List {
                upstream: query_one(parts, "upstream"),
                sort,
            }
        }
        (&Method::GET | &Method::HEAD, "history") => CacheRequest::History {
            image: required(parts, "image")?,
        },
        (&Method::GET | &Method::HEAD, "pins") => CacheRequest::Pins,
        (&Method::POST, "pins") => {
            let PinBody { image, platforms } = body_json(&mut body).await?;
            CacheRequest::Pin { image, platforms }
        }
        (&Method::DELETE, "pins") => CacheRequest::Unpin {
            image: required(parts, "image")?,
        },
        (&Method::POST, "evict") => {
            let EvictBody { image, older_than } = body_json(&mut body).await?;
            CacheRequest::Evict {
                image,
                older_than_secs: older_than.map(|d| d.0.as_secs()),
            }
        }
        (m, _) => return Err(super::not_allowed(m)),
    };
    let op = crate::cache_admin::describe(&req);
    let a = app.clone();
    let answer: Result<CacheAnswer, CacheError> =
        tokio::task::spawn_blocking(move || crate::cache_admin::apply(&a, req))
            .await
            .map_err(|e| RegistryError::internal(format!("cache task failed: {e}")))?;
    match answer {
        Ok(answer) => {
            tracing::info!(target: "audit", op, "audit: cache request applied");
            Ok(json(
                StatusCode::OK,
                serde_json::to_string(&answer).unwrap_or_default(),
            ))
        }
        Err(e) => {
            tracing::info!(target: "audit", op, error = %e, "audit: cache request refused");
            Err(match e {
                CacheError::Invalid(m) => bad(m),
                CacheError::NotFound(m) => RegistryError::new(ErrorCode::NotFound, m),
                CacheError::Store(e) => e.into(),
            })
        }
    }
}
