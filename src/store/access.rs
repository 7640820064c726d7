//! When cached content was last pulled, and how often: the order eviction follows. Recording a
//! pull is a memory write on the request path (a sharded map, no index write); the maintenance
//! loop merges the map into the `access` column family every `cache.access_flush_interval`
//! with one relaxed write, so a crash loses at most that much of the record — never content.
//! The map is bounded: once it holds `MAX_PENDING` keys, pulls of new keys wait for the next
//! flush to be recorded (updates of keys already held still count).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::index::{self, CF_ACCESS, key};
use super::{Store, StoreError, unix_now};
use crate::oci::{Digest, RepoName};

const SHARDS: usize = 16;
/// Distinct keys held between two flushes, at most (about 200 bytes each).
const MAX_PENDING: usize = 200_000;

/// A key's pulls since the last flush.
#[derive(Debug, Clone, Copy, Default)]
struct Touch {
    last: u64,
    pulls: u64,
}

/// What the index says about a key: when it was last pulled and how many pulls were counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub last_pulled: u64,
    pub pulls: u64,
}

pub(super) struct AccessLog {
    shards: Vec<Mutex<HashMap<Vec<u8>, Touch>>>,
    pending: AtomicUsize,
    /// Set once the map is full: the next flush is wanted early.
    full: AtomicBool,
    /// One flush at a time: each is a read-modify-write of the records it merges.
    flushing: Mutex<()>,
    /// Set in the cluster profile: what each flush wrote is also kept for the cluster's
    /// record (`take_forwarded_pulls`), at most `MAX_PENDING` keys.
    forwarding: AtomicBool,
    forwarded: Mutex<HashMap<Vec<u8>, Touch>>,
}

impl AccessLog {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            pending: AtomicUsize::new(0),
            full: AtomicBool::new(false),
            flushing: Mutex::new(()),
            forwarding: AtomicBool::new(false),
            forwarded: Mutex::new(HashMap::new()),
        }
    }

    fn note(&self, k: Vec<u8>, pull: bool, now: u64) {
        let mut h = std::hash::DefaultHasher::new();
        k.hash(&mut h);
        let mut shard = self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(t) = shard.get_mut(&k) {
            t.last = now;
            t.pulls += u64::from(pull);
            return;
        }
        if self.pending.load(Ordering::Relaxed) >= MAX_PENDING {
            self.full.store(true, Ordering::Relaxed);
            return;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        shard.insert(
            k,
            Touch {
                last: now,
                pulls: u64::from(pull),
            },
        );
    }

    fn take(&self) -> Vec<(Vec<u8>, Touch)> {
        let mut out = Vec::new();
        for s in &self.shards {
            let map = std::mem::take(&mut *s.lock().unwrap_or_else(|p| p.into_inner()));
            out.extend(map);
        }
        self.pending.store(0, Ordering::Relaxed);
        self.full.store(false, Ordering::Relaxed);
        out
    }
}

impl AccessLog {
    /// Merges flushed records into the forwarded map (new keys dropped once it is full: the
    /// cluster's record is an ordering hint, never content).
    fn forward(&self, touched: &[(Vec<u8>, Touch)]) {
        let mut map = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        for (k, t) in touched {
            if let Some(f) = map.get_mut(k) {
                f.last = f.last.max(t.last);
                f.pulls += t.pulls;
            } else if map.len() < MAX_PENDING {
                map.insert(k.clone(), *t);
            }
        }
    }
}

fn decode(v: &[u8]) -> Access {
    match index::decode_u64s::<2>(CF_ACCESS, v) {
        Ok([last_pulled, pulls]) => Access { last_pulled, pulls },
        Err(_) => Access::default(),
    }
}

impl Store {
    /// Records a pull of `digest` (a manifest, `counted` as a pull, or a blob) from the cache
    /// repository `repo`. Memory only; see `flush_access`.
    pub fn note_pull(&self, repo: &RepoName, digest: &Digest, counted: bool) {
        self.access.note(
            key(&[repo.as_str(), &digest.to_string()]),
            counted,
            unix_now(),
        );
    }

    /// Whether the in-memory record filled up and should be flushed before its interval.
    pub fn access_log_full(&self) -> bool {
        self.access.full.load(Ordering::Relaxed)
    }

    /// Merges the in-memory record of pulls into the index (one relaxed write). Returns the
    /// number of keys written.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        let _one = self
            .access
            .flushing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let touched = self.access.take();
        if touched.is_empty() {
            return Ok(0);
        }
        let mut batch = self.index.batch();
        for (k, t) in &touched {
            let old = self.index.get(CF_ACCESS, k)?.map(|v| decode(&v));
            let old = old.unwrap_or_default();
            batch.put(
                CF_ACCESS,
                k,
                &index::encode_u64s(&[old.last_pulled.max(t.last), old.pulls + t.pulls]),
            );
        }
        self.index.write_relaxed(batch)?;
        if self.access.forwarding.load(Ordering::Relaxed) {
            self.access.forward(&touched);
        }
        Ok(touched.len())
    }

    /// Keeps what each flush writes for `take_forwarded_pulls` too (the cluster profile, whose
    /// eviction orders by every replica's pulls).
    pub fn forward_pulls(&self) {
        self.access.forwarding.store(true, Ordering::Relaxed);
    }

    /// The pulls flushed since the last call, as `(repository, digest, last pull in unix
    /// seconds, pulls counted)`.
    pub fn take_forwarded_pulls(&self) -> Vec<(String, String, u64, u64)> {
        let map = std::mem::take(
            &mut *self
                .access
                .forwarded
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        map.into_iter()
            .filter_map(|(k, t)| {
                let (repo, digest) = std::str::from_utf8(&k).ok()?.split_once('\0')?;
                Some((repo.to_string(), digest.to_string(), t.last, t.pulls))
            })
            .collect()
    }

    /// The pulls recorded for a repository: the latest, and the count of every manifest in it.
    pub fn repo_pulls(&self, repo: &RepoName) -> Result<Access, StoreError> {
        let mut total = Access::default();
        self.index.scan(
            CF_ACCESS,
            &super::index::prefix(&[repo.as_str()]),
            None,
            |_, v| {
                let a = decode(v);
                total.last_pulled = total.last_pulled.max(a.last_pulled);
                total.pulls += a.pulls;
                true
            },
        )?;
        Ok(total)
    }

    /// Every recorded access, keyed `repo \0 digest`.
    pub(super) fn all_access(&self) -> Result<HashMap<Vec<u8>, Access>, StoreError> {
        let mut out = HashMap::new();
        self.index.scan(CF_ACCESS, b"", None, |k, v| {
            out.insert(k.to_vec(), decode(v));
            true
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_log_keeps_counting_known_keys_and_asks_for_a_flush() {
        let log = AccessLog::new();
        log.pending.store(MAX_PENDING - 1, Ordering::Relaxed);
        log.note(b"a".to_vec(), true, 5);
        log.note(b"b".to_vec(), true, 6);
        assert!(log.full.load(Ordering::Relaxed));
        log.note(b"a".to_vec(), true, 7);
        let taken = log.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.pulls, 2);
        assert_eq!(taken[0].1.last, 7);
        assert!(!log.full.load(Ordering::Relaxed));
    }
}
