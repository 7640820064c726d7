//! The RocksDB index: column families, key layouts, value encodings and synced write batches.
//! Everything here is bytes-in/bytes-out for the typed helpers in `store`; nothing here knows
//! about HTTP or files. Keys join validated names with `\0`, which no repository name, tag or
//! digest can contain, so prefix scans never bleed into a neighbouring repository.
//!
//! Column families:
//! - `blobs`     digest                         → size u64 BE, linked_at u64 BE (unix secs)
//! - `links`     repo \0 digest                 → linked_at u64 BE        (repo may read blob)
//! - `manifests` repo \0 digest                 → u16 BE len, media type, manifest bytes
//! - `tags`      repo \0 tag                    → digest
//! - `referrers` repo \0 subject \0 referrer    → descriptor JSON
//! - `blob_refs` blob \0 repo \0 manifest       → ()   (reverse references, for GC)
//! - `repos`     repo                           → created u64 BE
//! - `tag_checks` repo \0 tag                   → checked_at u64 BE (mirror tags: last upstream check)
//! - `tag_history` repo \0 tag \0 µs u64 BE     → digest (every observed mirror resolution)
//! - `pushed`    repo \0 digest                 → u64 BE unix secs (when the manifest was last written)
//! - `uploads`   upload id                      → UploadRecord JSON
//! - `auth`      kind \0 id                      → identity record JSON (users, keys, tokens, members)
//! - `access`    repo \0 digest                 → last pulled u64 BE (unix secs), pulls u64 BE
//!   (cache repositories; manifests and blobs)
//! - `pins`      repo \0 digest \0 reason        → PinRecord JSON (cached images kept from eviction;
//!   reason `@` for a pin by digest, `:TAG` for one a tag pin made)
//! - `pins`      repo \0 \0 tag                 → PinRecord JSON (a pinned tag: each digest it
//!   resolves to while pinned is pinned too)
//! - `meta`      key                            → value (schema version, events instance id)
//! - `events`    seq u64 BE                     → EventRecord JSON (the notification outbox)
//! - `event_cursors` endpoint                   → seq u64 BE (last event the endpoint is done with)
//! - `event_dead` endpoint \0 seq u64 BE        → state u8 (0 dead, 1 retry), EventRecord JSON

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

pub const CF_BLOBS: &str = "blobs";
pub const CF_LINKS: &str = "links";
pub const CF_MANIFESTS: &str = "manifests";
pub const CF_TAGS: &str = "tags";
pub const CF_REFERRERS: &str = "referrers";
pub const CF_BLOB_REFS: &str = "blob_refs";
pub const CF_REPOS: &str = "repos";
pub const CF_UPLOADS: &str = "uploads";
pub const CF_META: &str = "meta";
pub const CF_TAG_CHECKS: &str = "tag_checks";
pub const CF_TAG_HISTORY: &str = "tag_history";
pub const CF_AUTH: &str = "auth";
pub const CF_ACCESS: &str = "access";
pub const CF_PINS: &str = "pins";
pub const CF_PUSHED: &str = "pushed";
pub const CF_EVENTS: &str = "events";
pub const CF_EVENT_CURSORS: &str = "event_cursors";
pub const CF_EVENT_DEAD: &str = "event_dead";

const ALL_CFS: [&str; 18] = [
    CF_BLOBS,
    CF_LINKS,
    CF_MANIFESTS,
    CF_TAGS,
    CF_REFERRERS,
    CF_BLOB_REFS,
    CF_REPOS,
    CF_UPLOADS,
    CF_META,
    CF_TAG_CHECKS,
    CF_TAG_HISTORY,
    CF_AUTH,
    CF_ACCESS,
    CF_PINS,
    CF_PUSHED,
    CF_EVENTS,
    CF_EVENT_CURSORS,
    CF_EVENT_DEAD,
];

/// Bumped when a key or value layout changes; opening an index of another version is refused.
pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error(
        "index at {path} has schema version {found}, this transship reads version {SCHEMA_VERSION}"
    )]
    Schema { path: String, found: String },
    #[error("corrupt index record in {cf}: {what}")]
    Corrupt { cf: &'static str, what: String },
}

pub struct Index {
    db: DB,
}

/// Joins key parts with `\0`.
pub fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// The scan prefix for every key that starts with these parts: `a\0b\0`.
pub fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

pub fn encode_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

pub fn decode_u64s<const N: usize>(cf: &'static str, bytes: &[u8]) -> Result<[u64; N], IndexError> {
    if bytes.len() != N * 8 {
        return Err(IndexError::Corrupt {
            cf,
            what: format!("value of {} bytes, expected {}", bytes.len(), N * 8),
        });
    }
    let mut out = [0u64; N];
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        out[i] = u64::from_be_bytes(chunk.try_into().expect("chunk of 8"));
    }
    Ok(out)
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(5);
        let cache = rocksdb::Cache::new_lru_cache(32 << 20);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            block.set_cache_index_and_filter_blocks(true);
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&block);
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let index = Self { db };
        let meta = index.cf(CF_META);
        match index.db.get_cf(meta, b"schema_version")? {
            None => index.db.put_cf(meta, b"schema_version", SCHEMA_VERSION)?,
            Some(v) if v == SCHEMA_VERSION.as_bytes() => {}
            Some(v) => {
                return Err(IndexError::Schema {
                    path: path.display().to_string(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                });
            }
        }
        Ok(index)
    }

    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Pinned read: no copy of the value.
    pub fn get_with<T>(
        &self,
        cf: &'static str,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, IndexError> {
        Ok(self.db.get_pinned_cf(self.cf(cf), key)?.map(|v| f(&v)))
    }

    pub fn exists(&self, cf: &'static str, key: &[u8]) -> Result<bool, IndexError> {
        Ok(self.db.get_pinned_cf(self.cf(cf), key)?.is_some())
    }

    /// Applies a batch durably (WAL fsynced) — used for everything a client is told succeeded.
    pub fn write_synced(&self, batch: IndexBatch<'_>) -> Result<(), IndexError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        Ok(self.db.write_opt(batch.batch, &wo)?)
    }

    /// Applies a batch without waiting for the disk (progress records that can be recomputed).
    pub fn write_relaxed(&self, batch: IndexBatch<'_>) -> Result<(), IndexError> {
        Ok(self.db.write(batch.batch)?)
    }

    /// Makes every write applied so far durable (fsyncs the WAL): lets a caller apply relaxed
    /// writes under a lock and wait for the disk after releasing it.
    pub fn sync_wal(&self) -> Result<(), IndexError> {
        Ok(self.db.flush_wal(true)?)
    }

    pub fn batch(&self) -> IndexBatch<'_> {
        IndexBatch {
            index: self,
            batch: WriteBatch::default(),
        }
    }

    /// Visits `(key, value)` for keys starting with `prefix`, from `start` (inclusive) if given,
    /// until `f` returns false.
    pub fn scan(
        &self,
        cf: &'static str,
        prefix: &[u8],
        start: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), IndexError> {
        let mut ro = ReadOptions::default();
        if let Some(upper) = prefix_upper_bound(prefix) {
            ro.set_iterate_upper_bound(upper);
        }
        let from = start.unwrap_or(prefix);
        let iter = self.db.iterator_cf_opt(
            self.cf(cf),
            ro,
            IteratorMode::From(from, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// True if any key starts with `prefix`.
    pub fn any_with_prefix(&self, cf: &'static str, prefix: &[u8]) -> Result<bool, IndexError> {
        let mut found = false;
        self.scan(cf, prefix, None, |_, _| {
            found = true;
            false
        })?;
        Ok(found)
    }

    /// Calls `f` with the last key of `cf`, if it has any.
    pub fn scan_last(&self, cf: &'static str, f: impl FnOnce(&[u8])) -> Result<(), IndexError> {
        if let Some(item) = self.db.iterator_cf(self.cf(cf), IteratorMode::End).next() {
            f(&item?.0);
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), IndexError> {
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name))?;
        }
        self.db.flush_wal(true)?;
        Ok(())
    }
}

/// The smallest key greater than every key with this prefix.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xff {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// A write batch bound to the index's column families.
pub struct IndexBatch<'a> {
    index: &'a Index,
    batch: WriteBatch,
}

impl IndexBatch<'_> {
    pub fn put(&mut self, cf: &'static str, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.index.cf(cf), key, value);
    }
    pub fn delete(&mut self, cf: &'static str, key: &[u8]) {
        self.batch.delete_cf(self.index.cf(cf), key);
    }
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_prefixes() {
        assert_eq!(key(&["a", "b"]), b"a\0b");
        assert_eq!(prefix(&["a"]), b"a\0");
        assert_eq!(prefix_upper_bound(b"a\0"), Some(b"a\x01".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff"), None);
        assert_eq!(
            decode_u64s::<2>(CF_BLOBS, &encode_u64s(&[7, 9])).unwrap(),
            [7, 9]
        );
        assert!(decode_u64s::<2>(CF_BLOBS, b"short").is_err());
    }

    #[test]
    fn scan_stays_inside_prefix_and_schema_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let mut b = idx.batch();
        for k in ["a/b\0t1", "a/b\0t2", "a/bc\0t1", "a\0t0"] {
            b.put(CF_TAGS, k.as_bytes(), b"v");
        }
        idx.write_synced(b).unwrap();
        let mut seen = vec![];
        idx.scan(CF_TAGS, &prefix(&["a/b"]), None, |k, _| {
            seen.push(String::from_utf8(k.to_vec()).unwrap());
            true
        })
        .unwrap();
        assert_eq!(seen, vec!["a/b\0t1", "a/b\0t2"]);
        assert!(idx.any_with_prefix(CF_TAGS, &prefix(&["a"])).unwrap());
        assert!(!idx.any_with_prefix(CF_TAGS, &prefix(&["z"])).unwrap());
        idx.db
            .put_cf(idx.cf(CF_META), b"schema_version", b"99")
            .unwrap();
        drop(idx);
        assert!(matches!(
            Index::open(dir.path()),
            Err(IndexError::Schema { .. })
        ));
    }
}
