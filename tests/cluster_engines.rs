//! The cluster profile's foundation against the real engines: the S3 blob store on SeaweedFS
//! (verified multipart puts, aborts that leave nothing behind, ranged reads, listing, presigned
//! URLs) and the PostgreSQL metadata (migrations, fill leases, tag moves, the shared token
//! signing key), several `Db` handles standing in for several replicas.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::engines::{Postgres, SeaweedFs, plain_http};
use common::random_bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use transship::cluster::fill_lease::{Acquired, Renewed};
use transship::cluster::objects::{MIN_PART_SIZE, Objects, ObjectsError, S3Options};
use transship::cluster::pg::{Db, PgError, PgOptions};
use transship::cluster::tags::TagMove;
use transship::oci::{Digest, RepoName, Tag};

const BUCKET: &str = "transship-blobs";

fn objects(s3: &SeaweedFs, prefix: Option<&str>) -> Objects {
    Objects::new(&S3Options {
        endpoint: s3.endpoint.clone(),
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        path_style: true,
        prefix: prefix.map(str::to_string),
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.secret_access_key.clone(),
        part_size: MIN_PART_SIZE,
    })
    .expect("valid options")
}

/// A SeaweedFS started for the test with `BUCKET` in it, and the blob store on it (None, after
/// a loud skip, where SeaweedFS cannot run outside CI).
fn bucket(prefix: Option<&str>) -> Option<(SeaweedFs, Objects)> {
    if !SeaweedFs::available() {
        return None;
    }
    let s3 = SeaweedFs::start();
    s3.create_bucket(BUCKET);
    let o = objects(&s3, prefix);
    Some((s3, o))
}

/// `data` as a stream of uneven chunks (as a network would hand it over).
fn chunked(
    data: &[u8],
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut n = 0usize;
    while at < data.len() {
        let len = [65_536, 1 << 20, 333_333, 7][n % 4].min(data.len() - at);
        pieces.push(Ok(Bytes::copy_from_slice(&data[at..at + len])));
        at += len;
        n += 1;
    }
    stream::iter(pieces)
}

async fn read_range(o: &Objects, digest: &Digest, range: std::ops::Range<u64>) -> Vec<u8> {
    o.get_range(digest, range)
        .await
        .expect("get")
        .try_collect::<Vec<Bytes>>()
        .await
        .expect("read")
        .concat()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_multipart_blob_round_trips_byte_exact_with_ranges_listing_and_a_presigned_url() {
    let Some((s3, o)) = bucket(Some("team/reg")) else {
        return;
    };
    // Three parts of 5 MiB (two full, one partial).
    let data = random_bytes(2 * MIN_PART_SIZE + 3 * 1024 * 1024 + 17, 1);
    let digest = Digest::sha256_of(&data);
    runtime().block_on(async {
        o.put_verified(&digest, data.len() as u64, chunked(&data))
            .await
            .expect("put");
        assert_eq!(
            o.head(&digest).await.expect("head"),
            Some(data.len() as u64)
        );
        let whole = read_range(&o, &digest, 0..data.len() as u64).await;
        assert!(whole == data, "the blob read back differs");
        // Ranges inside a part, across a part boundary, and the last byte.
        let boundary = MIN_PART_SIZE as u64;
        for r in [
            0..1,
            1000..70_000,
            boundary - 10..boundary + 10,
            2 * boundary - 1..2 * boundary + 4096,
            data.len() as u64 - 1..data.len() as u64,
        ] {
            let got = read_range(&o, &digest, r.clone()).await;
            assert!(
                got == data[r.start as usize..r.end as usize],
                "range {r:?} differs"
            );
        }
        let listed: Vec<_> = o.list().try_collect().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].digest, digest);
        assert_eq!(listed[0].size, data.len() as u64);
        // The multipart upload was completed, not left behind.
        assert_eq!(s3.multipart_uploads(BUCKET), Vec::<String>::new());
        // Underneath: the object sits at PREFIX/blobs/sha256/<2 hex>/<hex>, as the filer shows.
        let hex = digest.hex();
        let (status, body) = plain_http(
            &s3.filer,
            "GET",
            &format!(
                "/buckets/{BUCKET}/team/reg/blobs/sha256/{}/{hex}",
                &hex[..2]
            ),
            &[],
        )
        .expect("filer");
        assert_eq!(status, 200);
        assert!(body == data, "the filer's copy differs");
        // A presigned URL works for a client with no credentials at all.
        let url = o
            .presign_get(&digest, Duration::from_secs(300))
            .await
            .expect("presign");
        let path = url
            .strip_prefix(&s3.endpoint)
            .expect("the URL points at the endpoint");
        let (status, body) = plain_http(&s3.endpoint, "GET", path, &[]).expect("GET");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(body == data, "the presigned download differs");
        // Without its signature the same key is refused.
        let unsigned = path.split('?').next().expect("path");
        let (status, _) = plain_http(&s3.endpoint, "GET", unsigned, &[]).expect("GET");
        assert!(
            status == 403 || status == 401,
            "unsigned GET answered {status}"
        );
        o.delete(&digest).await.expect("delete");
        assert_eq!(o.head(&digest).await.expect("head"), None);
        o.delete(&digest).await.expect("deleting twice is fine");
        assert!(matches!(
            o.get_range(&digest, 0..1).await,
            Err(ObjectsError::NotFound(_))
        ));
    });
}

#[test]
fn wrong_bytes_leave_no_object_and_no_multipart_upload() {
    let Some((s3, o)) = bucket(None) else {
        return;
    };
    let big = random_bytes(3 * MIN_PART_SIZE + 5, 2);
    let small = random_bytes(1000, 3);
    runtime().block_on(async {
        // Multipart: the declared digest is another blob's.
        let claimed = Digest::sha256_of(b"something else");
        let err = o
            .put_verified(&claimed, big.len() as u64, chunked(&big))
            .await
            .expect_err("wrong digest");
        assert!(matches!(err, ObjectsError::Mismatch { .. }), "{err}");
        // Multipart: right digest, but more bytes than declared.
        let digest = Digest::sha256_of(&big);
        let err = o
            .put_verified(&digest, big.len() as u64 - 1, chunked(&big))
            .await
            .expect_err("too long");
        assert!(matches!(err, ObjectsError::TooLong { .. }), "{err}");
        // Multipart: the source fails after two parts went up.
        let failing = chunked(&big[..2 * MIN_PART_SIZE + 10]).chain(stream::iter([Err(
            std::io::Error::other("client went away"),
        )]));
        let err = o
            .put_verified(&digest, big.len() as u64, failing)
            .await
            .expect_err("source error");
        assert!(matches!(err, ObjectsError::Source(_)), "{err}");
        // Single PUT: bytes short of the declared size.
        let small_digest = Digest::sha256_of(&small);
        let err = o
            .put_verified(&small_digest, small.len() as u64, chunked(&small[..999]))
            .await
            .expect_err("short");
        assert!(matches!(err, ObjectsError::Mismatch { .. }), "{err}");
        for d in [&claimed, &digest, &small_digest] {
            assert_eq!(o.head(d).await.expect("head"), None, "{d} is visible");
        }
        let listed: Vec<_> = o.list().try_collect().await.expect("list");
        assert!(listed.is_empty(), "objects left: {listed:?}");
        assert_eq!(s3.multipart_uploads(BUCKET), Vec::<String>::new());
        // The same store still takes the right bytes.
        o.put_verified(&digest, big.len() as u64, chunked(&big))
            .await
            .expect("put");
        o.put_verified(&small_digest, small.len() as u64, chunked(&small))
            .await
            .expect("put small");
        let listed: HashSet<Digest> = o.list().map(|b| b.expect("listed").digest).collect().await;
        assert_eq!(listed, HashSet::from([digest, small_digest]));
        assert_eq!(s3.multipart_uploads(BUCKET), Vec::<String>::new());
    });
}

#[test]
fn a_cancelled_put_leaves_no_multipart_upload_behind() {
    let Some((s3, o)) = bucket(None) else {
        return;
    };
    let data = random_bytes(3 * MIN_PART_SIZE, 4);
    let digest = Digest::sha256_of(&data);
    runtime().block_on(async {
        // Two parts' worth of bytes, then a source that never sends more: the put is dropped
        // there (as a fill or push is at shutdown).
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
        let mut reached_tx = Some(reached_tx);
        let stalling = chunked(&data[..2 * MIN_PART_SIZE + 10]).chain(stream::poll_fn(move |_| {
            if let Some(tx) = reached_tx.take() {
                let _ = tx.send(());
            }
            std::task::Poll::Pending
        }));
        let put = o.put_verified(&digest, data.len() as u64, stalling);
        tokio::select! {
            r = put => panic!("a stalled put ended: {r:?}"),
            r = reached_rx => r.expect("the source reached its stall"),
        }
        // The put future is dropped: its multipart upload existed and is aborted.
        let mut left = s3.multipart_uploads(BUCKET);
        for _ in 0..200 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            left = s3.multipart_uploads(BUCKET);
        }
        assert_eq!(left, Vec::<String>::new());
        assert_eq!(o.head(&digest).await.expect("head"), None);
    });
}

async fn db(url: &str, pool_size: usize) -> Db {
    Db::open(&PgOptions {
        url: url.to_string(),
        password: None,
        pool_size,
    })
    .await
    .expect("open db")
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Runs `test` on a fresh database of a PostgreSQL started for it (skipped where PostgreSQL
/// cannot run outside CI).
fn with_database<F, Fut>(name: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !Postgres::available() {
        return;
    }
    let pg = Postgres::start();
    runtime().block_on(async {
        let url = pg.create_database(name).await;
        test(url).await;
    });
}

#[test]
fn migrations_apply_once_even_when_replicas_start_together_and_a_newer_schema_is_refused() {
    with_database("migrations", |url| async move {
        let opened = futures_util::future::join_all((0..6).map(|_| db(&url, 2))).await;
        assert_eq!(opened.len(), 6);
        let check = raw(&url).await;
        let rows = check
            .query(
                "SELECT version, name FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .expect("query");
        let versions: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(versions, vec![(1, "init".to_string())]);
        // Re-opening is a no-op.
        db(&url, 1).await;
        let count: i64 = check
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(count, 1);
        // A database a newer binary migrated is refused, with a message saying what to do.
        check
            .execute(
                "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
                &[],
            )
            .await
            .expect("insert");
        let err = Db::open(&PgOptions {
            url: url.clone(),
            password: None,
            pool_size: 1,
        })
        .await
        .err()
        .expect("refused");
        assert!(
            matches!(
                err,
                PgError::SchemaTooNew {
                    database: 999,
                    binary: 1
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade transship"), "{err}");
    });
}

#[test]
fn one_fill_owner_among_30_concurrent_askers_and_take_over_after_expiry() {
    with_database("leases", |url| async move {
        // Three replicas, thirty askers spread across them.
        let replicas = [db(&url, 12).await, db(&url, 12).await, db(&url, 12).await];
        let digest = Digest::sha256_of(b"cold blob");
        let asks = (0..30).map(|i| {
            let replica = replicas[i % 3].clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                let me = format!("http://127.0.0.{}:5000/#{i}", 2 + i % 3);
                let got = replica
                    .acquire_fill(&digest, &me, Duration::from_secs(60))
                    .await
                    .expect("acquire");
                (me, got)
            })
        });
        let results: Vec<(String, Acquired)> = futures_util::future::join_all(asks)
            .await
            .into_iter()
            .map(|r| r.expect("task"))
            .collect();
        let owners: Vec<&String> = results
            .iter()
            .filter(|(_, a)| matches!(a, Acquired::Owner(_)))
            .map(|(me, _)| me)
            .collect();
        assert_eq!(owners.len(), 1, "{results:?}");
        let owner = owners[0].clone();
        for (me, a) in &results {
            match a {
                Acquired::Owner(lease) => assert!(!lease.took_over),
                Acquired::Follow(url) => assert_eq!(url, &owner, "{me} follows someone else"),
            }
        }

        // Take-over: A's lease runs out, B takes it; A can neither renew nor release B's.
        let other = Digest::sha256_of(b"another blob");
        let a = &replicas[0];
        let b = &replicas[1];
        let Acquired::Owner(lease_a) = a
            .acquire_fill(&other, "http://a", Duration::from_millis(300))
            .await
            .expect("acquire")
        else {
            panic!("the first asker owns");
        };
        assert_eq!(
            b.acquire_fill(&other, "http://b", Duration::from_secs(60))
                .await
                .expect("acquire"),
            Acquired::Follow("http://a".into())
        );
        let lease_b = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match b
                .acquire_fill(&other, "http://b", Duration::from_secs(60))
                .await
                .expect("acquire")
            {
                Acquired::Owner(lease) => break lease,
                Acquired::Follow(owner) => assert_eq!(owner, "http://a"),
            }
        };
        assert!(lease_b.took_over);
        assert_eq!(
            a.renew_fill(&lease_a, Duration::from_secs(60))
                .await
                .expect("renew"),
            Renewed::Lost
        );
        a.release_fill(&lease_a).await.expect("release");
        let c = &replicas[2];
        assert_eq!(
            c.acquire_fill(&other, "http://c", Duration::from_secs(60))
                .await
                .expect("acquire"),
            Acquired::Follow("http://b".into())
        );
        assert_eq!(
            b.renew_fill(&lease_b, Duration::from_secs(60))
                .await
                .expect("renew"),
            Renewed::Held
        );
        b.release_fill(&lease_b).await.expect("release");
        let Acquired::Owner(lease_c) = c
            .acquire_fill(&other, "http://c", Duration::from_secs(60))
            .await
            .expect("acquire")
        else {
            panic!("a released lease is free");
        };
        assert!(!lease_c.took_over);
    });
}

#[test]
fn concurrent_tag_moves_on_two_replicas_end_with_one_winner_everyone_reads() {
    with_database("tags", |url| async move {
        let (a, b, c) = (db(&url, 4).await, db(&url, 4).await, db(&url, 4).await);
        let repo: RepoName = "team/app".parse().expect("repo");
        let tag: Tag = "latest".parse().expect("tag");
        let writer = |replica: Db, name: &'static str| {
            let (repo, tag) = (repo.clone(), tag.clone());
            tokio::spawn(async move {
                let mut moves = Vec::new();
                for i in 0..25 {
                    let digest = Digest::sha256_of(format!("{name}{i}").as_bytes());
                    moves.push(replica.put_tag(&repo, &tag, &digest).await.expect("put"));
                }
                moves
            })
        };
        let (ma, mb) = tokio::join!(writer(a.clone(), "a"), writer(b.clone(), "b"));
        let moves: Vec<TagMove> = ma.expect("a").into_iter().chain(mb.expect("b")).collect();
        let creations = moves.iter().filter(|m| **m == TagMove::Created).count();
        assert_eq!(creations, 1, "{moves:?}");
        // Every replica reads the same winner...
        let seen = [
            a.tag(&repo, &tag).await.expect("read"),
            b.tag(&repo, &tag).await.expect("read"),
            c.tag(&repo, &tag).await.expect("read"),
        ];
        let winner = seen[0].clone().expect("the tag exists");
        assert!(seen.iter().all(|s| s.as_ref() == Some(&winner)), "{seen:?}");
        // ...which is the last entry of one unbroken history chain holding every change.
        let history = c.tag_history(&repo, &tag).await.expect("history");
        let changes = moves.iter().filter(|m| **m != TagMove::Unchanged).count();
        assert_eq!(history.len(), changes);
        assert_eq!(history[0].previous, None);
        for pair in history.windows(2) {
            assert_eq!(pair[1].previous.as_ref(), Some(&pair[0].digest));
        }
        assert_eq!(history.last().map(|h| &h.digest), Some(&winner));
        // Writing the current value again changes nothing.
        assert_eq!(
            a.put_tag(&repo, &tag, &winner).await.expect("put"),
            TagMove::Unchanged
        );
        assert_eq!(
            c.tag_history(&repo, &tag).await.expect("history").len(),
            changes
        );
    });
}

#[test]
fn the_token_signing_key_is_created_once_for_all_replicas() {
    with_database("keys", |url| async move {
        let replicas: Vec<Db> = futures_util::future::join_all((0..4).map(|_| db(&url, 2))).await;
        let keys = futures_util::future::join_all(replicas.iter().map(|r| r.token_signing_key()))
            .await
            .into_iter()
            .map(|k| k.expect("key"))
            .collect::<Vec<_>>();
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "replicas got different keys"
        );
        aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &keys[0],
        )
        .expect("a P-256 PKCS#8 key");
        // A replica starting later reads the same key.
        let later = db(&url, 1).await;
        assert_eq!(later.token_signing_key().await.expect("key"), keys[0]);
        let count: i64 = raw(&url)
            .await
            .query_one("SELECT count(*) FROM token_signing_key", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(count, 1);
    });
}
