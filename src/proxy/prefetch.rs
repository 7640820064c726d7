//! Prefetching an image into the cache exactly as a client pull would fill it: the reference
//! is routed like a client's name (`Router`), manifests come through `freshness::manifest`
//! (by tag and by digest: the single-flight lookups, the digest checks) and blobs through
//! `blob::locate` and its fill (single-flight with client pulls, verified before commit); the
//! walk waits for each fill to be committed. For an index, the children of the requested
//! platforms (all when none are given) are fetched. A warm list's check (`Mode::Revalidate`)
//! asks the upstream about a tag with a HEAD however fresh it is, and fetches only what is not
//! stored yet: a tag that did not move costs one HEAD and nothing else.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::blob::{self, BlobSource};
use super::fill::FillState;
use super::freshness::{self, Served};
use super::route::RouteError;
use super::{CacheOutcome, Context, MirrorRoute, Namespace};
use crate::oci::image_ref::{ImageRef, PlatformSpec};
use crate::oci::manifest::{Descriptor, ParsedManifest};
use crate::oci::{Digest, Reference, RegistryError, RepoName};

/// Blob downloads one image walk runs at once.
const PARALLEL_BLOBS: usize = 4;
/// Index levels followed below the top manifest (an index of indexes is rare; more is abuse).
const MAX_DEPTH: usize = 2;
/// Most progress events per second while bytes stream in.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How the top manifest of a tag is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As a client pull: a tag confirmed within `tag_ttl` is not asked about again.
    Pull,
    /// Ask the upstream (HEAD) now, and fetch only what moved.
    Revalidate,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PrefetchError {
    #[error("{0}")]
    Reference(#[from] crate::oci::image_ref::ImageRefError),
    #[error("{0}: no upstream named {1:?} is configured (configured: {2})")]
    UnknownUpstream(String, String, String),
    #[error("{0}: {1} is a project of this registry, not a mirrored upstream")]
    Project(String, String),
    #[error("{0}: {1}")]
    Route(String, RouteError),
    #[error("{image}: {what}: {message}")]
    Registry {
        image: String,
        what: String,
        message: String,
    },
    #[error("{0}: the upstream is unreachable; only a stale copy is cached")]
    Stale(String),
    #[error("{0}: no child manifest for {1} (the index lists {2})")]
    NoPlatform(String, String, String),
    #[error("{0}: manifest {1} cannot be read: {2}")]
    Manifest(String, Digest, String),
}

/// Where an image reference is cached, and what it asks for.
#[derive(Debug, Clone)]
pub struct Target {
    pub route: MirrorRoute,
    pub reference: Reference,
}

/// Maps an image reference to the mirror route a client's pull of it would take. A host that
/// is no configured upstream (or alias) is an error, never a path on the default upstream.
pub fn target(cx: &Context, image: &str) -> Result<Target, PrefetchError> {
    let parsed: ImageRef = image.parse()?;
    let router = cx.proxy.router();
    let route = match &parsed.host {
        Some(host) => router
            .resolve(&parsed.path, Some(host))
            .map_err(|e| match e {
                RouteError::UnknownNamespace(_) => {
                    let names: Vec<&str> = (0..cx.proxy.upstream_count())
                        .map(|i| cx.proxy.upstream_name(i))
                        .collect();
                    PrefetchError::UnknownUpstream(image.into(), host.clone(), names.join(", "))
                }
                e => PrefetchError::Route(image.into(), e),
            })?,
        None => match router.namespace(&parsed.path, None) {
            Namespace::Project(p) => {
                return Err(PrefetchError::Project(
                    image.into(),
                    p.name.get_ref().to_string(),
                ));
            }
            Namespace::Mirror(r) => r.map_err(|e| PrefetchError::Route(image.into(), e))?,
        },
    };
    Ok(Target {
        route,
        reference: parsed.reference,
    })
}

/// What the walk reports while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The image's manifests are resolved: `blobs` to make present, `bytes` in all.
    Resolved {
        image: String,
        digest: Digest,
        blobs: u64,
        bytes: u64,
    },
    /// Bytes so far for the image: downloaded, and found stored already.
    Progress {
        image: String,
        blobs_done: u64,
        fetched: u64,
        present: u64,
    },
}

/// One prefetched image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageReport {
    pub image: String,
    /// The local repository it is cached under (`docker.io/library/nginx`).
    pub repository: RepoName,
    /// The top manifest's digest.
    pub digest: Digest,
    /// The tag it was asked for by, if any.
    pub tag: Option<String>,
    /// Manifests walked (top, and the children of the platforms asked for).
    pub manifests: u64,
    /// Distinct blobs the walked manifests reference.
    pub blobs: u64,
    /// Blobs downloaded, and their bytes.
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Bytes that were stored already.
    pub bytes_present: u64,
    /// Whether the top manifest came from the upstream (it moved, or was not cached).
    pub manifest_fetched: bool,
}

/// Counters one walk shares between its concurrent blob downloads.
struct Tally {
    image: String,
    events: Option<UnboundedSender<Event>>,
    blobs_done: AtomicU64,
    blobs_fetched: AtomicU64,
    fetched: AtomicU64,
    present: AtomicU64,
    last_event: std::sync::Mutex<Instant>,
}

impl Tally {
    /// Reports progress (at most every `PROGRESS_EVERY` unless `now`).
    fn report(&self, now: bool) {
        let Some(events) = &self.events else {
            return;
        };
        {
            let mut last = self.last_event.lock().unwrap_or_else(|p| p.into_inner());
            if !now && last.elapsed() < PROGRESS_EVERY {
                return;
            }
            *last = Instant::now();
        }
        let _ = events.send(Event::Progress {
            image: self.image.clone(),
            blobs_done: self.blobs_done.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
        });
    }
}

/// Fetches `image` (`platforms` of an index; all when empty) into the cache; progress goes to
/// `events`.
pub async fn prefetch(
    cx: &Context,
    image: &str,
    platforms: &[PlatformSpec],
    mode: Mode,
    events: Option<UnboundedSender<Event>>,
) -> Result<ImageReport, PrefetchError> {
    let Target { route, reference } = target(cx, image)?;
    let failed = |what: String| {
        let image = image.to_string();
        move |e: RegistryError| PrefetchError::Registry {
            image,
            what,
            message: e.message,
        }
    };
    let top = match (&reference, mode) {
        (Reference::Tag(tag), Mode::Revalidate) => {
            cx.proxy.manifest_misses.revalidate(cx, &route, tag).await
        }
        _ => freshness::manifest(cx, &route, &reference).await,
    }
    .map_err(failed(format!("manifest {reference}")))?;
    if top.outcome == CacheOutcome::Stale {
        return Err(PrefetchError::Stale(image.into()));
    }
    let manifest_fetched = matches!(top.outcome, CacheOutcome::Miss | CacheOutcome::Coalesced);
    let mut images = Vec::new();
    let mut manifests = 1u64;
    let mut level = vec![top.clone()];
    for depth in 0..=MAX_DEPTH {
        let mut next = Vec::new();
        for served in level {
            let parsed = parse(image, &served)?;
            if !parsed.is_index() {
                images.push(parsed);
                continue;
            }
            if depth == MAX_DEPTH {
                continue;
            }
            for child in children(image, &parsed, platforms, depth == 0)? {
                let m = freshness::manifest(cx, &route, &Reference::Digest(child.digest.clone()))
                    .await
                    .map_err(failed(format!("manifest {}", child.digest)))?;
                manifests += 1;
                next.push(m);
            }
        }
        level = next;
    }
    // Distinct blobs, in manifest order (a layer shared by two platforms is fetched once).
    let mut seen = BTreeSet::new();
    let blobs: Vec<Descriptor> = images
        .iter()
        .flat_map(|m| m.referenced_blobs())
        .filter(|d| seen.insert(d.digest.clone()))
        .cloned()
        .collect();
    if let Some(events) = &events {
        let _ = events.send(Event::Resolved {
            image: image.to_string(),
            digest: top.manifest.digest.clone(),
            blobs: blobs.len() as u64,
            bytes: blobs.iter().map(|d| d.size).sum(),
        });
    }
    let tally = Arc::new(Tally {
        image: image.to_string(),
        events,
        blobs_done: AtomicU64::new(0),
        blobs_fetched: AtomicU64::new(0),
        fetched: AtomicU64::new(0),
        present: AtomicU64::new(0),
        last_event: std::sync::Mutex::new(Instant::now()),
    });
    // Each download owns what it uses: the stream's futures borrow nothing from the walk.
    let results: Vec<Result<(), PrefetchError>> = stream::iter(blobs.clone())
        .map(|d| {
            let (cx, route, tally) = (cx.clone(), route.clone(), tally.clone());
            async move {
                fetch_blob(&cx, &route, &d, &tally)
                    .await
                    .map_err(|e| PrefetchError::Registry {
                        image: tally.image.clone(),
                        what: format!("blob {}", d.digest),
                        message: e.message,
                    })
            }
        })
        .buffer_unordered(PARALLEL_BLOBS)
        .collect()
        .await;
    tally.report(true);
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(ImageReport {
        image: image.to_string(),
        repository: route.local.clone(),
        digest: top.manifest.digest.clone(),
        tag: match reference {
            Reference::Tag(t) => Some(t.to_string()),
            Reference::Digest(_) => None,
        },
        manifests,
        blobs: blobs.len() as u64,
        blobs_fetched: tally.blobs_fetched.load(Ordering::Relaxed),
        bytes_fetched: tally.fetched.load(Ordering::Relaxed),
        bytes_present: tally.present.load(Ordering::Relaxed),
        manifest_fetched,
    })
}

fn parse(image: &str, served: &Served) -> Result<ParsedManifest, PrefetchError> {
    let m = &served.manifest;
    ParsedManifest::parse(&m.bytes, &m.media_type)
        .map_err(|e| PrefetchError::Manifest(image.into(), m.digest.clone(), e.to_string()))
}

/// The children of an index to fetch: those of `platforms` (every one when empty). At the top
/// level, a platform the index does not list is an error naming what it does list.
fn children<'a>(
    image: &str,
    index: &'a ParsedManifest,
    platforms: &[PlatformSpec],
    top: bool,
) -> Result<Vec<&'a Descriptor>, PrefetchError> {
    let all = index.child_manifests();
    if platforms.is_empty() {
        return Ok(all.iter().collect());
    }
    let of = |d: &Descriptor, p: &PlatformSpec| {
        d.platform
            .as_ref()
            .is_some_and(|q| p.matches(&q.os, &q.architecture, q.variant.as_deref()))
    };
    if top && let Some(missing) = platforms.iter().find(|p| !all.iter().any(|d| of(d, p))) {
        let listed: Vec<String> = all
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| {
                PlatformSpec {
                    os: p.os.clone(),
                    architecture: p.architecture.clone(),
                    variant: p.variant.clone(),
                }
                .to_string()
            })
            .collect();
        return Err(PrefetchError::NoPlatform(
            image.into(),
            missing.to_string(),
            listed.join(", "),
        ));
    }
    Ok(all
        .iter()
        .filter(|d| platforms.iter().any(|p| of(d, p)))
        .collect())
}

/// Makes one blob present in the route's repository: stored already, or filled (a fill this
/// walk starts or one in flight) and committed.
async fn fetch_blob(
    cx: &Context,
    route: &MirrorRoute,
    desc: &Descriptor,
    tally: &Tally,
) -> Result<(), RegistryError> {
    let fill = match blob::locate(cx, route, &desc.digest, false).await? {
        BlobSource::Stored | BlobSource::Upstream { .. } => {
            tally.present.fetch_add(desc.size, Ordering::Relaxed);
            tally.blobs_done.fetch_add(1, Ordering::Relaxed);
            tally.report(false);
            return Ok(());
        }
        BlobSource::Fill { fill, .. } => fill,
    };
    let mut rx = fill.subscribe();
    let mut counted = 0u64;
    let outcome = loop {
        let state = rx.borrow_and_update().clone();
        match state {
            FillState::Done { size } => break Ok(size),
            FillState::Failed(e) => break Err(e),
            FillState::Streaming { received, .. } | FillState::Verified { size: received } => {
                if received > counted {
                    tally
                        .fetched
                        .fetch_add(received - counted, Ordering::Relaxed);
                    counted = received;
                    tally.report(false);
                }
            }
            FillState::Queued | FillState::Connecting => {}
        }
        if rx.changed().await.is_err() {
            break Err(super::fill::FillError::Aborted);
        }
    };
    match outcome {
        Ok(size) => {
            if size >= counted {
                tally.fetched.fetch_add(size - counted, Ordering::Relaxed);
            } else {
                tally.fetched.fetch_sub(counted - size, Ordering::Relaxed);
            }
            tally.blobs_fetched.fetch_add(1, Ordering::Relaxed);
            tally.blobs_done.fetch_add(1, Ordering::Relaxed);
            tally.report(false);
            Ok(())
        }
        Err(e) => {
            tally.fetched.fetch_sub(counted, Ordering::Relaxed);
            Err(blob::fill_error(e, &desc.digest, cx, route))
        }
    }
}
