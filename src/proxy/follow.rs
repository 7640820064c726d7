//! A client's view of a fill: bytes `pos..end` of the blob as they arrive. A reader that keeps
//! up takes the fill's in-memory tail (the upstream's own buffers, no copy); one that fell
//! behind reads the spool: inline when the pages are cached, else on the blocking pool. The last byte waits until the blob is
//! verified, so no client ever receives a complete body that failed verification.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::Context;
use super::fill::{Fill, FillState};
use super::tail::Piece;
use crate::store::pagecache;

/// Largest piece a reader takes from the spool at once.
const READ_PIECE: u64 = 256 << 10;
/// Smallest batch a caught-up reader waits for after its first piece (unless the blob is
/// complete), so a client gets a few worthwhile writes rather than a trickle.
const BATCH: u64 = 256 << 10;
/// Longest a reader holds back bytes it has while waiting for a full batch.
const BATCH_WAIT: Duration = Duration::from_millis(50);

/// A reader following a fill: bytes `pos..end` of the blob, as they land.
pub fn follow(
    cx: Context,
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    pos: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let follower = Follower {
        cx,
        fill,
        rx,
        file: None,
        pos,
        end,
        burst_until: pos,
        finished: false,
        sent_any: false,
    };
    futures_util::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
}

struct Follower {
    cx: Context,
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    file: Option<Arc<File>>,
    pos: u64,
    end: u64,
    /// Bytes up to here are known to have arrived and are being sent without waiting.
    burst_until: u64,
    finished: bool,
    sent_any: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished || self.pos >= self.end {
            return None;
        }
        // A failed fill ends every stream at once, bursts included.
        if let FillState::Failed(e) = &*self.rx.borrow() {
            self.finished = true;
            return Some(Err(std::io::Error::other(e.to_string())));
        }
        if self.pos < self.burst_until {
            return Some(self.read(self.burst_until).await);
        }
        loop {
            let (avail, done) = match &*self.rx.borrow_and_update() {
                // The last byte is held back until the blob is verified.
                FillState::Streaming {
                    received,
                    size: Some(size),
                } => ((*received).min(size.saturating_sub(1)), false),
                FillState::Verified { size } | FillState::Done { size } => (*size, true),
                FillState::Queued
                | FillState::Connecting
                | FillState::Streaming { size: None, .. } => (0, false),
                FillState::Failed(e) => {
                    self.finished = true;
                    return Some(Err(std::io::Error::other(e.to_string())));
                }
            };
            let limit = avail.min(self.end);
            // The first piece goes out at once (time to first byte); after that a reader that
            // has caught up waits for a worthwhile batch instead of one upstream frame each.
            let wanted = if self.sent_any {
                BATCH.min(self.end - self.pos)
            } else {
                1
            };
            if self.pos < limit && (done || limit - self.pos >= wanted || limit == self.end) {
                return Some(self.burst(limit).await);
            }
            // Bytes are waiting but not yet a batch: wait a little for more, then send what
            // there is, so a stalled upstream never starves a reader of bytes already here.
            let changed = if self.pos < limit {
                match tokio::time::timeout(BATCH_WAIT, self.rx.changed()).await {
                    Ok(r) => r,
                    Err(_) => return Some(self.burst(limit).await),
                }
            } else {
                self.rx.changed().await
            };
            // The Fill (and so the sender) lives as long as this reader, and the fill's guard
            // always leaves a final state, so this only errs if that guarantee broke.
            if changed.is_err() {
                self.finished = true;
                return Some(Err(std::io::Error::other(
                    "fill ended before the blob was complete",
                )));
            }
        }
    }

    /// Starts sending everything up to `limit` (all of it has arrived) without waiting.
    async fn burst(&mut self, limit: u64) -> Result<Bytes, std::io::Error> {
        self.sent_any = true;
        self.burst_until = limit;
        self.read(limit).await
    }

    /// The next piece before `limit`: from the fill's tail when it still holds `pos`, else
    /// from the spool (or the committed blob): inline if its pages are cached, else on the
    /// blocking pool.
    async fn read(&mut self, limit: u64) -> Result<Bytes, std::io::Error> {
        let upto = match self.fill.tail_piece(self.pos, limit) {
            Piece::Memory(data) if !data.is_empty() => {
                self.pos += data.len() as u64;
                return Ok(data);
            }
            Piece::Memory(_) => limit,
            Piece::Spool { upto } => upto,
        };
        let n = (upto - self.pos).min(READ_PIECE);
        // Just written, the spool is nearly always in the page cache: read it here without a
        // hop to the blocking pool when that needs no wait for the disk.
        let mut buf = vec![0u8; n as usize];
        if let Some(file) = self.file.clone().or_else(|| self.fill.spool())
            && let Ok(true) = pagecache::read_if_cached(&file, self.pos, &mut buf)
        {
            self.file = Some(file);
            self.pos += n;
            return Ok(Bytes::from(buf));
        }
        let (file, cx, fill, pos) = (
            self.file.clone(),
            self.cx.clone(),
            self.fill.clone(),
            self.pos,
        );
        let read = tokio::task::spawn_blocking(move || {
            let file = match file.or_else(|| fill.spool()) {
                Some(f) => f,
                // Not reached once the spool exists (see `Fill::spool`); kept as a fallback.
                None => Arc::new(
                    File::open(fill.path())
                        .ok()
                        .or_else(|| cx.store.open_blob(&fill.digest).ok())
                        .ok_or_else(|| std::io::Error::other("blob vanished during fill"))?,
                ),
            };
            file.read_exact_at(&mut buf, pos)?;
            Ok::<_, std::io::Error>((file, buf))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match read {
            Ok((file, buf)) => {
                self.file = Some(file);
                self.pos += n;
                Ok(Bytes::from(buf))
            }
            Err(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }
}
