//! Garbage collection: removes blobs nothing references any more, online and safe while
//! pushes run. A blob is collected when no manifest references it (`blob_refs` has no entry)
//! and it was last committed, mounted or linked longer ago than the grace period — the window
//! in which a push has uploaded layers but not yet its manifest. Also removes orphan files
//! (bytes on disk with no index record, left by a crash between rename and index write) and
//! stale ingest files, both after the grace period.
//!
//! Locking keeps the stop-the-world part to reads and memory writes. Candidates are found with
//! no lock held. Each small group is re-checked and dropped from the index under the exclusive
//! GC lock (every commit, mount and manifest push holds it shared, so none can reference a
//! blob between its re-check and its removal) with a relaxed write: no disk wait under the
//! lock. The WAL is then synced with no lock held; only after that do the files leave, moved to
//! `trash/` under the GC lock (skipped if a commit brought the blob back meanwhile: a commit
//! that finds the file in place reuses it) and unlinked with no lock at all. A crash anywhere
//! leaves a blob indexed with its file, or an orphan file a later run removes — never a
//! durable record without its file. Hot-cache entries of removed links are invalidated under
//! each key's own stripe.

use std::collections::HashMap;
use std::time::SystemTime;

use super::index::{self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, prefix};
use super::{Store, StoreError, unix_now};
use crate::oci::Digest;

/// Candidates re-checked and removed per hold of the exclusive GC lock.
pub(super) const GROUP: usize = 32;
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub links_removed: u64,
    pub orphan_files_removed: u64,
    pub ingest_files_removed: u64,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "removed {} unreferenced blobs ({} bytes, {} repository links), {} orphan blob files, {} stale ingest files",
            self.blobs_removed,
            self.bytes_freed,
            self.links_removed,
            self.orphan_files_removed,
            self.ingest_files_removed
        )
    }
}

fn older_than(meta: &std::fs::Metadata, cutoff: u64) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .is_some_and(|d| d.as_secs() <= cutoff)
}

impl Store {
    pub fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        self.collect_garbage_until(&|| false)
    }

    /// `collect_garbage`, checking `should_stop` between units of work (groups of candidates,
    /// each orphan and ingest file) and returning early once it says so: what was dropped from
    /// the index by then is removed completely, the rest waits for the next run.
    pub fn collect_garbage_until(
        &self,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<GcReport, StoreError> {
        let cutoff = unix_now().saturating_sub(self.options().gc_grace.as_secs());
        let mut report = GcReport::default();
        // One sweep at a time: GC and eviction plan from scans the other would invalidate.
        let _sweep = self.sweep_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Files a previous run moved out but did not get to unlink (crash or stop).
        self.blobs.empty_trash()?;

        // 1. Candidates: old enough and unreferenced (re-checked under the lock below).
        let mut candidates: HashMap<String, u64> = HashMap::new();
        let mut records = Vec::new();
        self.index.scan(CF_BLOBS, b"", None, |k, v| {
            records.push((k.to_vec(), v.to_vec()));
            true
        })?;
        for (k, v) in records {
            let [size, linked_at] = index::decode_u64s::<2>(CF_BLOBS, &v)?;
            let digest = String::from_utf8_lossy(&k).into_owned();
            if linked_at <= cutoff
                && !self
                    .index
                    .any_with_prefix(CF_BLOB_REFS, &prefix(&[&digest]))?
            {
                candidates.insert(digest, size);
            }
        }

        if !candidates.is_empty() {
            // 2. The repository links of each candidate. A recent push's link keeps its blob
            // (its manifest may still arrive); a push that links it after this scan moves the
            // blob's `linked_at`, which the re-check below sees.
            let mut links: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
            let now = unix_now();
            let mut pushed = Vec::new();
            self.index.scan(CF_LINKS, b"", None, |k, v| {
                if let Some(pos) = k.iter().rposition(|&b| b == 0) {
                    let digest = String::from_utf8_lossy(&k[pos + 1..]);
                    if candidates.contains_key(digest.as_ref()) {
                        if self.kept_for_push(v, now) {
                            pushed.push(digest.to_string());
                        }
                        links
                            .entry(digest.into_owned())
                            .or_default()
                            .push(k.to_vec());
                    }
                }
                true
            })?;
            for d in pushed {
                candidates.remove(&d);
            }

            // 3. Re-check and drop from the index, group by group.
            let candidates: Vec<(String, u64, u64)> = candidates
                .into_iter()
                .map(|(d, size)| (d, size, cutoff))
                .collect();
            let mut unindexed = Vec::new();
            for group in candidates.chunks(GROUP) {
                if should_stop() {
                    break;
                }
                self.unindex_group(group, &links, &mut unindexed, &mut report)?;
            }

            // 4. Their files, once the index change is durable.
            self.remove_unindexed_files(&unindexed)?;
        }

        // 5. Orphan blob files: on disk, not in the index, older than the grace period.
        for entry in self.blobs.list()? {
            if should_stop() {
                break;
            }
            let Ok(digest) = entry else { continue };
            let digest_key = digest.to_string();
            if self.index.exists(CF_BLOBS, digest_key.as_bytes())?
                || !std::fs::metadata(self.blobs.path(&digest))
                    .is_ok_and(|m| older_than(&m, cutoff))
            {
                continue;
            }
            let _gc = self.write_gc_lock();
            if !self.index.exists(CF_BLOBS, digest_key.as_bytes())? && self.blobs.trash(&digest)? {
                report.orphan_files_removed += 1;
            }
        }
        self.blobs.empty_trash()?;

        // 6. Ingest files that belong to no live session (left by a crash).
        for entry in std::fs::read_dir(self.blobs.ingest_dir())? {
            if should_stop() {
                break;
            }
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.metadata().is_ok_and(|m| older_than(&m, cutoff))
                && self.remove_unowned_ingest(&name, &entry.path())?
            {
                report.ingest_files_removed += 1;
            }
        }
        Ok(report)
    }

    /// Re-checks one group of candidates `(digest, size, newest linked_at allowed)` under the
    /// exclusive GC lock and drops those still unreferenced and not linked since (record and
    /// links) from the index, with a relaxed write.
    pub(super) fn unindex_group(
        &self,
        group: &[(String, u64, u64)],
        links: &HashMap<String, Vec<Vec<u8>>>,
        unindexed: &mut Vec<Digest>,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let mut batch = self.index.batch();
        let mut gone_links: Vec<&[u8]> = Vec::new();
        {
            let _gc = self.write_gc_lock();
            let (mut bytes, mut count) = (0u64, 0u64);
            for (digest, size, cutoff) in group {
                let still = self.index.get_with(CF_BLOBS, digest.as_bytes(), |v| {
                    index::decode_u64s::<2>(CF_BLOBS, v)
                })?;
                let Some(Ok([_, linked_at])) = still else {
                    continue;
                };
                if linked_at > *cutoff
                    || self
                        .index
                        .any_with_prefix(CF_BLOB_REFS, &prefix(&[digest]))?
                {
                    continue;
                }
                batch.delete(CF_BLOBS, digest.as_bytes());
                for l in links.get(digest).into_iter().flatten() {
                    batch.delete(CF_LINKS, l);
                    gone_links.push(l);
                }
                if let Ok(d) = digest.parse::<Digest>() {
                    unindexed.push(d);
                }
                bytes += size;
                count += 1;
            }
            if count == 0 {
                return Ok(());
            }
            // Relaxed: the lock covers the decision; `remove_unindexed_files` syncs the WAL
            // before any file goes.
            self.index.write_relaxed(batch)?;
            self.blob_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stored_bytes
                .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            self.blob_count
                .fetch_sub(count, std::sync::atomic::Ordering::Relaxed);
            report.blobs_removed += count;
            report.bytes_freed += bytes;
            report.links_removed += gone_links.len() as u64;
        }
        self.forget_links(gone_links);
        Ok(())
    }

    /// Removes the files of blobs just dropped from the index: syncs the WAL (no lock held),
    /// moves each file to `trash/` under the GC lock unless a commit brought the blob back in
    /// the meantime, then unlinks with no lock held.
    pub(super) fn remove_unindexed_files(&self, digests: &[Digest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        self.index.sync_wal()?;
        for group in digests.chunks(GROUP) {
            let _gc = self.write_gc_lock();
            for d in group {
                if !self.index.exists(CF_BLOBS, d.to_string().as_bytes())? {
                    self.blobs.trash(d)?;
                }
            }
        }
        self.blobs.empty_trash()?;
        Ok(())
    }

    /// Drops removed links from the hot cache, each under its own stripe (so a reader that
    /// checked the index before the removal cannot re-insert the link after it).
    pub(super) fn forget_links<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        for k in keys {
            let _g = self.lock_stripe(k);
            self.links.invalidate(k);
        }
    }
}
