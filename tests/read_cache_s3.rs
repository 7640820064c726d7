//! A replica's local read cache filled from the real bucket (SeaweedFS): concurrent misses of
//! a multipart blob take one ranged GET and every caller gets the exact bytes; a bucket that
//! hands back other bytes is refused and nothing is kept; LRU eviction within the budget; a
//! wiped cache directory is filled again from the bucket; a missing object is a clear error.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::engines::SeaweedFs;
use common::random_bytes;
use futures_util::stream;
use transship::cluster::objects::{MIN_PART_SIZE, Objects};
use transship::oci::Digest;
use transship::storage::read_cache::{ReadCache, ReadCacheError, ReadCacheOptions};

const BUCKET: &str = "transship-read-cache";

fn contents(file: &File) -> Vec<u8> {
    let len = file.metadata().expect("metadata").len();
    let mut buf = vec![0; len as usize];
    file.read_exact_at(&mut buf, 0).expect("read");
    buf
}

/// Fetches `source`'s whole object (the digest asked for, unless a test lies), counting GETs.
async fn get_or_fetch(
    cache: &ReadCache,
    objects: &Objects,
    gets: &AtomicUsize,
    digest: &Digest,
    source: &Digest,
    size: u64,
) -> Result<File, ReadCacheError> {
    cache
        .get_or_fetch(digest, size, || {
            gets.fetch_add(1, Ordering::SeqCst);
            objects.get_range(source, 0..size)
        })
        .await
}

#[test]
fn the_read_cache_fills_from_the_bucket_once_and_only_with_verified_bytes() {
    if !SeaweedFs::available() {
        return;
    }
    let s3 = SeaweedFs::start();
    s3.create_bucket(BUCKET);
    let objects = s3.objects(BUCKET, None);
    // Two blobs of one size, three parts each in the bucket; a budget that holds one.
    let size = 2 * MIN_PART_SIZE + 12_345;
    let a = random_bytes(size, 71);
    let b = random_bytes(size, 72);
    let (da, db) = (Digest::sha256_of(&a), Digest::sha256_of(&b));
    let size = size as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = ReadCacheOptions::in_data_dir(dir.path(), size + size / 2);
    let cache_dir = options.dir.clone();
    let cache = ReadCache::open(options).expect("open");
    let gets = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for (digest, data) in [(&da, &a), (&db, &b)] {
            let body = stream::iter([Ok::<_, std::io::Error>(Bytes::copy_from_slice(data))]);
            objects.put_verified(digest, size, body).await.expect("put");
        }

        // Concurrent misses: one GET, everyone byte-exact.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, objects, gets, da) = (
                    cache.clone(),
                    objects.clone(),
                    Arc::clone(&gets),
                    da.clone(),
                );
                tokio::spawn(async move {
                    let file = get_or_fetch(&cache, &objects, &gets, &da, &da, size).await?;
                    Ok::<_, ReadCacheError>(contents(&file))
                })
            })
            .collect();
        for task in tasks {
            let got = task.await.expect("task").expect("fetch");
            assert!(got == a, "a cached blob differs from the bucket's");
        }
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        assert_eq!(cache.usage(), (size, 1));
        let hit = cache.open_cached(&da, size).expect("cached");
        assert!(contents(&hit) == a);

        // The bucket hands back other bytes (b's, for a's digest): refused, nothing kept.
        cache.remove(&da);
        let err = get_or_fetch(&cache, &objects, &gets, &da, &db, size)
            .await
            .expect_err("wrong bytes");
        assert!(
            matches!(err, ReadCacheError::DigestMismatch { .. }),
            "{err}"
        );
        assert_eq!(cache.usage(), (0, 0));
        assert_eq!(std::fs::read_dir(&cache_dir).expect("dir").count(), 0);

        // Within the budget: b in, then a in evicts b.
        for (digest, data) in [(&db, &b), (&da, &a)] {
            let file = get_or_fetch(&cache, &objects, &gets, digest, digest, size)
                .await
                .expect("fetch");
            assert!(contents(&file) == *data);
        }
        assert_eq!(cache.usage(), (size, 1));
        assert!(cache.open_cached(&db, size).is_none());
        assert_eq!(cache.stats().evicted, 1);

        // A wiped cache directory: a miss, filled again from the bucket.
        std::fs::remove_dir_all(&cache_dir).expect("wipe");
        let before = gets.load(Ordering::SeqCst);
        let file = get_or_fetch(&cache, &objects, &gets, &da, &da, size)
            .await
            .expect("refill");
        assert!(contents(&file) == a);
        assert_eq!(gets.load(Ordering::SeqCst), before + 1);
        assert!(cache.open_cached(&da, size).is_some());

        // An object the bucket does not have: a clear error, and nothing left behind.
        let missing = Digest::sha256_of(b"not in the bucket");
        let err = get_or_fetch(&cache, &objects, &gets, &missing, &missing, 17)
            .await
            .expect_err("missing");
        assert!(matches!(err, ReadCacheError::Fetch { .. }), "{err}");
        assert!(err.to_string().contains(&missing.to_string()), "{err}");
        assert_eq!(std::fs::read_dir(&cache_dir).expect("dir").count(), 1);
    });
}
