//! Single-flight blob fills. One upstream download per digest, however many clients ask: the
//! first request starts a detached fill task; every request (first included) follows it. The
//! task writes to `ingest/fill-<uuid>` while hashing; readers follow the growing file from
//! byte 0 or their Range as bytes land, so headers go out as soon as the upstream answers. The
//! fill continues when clients disconnect, resumes a dropped upstream body with a Range
//! request, and commits only after digest and size are verified. No reader receives the last
//! byte before the whole blob is verified, so a corrupt upstream body never looks complete: on
//! a mismatch nothing is committed and every reader's stream is aborted. The fsync and commit
//! come after the readers' last byte; requests arriving meanwhile still follow the spool.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::MirrorRoute;
use super::upstream::UpstreamClient;
use crate::App;
use crate::oci::{Digest, Digester};

/// A fill's progress, broadcast to its readers.
#[derive(Debug, Clone)]
pub enum FillState {
    Connecting,
    Streaming {
        size: u64,
        written: u64,
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
}

pub struct Fill {
    pub digest: Digest,
    path: PathBuf,
    state: watch::Sender<FillState>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }
}

#[derive(Default)]
pub struct Fills {
    inflight: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// How many times a dropped upstream body is resumed with a Range request.
const RESUMES: usize = 3;
/// Longest wait for the next piece of an upstream body before it counts as dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest piece a reader takes from the spool at once.
const READ_PIECE: u64 = 512 << 10;
/// Smallest piece a caught-up reader sends after its first (unless the blob is complete).
const BATCH: u64 = 256 << 10;
/// Longest a reader holds back bytes it has while waiting for a full batch.
const BATCH_WAIT: Duration = Duration::from_millis(50);

impl Fills {
    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The fill in flight for `digest`, if any.
    pub fn in_flight_for(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// The fill for `digest`: joins one in flight (`false`) or starts one (`true`).
    pub fn join_or_start(
        &self,
        app: &Arc<App>,
        route: &MirrorRoute,
        digest: &Digest,
    ) -> (Arc<Fill>, bool) {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        // A fill that already failed is on its way out of the map: start afresh, don't inherit
        // its error.
        if let Some(f) = map.get(digest)
            && !matches!(*f.state.borrow(), FillState::Failed(_))
        {
            return (f.clone(), false);
        }
        let id = format!("fill-{}", uuid::Uuid::new_v4());
        let (tx, _) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            path: app.store.ingest_path_for_fill(&id),
            state: tx,
        });
        map.insert(digest.clone(), fill.clone());
        drop(map);
        let (app, route, f) = (app.clone(), route.clone(), fill.clone());
        tokio::spawn(async move {
            let client = app.proxy.client(route.upstream).clone();
            let outcome = run(&app, &client, &route, &f, &id).await;
            match outcome {
                Ok(size) => {
                    f.state.send_replace(FillState::Done { size });
                }
                Err(e) => {
                    if matches!(
                        e,
                        FillError::DigestMismatch { .. } | FillError::SizeMismatch { .. }
                    ) {
                        app.metrics
                            .digest_mismatches
                            .with_label_values(&[&client.name])
                            .inc();
                        tracing::warn!(digest = %f.digest, upstream = %client.name, error = %e, "upstream blob failed verification; not cached");
                    }
                    let _ = std::fs::remove_file(&f.path);
                    f.state.send_replace(FillState::Failed(e));
                }
            }
            app.store.release_ingest(&id);
            app.proxy
                .fills
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&f.digest);
        });
        (fill, true)
    }
}

async fn run(
    app: &Arc<App>,
    client: &UpstreamClient,
    route: &MirrorRoute,
    fill: &Fill,
    id: &str,
) -> Result<u64, FillError> {
    app.store.claim_ingest(id);
    let suffix = format!("/blobs/{}", fill.digest);
    let resp = app
        .proxy
        .ask(&app.metrics, route, Method::GET, &suffix, &[])
        .await
        .map_err(|e| FillError::Upstream(e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(FillError::Status(resp.status()));
    }
    let size = content_length(resp.headers()).ok_or_else(|| {
        FillError::Upstream("upstream sent no Content-Length for the blob".into())
    })?;
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
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .open(&fill.path)
        .map_err(|e| FillError::Store(e.to_string()))?;
    fill.state
        .send_replace(FillState::Streaming { size, written: 0 });
    let mut hasher = Digester::new(fill.digest.algorithm());
    let mut written = 0u64;
    let mut body = resp.into_body();
    let mut resumes = 0;
    loop {
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await;
        match frame {
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if written + data.len() as u64 > size {
                    return Err(FillError::SizeMismatch {
                        want: size,
                        got: written + data.len() as u64,
                    });
                }
                file.write_all_at(&data, written)
                    .map_err(|e| FillError::Store(e.to_string()))?;
                hasher.update(&data);
                written += data.len() as u64;
                app.metrics
                    .upstream_bytes
                    .with_label_values(&[&client.name])
                    .inc_by(data.len() as u64);
                fill.state
                    .send_replace(FillState::Streaming { size, written });
            }
            Ok(None) if written == size => break,
            // Dropped, stalled or short: resume from where we are.
            other => {
                let reason = match other {
                    Ok(Some(Err(e))) => e.to_string(),
                    Err(_) => format!("no data for {IDLE_TIMEOUT:?}"),
                    _ => format!("body ended after {written} of {size} bytes"),
                };
                if resumes >= RESUMES {
                    return Err(FillError::Upstream(format!(
                        "upstream body failed ({reason}); gave up after {RESUMES} resumes"
                    )));
                }
                resumes += 1;
                tracing::info!(digest = %fill.digest, written, size, %reason, "resuming upstream blob download");
                let range = format!("bytes={written}-");
                let resp = app
                    .proxy
                    .ask(
                        &app.metrics,
                        route,
                        Method::GET,
                        &suffix,
                        &[(header::RANGE, range.as_str())],
                    )
                    .await
                    .map_err(|e| FillError::Upstream(e.to_string()))?;
                let resumed_at = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if resp.status() != StatusCode::PARTIAL_CONTENT || resumed_at != Some(written) {
                    return Err(FillError::Upstream(format!(
                        "upstream cannot resume the download (answered {})",
                        resp.status()
                    )));
                }
                body = resp.into_body();
            }
        }
    }
    let actual = hasher.finish();
    if actual != fill.digest {
        return Err(FillError::DigestMismatch {
            expected: fill.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    // Readers get their last byte now; durability is the cache's business, not theirs.
    fill.state.send_replace(FillState::Verified { size });
    file.sync_data()
        .map_err(|e| FillError::Store(e.to_string()))?;
    drop(file);
    let (app2, path2, digest, local) = (
        app.clone(),
        fill.path.clone(),
        fill.digest.clone(),
        route.local.clone(),
    );
    tokio::task::spawn_blocking(move || {
        app2.store.commit_blob(&path2, &digest, size, &local, None)
    })
    .await
    .map_err(|e| FillError::Store(e.to_string()))?
    .map_err(|e| FillError::Store(e.to_string()))?;
    Ok(size)
}

pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the fill knows the blob's size (upstream headers arrived) or fails.
pub async fn wait_for_size(rx: &mut watch::Receiver<FillState>) -> Result<u64, FillError> {
    loop {
        match &*rx.borrow_and_update() {
            FillState::Streaming { size, .. }
            | FillState::Verified { size }
            | FillState::Done { size } => {
                return Ok(*size);
            }
            FillState::Failed(e) => return Err(e.clone()),
            FillState::Connecting => {}
        }
        if rx.changed().await.is_err() {
            return Err(FillError::Upstream("fill ended unexpectedly".into()));
        }
    }
}

/// A reader following a fill: bytes `pos..end` of the blob, as they land.
pub fn follow(
    app: Arc<App>,
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    pos: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let follower = Follower {
        app,
        fill,
        rx,
        file: None,
        pos,
        end,
        finished: false,
        sent_any: false,
    };
    futures_util::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
}

struct Follower {
    app: Arc<App>,
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    file: Option<File>,
    pos: u64,
    end: u64,
    finished: bool,
    sent_any: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished || self.pos >= self.end {
            return None;
        }
        loop {
            let avail = match &*self.rx.borrow_and_update() {
                // The last byte is held back until the blob is verified: no client ever
                // receives a complete body that failed verification.
                FillState::Streaming { written, size } => (*written).min(size.saturating_sub(1)),
                FillState::Verified { size } | FillState::Done { size } => *size,
                FillState::Connecting => 0,
                FillState::Failed(e) => {
                    self.finished = true;
                    return Some(Err(std::io::Error::other(e.to_string())));
                }
            };
            // The first piece goes out at once (time to first byte); after that a reader that
            // has caught up waits for a worthwhile batch instead of one upstream frame each.
            let done = matches!(
                *self.rx.borrow(),
                FillState::Verified { .. } | FillState::Done { .. }
            );
            let wanted = if self.sent_any {
                BATCH.min(self.end - self.pos)
            } else {
                1
            };
            if self.pos < avail
                && (done || avail.min(self.end) - self.pos >= wanted || avail >= self.end)
            {
                self.sent_any = true;
                return Some(self.read(avail));
            }
            // Bytes are waiting but not yet a batch: wait a little for more, then send what
            // there is, so a stalled upstream never starves a reader of bytes already here.
            let changed = if self.pos < avail {
                match tokio::time::timeout(BATCH_WAIT, self.rx.changed()).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.sent_any = true;
                        return Some(self.read(avail));
                    }
                }
            } else {
                self.rx.changed().await
            };
            // The Fill (and so the sender) lives as long as this reader, so this only
            // errs if the fill task vanished without a final state.
            if changed.is_err() {
                self.finished = true;
                return Some(Err(std::io::Error::other(
                    "fill ended before the blob was complete",
                )));
            }
        }
    }

    fn read(&mut self, avail: u64) -> Result<Bytes, std::io::Error> {
        if self.file.is_none() {
            // The spool, or the committed blob if the fill finished before we opened it.
            self.file = File::open(&self.fill.path)
                .ok()
                .or_else(|| self.app.store.open_blob(&self.fill.digest).ok());
        }
        let Some(f) = &self.file else {
            self.finished = true;
            return Err(std::io::Error::other("blob vanished during fill"));
        };
        let n = (avail.min(self.end) - self.pos).min(READ_PIECE);
        let mut buf = vec![0u8; n as usize];
        if let Err(e) = f.read_exact_at(&mut buf, self.pos) {
            self.finished = true;
            return Err(e);
        }
        self.pos += n;
        Ok(Bytes::from(buf))
    }
}
