//! Single-flight blob fills. One upstream download per digest, however many clients ask: the
//! first request starts a detached fill task; every request (first included) follows it. The
//! task writes to `ingest/fill-<uuid>` while hashing; readers follow the download from byte 0
//! or their Range as bytes land (`follow`: the recent bytes from memory, older ones from the
//! spool), so headers go out as soon as the upstream answers. The
//! fill continues when clients disconnect, resumes a dropped upstream body with a Range
//! request, and commits only after digest and size are verified. No reader receives the last
//! byte before the whole blob is verified, so a corrupt upstream body never looks complete: on
//! a mismatch nothing is committed and every reader's stream is aborted. The fsync and commit
//! come after the readers' last byte; requests arriving meanwhile still follow the spool.
//!
//! A fill only ever hands its bytes to routes entitled to them: the route that started it, and
//! routes whose upstream confirmed (HEAD) that their repository has the blob. Fills of one
//! upstream run at most `max_concurrent_fills` at a time; more wait their turn (`Queued`) for
//! up to `QUEUE_TIMEOUT`. An upstream body without `Content-Length` is spooled with its size
//! unknown (unless a HEAD tells it); its readers then start once it is verified (so does a
//! body announced as empty). File writes and hashing run off the async workers, on two
//! blocking workers per fill fed the same batches; the batches also go to the fill's in-memory
//! tail as they arrive. However the fill task ends (error, panic, cancellation), a guard gives
//! its readers a final state and removes exactly its own entry from the table.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc, watch};

use super::Context;
use super::MirrorRoute;
use super::tail::{Gather, Piece, Tail};
use super::upstream::UpstreamClient;
use crate::config::Config;
use crate::oci::{Digest, Digester, RepoName};

/// A fill's progress, broadcast to its readers.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for one of the upstream's `max_concurrent_fills` download slots.
    Queued,
    Connecting,
    /// `size` is `None` when the upstream announced no length: readers wait for `Verified`.
    /// `received` bytes have arrived: readers find them in the tail or the spool.
    Streaming {
        size: Option<u64>,
        received: u64,
    },
    /// Every byte arrived and hashes to the digest: readers may finish. The blob is being
    /// made durable and committed; late joiners keep reading the spool meanwhile.
    Verified {
        size: u64,
    },
    Done {
        size: u64,
    },
    Failed(FillError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("upstream answered {0}")]
    Status(StatusCode),
    #[error("{0}")]
    Upstream(String),
    #[error("upstream content does not match {expected}: got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("upstream sent {got} bytes, {want} were announced")]
    SizeMismatch { want: u64, got: u64 },
    #[error("storage error: {0}")]
    Store(String),
    #[error("too many downloads from this upstream are in progress; try again later")]
    Busy,
    #[error("the download ended unexpectedly")]
    Aborted,
}

pub struct Fill {
    pub digest: Digest,
    path: PathBuf,
    state: watch::Sender<FillState>,
    /// `(upstream, local repository)` of the routes that may read this fill: the one that
    /// started it (its own upstream GET answers for it) and those whose upstream confirmed
    /// with a HEAD that their repository has the blob.
    entitled: Mutex<Vec<(usize, RepoName)>>,
    /// A read handle on the spool, set before any reader is told bytes exist. Readers share
    /// it, so the bytes stay readable after the commit renames the spool and even after an
    /// eviction removes the committed blob while a client is still reading it.
    spool: std::sync::OnceLock<Arc<File>>,
    /// The most recently received bytes, for readers that keep up.
    tail: Mutex<Tail>,
    /// How much of the blob the writer has put in the spool.
    written: AtomicU64,
}

impl Fill {
    fn new(digest: Digest, path: PathBuf, route: &MirrorRoute) -> Self {
        let (state, _) = watch::channel(FillState::Connecting);
        Self {
            digest,
            path,
            state,
            entitled: Mutex::new(vec![(route.upstream, route.local.clone())]),
            spool: std::sync::OnceLock::new(),
            tail: Mutex::new(Tail::default()),
            written: AtomicU64::new(0),
        }
    }

    /// Where the bytes at `pos` (up to `limit`, all arrived) are: in memory or in the spool.
    pub fn tail_piece(&self, pos: u64, limit: u64) -> Piece {
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(pos, limit)
    }

    /// The shared read handle on the spool, once it exists.
    pub fn spool(&self) -> Option<Arc<File>> {
        self.spool.get().cloned()
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Hands the next received batch to readers: into the tail (dropping what the spool holds
    /// beyond the budget), then announces it.
    pub(super) fn received(&self, batch: &[Bytes], received: u64) {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).push(
            batch,
            self.written.load(Ordering::Acquire),
            TAIL_BUDGET,
        );
        // Only while streaming: a final state set meanwhile is never overwritten.
        self.state.send_if_modified(|s| match s {
            FillState::Streaming { received: r, .. } => {
                *r = received;
                true
            }
            _ => false,
        });
    }

    /// The disk caught up to `written`: pieces beyond the budget it now holds may go.
    fn trim_tail(&self, written: u64) {
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trim(written, TAIL_BUDGET);
    }

    /// The fill is committed: its bytes are all in the spool, so the tail's memory goes. (A
    /// failed fill keeps its tail until the `Fill` goes: its disk worker may still be writing,
    /// and "before the tail" must keep meaning "on disk".)
    fn release_tail(&self) {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// Whether `route` may read this fill without asking its upstream first.
    pub fn entitles(&self, route: &MirrorRoute) -> bool {
        self.entitled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(u, l)| *u == route.upstream && *l == route.local)
    }

    fn entitle(&self, route: &MirrorRoute) {
        let mut e = self.entitled.lock().unwrap_or_else(|p| p.into_inner());
        if !e
            .iter()
            .any(|(u, l)| *u == route.upstream && *l == route.local)
        {
            e.push((route.upstream, route.local.clone()));
        }
    }

    fn failed(&self) -> bool {
        matches!(*self.state.borrow(), FillState::Failed(_))
    }
}

type Table = Arc<Mutex<HashMap<Digest, Arc<Fill>>>>;

pub struct Fills {
    inflight: Table,
    /// Per upstream: its download slots (`max_concurrent_fills`).
    slots: Vec<Arc<Semaphore>>,
}

/// What `join_or_start` did.
pub enum Joined {
    /// Started a fill for this route.
    Started(Arc<Fill>),
    /// Joined the fill in flight.
    Joined(Arc<Fill>),
    /// A fill started by another route is in flight: the caller's upstream must confirm the
    /// blob for its repository first, then call again with `confirmed`.
    Unconfirmed,
}

/// How many times a dropped upstream body is resumed with a Range request.
const RESUMES: usize = 3;
/// Longest wait for the next piece of an upstream body before it counts as dropped.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a fill waits for a download slot of its upstream (as long as a response's headers
/// may take): then its readers get 503.
pub const QUEUE_TIMEOUT: Duration = super::upstream::HEADER_TIMEOUT;
/// The most a blob body may carry when neither its GET nor a HEAD said how long it is.
pub const MAX_UNSIZED_BLOB: u64 = 16 << 30;
/// Upstream bytes already received are handed to the writer in batches of up to this much.
pub(super) const WRITE_BATCH: usize = 1 << 20;
/// Batches queued for the writer before the download waits for the disk.
const WRITE_QUEUE: usize = 8;
/// Received bytes a fill keeps in memory for readers that keep up, beyond those the writer has
/// not yet put in the spool (its queue and the batch in hand, which are kept regardless).
const TAIL_BUDGET: usize = 4 << 20;

impl Fills {
    pub fn new(config: &Config) -> Self {
        Self {
            inflight: Table::default(),
            slots: config
                .upstreams
                .iter()
                .map(|u| Arc::new(Semaphore::new(u.max_concurrent_fills.max(1))))
                .collect(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The fill in flight for `digest`, if any.
    /// A failed fill is on its way out of the table and counts as none.
    pub fn in_flight_for(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .filter(|f| !f.failed())
            .cloned()
    }

    /// The fill for `digest`: joins one in flight that `route` is entitled to (or, with
    /// `confirmed`, any), or starts one.
    pub fn join_or_start(
        &self,
        cx: &Context,
        route: &MirrorRoute,
        digest: &Digest,
        confirmed: bool,
    ) -> Joined {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // A fill that already failed is on its way out of the map: start afresh, don't inherit
        // its error.
        if let Some(f) = map.get(digest)
            && !f.failed()
        {
            if f.entitles(route) {
                return Joined::Joined(f.clone());
            }
            if !confirmed {
                return Joined::Unconfirmed;
            }
            f.entitle(route);
            return Joined::Joined(f.clone());
        }
        let id = format!("fill-{}", uuid::Uuid::new_v4());
        let fill = Arc::new(Fill::new(
            digest.clone(),
            cx.store.ingest_path_for_fill(&id),
            route,
        ));
        map.insert(digest.clone(), fill.clone());
        drop(map);
        cx.store.claim_ingest(&id);
        let guard = {
            let cx = cx.clone();
            let id = id.clone();
            Guard {
                table: self.inflight.clone(),
                fill: fill.clone(),
                on_end: Some(Box::new(move || cx.store.release_ingest(&id))),
            }
        };
        let slot = self.slots.get(route.upstream).cloned();
        let (cx, route, f) = (cx.clone(), route.clone(), fill.clone());
        tokio::spawn(async move {
            let client = cx.proxy.client(route.upstream).clone();
            // In the cluster profile the fill may come from the bucket or another replica.
            let outcome = match cx.proxy.cluster() {
                Some(cluster) => {
                    super::cluster_fill::run(&cx, cluster, &client, &route, &f, slot).await
                }
                None => run(&cx, &client, &route, &f, slot).await,
            };
            match outcome {
                Ok(size) => {
                    f.state.send_replace(FillState::Done { size });
                    f.release_tail();
                }
                Err(e) => {
                    if matches!(
                        e,
                        FillError::DigestMismatch { .. } | FillError::SizeMismatch { .. }
                    ) {
                        cx.metrics
                            .digest_mismatches
                            .with_label_values(&[&client.name])
                            .inc();
                        tracing::warn!(digest = %f.digest, upstream = %client.name, error = %e, "upstream blob failed verification; not cached");
                    }
                    let path = f.path.clone();
                    let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                    f.state.send_replace(FillState::Failed(e));
                }
            }
            drop(guard);
        });
        Joined::Started(fill)
    }
}

/// Ends a fill however its task ends. Dropped at the end of the task, or while unwinding a
/// panic, or with the task when it is cancelled: readers still waiting get `Aborted` instead
/// of waiting forever, and the table entry goes — this fill's own, never a newer fill that
/// replaced a failed one under the same digest.
struct Guard {
    table: Table,
    fill: Arc<Fill>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let aborted = self.fill.state.send_if_modified(|s| {
            if matches!(s, FillState::Done { .. } | FillState::Failed(_)) {
                false
            } else {
                *s = FillState::Failed(FillError::Aborted);
                true
            }
        });
        if aborted {
            tracing::error!(digest = %self.fill.digest, "blob fill ended without an outcome (panic or cancellation)");
            let _ = std::fs::remove_file(&self.fill.path);
        }
        if let Some(f) = self.on_end.take() {
            f();
        }
        let mut map = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.fill.digest)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            map.remove(&self.fill.digest);
        }
    }
}

/// What the writer made of the upstream body.
pub(super) struct Spooled {
    file: File,
    len: u64,
    digest: Digest,
}

/// The fill's two blocking workers, fed the same batches in order: one writes them to the
/// spool and records how much is on disk (so the tail knows what it may drop), the other
/// hashes them. Apart, they run on both cores: hashing is the costliest step of a fill.
pub(super) struct SpoolWriter {
    to_disk: mpsc::Sender<Vec<Bytes>>,
    to_hash: mpsc::Sender<Vec<Bytes>>,
    disk: tokio::task::JoinHandle<std::io::Result<(File, u64)>>,
    hash: tokio::task::JoinHandle<Digest>,
}

impl SpoolWriter {
    fn spawn(file: File, fill: Arc<Fill>) -> Self {
        let (to_disk, mut disk_rx) = mpsc::channel::<Vec<Bytes>>(WRITE_QUEUE);
        let (to_hash, mut hash_rx) = mpsc::channel::<Vec<Bytes>>(WRITE_QUEUE);
        let algorithm = fill.digest.algorithm();
        let disk = tokio::task::spawn_blocking(move || {
            let mut len = 0u64;
            while let Some(batch) = disk_rx.blocking_recv() {
                for data in batch {
                    file.write_all_at(&data, len)?;
                    len += data.len() as u64;
                }
                fill.written.store(len, Ordering::Release);
                fill.trim_tail(len);
            }
            Ok((file, len))
        });
        let hash = tokio::task::spawn_blocking(move || {
            let mut hasher = Digester::new(algorithm);
            while let Some(batch) = hash_rx.blocking_recv() {
                for data in batch {
                    hasher.update(&data);
                }
            }
            hasher.finish()
        });
        Self {
            to_disk,
            to_hash,
            disk,
            hash,
        }
    }

    /// Hands a batch to both workers; false if either stopped (`finish` says why).
    pub(super) async fn send(&self, batch: Vec<Bytes>) -> bool {
        self.to_hash.send(batch.clone()).await.is_ok() && self.to_disk.send(batch).await.is_ok()
    }

    /// Waits for both workers to finish what they were sent.
    pub(super) async fn finish(self) -> Result<Spooled, FillError> {
        let Self {
            to_disk,
            to_hash,
            disk,
            hash,
        } = self;
        drop((to_disk, to_hash));
        let store_error = |e: &dyn std::fmt::Display| FillError::Store(e.to_string());
        let (file, len) = disk
            .await
            .map_err(|e| store_error(&e))?
            .map_err(|e| store_error(&e))?;
        let digest = hash.await.map_err(|e| store_error(&e))?;
        Ok(Spooled { file, len, digest })
    }
}

pub(super) async fn run(
    cx: &Context,
    client: &UpstreamClient,
    route: &MirrorRoute,
    fill: &Arc<Fill>,
    slot: Option<Arc<Semaphore>>,
) -> Result<u64, FillError> {
    let _permit = match slot {
        Some(slot) => Some(match slot.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                fill.state.send_replace(FillState::Queued);
                let p = tokio::time::timeout(QUEUE_TIMEOUT, slot.acquire_owned())
                    .await
                    .map_err(|_| {
                        tracing::warn!(upstream = %client.name, digest = %fill.digest, "no download slot within {QUEUE_TIMEOUT:?} (max_concurrent_fills)");
                        FillError::Busy
                    })?
                    .map_err(|_| FillError::Busy)?;
                fill.state.send_replace(FillState::Connecting);
                p
            }
        }),
        None => None,
    };
    let suffix = format!("/blobs/{}", fill.digest);
    let resp = cx
        .proxy
        .ask(&cx.metrics, route, Method::GET, &suffix, &[])
        .await
        .map_err(|e| FillError::Upstream(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(FillError::Status(resp.status()));
    }
    if let Some(d) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        && d != fill.digest.to_string()
    {
        return Err(FillError::DigestMismatch {
            expected: fill.digest.to_string(),
            actual: d.to_string(),
        });
    }
    let size = match content_length(resp.headers()) {
        Some(n) => Some(n),
        // A chunked body: the size is known for sure only once it hashes right; a HEAD may
        // tell it now (and is held to it), so readers can stream meanwhile.
        None => super::blob::upstream_size(cx, route, &fill.digest)
            .await
            .ok()
            .flatten(),
    };
    let writer = open_spool(fill, size).await?;
    let mut received = 0u64;
    let mut body = resp.into_body();
    let mut resumes = 0;
    // A frame (or the end, or an error) taken while filling a batch, handled next round.
    let mut pending = None;
    loop {
        let frame = match pending.take() {
            Some(f) => Ok(f),
            None => tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await,
        };
        match frame {
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                // Take what else has arrived already, so the writer wakes once per batch.
                let mut batch = Gather::default();
                batch.add(data);
                while batch.len() < WRITE_BATCH {
                    match body.frame().now_or_never() {
                        Some(Some(Ok(f))) => {
                            if let Ok(d) = f.into_data() {
                                batch.add(d);
                            }
                        }
                        Some(other) => {
                            pending = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                let batch_len = batch.len();
                let batch = batch.finish();
                let got = received + batch_len as u64;
                // Without a size from the upstream, an endless body must not fill the disk.
                let want = size.unwrap_or(MAX_UNSIZED_BLOB);
                if got > want {
                    return Err(FillError::SizeMismatch { want, got });
                }
                fill.received(&batch, got);
                if !writer.send(batch).await {
                    // A worker stopped: the writer's error says why.
                    writer.finish().await?;
                    return Err(FillError::Store("the spool writer stopped".into()));
                }
                received = got;
                cx.metrics
                    .upstream_bytes
                    .with_label_values(&[&client.name])
                    .inc_by(batch_len as u64);
            }
            // The end of a body whose length we know, or of one that had none (chunked: a
            // connection that drops mid-way is an error, not an end).
            Ok(None) if size.is_none_or(|s| received == s) => break,
            // Dropped, stalled or short: resume from where we are.
            other => {
                let reason = match other {
                    Ok(Some(Err(e))) => e.to_string(),
                    Err(_) => format!("no data for {IDLE_TIMEOUT:?}"),
                    _ => format!("body ended after {received} of {size:?} bytes"),
                };
                if resumes >= RESUMES {
                    return Err(FillError::Upstream(format!(
                        "upstream {} body failed ({reason}); gave up after {RESUMES} resumes",
                        client.name
                    )));
                }
                resumes += 1;
                tracing::info!(digest = %fill.digest, received, ?size, %reason, "resuming upstream blob download");
                let resp = ask_from(cx, route, &suffix, received).await?;
                let resumed_at = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if resp.status() != StatusCode::PARTIAL_CONTENT || resumed_at != Some(received) {
                    return Err(FillError::Upstream(format!(
                        "upstream {} cannot resume the download (answered {})",
                        client.name,
                        resp.status()
                    )));
                }
                body = resp.into_body();
            }
        }
    }
    verify_and_commit(cx, fill, writer, &route.local).await
}

/// GETs `suffix` (the blob) from the route's upstream from byte `from` on (a Range request).
pub(super) async fn ask_from(
    cx: &Context,
    route: &MirrorRoute,
    suffix: &str,
    from: u64,
) -> Result<http::Response<hyper::body::Incoming>, FillError> {
    let range = format!("bytes={from}-");
    cx.proxy
        .ask(
            &cx.metrics,
            route,
            Method::GET,
            suffix,
            &[(header::RANGE, range.as_str())],
        )
        .await
        .map_err(|e| FillError::Upstream(e.to_string()))
}

/// Creates the fill's spool, hands readers its read handle and announces the stream (of
/// `size` bytes, if known): the writer to feed.
pub(super) async fn open_spool(
    fill: &Arc<Fill>,
    size: Option<u64>,
) -> Result<SpoolWriter, FillError> {
    let path = fill.path.clone();
    let file = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            // Readers read the spool inline on the async workers: no atime update (an inode
            // write that may wait for the journal) on the way.
            .custom_flags(libc::O_NOATIME)
            .open(path)
    })
    .await
    .map_err(|e| FillError::Store(e.to_string()))?
    .map_err(|e| FillError::Store(e.to_string()))?;
    let readers = file
        .try_clone()
        .map_err(|e| FillError::Store(e.to_string()))?;
    let _ = fill.spool.set(Arc::new(readers));
    fill.state
        .send_replace(FillState::Streaming { size, received: 0 });
    Ok(SpoolWriter::spawn(file, fill.clone()))
}

/// Checks what the writer spooled against the digest, lets readers take their last byte, then
/// makes the blob durable and commits it, linked to `local`.
pub(super) async fn verify_and_commit(
    cx: &Context,
    fill: &Arc<Fill>,
    writer: SpoolWriter,
    local: &RepoName,
) -> Result<u64, FillError> {
    let spooled = writer.finish().await?;
    if spooled.digest != fill.digest {
        return Err(FillError::DigestMismatch {
            expected: fill.digest.to_string(),
            actual: spooled.digest.to_string(),
        });
    }
    let size = spooled.len;
    // Readers get their last byte now; durability is the cache's business, not theirs.
    fill.state.send_replace(FillState::Verified { size });
    let (app2, path2, digest, local) = (
        cx.clone(),
        fill.path.clone(),
        fill.digest.clone(),
        local.clone(),
    );
    tokio::task::spawn_blocking(move || {
        spooled
            .file
            .sync_data()
            .map_err(|e| FillError::Store(e.to_string()))?;
        drop(spooled.file);
        app2.store
            .commit_blob(&path2, &digest, size, &local, None)
            .map_err(|e| FillError::Store(e.to_string()))
    })
    .await
    .map_err(|e| FillError::Store(e.to_string()))??;
    Ok(size)
}

/// The blob's size from a HEAD upstream, if it answers with one.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the fill knows the blob's size (upstream headers arrived, or, for a body of
/// unknown length, it is verified) or fails. A body announced as empty counts as unknown until
/// verified: an empty response would otherwise be complete before anything was checked.
pub async fn wait_for_size(rx: &mut watch::Receiver<FillState>) -> Result<u64, FillError> {
    loop {
        match &*rx.borrow_and_update() {
            FillState::Streaming {
                size: Some(size), ..
            } if *size > 0 => {
                return Ok(*size);
            }
            FillState::Verified { size } | FillState::Done { size } => {
                return Ok(*size);
            }
            FillState::Failed(e) => return Err(e.clone()),
            FillState::Queued | FillState::Connecting | FillState::Streaming { .. } => {}
        }
        if rx.changed().await.is_err() {
            return Err(FillError::Aborted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(upstream: usize, local: &str) -> MirrorRoute {
        MirrorRoute {
            upstream,
            remote: "library/x".parse().expect("name"),
            local: local.parse().expect("name"),
        }
    }

    fn fill(table: &Table, seed: &[u8], dir: &std::path::Path) -> (Arc<Fill>, Guard) {
        let digest = Digest::sha256_of(seed);
        let f = Arc::new(Fill::new(
            digest.clone(),
            dir.join("spool"),
            &route(0, "docker.io/library/x"),
        ));
        table.lock().expect("table").insert(digest, f.clone());
        let guard = Guard {
            table: table.clone(),
            fill: f.clone(),
            on_end: None,
        };
        (f, guard)
    }

    #[tokio::test]
    async fn a_panicking_fill_task_fails_its_readers_and_leaves_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = Table::default();
        let (f, guard) = fill(&table, b"a", dir.path());
        let mut rx = f.subscribe();
        let task = tokio::spawn(async move {
            let _guard = guard;
            f.state.send_replace(FillState::Streaming {
                size: Some(10),
                received: 5,
            });
            panic!("injected");
        });
        assert!(task.await.is_err(), "the task panicked");
        let got = wait_for_size(&mut rx).await;
        assert!(matches!(got, Err(FillError::Aborted)), "{got:?}");
        assert!(table.lock().expect("table").is_empty());
    }

    /// An upstream announcing an empty body: no reader may start (and so complete) an empty
    /// response before the digest is checked.
    #[tokio::test]
    async fn an_announced_empty_body_is_not_a_size_until_verified() {
        let (tx, mut rx) = watch::channel(FillState::Connecting);
        let waiter = tokio::spawn(async move { wait_for_size(&mut rx).await });
        tx.send_replace(FillState::Streaming {
            size: Some(0),
            received: 0,
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "an announced size of 0 is not enough"
        );
        tx.send_replace(FillState::Failed(FillError::DigestMismatch {
            expected: "a".into(),
            actual: "b".into(),
        }));
        let got = waiter.await.expect("waiter");
        assert!(
            matches!(got, Err(FillError::DigestMismatch { .. })),
            "{got:?}"
        );
        let (tx, mut rx) = watch::channel(FillState::Verified { size: 0 });
        assert_eq!(wait_for_size(&mut rx).await.ok(), Some(0));
        drop(tx);
    }

    #[tokio::test]
    async fn a_cancelled_fill_task_wakes_waiting_readers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = Table::default();
        let (f, guard) = fill(&table, b"b", dir.path());
        let mut rx = f.subscribe();
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        let waiter = tokio::spawn(async move { wait_for_size(&mut rx).await });
        task.abort();
        let got = waiter.await.expect("waiter");
        assert!(matches!(got, Err(FillError::Aborted)), "{got:?}");
        assert!(table.lock().expect("table").is_empty());
    }

    #[test]
    fn an_ending_fill_removes_only_its_own_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = Table::default();
        let (old, guard) = fill(&table, b"c", dir.path());
        old.state.send_replace(FillState::Failed(FillError::Status(
            StatusCode::BAD_GATEWAY,
        )));
        // A newcomer replaced the failed fill under the same digest.
        let (new, new_guard) = fill(&table, b"c", dir.path());
        drop(guard);
        let map = table.lock().expect("table");
        let entry = map.get(&new.digest).expect("the newcomer's entry survives");
        assert!(Arc::ptr_eq(entry, &new));
        drop(map);
        assert!(
            matches!(*old.state.borrow(), FillState::Failed(FillError::Status(_))),
            "a final state is kept"
        );
        drop(new_guard);
        assert!(table.lock().expect("table").is_empty());
    }

    #[test]
    fn only_confirmed_routes_are_entitled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fill::new(
            Digest::sha256_of(b"d"),
            dir.path().join("s"),
            &route(1, "private.example/team/secret"),
        );
        assert!(f.entitles(&route(1, "private.example/team/secret")));
        assert!(!f.entitles(&route(0, "private.example/team/secret")));
        assert!(!f.entitles(&route(1, "private.example/team/other")));
        f.entitle(&route(0, "docker.io/library/x"));
        assert!(f.entitles(&route(0, "docker.io/library/x")));
    }
}
