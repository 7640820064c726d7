//! Eviction: keeps cached content within the byte budget and the data directory's filesystem
//! above its free-space floor, least recently pulled image first, never touching pushed or
//! pinned content, online.
//!
//! A pass plans from a census (`inventory`) taken with no lock held, simulating reference
//! counts so that a blob shared with a kept image is never chosen. It then removes the chosen
//! images' manifests, reverse references, tags and access records in small relaxed batches
//! (each tag re-checked under its stripe, so a tag that moved meanwhile stays), and hands the
//! blobs that no cached manifest references any more to the same group-wise removal GC uses:
//! each is re-checked under the exclusive GC lock (still unreferenced, not linked again since
//! the census) before it leaves the index, and its file goes only after the WAL is synced.
//! A pull racing the eviction of its image either finds the manifest and its blobs, or misses
//! and fetches them again from the upstream, as for any miss. A crash at any point leaves
//! either the image whole, or a manifest whose blobs a later pull refetches, or orphan files
//! GC removes — never an index record pointing at a missing file.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::index::{CF_ACCESS, CF_BLOB_REFS, CF_MANIFESTS, CF_TAG_CHECKS, CF_TAGS, key};
use super::inventory::{CacheUsage, Census};
use super::{Store, StoreError, unix_now};
use crate::oci::{Digest, RepoName};

/// A census is taken at least this often while anything was stored, so the usage figures
/// stay current even when nothing needs evicting.
const CENSUS_REFRESH_SECS: u64 = 300;

/// Manifests removed per index batch (each batch holds their stripes: keep it small).
const GROUP: usize = 16;

/// The limits a pass enforces.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Cached bytes allowed; `None`: no budget.
    pub max_size: Option<u64>,
    /// Cached bytes to get down to once over `max_size`.
    pub evict_to: u64,
    /// Free bytes the data directory's filesystem must keep.
    pub min_free_disk: u64,
}

/// What a pass found and did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvictReport {
    pub usage: CacheUsage,
    pub images_evicted: u64,
    pub manifests_removed: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Free bytes on the data directory's filesystem after the pass.
    pub free_disk: u64,
    /// Pins alone hold more than the budget allows.
    pub pins_over_budget: bool,
    /// The free-space floor could not be restored: fills and pushes are refused.
    pub space_low: bool,
    /// The pass counted everything (it was over a limit); otherwise `usage` is the last count.
    pub took_census: bool,
    pub seconds: f64,
}

/// Which images to evict.
#[derive(Clone, Copy)]
pub enum Selection<'a> {
    /// Least recently pulled first, until this many bytes are freed.
    Bytes(u64),
    /// Every unpinned image not pulled since this Unix time.
    PulledBefore(u64),
    /// One image (by root digest) in one repository.
    Image(&'a RepoName, &'a Digest),
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_disk(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Ok(u64::from(s.f_bavail).saturating_mul(u64::from(s.f_frsize)))
}

impl Store {
    /// Whether the data directory is short of space that eviction could not recover: new
    /// fills and pushes are refused until a pass finds enough free space again.
    pub fn space_low(&self) -> bool {
        self.space_low.load(Ordering::Relaxed)
    }

    /// Wakes the eviction loop if the data directory has less free space than the floor:
    /// called when a fill or an upload starts (one statvfs), so space is made before the
    /// next periodic check.
    pub fn note_space_needed(&self) {
        if self.options().cache_min_free_disk > 0
            && free_disk(self.data_dir()).is_ok_and(|f| f < self.options().cache_min_free_disk)
        {
            self.eviction_wanted.notify_one();
        }
    }

    /// `Err(InsufficientStorage)` while the data directory is short of space: a push must not
    /// take the last free bytes the index and the cache need.
    pub fn room_for_push(&self) -> Result<(), StoreError> {
        self.note_space_needed();
        if self.space_low() {
            return Err(StoreError::InsufficientStorage);
        }
        Ok(())
    }

    /// One eviction pass: frees cached bytes until the budget and the free-space floor hold
    /// (or nothing more may go), checking `should_stop` between groups.
    pub fn enforce_budget(
        &self,
        budget: &Budget,
        is_cache_repo: &dyn Fn(&RepoName) -> bool,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<EvictReport, StoreError> {
        let started = Instant::now();
        let _sweep = self.sweep_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_access()?;
        let free = free_disk(self.data_dir())?;
        let stored = self.usage().0;
        let estimate = stored.saturating_sub(self.pushed_seen.load(Ordering::Relaxed));
        let over = budget.max_size.is_some_and(|m| estimate > m);
        let changes = self.blob_changes.load(Ordering::Relaxed);
        let unchanged = changes == self.census_changes.load(Ordering::Relaxed);
        let recent =
            unix_now().saturating_sub(self.census_at.load(Ordering::Relaxed)) < CENSUS_REFRESH_SECS;
        // Nothing to evict: skip the census unless its figures (metrics, `space_low`) are
        // old. Unchanged since the last census: it would find what it found then.
        if free >= budget.min_free_disk && (unchanged || (!over && recent)) {
            self.space_low.store(false, Ordering::Relaxed);
            return Ok(EvictReport {
                usage: self.last_usage(),
                free_disk: free,
                seconds: started.elapsed().as_secs_f64(),
                ..EvictReport::default()
            });
        }
        // As of the census's start: what this pass removes, or a fill during it, makes the
        // next check count again (once), so nothing is missed.
        self.census_changes.store(changes, Ordering::Relaxed);
        self.census_at.store(unix_now(), Ordering::Relaxed);
        let census = self.census(is_cache_repo)?;
        let usage = census.usage;
        let need_budget = match budget.max_size {
            Some(m) if usage.cached_bytes > m => usage.cached_bytes - budget.evict_to.min(m),
            _ => 0,
        };
        let need_disk = budget.min_free_disk.saturating_sub(free);
        let need = need_budget.max(need_disk);
        let mut report = if need > 0 {
            self.evict(census, Selection::Bytes(need), should_stop)?
        } else {
            self.forget_stale_access(&census.stale_access)?;
            EvictReport {
                usage,
                ..EvictReport::default()
            }
        };
        report.usage = CacheUsage {
            cached_bytes: usage.cached_bytes.saturating_sub(report.bytes_freed),
            images: usage.images.saturating_sub(report.images_evicted),
            ..usage
        };
        report.took_census = true;
        report.pins_over_budget = budget.max_size.is_some_and(|m| usage.pinned_bytes > m);
        report.free_disk = free_disk(self.data_dir())?;
        report.space_low = report.free_disk < budget.min_free_disk;
        self.space_low.store(report.space_low, Ordering::Relaxed);
        *self.usage_seen.lock().unwrap_or_else(|p| p.into_inner()) = report.usage;
        self.pushed_seen
            .store(report.usage.pushed_bytes, Ordering::Relaxed);

        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Makes the next eviction check take a census even if no bytes were stored since the
    /// last one (pins changed what it reports).
    pub(super) fn recount_cache_soon(&self) {
        self.census_changes.store(u64::MAX, Ordering::Relaxed);
    }

    /// The usage the last census found (adjusted by what that pass freed).
    pub fn last_usage(&self) -> CacheUsage {
        *self.usage_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evicts what `selection` names now (`transship cache evict`), pins respected.
    pub fn evict_now(
        &self,
        selection: Selection<'_>,
        is_cache_repo: &dyn Fn(&RepoName) -> bool,
    ) -> Result<EvictReport, StoreError> {
        let started = Instant::now();
        let _sweep = self.sweep_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_access()?;
        let census = self.census(is_cache_repo)?;
        let mut report = self.evict(census, selection, &|| false)?;
        self.recount_cache_soon();
        report.free_disk = free_disk(self.data_dir())?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    fn evict(
        &self,
        mut census: Census,
        selection: Selection<'_>,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<EvictReport, StoreError> {
        let mut report = EvictReport {
            usage: census.usage,
            ..EvictReport::default()
        };
        // Plan: simulate reference counts image by image, oldest pull first.
        let mut order: Vec<usize> = (0..census.images.len())
            .filter(|&i| !census.images[i].removable.is_empty())
            .filter(|&i| match &selection {
                Selection::Bytes(_) => true,
                Selection::PulledBefore(t) => census.images[i].info.last_pulled < *t,
                Selection::Image(repo, d) => {
                    census.images[i].info.repository == repo.as_str()
                        && census.images[i].info.digest == d.to_string()
                }
            })
            .collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&census.images[a].info, &census.images[b].info);
            (a.last_pulled, &a.repository, &a.digest).cmp(&(
                b.last_pulled,
                &b.repository,
                &b.digest,
            ))
        });
        // (member, root of the image it goes with, whether the census saw that root pinned)
        let mut doomed_members: Vec<(usize, usize, bool)> = Vec::new();
        let mut doomed_blobs: Vec<(String, u64, u64)> = Vec::new();
        let mut planned = 0u64;
        // Anything linked in or after the census's first second is not its to judge: a
        // mount or link in that second leaves `linked_at` equal to what the census saw.
        let newest = census.started.saturating_sub(1);
        for i in order {
            if let Selection::Bytes(need) = selection
                && planned >= need
            {
                break;
            }
            let (root, root_pinned) = (census.images[i].root, census.images[i].info.pinned != "no");
            for &m in &census.images[i].removable {
                let member = &mut census.members[m];
                member.images -= 1;
                if member.images > 0 {
                    continue;
                }
                doomed_members.push((m, root, root_pinned));
                for b in &member.blobs {
                    let Some(f) = census.blobs.get_mut(b) else {
                        continue;
                    };
                    f.refs = f.refs.saturating_sub(1);
                    if f.refs == 0 && !f.pushed {
                        planned += f.size;
                        doomed_blobs.push((b.clone(), f.size, f.linked_at.min(newest)));
                    }
                }
            }
        }

        // Manifests, their reverse references, tags and access records.
        let mut removed_roots = std::collections::HashSet::new();
        for group in doomed_members.chunks(GROUP) {
            if should_stop() {
                break;
            }
            for (m, root) in self.unindex_manifests(&census, group)? {
                report.manifests_removed += 1;
                if m == root {
                    removed_roots.insert(root);
                }
            }
        }
        report.images_evicted = removed_roots.len() as u64;

        // Blobs no cached manifest references any more: re-checked under the GC lock.
        doomed_blobs.sort();
        doomed_blobs.dedup();
        let links: HashMap<String, Vec<Vec<u8>>> = doomed_blobs
            .iter()
            .filter_map(|(d, _, _)| {
                census
                    .blobs
                    .get_mut(d)
                    .map(|f| (d.clone(), std::mem::take(&mut f.links)))
            })
            .collect();
        let mut gc = super::gc::GcReport::default();
        let mut unindexed = Vec::new();
        for group in doomed_blobs.chunks(super::gc::GROUP) {
            if should_stop() {
                break;
            }
            self.unindex_group(group, &links, &mut unindexed, &mut gc)?;
        }
        self.remove_unindexed_files(&unindexed)?;
        let gone: Vec<&[u8]> = unindexed
            .iter()
            .flat_map(|d| links.get(&d.to_string()).into_iter().flatten())
            .map(|k| k.as_slice())
            .collect();
        self.forget_access(gone.iter().copied())?;
        self.forget_stale_access(&census.stale_access)?;
        report.blobs_removed = gc.blobs_removed;
        report.bytes_freed = gc.bytes_freed;
        Ok(report)
    }

    /// Removes cached manifests (with reverse references, access records, and every tag of
    /// their repository still pointing at them) in one relaxed batch; durable before any blob
    /// file goes, because blob removal syncs the WAL first. Each is re-checked under its
    /// stripe (and its image root's): a manifest pinned, pulled or fetched again since the
    /// census stays, and so do its blobs (its reverse references keep them). Returns the
    /// `(member, root)` pairs removed.
    fn unindex_manifests(
        &self,
        census: &Census,
        group: &[(usize, usize, bool)],
    ) -> Result<Vec<(usize, usize)>, StoreError> {
        // The tags pointing at them, found with no lock held (re-checked below).
        let mut by_repo: HashMap<&str, Vec<&str>> = HashMap::new();
        for &(m, _, _) in group {
            let member = &census.members[m];
            by_repo
                .entry(&member.repo)
                .or_default()
                .push(&member.digest);
        }
        let mut tag_keys: Vec<(Vec<u8>, String)> = Vec::new();
        for (repo, digests) in &by_repo {
            self.index
                .scan(CF_TAGS, &super::index::prefix(&[repo]), None, |k, v| {
                    if let Some(d) = digests.iter().find(|d| d.as_bytes() == v) {
                        tag_keys.push((k.to_vec(), d.to_string()));
                    }
                    true
                })?;
        }
        let keys: Vec<(Vec<u8>, Vec<u8>)> = group
            .iter()
            .map(|&(m, r, _)| {
                let (member, root) = (&census.members[m], &census.members[r]);
                (
                    key(&[&member.repo, &member.digest]),
                    key(&[&root.repo, &root.digest]),
                )
            })
            .collect();
        let _stripes = self.lock_stripes(
            keys.iter()
                .flat_map(|(m, r)| [m.as_slice(), r.as_slice()])
                .chain(tag_keys.iter().map(|(k, _)| k.as_slice())),
        );
        let mut batch = self.index.batch();
        let mut removed = Vec::new();
        let mut gone_digests = std::collections::HashSet::new();
        for (&(m, r, root_pinned), (mk, _)) in group.iter().zip(&keys) {
            let (member, root) = (&census.members[m], &census.members[r]);
            let pulled = self
                .index
                .get(CF_ACCESS, mk)?
                .and_then(|v| super::index::decode_u64s::<2>(CF_ACCESS, &v).ok())
                .map_or(0, |[t, _]| t);
            // Pulled or fetched again, pinned, or its image pinned since the census (a pin
            // the census saw on the root was a partial one that leaves this child out).
            if pulled > member.seen_pull
                || self.is_pinned(&member.repo, &member.digest)?
                || (!root_pinned && self.is_pinned(&root.repo, &root.digest)?)
            {
                continue;
            }
            batch.delete(CF_MANIFESTS, mk);
            batch.delete(super::index::CF_PUSHED, mk);
            batch.delete(CF_ACCESS, mk);
            for b in &member.blobs {
                batch.delete(CF_BLOB_REFS, &key(&[b, &member.repo, &member.digest]));
            }
            gone_digests.insert((member.repo.as_str(), member.digest.as_str()));
            removed.push((m, r));
        }
        let mut gone_tags = Vec::new();
        for (tk, digest) in &tag_keys {
            let repo = std::str::from_utf8(&tk[..tk.iter().position(|&b| b == 0).unwrap_or(0)])
                .unwrap_or_default();
            // A tag that moved since the scan points at a kept manifest: it stays.
            if gone_digests.contains(&(repo, digest.as_str()))
                && self.index.get(CF_TAGS, tk)?.as_deref() == Some(digest.as_bytes())
            {
                batch.delete(CF_TAGS, tk);
                batch.delete(CF_TAG_CHECKS, tk);
                gone_tags.push(tk);
            }
        }
        if removed.is_empty() {
            return Ok(removed);
        }
        // `cache.evict` for each image whose root goes (with a tag it had), in the same batch.
        let _events = self.record_events(&mut batch, super::outbox::EventKind::CacheEvict, || {
            removed
                .iter()
                .filter(|(m, r)| m == r)
                .map(|&(m, _)| {
                    let member = &census.members[m];
                    // A tag this batch removes (not one that moved away meanwhile).
                    let tag = gone_tags
                        .iter()
                        .find(|k| {
                            tag_keys
                                .iter()
                                .any(|(tk, d)| tk == **k && *d == member.digest)
                                && k.starts_with(&super::index::prefix(&[&member.repo]))
                        })
                        .and_then(|k| k.rsplit(|&b| b == 0).next())
                        .map(|t| String::from_utf8_lossy(t).into_owned());
                    super::outbox::EventRecord {
                        digest: Some(member.digest.clone()),
                        tag,
                        ..super::outbox::EventRecord::new(
                            super::outbox::EventKind::CacheEvict,
                            &member.repo,
                        )
                    }
                })
                .collect()
        });
        self.index.write_relaxed(batch)?;
        for (&(m, _, _), (mk, _)) in group.iter().zip(&keys) {
            if removed.iter().any(|&(r, _)| r == m) {
                self.manifests.invalidate(mk);
            }
        }
        for k in gone_tags {
            self.tags.invalidate(k);
        }
        Ok(removed)
    }

    fn forget_access<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), StoreError> {
        let mut batch = self.index.batch();
        for k in keys {
            batch.delete(CF_ACCESS, k);
        }
        if !batch.is_empty() {
            self.index.write_relaxed(batch)?;
        }
        Ok(())
    }

    fn forget_stale_access(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        self.forget_access(keys.iter().map(|k| k.as_slice()))
    }

    /// Drops tag-resolution history older than `max_age` seconds and beyond the newest
    /// `max_entries` per tag. Returns the number of entries removed.
    pub fn prune_tag_history(&self, max_age: u64, max_entries: usize) -> Result<u64, StoreError> {
        let cutoff_micros = unix_now().saturating_sub(max_age).saturating_mul(1_000_000);
        let mut doomed = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        let mut run: Vec<(Vec<u8>, u64)> = Vec::new();
        let flush = |run: &mut Vec<(Vec<u8>, u64)>, doomed: &mut Vec<Vec<u8>>| {
            let keep_from = run.len().saturating_sub(max_entries);
            let newest = run.len().saturating_sub(1);
            for (i, (k, t)) in run.drain(..).enumerate() {
                // The newest entry stays however old: it says what the tag points at.
                if i < keep_from || (t < cutoff_micros && i != newest) {
                    doomed.push(k);
                }
            }
        };
        self.index
            .scan(super::index::CF_TAG_HISTORY, b"", None, |k, _| {
                if k.len() < 9 {
                    return true;
                }
                let (tag_part, t) = k.split_at(k.len() - 8);
                let t = u64::from_be_bytes(t.try_into().unwrap_or([0; 8]));
                if tag_part != current.as_slice() {
                    flush(&mut run, &mut doomed);
                    current = tag_part.to_vec();
                }
                run.push((k.to_vec(), t));
                true
            })?;
        flush(&mut run, &mut doomed);
        for chunk in doomed.chunks(1024) {
            let mut batch = self.index.batch();
            for k in chunk {
                batch.delete(super::index::CF_TAG_HISTORY, k);
            }
            self.index.write_relaxed(batch)?;
        }
        Ok(doomed.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Tag;
    use crate::store::StoreOptions;
    use crate::store::pins::PinTarget;

    const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    fn blob(store: &Store, repo: &RepoName, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let path = store.ingest_path_for_fill(&format!("fill-test-{}", digest.hex()));
        std::fs::write(&path, bytes).unwrap();
        store
            .commit_blob(&path, &digest, bytes.len() as u64, repo, None)
            .unwrap();
        digest
    }

    fn image(store: &Store, repo: &RepoName, config: &Digest, layer: &Digest) -> (Digest, String) {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{IMAGE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":3}}]}}"#
        );
        let d = Digest::sha256_of(m.as_bytes());
        store
            .put_cached_manifest(repo, &d, IMAGE, bytes::Bytes::from(m.clone()), None)
            .unwrap();
        (d, m)
    }

    /// An index of two platforms sharing a config, pinned for one platform: eviction takes the
    /// other child and its own layer only; the kept child's blobs and the shared one stay.
    #[test]
    fn a_platform_pin_keeps_its_child_and_shared_blobs_and_evicts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let repo: RepoName = "docker.io/library/app".parse().unwrap();
        let config = blob(&store, &repo, b"{}");
        let amd_layer = blob(&store, &repo, b"amd");
        let arm_layer = blob(&store, &repo, b"arm");
        let (amd, _) = image(&store, &repo, &config, &amd_layer);
        let (arm, _) = image(&store, &repo, &config, &arm_layer);
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{INDEX}","manifests":[{{"mediaType":"{IMAGE}","digest":"{amd}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"{IMAGE}","digest":"{arm}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
        );
        let index_digest = Digest::sha256_of(index.as_bytes());
        let tag: Tag = "1".parse().unwrap();
        store
            .put_cached_manifest(&repo, &index_digest, INDEX, index.into(), Some(&tag))
            .unwrap();
        // A tag on a child (as `app:1-arm64` would be): it goes with the child.
        let child_tag: Tag = "1-arm64".parse().unwrap();
        let arm_bytes = store.manifest(&repo, &arm).unwrap().unwrap().bytes.clone();
        store
            .put_cached_manifest(&repo, &arm, IMAGE, arm_bytes, Some(&child_tag))
            .unwrap();
        let everything = |_: &RepoName| true;
        let (images, usage) = store.cache_inventory(&everything).unwrap();
        assert_eq!(images.len(), 1, "one image: the index with its children");
        assert_eq!(images[0].children, 2);
        assert_eq!(images[0].own_bytes, 2 + 3 + 3);
        assert_eq!(usage.cached_bytes, 8);

        store
            .pin(&repo, &PinTarget::Tag(tag.clone()), &["linux/amd64".into()])
            .unwrap();
        let (images, usage) = store.cache_inventory(&everything).unwrap();
        assert_eq!(images[0].pinned, "partial");
        // Eviction leaves what was linked in its own first second alone.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(usage.pinned_bytes, 2 + 3);

        let report = store
            .evict_now(Selection::PulledBefore(u64::MAX), &everything)
            .unwrap();
        assert_eq!(report.manifests_removed, 1, "only the arm64 child");
        assert_eq!(report.blobs_removed, 1, "only the arm64 layer");
        assert!(store.manifest(&repo, &arm).unwrap().is_none());
        assert_eq!(store.resolve_tag(&repo, &child_tag).unwrap(), None);
        assert!(store.manifest(&repo, &amd).unwrap().is_some());
        assert_eq!(
            store.resolve_tag(&repo, &tag).unwrap(),
            Some(index_digest.clone())
        );
        assert!(!store.has_blob_anywhere(&arm_layer).unwrap());
        for kept in [&config, &amd_layer] {
            assert!(
                store.blob_size(&repo, kept).unwrap().is_some(),
                "{kept} was evicted"
            );
            assert!(store.blobs.contains(kept));
        }

        // Two reasons pin the index: dropping one keeps the other.
        store
            .pin(&repo, &PinTarget::Digest(index_digest.clone()), &[])
            .unwrap();
        assert_eq!(store.unpin(&repo, &PinTarget::Tag(tag.clone())).unwrap(), 2);
        let report = store
            .evict_now(Selection::PulledBefore(u64::MAX), &everything)
            .unwrap();
        assert_eq!(report.images_evicted, 0, "still pinned by digest");
        // Unpinned, the whole image goes, its tag with it.
        assert_eq!(
            store
                .unpin(&repo, &PinTarget::Digest(index_digest.clone()))
                .unwrap(),
            1
        );
        let report = store
            .evict_now(Selection::PulledBefore(u64::MAX), &everything)
            .unwrap();
        assert_eq!(report.images_evicted, 1);
        assert_eq!(store.resolve_tag(&repo, &tag).unwrap(), None);
        assert_eq!(
            store.cache_inventory(&everything).unwrap().1.cached_bytes,
            0
        );
        assert!(store.fsck_with(false, &everything).unwrap().is_clean());
    }

    /// A child listed by two indexes belongs to both images: evicting one leaves it (and its
    /// blobs) to the other; evicting the other too removes it.
    #[test]
    fn a_child_shared_by_two_indexes_stays_until_both_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let repo: RepoName = "docker.io/library/app".parse().unwrap();
        let config = blob(&store, &repo, b"{}");
        let layer = blob(&store, &repo, b"abc");
        let (child, _) = image(&store, &repo, &config, &layer);
        let mut roots = Vec::new();
        for (n, tag) in ["a", "b"].into_iter().enumerate() {
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"{INDEX}","annotations":{{"n":"{n}"}},"manifests":[{{"mediaType":"{IMAGE}","digest":"{child}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
            );
            let d = Digest::sha256_of(index.as_bytes());
            let tag: Tag = tag.parse().unwrap();
            store
                .put_cached_manifest(&repo, &d, INDEX, index.into(), Some(&tag))
                .unwrap();
            roots.push(d);
        }
        let everything = |_: &RepoName| true;
        let (images, _) = store.cache_inventory(&everything).unwrap();
        assert_eq!(images.len(), 2);
        assert!(
            images
                .iter()
                .all(|i| i.own_bytes == 0 && i.shared_bytes == 5)
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let first = store
            .evict_now(Selection::Image(&repo, &roots[0]), &everything)
            .unwrap();
        assert_eq!((first.images_evicted, first.manifests_removed), (1, 1));
        assert_eq!(first.blobs_removed, 0);
        assert!(store.manifest(&repo, &child).unwrap().is_some());
        let second = store
            .evict_now(Selection::Image(&repo, &roots[1]), &everything)
            .unwrap();
        assert_eq!((second.images_evicted, second.manifests_removed), (1, 2));
        assert_eq!(second.blobs_removed, 2);
        assert!(store.fsck_with(false, &everything).unwrap().is_clean());
    }

    /// A blob a private repository holds is pushed content: never counted, never evicted.
    #[test]
    fn pushed_blobs_are_neither_counted_nor_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let cache: RepoName = "docker.io/library/app".parse().unwrap();
        let private: RepoName = "local/app".parse().unwrap();
        let config = blob(&store, &cache, b"{}");
        let layer = blob(&store, &cache, b"abc");
        image(&store, &cache, &config, &layer);
        assert!(
            store
                .mount_blob(&private, &cache, &layer)
                .unwrap()
                .is_some()
        );
        let is_cache = |r: &RepoName| r.as_str().starts_with("docker.io/");
        let (_, usage) = store.cache_inventory(&is_cache).unwrap();
        assert_eq!((usage.cached_bytes, usage.pushed_bytes), (2, 3));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        store
            .evict_now(Selection::PulledBefore(u64::MAX), &is_cache)
            .unwrap();
        assert!(store.blob_size(&private, &layer).unwrap().is_some());
        assert!(!store.has_blob_anywhere(&config).unwrap());
    }
}
