//! Garbage collection: removes blobs nothing references any more, online and safe while
//! pushes run. A blob is collected when no manifest references it (`blob_refs` has no entry)
//! and it was last committed, mounted or linked longer ago than the grace period — the window
//! in which a push has uploaded layers but not yet its manifest. The final re-check and the
//! delete happen under the exclusive GC lock, which every commit and manifest push holds
//! shared. Also removes orphan files (bytes on disk with no index record, left by a crash
//! between rename and index write) and stale ingest files, both after the grace period.

use std::collections::HashMap;
use std::time::SystemTime;

use super::index::{self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, prefix};
use super::{Store, StoreError, unix_now};
use crate::oci::Digest;

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
        let cutoff = unix_now().saturating_sub(self.options().gc_grace.as_secs());
        let mut report = GcReport::default();

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

            // 3. Re-check and delete, excluding concurrent commits and pushes.
            let _gc = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let _stripes = self.lock_all_stripes();
            let mut batch = self.index.batch();
            let mut doomed = Vec::new();
            for (digest, size) in &candidates {
                let still = self.index.get_with(CF_BLOBS, digest.as_bytes(), |v| {
                    index::decode_u64s::<2>(CF_BLOBS, v)
                })?;
                let Some(Ok([_, linked_at])) = still else {
                    continue;
                };
                if linked_at > cutoff
                    || self
                        .index
                        .any_with_prefix(CF_BLOB_REFS, &prefix(&[digest]))?
                {
                    continue;
                }
                batch.delete(CF_BLOBS, digest.as_bytes());
                for l in links.get(digest).into_iter().flatten() {
                    batch.delete(CF_LINKS, l);
                    report.links_removed += 1;
                }
                doomed.push((digest.clone(), *size));
            }
            if !doomed.is_empty() {
                self.index.write_synced(batch)?;
                self.links.invalidate_all();
                for (digest, size) in doomed {
                    if let Ok(d) = digest.parse::<Digest>() {
                        self.blobs.remove(&d)?;
                    }
                    report.blobs_removed += 1;
                    report.bytes_freed += size;
                    self.stored_bytes
                        .fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
                    self.blob_count
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }

        // 4. Orphan blob files: on disk, not in the index, older than the grace period.
        for entry in self.blobs.list()? {
            let Ok(digest) = entry else { continue };
            let path = self.blobs.path(&digest);
            let _gc = self.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            if self.index.exists(CF_BLOBS, digest.to_string().as_bytes())? {
                continue;
            }
            if std::fs::metadata(&path).is_ok_and(|m| older_than(&m, cutoff)) {
                self.blobs.remove(&digest)?;
                report.orphan_files_removed += 1;
            }
        }

        // 5. Ingest files that belong to no live session (left by a crash).
        for entry in std::fs::read_dir(self.blobs.ingest_dir())? {
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
}
