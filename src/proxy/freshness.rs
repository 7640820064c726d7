//! Manifests and tags of mirrored repositories. By-digest manifests are immutable cache
//! entries. A tag is served locally while younger than `tag_ttl`; after that it is
//! revalidated with a HEAD (free against Docker Hub's pull limit) and fetched by digest only
//! when it moved. Upstream 404 → 404 (remembered for `not_found_ttl`, and the cached tag is
//! forgotten). Upstream 429, 5xx, timeouts and connection errors → the last known digest while
//! it is within `stale_if_error`, else a clean 503. Upstream bytes are verified against the
//! digest before they are stored; they are stored byte-exact with their media type.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use bytes::Bytes;
use http::{HeaderName, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use super::{CacheOutcome, MirrorRoute};
use crate::App;
use crate::oci::manifest::ParsedManifest;
use crate::oci::media::{self, ALL_MANIFEST_TYPES};
use crate::oci::{Digest, ErrorCode, Reference, RegistryError, Tag};
use crate::store::{StoredManifest, unix_now};

/// Largest manifest accepted from an upstream (containerd's limit, a little over 4 MiB).
pub const MAX_UPSTREAM_MANIFEST: usize = 4 * 1048 * 1048;

#[derive(Clone)]
pub struct Served {
    pub manifest: Arc<StoredManifest>,
    pub outcome: CacheOutcome,
}

type SharedLookup = Shared<BoxFuture<'static, Result<Served, RegistryError>>>;

/// Manifest lookups that need the upstream, one per repository and reference at a time:
/// concurrent pulls of a cold image cost one HEAD/GET upstream (on Docker Hub a manifest GET
/// is a pull), not one per client.
#[derive(Default)]
pub struct Lookups {
    inflight: Mutex<HashMap<String, SharedLookup>>,
}

/// Why an upstream lookup failed.
#[derive(Debug)]
enum Miss {
    /// The upstream does not have it: 404 (`repository: false`), or 401/403 after the token
    /// dance, which is how Docker Hub answers for a repository that does not exist.
    NotFound { repository: bool },
    /// Worth serving stale content for: rate limit, server error, timeout, unreachable.
    Unavailable(String),
    /// The upstream answered with something that is not the manifest asked for.
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

fn unavailable(app: &App, route: &MirrorRoute, why: &str) -> RegistryError {
    RegistryError::new(
        ErrorCode::Unavailable,
        format!(
            "upstream {} is unavailable and nothing usable is cached: {why}",
            app.proxy.upstream_name(route.upstream)
        ),
    )
}

fn not_found(route: &MirrorRoute, reference: &Reference, repository: bool) -> RegistryError {
    if repository {
        RegistryError::name_unknown(&format!(
            "{} (upstream does not know the repository)",
            route.remote
        ))
    } else {
        RegistryError::manifest_unknown(&format!(
            "{}:{reference} (not found upstream)",
            route.remote
        ))
    }
}

/// The manifest for `reference` in the mirrored repository, from cache or upstream.
pub async fn manifest(
    app: &Arc<App>,
    route: &MirrorRoute,
    reference: &Reference,
) -> Result<Served, RegistryError> {
    // The hot path: cached and fresh, no upstream, no coalescing bookkeeping.
    if let Some(served) = cached_and_fresh(app, route, reference)? {
        return Ok(served);
    }
    let key = format!("{}\0{reference}", route.local);
    let (lookup, joined) = {
        let mut inflight = app
            .proxy
            .lookups
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match inflight.get(&key) {
            Some(l) => (l.clone(), true),
            None => {
                let (app2, route2, ref2, key2) =
                    (app.clone(), route.clone(), reference.clone(), key.clone());
                let lookup = async move {
                    let result = lookup(&app2, &route2, &ref2).await;
                    app2.proxy
                        .lookups
                        .inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key2);
                    result
                }
                .boxed()
                .shared();
                inflight.insert(key, lookup.clone());
                (lookup, false)
            }
        }
    };
    let served = lookup.await?;
    Ok(if joined && served.outcome == CacheOutcome::Miss {
        Served {
            outcome: CacheOutcome::Coalesced,
            ..served
        }
    } else {
        served
    })
}

/// The cached manifest if it can be served without asking the upstream.
fn cached_and_fresh(
    app: &App,
    route: &MirrorRoute,
    reference: &Reference,
) -> Result<Option<Served>, RegistryError> {
    let config = app.proxy.config(route.upstream);
    let hit = |manifest| {
        Some(Served {
            manifest,
            outcome: CacheOutcome::Hit,
        })
    };
    match reference {
        Reference::Digest(d) => Ok(app.store.manifest(&route.local, d)?.and_then(hit)),
        Reference::Tag(tag) => {
            let Some((digest, checked)) = app.store.cached_tag(&route.local, tag)? else {
                return Ok(None);
            };
            let fresh =
                config.offline || unix_now().saturating_sub(checked) < config.tag_ttl.0.as_secs();
            if !fresh {
                return Ok(None);
            }
            Ok(app.store.manifest(&route.local, &digest)?.and_then(hit))
        }
    }
}

/// The full lookup: cache, then upstream (run once per repository and reference at a time).
async fn lookup(
    app: &Arc<App>,
    route: &MirrorRoute,
    reference: &Reference,
) -> Result<Served, RegistryError> {
    let config = app.proxy.config(route.upstream);
    match reference {
        Reference::Digest(d) => {
            if let Some(m) = app.store.manifest(&route.local, d)? {
                return Ok(Served {
                    manifest: m,
                    outcome: CacheOutcome::Hit,
                });
            }
            if config.offline || app.proxy.recently_not_found(route, &d.to_string()) {
                return Err(not_found(route, reference, false));
            }
            match fetch(app, route, &d.to_string(), Some(d), None).await {
                Ok(m) => Ok(Served {
                    manifest: m,
                    outcome: CacheOutcome::Miss,
                }),
                Err(Miss::NotFound { repository }) => {
                    app.proxy.remember_not_found(route, &d.to_string());
                    Err(not_found(route, reference, repository))
                }
                Err(Miss::Unavailable(why)) => Err(unavailable(app, route, &why)),
                Err(Miss::Invalid(why)) => Err(RegistryError::new(ErrorCode::Unavailable, why)),
            }
        }
        Reference::Tag(tag) => tag_manifest(app, route, tag, reference).await,
    }
}

async fn tag_manifest(
    app: &Arc<App>,
    route: &MirrorRoute,
    tag: &Tag,
    reference: &Reference,
) -> Result<Served, RegistryError> {
    let config = app.proxy.config(route.upstream);
    let cached = app.store.cached_tag(&route.local, tag)?;
    let local = match &cached {
        Some((d, checked)) => app.store.manifest(&route.local, d)?.map(|m| (m, *checked)),
        None => None,
    };
    let age = |checked: u64| unix_now().saturating_sub(checked);
    if let Some((m, checked)) = &local {
        if config.offline || age(*checked) < config.tag_ttl.0.as_secs() {
            return Ok(Served {
                manifest: m.clone(),
                outcome: CacheOutcome::Hit,
            });
        }
    } else if config.offline || app.proxy.recently_not_found(route, tag.as_str()) {
        return Err(not_found(route, reference, false));
    }

    let stale_or = |why: String| -> Result<Served, RegistryError> {
        match &local {
            Some((m, checked)) if age(*checked) <= config.stale_if_error.0.as_secs() => {
                tracing::warn!(repo = %route.local, %tag, %why, "serving a stale tag");
                Ok(Served {
                    manifest: m.clone(),
                    outcome: CacheOutcome::Stale,
                })
            }
            _ => Err(unavailable(app, route, &why)),
        }
    };

    match head(app, route, tag).await {
        Ok(Some(upstream_digest)) => {
            if let Some((m, _)) = &local
                && m.digest == upstream_digest
            {
                let (app2, repo, t) = (app.clone(), route.local.clone(), tag.clone());
                crate::http::blocking(move || app2.store.confirm_cached_tag(&repo, &t)).await?;
                return Ok(Served {
                    manifest: m.clone(),
                    outcome: CacheOutcome::Hit,
                });
            }
            // The tag moved (or is new here): fetch by digest, unless that manifest is cached.
            if let Some(m) = app.store.manifest(&route.local, &upstream_digest)? {
                let (app2, repo, t, m2) =
                    (app.clone(), route.local.clone(), tag.clone(), m.clone());
                let m = crate::http::blocking(move || {
                    app2.store.put_cached_manifest(
                        &repo,
                        &m2.digest,
                        &m2.media_type,
                        m2.bytes.clone(),
                        Some(&t),
                    )
                })
                .await?;
                return Ok(Served {
                    manifest: m,
                    outcome: CacheOutcome::Hit,
                });
            }
            match fetch(
                app,
                route,
                &upstream_digest.to_string(),
                Some(&upstream_digest),
                Some(tag),
            )
            .await
            {
                Ok(m) => Ok(Served {
                    manifest: m,
                    outcome: CacheOutcome::Miss,
                }),
                Err(Miss::NotFound { repository }) => Err(not_found(route, reference, repository)),
                Err(Miss::Unavailable(why) | Miss::Invalid(why)) => stale_or(why),
            }
        }
        // No digest in the HEAD answer: GET by tag.
        Ok(None) => match fetch(app, route, tag.as_str(), None, Some(tag)).await {
            Ok(m) => Ok(Served {
                manifest: m,
                outcome: CacheOutcome::Miss,
            }),
            Err(Miss::NotFound { repository }) => {
                tag_gone(app, route, tag, reference, repository).await
            }
            Err(Miss::Unavailable(why) | Miss::Invalid(why)) => stale_or(why),
        },
        Err(Miss::NotFound { repository }) => {
            tag_gone(app, route, tag, reference, repository).await
        }
        Err(Miss::Unavailable(why) | Miss::Invalid(why)) => stale_or(why),
    }
}

/// Upstream says the tag does not exist (any more): forget it, remember the 404 briefly.
async fn tag_gone(
    app: &Arc<App>,
    route: &MirrorRoute,
    tag: &Tag,
    reference: &Reference,
    repository: bool,
) -> Result<Served, RegistryError> {
    let (app2, repo, t) = (app.clone(), route.local.clone(), tag.clone());
    crate::http::blocking(move || app2.store.forget_cached_tag(&repo, &t)).await?;
    app.proxy.remember_not_found(route, tag.as_str());
    Err(not_found(route, reference, repository))
}

/// Asks the upstream for a manifest (all four manifest types accepted), unless it asked us to
/// wait (`Retry-After`). Anything but 200 is a `Miss`.
async fn ask_manifest(
    app: &Arc<App>,
    route: &MirrorRoute,
    method: Method,
    reference: &str,
) -> Result<http::Response<hyper::body::Incoming>, Miss> {
    if let Some(wait) = app.proxy.client(route.upstream).rate_limited_for() {
        return Err(Miss::Unavailable(format!(
            "upstream rate limit: it asked us to wait {}s more (Retry-After)",
            wait.as_secs() + 1
        )));
    }
    let resp = app
        .proxy
        .ask(
            &app.metrics,
            route,
            method,
            &format!("/manifests/{reference}"),
            &[(header::ACCEPT, ALL_MANIFEST_TYPES)],
        )
        .await
        .map_err(|e| Miss::Unavailable(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(Miss::from_status(resp.status(), resp.headers()));
    }
    Ok(resp)
}

/// HEAD the tag upstream: its digest, `None` if the answer carries none.
async fn head(app: &Arc<App>, route: &MirrorRoute, tag: &Tag) -> Result<Option<Digest>, Miss> {
    let resp = ask_manifest(app, route, Method::HEAD, tag.as_str()).await?;
    Ok(resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok()))
}

/// GET a manifest upstream, verify it, store it (pointing `tag` at it if given).
async fn fetch(
    app: &Arc<App>,
    route: &MirrorRoute,
    reference: &str,
    expected: Option<&Digest>,
    tag: Option<&Tag>,
) -> Result<Arc<StoredManifest>, Miss> {
    let resp = ask_manifest(app, route, Method::GET, reference).await?;
    let (parts, body) = resp.into_parts();
    let bytes: Bytes = tokio::time::timeout(
        super::upstream::HEADER_TIMEOUT,
        Limited::new(body, MAX_UPSTREAM_MANIFEST).collect(),
    )
    .await
    .map_err(|_| Miss::Unavailable("upstream stalled sending a manifest".into()))?
    .map_err(|e| {
        Miss::Invalid(format!(
            "upstream manifest unreadable or over {MAX_UPSTREAM_MANIFEST} bytes: {e}"
        ))
    })?
    .to_bytes();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media::essence)
        .unwrap_or_default();
    // An HTML error page or other non-manifest is never stored.
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
        app.metrics
            .digest_mismatches
            .with_label_values(&[app.proxy.upstream_name(route.upstream)])
            .inc();
        return Err(Miss::Invalid(format!(
            "upstream manifest for {reference} does not match its digest; not cached"
        )));
    }
    let (app2, repo, tag2, mt) = (
        app.clone(),
        route.local.clone(),
        tag.cloned(),
        parsed.media_type.clone(),
    );
    crate::http::blocking(move || {
        app2.store
            .put_cached_manifest(&repo, &digest, &mt, bytes, tag2.as_ref())
    })
    .await
    .map_err(|e| Miss::Invalid(e.message))
}

/// The `OCI-Namespace` header name.
pub fn oci_namespace() -> HeaderName {
    HeaderName::from_static("oci-namespace")
}
