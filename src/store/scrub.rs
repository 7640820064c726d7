//! Scrub: an online, rate-limited re-hash of every stored blob, so bytes damaged at rest are
//! found and stop being served instead of being served forever. A blob whose file does not
//! hash to its digest (or has the wrong size, cannot be read, or is gone) is quarantined the
//! way `fsck --repair` does it: the file moves to `quarantine/`, the blob record and every
//! repository link to it leave the index. A private repository then answers 404
//! (`BLOB_UNKNOWN`) until the blob is pushed again; a pull-through cache repository fetches it
//! from upstream again at the next pull.
//!
//! A pass reads at most `rate` bytes per second on average, leaves the page cache as it found
//! it (pages it had to read from disk are dropped again), and checks its `should_stop` between
//! pieces of 1 MiB, so it can be cancelled at any time without leaving anything half done.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use super::index::{self, CF_BLOBS, CF_LINKS};
use super::{Store, StoreError, pagecache};
use crate::oci::{Digest, Digester};

/// Bytes hashed between two looks at the rate and at `should_stop`.
const PIECE: usize = 1 << 20;
/// Blob records read from the index at a time (a pass never holds the whole list).
const BATCH: usize = 256;

/// What a pass did.
#[derive(Debug, Default)]
pub struct ScrubReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Blobs found damaged and quarantined, with what was wrong.
    pub quarantined: Vec<(Digest, String)>,
    /// False if `should_stop` ended the pass early.
    pub completed: bool,
}

impl std::fmt::Display for ScrubReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checked {} blobs ({} bytes), quarantined {}{}",
            self.blobs_checked,
            self.bytes_checked,
            self.quarantined.len(),
            if self.completed {
                ""
            } else {
                " (stopped early)"
            }
        )
    }
}

/// Progress reported while a pass runs (for metrics and logs).
#[derive(Debug)]
pub enum ScrubEvent<'a> {
    /// This many more bytes were read and hashed.
    Read(u64),
    /// A damaged blob was quarantined.
    Quarantined {
        digest: &'a Digest,
        problem: &'a str,
    },
}

/// The identity of a blob file as it was hashed: a file put in its place later is not the one
/// found damaged.
type FileId = Option<(u64, u64)>;

enum Verdict {
    Good,
    /// Removed (by GC) while the pass ran: nothing to check.
    Gone,
    Bad(String, FileId),
    Stopped,
}

/// Keeps the average read rate of a pass at or below `rate` bytes per second (0: no limit),
/// allowing at most a second of catch-up after a slow stretch.
struct Pacer {
    rate: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `n` bytes read and waits until they fit the rate; false if `should_stop`
    /// said so while waiting.
    fn take(&mut self, n: u64, should_stop: &dyn Fn() -> bool) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.since.elapsed();
        if elapsed > due + Duration::from_secs(1) {
            self.since += elapsed - due - Duration::from_secs(1);
        }
        loop {
            let elapsed = self.since.elapsed();
            if elapsed >= due {
                return true;
            }
            if should_stop() {
                return false;
            }
            std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
        }
    }
}

impl Store {
    /// One pass over every blob stored when it starts (blobs committed meanwhile wait for the
    /// next pass), reading at most `rate` bytes per second (0: no limit). Blocking: run it on a
    /// blocking thread. `should_stop` is checked between pieces; `observe` hears the progress.
    pub fn scrub_pass(
        &self,
        rate: u64,
        should_stop: &dyn Fn() -> bool,
        observe: &mut dyn FnMut(ScrubEvent<'_>),
    ) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        let mut pacer = Pacer::new(rate);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut records = Vec::with_capacity(BATCH);
            self.index.scan(CF_BLOBS, b"", after.as_deref(), |k, v| {
                if after.as_deref() == Some(k) {
                    return true;
                }
                records.push((k.to_vec(), v.to_vec()));
                records.len() < BATCH
            })?;
            let Some((last, _)) = records.last() else {
                report.completed = true;
                return Ok(report);
            };
            after = Some(last.clone());
            for (k, v) in records {
                if should_stop() {
                    return Ok(report);
                }
                // Records that do not parse are fsck's business.
                let Ok(digest) = String::from_utf8_lossy(&k).parse::<Digest>() else {
                    continue;
                };
                let Ok([size, _]) = index::decode_u64s::<2>(CF_BLOBS, &v) else {
                    continue;
                };
                let mut read = 0u64;
                let verdict = self.check_blob(&digest, size, &mut |n| {
                    read += n;
                    observe(ScrubEvent::Read(n));
                    pacer.take(n, should_stop)
                })?;
                report.bytes_checked += read;
                match verdict {
                    Verdict::Good => report.blobs_checked += 1,
                    Verdict::Gone => {}
                    Verdict::Stopped => return Ok(report),
                    Verdict::Bad(problem, seen) => {
                        report.blobs_checked += 1;
                        if self.quarantine_blob(&digest, seen)? {
                            observe(ScrubEvent::Quarantined {
                                digest: &digest,
                                problem: &problem,
                            });
                            report.quarantined.push((digest, problem));
                        }
                    }
                }
            }
        }
    }

    /// Hashes one blob file, telling `progress` about every piece read (it returns false to
    /// stop). Pages that were not cached before are dropped from the cache again.
    fn check_blob(
        &self,
        digest: &Digest,
        size: u64,
        progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Verdict, StoreError> {
        let file = match File::open(self.blobs.path(digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(if self.has_blob_anywhere(digest)? {
                    Verdict::Bad("the blob file is missing".into(), None)
                } else {
                    Verdict::Gone
                });
            }
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        let seen = Some((meta.dev(), meta.ino()));
        let mut hasher = Digester::new(digest.algorithm());
        let mut buf = vec![0u8; PIECE];
        let mut scratch = Vec::new();
        let mut offset = 0u64;
        loop {
            let want = usize::try_from(meta.len().saturating_sub(offset))
                .unwrap_or(PIECE)
                .clamp(1, PIECE);
            let cached = pagecache::file_range_resident(&file, offset, want, &mut scratch);
            let n = match file.read_at(&mut buf[..want], offset) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok(Verdict::Bad(format!("cannot read the file: {e}"), seen)),
            };
            if !cached {
                pagecache::drop_cached(&file, offset, n as u64);
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
            if !progress(n as u64) {
                return Ok(Verdict::Stopped);
            }
        }
        if offset != size {
            return Ok(Verdict::Bad(
                format!("the file has {offset} bytes, the index says {size}"),
                seen,
            ));
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Ok(Verdict::Bad(format!("content hashes to {actual}"), seen));
        }
        Ok(Verdict::Good)
    }

    /// Takes a damaged blob out of service: its file (if it is still the one found damaged)
    /// moves to `quarantine/`, its record and repository links leave the index. False if the
    /// blob changed in the meantime (collected, or replaced by a fresh copy).
    fn quarantine_blob(&self, digest: &Digest, seen: FileId) -> Result<bool, StoreError> {
        let digest_key = digest.to_string();
        let links = self.links_to(&digest_key)?;
        {
            // Exclusive: no commit may find the damaged file in place and reuse it, and no
            // mount may link it, between the checks and the index write. Held across one
            // synced write — acceptable for an event this rare, and it keeps the file move
            // and the record removal in the only crash-safe order (record without file is
            // found by the next pass; a damaged file without record would be reused).
            let _gc = self.write_gc_lock();
            let record = self.index.get_with(CF_BLOBS, digest_key.as_bytes(), |v| {
                index::decode_u64s::<2>(CF_BLOBS, v)
            })?;
            let Some(Ok([size, _])) = record else {
                return Ok(false);
            };
            let now = std::fs::metadata(self.blobs.path(digest))
                .ok()
                .map(|m| (m.dev(), m.ino()));
            if now != seen {
                return Ok(false);
            }
            self.blobs.quarantine(digest)?;
            let mut batch = self.index.batch();
            batch.delete(CF_BLOBS, digest_key.as_bytes());
            for l in &links {
                batch.delete(CF_LINKS, l);
            }
            self.index.write_synced(batch)?;
            self.blob_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stored_bytes
                .fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
            self.blob_count
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.forget_links(links.iter().map(|l| l.as_slice()));

        // Links made between the scan above and the lock. No new ones can appear without a
        // new record (mounts need the record; a commit makes one, and its links are good).
        let late = self.links_to(&digest_key)?;
        if !late.is_empty() {
            {
                let _gc = self.write_gc_lock();
                if !self.index.exists(CF_BLOBS, digest_key.as_bytes())? {
                    let mut batch = self.index.batch();
                    for l in &late {
                        batch.delete(CF_LINKS, l);
                    }
                    self.index.write_synced(batch)?;
                }
            }
            self.forget_links(late.iter().map(|l| l.as_slice()));
        }
        Ok(true)
    }

    /// Every repository link to `digest_key` (a full scan of the links: rare use only).
    fn links_to(&self, digest_key: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        self.index.scan(CF_LINKS, b"", None, |k, _| {
            if let Some(pos) = k.iter().rposition(|&b| b == 0)
                && &k[pos + 1..] == digest_key.as_bytes()
            {
                out.push(k.to_vec());
            }
            true
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_pacer_never_waits_and_a_limited_one_stops_on_request() {
        let mut free = Pacer::new(0);
        assert!(free.take(u64::MAX / 2, &|| true));
        // 1 byte per second, 10 bytes owed: it waits, so a stop request ends the wait.
        let mut slow = Pacer::new(1);
        assert!(!slow.take(10, &|| true));
    }
}
