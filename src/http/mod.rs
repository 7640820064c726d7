//! The HTTP side: routing a request to its handler after the access check, and the one log
//! line and metrics update every request gets. Handlers turn protocol input into store calls;
//! they never touch RocksDB or files directly. `server` owns sockets and shutdown.

pub mod access_log;
pub mod blobs;
pub mod body;
pub mod cache_admin;
mod coalesce;
pub mod forwarded;
pub mod internal_fill;
pub mod manifests;
pub mod members;
pub mod mirror;
pub mod referrers;
pub mod response;
pub mod router;
pub mod server;
pub mod tags;
pub mod tls;
pub mod token;
pub mod uploads;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::{HeaderValue, Method, Request, StatusCode, header};
use hyper::body::Incoming;

use crate::App;
use crate::auth::Action;
use crate::oci::digest::DigestError;
use crate::oci::{Digest, ErrorCode, RegistryError, RepoName};
use crate::proxy::{MirrorRoute, Namespace};
use body::{RequestBody, ResponseBody};
use response::{Resp, error_response, json};
use router::Route;

/// Runs a blocking identity change (a synced write) off the async workers.
pub async fn blocking_admin(
    f: impl FnOnce() -> Result<(), crate::auth::keys::AdminError> + Send + 'static,
) -> Result<(), RegistryError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(RegistryError::internal(format!("admin task failed: {e}"))),
    }
}

/// Runs blocking store work (synced writes) off the async workers: the proxy's helper, shared.
pub use crate::proxy::blocking::store_work as blocking;

pub fn parse_repo(name: &str) -> Result<RepoName, RegistryError> {
    name.parse().map_err(|e: crate::oci::name::NameError| {
        RegistryError::new(ErrorCode::NameInvalid, e.to_string())
    })
}

pub fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: DigestError| RegistryError::digest_invalid(e.to_string()))
}

/// The first value of a query parameter.
pub fn query_one(parts: &Parts, key: &str) -> Option<String> {
    let q = parts.uri.query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Every value of a repeated query parameter.
pub fn query_all(parts: &Parts, key: &str) -> Vec<String> {
    let Some(q) = parts.uri.query() else {
        return Vec::new();
    };
    form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// `If-None-Match` naming this digest (quoted or not, or `*`).
pub fn etag_matches(parts: &Parts, digest: &str) -> bool {
    parts
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
                .any(|t| t == digest || t == "*")
        })
}

/// The action a request on `route` needs: cancelling an upload is part of pushing it, so it
/// needs push (as every other upload request does), not delete.
pub(crate) fn action_for_route(route: &Route<'_>, method: &Method) -> Action {
    match route {
        Route::Upload { .. } if *method == Method::DELETE => Action::Push,
        _ => action_for(method),
    }
}

pub(crate) fn action_for(method: &Method) -> Action {
    match *method {
        Method::GET | Method::HEAD => Action::Pull,
        Method::DELETE => Action::Delete,
        _ => Action::Push,
    }
}

/// Serves one request: route, authorize, handle, then log and count it.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    // From here on `peer` is the client: a trusted reverse proxy may name it.
    let peer = forwarded::client_addr(&parts.headers, peer, &app.config.server.trusted_proxies);
    let body = RequestBody::new(body, app.metrics.bytes_received.clone())
        .with_idle_timeout(app.config.uploads.body_idle_timeout.0);
    let route = router::parse(parts.uri.path());
    let head = parts.method == Method::HEAD;
    let mut resp = match dispatch(&app, &route, &parts, body, peer).await {
        Ok(r) => r,
        Err(e) => {
            if e.code == ErrorCode::Unknown {
                tracing::error!(error = %e, method = %parts.method, path = parts.uri.path(), "request failed");
            }
            error_response(&e, head)
        }
    };
    resp.headers_mut().insert(
        HeaderName::from_static("docker-distribution-api-version"),
        HeaderValue::from_static("registry/2.0"),
    );
    let status = resp.status();
    if status == StatusCode::METHOD_NOT_ALLOWED
        && !resp.headers().contains_key(header::ALLOW)
        && let Some(allow) = route.allow()
    {
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    // A HEAD answer carries the headers of the GET but never its body.
    let resp = if head {
        resp.map(|_| ResponseBody::Empty)
    } else {
        resp.map(|b| b.counted(&app.metrics.bytes_sent))
    };
    let label = if route == Route::NotFound
        && crate::console::wants(&parts.method, parts.uri.path(), &parts.headers).is_some()
    {
        "console"
    } else {
        route.label()
    };
    app.metrics
        .requests
        .with_label_values(&[
            crate::metrics::method_label(&parts.method),
            label,
            status.as_str(),
        ])
        .inc();
    let elapsed = started.elapsed();
    app.metrics
        .duration
        .with_label_values(&[label, status.as_str()])
        .observe(elapsed.as_secs_f64());
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    access_log::emit(&access_log::AccessLine {
        method: parts.method.as_str(),
        route: label,
        repo: route.name().unwrap_or("-"),
        status: status.as_u16(),
        bytes,
        us: elapsed.as_micros() as u64,
        peer,
    });
    resp
}

use http::HeaderName;

async fn dispatch(
    app: &Arc<App>,
    route: &Route<'_>,
    parts: &Parts,
    body: RequestBody,
    peer: SocketAddr,
) -> Result<Resp, RegistryError> {
    let method = &parts.method;
    let head = *method == Method::HEAD;
    let get = *method == Method::GET || head;
    match route {
        Route::Token => return token::serve(app, parts, body, peer).await,
        Route::Health if get => return Ok(json(StatusCode::OK, r#"{"status":"ok"}"#.into())),
        Route::Metrics if get => return Ok(metrics(app)),
        // Replicas only, never the registry API (404 outside the cluster profile).
        Route::InternalFill { digest } => return internal_fill::serve(app, parts, digest).await,
        // Pages for browsers (and their JSON form): never a path of the registry API.
        Route::NotFound => {
            if let Some(form) = crate::console::wants(method, parts.uri.path(), &parts.headers) {
                return Ok(crate::console::serve(app, form, parts, body, peer).await);
            }
        }
        _ => {}
    }
    let repo = route.name().map(parse_repo).transpose()?;
    // Where the name lives is decided once, here, and passed to access control and handlers.
    let ns = query_one(parts, "ns");
    let namespace = repo.as_ref().map(|r| app.proxy.namespace(r, ns.as_deref()));
    let deny = |d| token::denial_error(app, parts, d, token::scope_for(route, method));
    let authorization = parts.headers.get(header::AUTHORIZATION);
    // Leniency only matters for requests that carry credentials.
    let lenient =
        authorization.is_some() && namespace.as_ref().is_some_and(|n| app.auth.lenient_for(n));
    let caller = app
        .auth
        .authenticate(authorization, peer.ip(), lenient)
        .await
        .map_err(deny)?;
    if let (Some(r), Some(namespace)) = (&repo, namespace) {
        app.auth
            .authorize(&caller, r, &namespace, action_for_route(route, method))
            .map_err(deny)?;
        if let Namespace::Mirror(mirror) = namespace {
            let mirror =
                mirror.map_err(|e| RegistryError::new(ErrorCode::NameUnknown, e.to_string()))?;
            return dispatch_mirror(app, route, parts, r, &mirror, head).await;
        }
    }
    let repo = || {
        repo.as_ref()
            .ok_or_else(|| RegistryError::internal("route without a repository"))
    };
    match route {
        Route::Base if get => {
            // Once anyone can log in, an anonymous ping is challenged: Docker learns how to
            // authenticate only from this answer.
            if !app.auth.identities.is_empty() {
                app.auth.require_authenticated(&caller).map_err(deny)?;
            }
            Ok(json(StatusCode::OK, "{}".into()))
        }
        Route::Catalog if get => {
            app.auth.authorize_catalog(&caller).map_err(deny)?;
            tags::catalog(app, parts, &caller).await
        }
        Route::Cache { what } => cache_admin::serve(app, parts, body, &caller, what).await,
        Route::Members { project, user } => {
            members::serve(app, parts, body, &caller, project, user.as_deref()).await
        }
        Route::Manifest { reference, .. } => match *method {
            Method::GET | Method::HEAD => {
                manifests::get(app, repo()?, reference, parts, head).await
            }
            Method::PUT => manifests::put(app, repo()?, reference, parts, body).await,
            Method::DELETE => manifests::delete(app, repo()?, reference).await,
            _ => Err(not_allowed(method)),
        },
        Route::Blob { digest, .. } => match *method {
            Method::GET | Method::HEAD => blobs::get(app, repo()?, digest, parts, head).await,
            Method::DELETE => blobs::delete(app, repo()?, digest).await,
            _ => Err(not_allowed(method)),
        },
        Route::UploadStart { .. } if *method == Method::POST => {
            uploads::start(app, repo()?, parts, &caller, body).await
        }
        Route::Upload { id, .. } => match *method {
            Method::GET => uploads::status(app, repo()?, id).await,
            Method::PATCH => uploads::patch(app, repo()?, id, parts, body).await,
            Method::PUT => uploads::put(app, repo()?, id, parts, body).await,
            Method::DELETE => uploads::cancel(app, repo()?, id).await,
            _ => Err(not_allowed(method)),
        },
        Route::Tags { .. } if get => tags::list(app, repo()?, parts).await,
        Route::Referrers { digest, .. } if get => {
            referrers::list(app, repo()?, digest, parts).await
        }
        Route::NotFound => Err(RegistryError::new(
            ErrorCode::NotFound,
            format!("no such endpoint: {}", parts.uri.path()),
        )),
        _ => Err(not_allowed(method)),
    }
}

/// Routes a request for a mirrored repository (read-only; pushes were refused by `authorize`).
async fn dispatch_mirror(
    app: &Arc<App>,
    route: &Route<'_>,
    parts: &Parts,
    repo: &RepoName,
    mirror: &MirrorRoute,
    head: bool,
) -> Result<Resp, RegistryError> {
    let get = parts.method == Method::GET || head;
    if !get {
        return Err(not_allowed(&parts.method).with_header("allow", "GET, HEAD"));
    }
    match route {
        Route::Manifest { reference, .. } => {
            mirror::get_manifest(app, mirror, reference, parts, head).await
        }
        Route::Blob { digest, .. } => mirror::get_blob(app, mirror, digest, parts, head).await,
        Route::Tags { .. } => mirror::list_tags(app, mirror, repo, parts).await,
        Route::Referrers { digest, .. } => referrers::list(app, &mirror.local, digest, parts).await,
        // Uploads: a mirror namespace takes none, so no method is allowed here.
        _ => Err(not_allowed(&parts.method).with_header("allow", "")),
    }
}

/// The Prometheus text exposition, with the gauges that are sampled rather than counted.
fn metrics(app: &App) -> Resp {
    let (bytes, blobs) = app.store.usage();
    app.metrics.stored_bytes.set(bytes as i64);
    app.metrics.stored_blobs.set(blobs as i64);
    app.metrics
        .uploads_active
        .set(app.store.uploads_active() as i64);
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        crate::storage::cluster_metrics::sample(c.read_cache(), &app.metrics);
    }
    // What was dropped since the last scrape, counted once even when scrapes overlap.
    static REPORTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::log_writer::dropped_lines();
    let before = REPORTED.swap(now, std::sync::atomic::Ordering::AcqRel);
    app.metrics
        .log_dropped_lines
        .inc_by(now.saturating_sub(before));
    let mut r = json(StatusCode::OK, app.metrics.render());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

pub(crate) fn not_allowed(method: &Method) -> RegistryError {
    RegistryError::unsupported(format!("method {method} is not supported on this endpoint"))
}
