//! Small committed blobs kept in memory, so the most frequent pulls (config blobs, small
//! layers) cost no `open`/`read`/`close` per request. Bounded by bytes (`storage.small_blob_cache`,
//! moka weighs each entry by its size); only blobs up to [`MAX_ENTRY`] bytes are kept.
//!
//! What is cached is exactly what a committed file holds and its digest names: the bytes are
//! read from `blobs/` and re-hashed before they are kept, so a file damaged on disk is never
//! cached (it is served from the file, as before, until scrub quarantines it). A blob file
//! that leaves the store (delete, GC, eviction, quarantine, fsck) leaves the cache with it
//! (`BlobStore::remove`/`move_out` call [`SmallBlobs::forget`]); a read that raced with such
//! a removal is not cached.
//!
//! Callers check the repository's link first (`Store::blob_size`), exactly as for a file.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use moka::sync::Cache;

use super::{Store, StoreError};
use crate::oci::{Digest, Digester};

/// Largest blob the cache keeps; larger ones stream from their files.
pub const MAX_ENTRY: u64 = 64 << 10;

/// Default bound of the cache, in bytes.
pub const DEFAULT_CAPACITY: u64 = 4 << 20;

pub struct SmallBlobs {
    /// `None` when the configured size is zero.
    cache: Option<Cache<Digest, Bytes>>,
    /// Bumped by every removal, so a read that overlapped one is not inserted.
    removals: AtomicU64,
    /// Orders an insert against a removal: each happens wholly before or after the other.
    gate: Mutex<()>,
}

impl SmallBlobs {
    pub fn new(capacity: u64) -> Self {
        let cache = (capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(capacity)
                .weigher(|_: &Digest, v: &Bytes| {
                    // The key (a boxed digest), moka's entry, its queue nodes and sketch count
                    // too: many tiny blobs are not free.
                    u32::try_from(v.len() + 400).unwrap_or(u32::MAX)
                })
                .build()
        });
        Self {
            cache,
            removals: AtomicU64::new(0),
            gate: Mutex::new(()),
        }
    }

    /// True for a blob of `size` bytes the cache would keep.
    pub fn fits(&self, size: u64) -> bool {
        self.cache.is_some() && size <= MAX_ENTRY
    }

    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        self.cache.as_ref()?.get(digest)
    }

    /// Drops `digest`; called after its file left `blobs/`.
    pub fn forget(&self, digest: &Digest) {
        let Some(cache) = &self.cache else { return };
        let _g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.removals.fetch_add(1, Ordering::SeqCst);
        cache.invalidate(digest);
    }

    /// Keeps `bytes` unless a removal happened since `seen` was read from `removals`.
    fn insert_unless_removed(&self, digest: &Digest, bytes: Bytes, seen: u64) {
        let Some(cache) = &self.cache else { return };
        let _g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        if self.removals.load(Ordering::SeqCst) == seen {
            cache.insert(digest.clone(), bytes);
        }
    }

    /// Bytes currently held (entries and their bookkeeping), for tests.
    pub fn weighted_size(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}

impl Store {
    /// The bytes of committed blob `digest` if the small-blob cache holds
    /// them. Memory only: never touches the disk.
    pub fn cached_small_blob(&self, digest: &Digest) -> Option<Bytes> {
        self.blobs.small.get(digest)
    }

    /// Whether a blob of `size` bytes is served from memory (after `load_small_blob`).
    pub fn small_blob_fits(&self, size: u64) -> bool {
        self.blobs.small.fits(size)
    }

    /// Reads blob `digest` (`size` bytes) whole, verifies it and keeps it in the cache.
    /// Blocking (it reads the file): run it off the async workers. `Ok(None)` when the file
    /// does not hold exactly the bytes its digest names (then it is served from the file).
    pub fn load_small_blob(&self, digest: &Digest, size: u64) -> Result<Option<Bytes>, StoreError> {
        let seen = self.blobs.small.removals.load(Ordering::SeqCst);
        let file = self.open_blob(digest)?;
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // One byte more than expected tells a longer file from an exact one.
        file.take(size + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            return Ok(None);
        }
        let mut hasher = Digester::new(digest.algorithm());
        hasher.update(&buf);
        if hasher.finish() != *digest {
            return Ok(None);
        }
        let bytes = Bytes::from(buf);
        self.blobs
            .small
            .insert_unless_removed(digest, bytes.clone(), seen);
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> Digest {
        Digest::sha256_of(b)
    }

    #[test]
    fn bounded_by_bytes() {
        let c = SmallBlobs::new(64 << 10);
        for i in 0..100u32 {
            let b = vec![i as u8; 4096];
            c.insert_unless_removed(&digest(&b), Bytes::from(b), 0);
        }
        assert!(c.weighted_size() <= 64 << 10, "{}", c.weighted_size());
    }

    #[test]
    fn a_read_that_overlapped_a_removal_is_not_kept() {
        let c = SmallBlobs::new(1 << 20);
        let b = b"config".to_vec();
        let d = digest(&b);
        let seen = c.removals.load(Ordering::SeqCst);
        c.forget(&d);
        c.insert_unless_removed(&d, Bytes::from(b.clone()), seen);
        assert!(c.get(&d).is_none());
        let seen = c.removals.load(Ordering::SeqCst);
        c.insert_unless_removed(&d, Bytes::from(b), seen);
        assert!(c.get(&d).is_some());
        c.forget(&d);
        assert!(c.get(&d).is_none());
    }

    #[test]
    fn zero_disables() {
        let c = SmallBlobs::new(0);
        assert!(!c.fits(1));
        c.insert_unless_removed(&digest(b"x"), Bytes::from_static(b"x"), 0);
        assert!(c.get(&digest(b"x")).is_none());
    }
}
