//! Operators' view and control of the pull-through cache: the inventory, eviction on demand,
//! pins and tag history. One request type, answered by `apply` for the `transship cache …`
//! commands (through the admin socket when the server runs, on the stopped store otherwise)
//! and for `/transship/v1/cache/…` (registry admins only). Image references are the names
//! clients pull (`nginx:1.27`, `docker.io/library/nginx@sha256:…`, `ghcr.io/org/app:v1`),
//! resolved to cache repositories by the same router the registry API uses.

use serde::{Deserialize, Serialize};

use crate::App;
use crate::auth::token::rfc3339;
use crate::oci::{Digest, RepoName, Tag};
use crate::proxy::route::Namespace;
use crate::store::evict::{EvictReport, Selection};
use crate::store::inventory::{CacheUsage, CachedImage};
use crate::store::pins::{PinInfo, PinTarget};
use crate::store::{StoreError, unix_now};

mod cluster;

/// How `cache ls` orders images.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SortKey {
    /// Largest own bytes first.
    Size,
    /// Most recently pulled first.
    #[default]
    LastPulled,
    /// Most pulled first.
    Pulls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cache_op", rename_all = "snake_case")]
pub enum CacheRequest {
    List {
        #[serde(default)]
        upstream: Option<String>,
        #[serde(default)]
        sort: SortKey,
    },
    Evict {
        #[serde(default)]
        image: Option<String>,
        #[serde(default)]
        older_than_secs: Option<u64>,
    },
    Pin {
        image: String,
        #[serde(default)]
        platforms: Vec<String>,
    },
    Unpin {
        image: String,
    },
    Pins,
    History {
        image: String,
    },
}

/// One observed resolution of a tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolution {
    /// RFC 3339, UTC.
    pub at: String,
    pub at_unix_micros: u64,
    pub digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cache_result", rename_all = "snake_case")]
pub enum CacheAnswer {
    Images {
        images: Vec<CachedImage>,
        usage: CacheUsage,
    },
    Evicted {
        report: EvictReport,
    },
    Pinned {
        repository: String,
        digest: String,
    },
    Unpinned {
        removed: usize,
    },
    Pins {
        pins: Vec<PinInfo>,
    },
    History {
        repository: String,
        tag: String,
        resolutions: Vec<Resolution>,
    },
}

/// Why a cache request failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The request itself is wrong (a malformed reference, a project name, missing fields).
    #[error("{0}")]
    Invalid(String),
    /// What it names is not there (not cached, not pinned).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cache image reference: its cache repository and, if given, tag or digest.
struct ImageRef {
    repo: RepoName,
    target: Option<PinTarget>,
}

/// Parses `name[:tag|@digest]` and maps the name to its cache repository.
fn image_ref(app: &App, s: &str) -> Result<ImageRef, CacheError> {
    let (name, target) = if let Some((n, d)) = s.split_once('@') {
        let d: Digest = d
            .parse()
            .map_err(|e| CacheError::Invalid(format!("{s:?}: {e}")))?;
        (n, Some(PinTarget::Digest(d)))
    } else {
        match s.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => {
                let t: Tag = t
                    .parse()
                    .map_err(|e| CacheError::Invalid(format!("{s:?}: {e}")))?;
                (n, Some(PinTarget::Tag(t)))
            }
            _ => (s, None),
        }
    };
    let name: RepoName = name
        .parse()
        .map_err(|e| CacheError::Invalid(format!("{s:?}: {e}")))?;
    match app.proxy.namespace(&name, None) {
        Namespace::Mirror(Ok(route)) => Ok(ImageRef {
            repo: route.local,
            target,
        }),
        Namespace::Mirror(Err(e)) => Err(CacheError::Invalid(format!("{s:?}: {e}"))),
        Namespace::Project(p) => Err(CacheError::Invalid(format!(
            "{s:?} is in project {:?}: pushed images are not cache content",
            p.name.get_ref().as_str()
        ))),
    }
}

/// The configured upstream whose namespace holds the cache repository `repo` (the longest
/// matching name); empty for a repository of an upstream no longer configured.
fn upstream_of(app: &App, repo: &str) -> String {
    app.config
        .upstreams
        .iter()
        .map(|u| u.name.get_ref().as_str())
        .filter(|n| {
            repo.strip_prefix(n)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|n| n.len())
        .unwrap_or_default()
        .to_string()
}

fn need_target(r: &ImageRef, s: &str) -> Result<PinTarget, CacheError> {
    r.target.clone().ok_or_else(|| {
        CacheError::Invalid(format!(
            "{s:?}: give a tag (IMAGE:TAG) or a digest (IMAGE@sha256:…)"
        ))
    })
}

/// The answer to `cache ls`: each image's upstream named, filtered by `upstream`, sorted.
fn listing(
    app: &App,
    mut images: Vec<CachedImage>,
    usage: CacheUsage,
    upstream: Option<String>,
    sort: SortKey,
) -> CacheAnswer {
    for i in &mut images {
        i.upstream = upstream_of(app, &i.repository);
    }
    if let Some(u) = upstream {
        images.retain(|i| i.upstream == u);
    }
    match sort {
        SortKey::Size => images.sort_by_key(|i| std::cmp::Reverse(i.own_bytes)),
        SortKey::LastPulled => images.sort_by_key(|i| std::cmp::Reverse(i.last_pulled)),
        SortKey::Pulls => images.sort_by_key(|i| std::cmp::Reverse(i.pulls)),
    }
    CacheAnswer::Images { images, usage }
}

fn need_tag(r: &ImageRef, image: &str) -> Result<Tag, CacheError> {
    match &r.target {
        Some(PinTarget::Tag(tag)) => Ok(tag.clone()),
        _ => Err(CacheError::Invalid(format!(
            "{image:?}: give a tag (IMAGE:TAG)"
        ))),
    }
}

/// The answer to `cache history`: `(Unix microseconds, digest)` resolutions, oldest first.
fn history(r: &ImageRef, tag: &Tag, resolutions: Vec<(u64, String)>) -> CacheAnswer {
    CacheAnswer::History {
        repository: r.repo.to_string(),
        tag: tag.as_str().to_string(),
        resolutions: resolutions
            .into_iter()
            .map(|(micros, digest)| Resolution {
                at: rfc3339(micros / 1_000_000),
                at_unix_micros: micros,
                digest,
            })
            .collect(),
    }
}

fn not_evictable(image: &str) -> CacheError {
    CacheError::NotFound(format!(
        "{image} is not a cached image that may be evicted (not cached, pinned, or a child of a cached index)"
    ))
}

fn not_pinnable(image: &str) -> CacheError {
    CacheError::NotFound(format!(
        "{image} is not cached (only cached images can be pinned: pull it first)"
    ))
}

fn pinned(r: &ImageRef, digest: &Digest) -> CacheAnswer {
    CacheAnswer::Pinned {
        repository: r.repo.to_string(),
        digest: digest.to_string(),
    }
}

fn unpinned(image: &str, removed: usize) -> Result<CacheAnswer, CacheError> {
    if removed == 0 {
        return Err(CacheError::NotFound(format!("{image} is not pinned")));
    }
    Ok(CacheAnswer::Unpinned { removed })
}

/// Refuses a platform that is not `os/arch[/variant]`.
fn check_platforms(platforms: &[String]) -> Result<(), CacheError> {
    for p in platforms {
        let parts = p.split('/').count();
        if !(2..=3).contains(&parts) || p.split('/').any(str::is_empty) {
            return Err(CacheError::Invalid(format!(
                "platform {p:?}: expected os/arch[/variant]"
            )));
        }
    }
    Ok(())
}

/// Answers one request (blocking: it scans the index).
pub fn apply(app: &App, req: CacheRequest) -> Result<CacheAnswer, CacheError> {
    // In the cluster profile the cache's eviction and pins are the database's (callers run
    // this on the blocking pool, where waiting on the runtime is allowed).
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        return tokio::runtime::Handle::current().block_on(cluster::apply(app, c, req));
    }
    let store = &app.store;
    let is_cache = |r: &RepoName| app.is_cache_repo(r);
    match req {
        CacheRequest::List { upstream, sort } => {
            let (images, usage) = store.cache_inventory(&is_cache)?;
            Ok(listing(app, images, usage, upstream, sort))
        }
        CacheRequest::Evict {
            image: Some(image),
            older_than_secs: None,
        } => {
            let r = image_ref(app, &image)?;
            let digest = match need_target(&r, &image)? {
                PinTarget::Digest(d) => d,
                PinTarget::Tag(t) => store
                    .resolve_tag(&r.repo, &t)?
                    .ok_or_else(|| CacheError::NotFound(format!("{image} is not cached")))?,
            };
            let report = store.evict_now(Selection::Image(&r.repo, &digest), &is_cache)?;
            if report.images_evicted == 0 {
                return Err(not_evictable(&image));
            }
            Ok(CacheAnswer::Evicted { report })
        }
        CacheRequest::Evict {
            image: None,
            older_than_secs: Some(age),
        } => {
            let report = store.evict_now(
                Selection::PulledBefore(unix_now().saturating_sub(age)),
                &is_cache,
            )?;
            Ok(CacheAnswer::Evicted { report })
        }
        CacheRequest::Evict { .. } => Err(CacheError::Invalid(
            "give either an image or an age (--older-than), not both or neither".into(),
        )),
        CacheRequest::Pin { image, platforms } => {
            let r = image_ref(app, &image)?;
            check_platforms(&platforms)?;
            let target = need_target(&r, &image)?;
            let digest = store
                .pin(&r.repo, &target, &platforms)
                .map_err(|e| match e {
                    StoreError::ManifestUnknown(_) => not_pinnable(&image),
                    e => e.into(),
                })?;
            Ok(pinned(&r, &digest))
        }
        CacheRequest::Unpin { image } => {
            let r = image_ref(app, &image)?;
            let removed = store.unpin(&r.repo, &need_target(&r, &image)?)?;
            unpinned(&image, removed)
        }
        CacheRequest::Pins => Ok(CacheAnswer::Pins {
            pins: store.pins()?,
        }),
        CacheRequest::History { image } => {
            let r = image_ref(app, &image)?;
            let tag = need_tag(&r, &image)?;
            let resolutions = store.tag_history(&r.repo, &tag)?;
            Ok(history(&r, &tag, resolutions))
        }
    }
}

/// Whether a request changes the cache (for the audit log).
pub fn describe(req: &CacheRequest) -> String {
    match req {
        CacheRequest::List { .. } | CacheRequest::Pins | CacheRequest::History { .. } => {
            "cache list".into()
        }
        CacheRequest::Evict {
            image,
            older_than_secs,
        } => match (image, older_than_secs) {
            (Some(i), _) => format!("cache evict {i}"),
            (None, Some(s)) => format!("cache evict --older-than {s}s"),
            (None, None) => "cache evict".into(),
        },
        CacheRequest::Pin { image, .. } => format!("cache pin {image}"),
        CacheRequest::Unpin { image } => format!("cache unpin {image}"),
    }
}
