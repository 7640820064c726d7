//! The cluster profile's foundation against the real engines: the S3 blob store on SeaweedFS
//! (verified multipart puts, aborts that leave nothing behind, ranged reads, listing, presigned
//! URLs), the PostgreSQL metadata (migrations, fill leases, tag moves, the shared token
//! signing key, the registry's links, manifests, tags, referrers and listings, and pushes racing
//! a GC) and push upload sessions continued across replicas; several `Db` and `Objects`
//! handles stand in for several replicas.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::engines::{Postgres, SeaweedFs, plain_http};
use common::random_bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use transship::cluster::fill_lease::{Acquired, Renewed};
use transship::cluster::manifests::{NewManifest, PutManifestError};
use transship::cluster::objects::{MIN_PART_SIZE, Objects, ObjectsError};
use transship::cluster::pg::{Db, PgError, PgOptions};
use transship::cluster::tags::{TagChange, TagMove};
use transship::cluster::uploads::{SessionId, UploadOptions, Uploads, UploadsError};
use transship::oci::{Algorithm, Digest, Digester, RepoName, Tag};

const BUCKET: &str = "transship-blobs";

fn objects(s3: &SeaweedFs, prefix: Option<&str>) -> Objects {
    s3.objects(BUCKET, prefix)
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
        ca_roots: None,
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
        assert_eq!(
            versions,
            vec![
                (1, "init".to_string()),
                (2, "upload_tails".to_string()),
                (3, "registry_metadata".to_string()),
                (4, "identity_notify".to_string()),
                (5, "console_sessions".to_string()),
                (6, "event_delivery".to_string()),
                (7, "cache_state".to_string())
            ]
        );
        // Re-opening is a no-op.
        db(&url, 1).await;
        let count: i64 = check
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(count, 7);
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
            ca_roots: None,
        })
        .await
        .err()
        .expect("refused");
        assert!(
            matches!(
                err,
                PgError::SchemaTooNew {
                    database: 999,
                    binary
                } if binary == transship::cluster::migrate::latest()
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
            assert_eq!(pair[1].previous, pair[0].digest);
        }
        assert_eq!(
            history.last().and_then(|h| h.digest.as_ref()),
            Some(&winner)
        );
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

/// SeaweedFS and PostgreSQL started for one test, and three upload "replicas" on them, each
/// with its own `Db` pool and `Objects` client.
struct Replicas {
    s3: Arc<SeaweedFs>,
    url: String,
    up: [Uploads; 3],
    /// A reader of the bucket of its own.
    objects: Objects,
}

/// The prefix the upload tests' blob store uses.
const UPLOAD_PREFIX: &str = "reg";
/// A lease far longer than any step of the tests that do not wait for one to expire.
const LONG_LEASE: Duration = Duration::from_secs(60);

fn with_replicas<F, Fut>(name: &str, lease: Duration, test: F)
where
    F: FnOnce(Replicas) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !SeaweedFs::available() || !Postgres::available() {
        return;
    }
    // The engines live here, not in what the test gets: a test's async block captures only
    // the fields it uses, and would drop (stop) an engine it never names.
    let s3 = Arc::new(SeaweedFs::start());
    s3.create_bucket(BUCKET);
    let pg = Postgres::start();
    runtime().block_on(async {
        let url = pg.create_database(name).await;
        let mut up = Vec::new();
        for replica in ["a", "b", "c"] {
            up.push(Uploads::new(
                db(&url, 4).await,
                objects(&s3, Some(UPLOAD_PREFIX)),
                UploadOptions {
                    replica: replica.into(),
                    lease,
                    max_sessions: 4096,
                    max_sessions_per_client: 512,
                },
            ));
        }
        let Ok(up) = <[Uploads; 3]>::try_from(up) else {
            unreachable!("three replicas")
        };
        let objects = objects(&s3, Some(UPLOAD_PREFIX));
        test(Replicas {
            s3: s3.clone(),
            url,
            up,
            objects,
        })
        .await;
    });
}

impl Replicas {
    /// Asserts nothing of session `id` is left: no row, no parts, no multipart upload, no
    /// assembly object.
    async fn assert_gone(&self, repo: &RepoName, id: SessionId) {
        for r in &self.up {
            assert!(
                matches!(r.offset(repo, id).await, Err(UploadsError::NotFound)),
                "session {id} is still known"
            );
        }
        let parts = self
            .sql_i64(
                "SELECT count(*) FROM upload_parts WHERE session_id = $1::text::uuid",
                &id.to_string(),
            )
            .await;
        assert_eq!(parts, 0, "parts of {id} are left");
        assert_eq!(
            self.objects
                .key_size(&self.objects.upload_key(&id.to_string()))
                .await
                .expect("head"),
            None,
            "the assembly object of {id} is left"
        );
    }

    fn open_multipart_uploads(&self) -> Vec<String> {
        self.s3.multipart_uploads(BUCKET)
    }

    /// The one `bigint` `query` returns for `param`.
    async fn sql_i64(&self, query: &str, param: &str) -> i64 {
        raw(&self.url)
            .await
            .query_one(query, &[&param])
            .await
            .expect("query")
            .get(0)
    }
}

const MIB: usize = 1 << 20;

fn repo(name: &str) -> RepoName {
    name.parse().expect("repo name")
}

#[test]
fn a_chunked_upload_started_on_a_continues_on_b_and_finishes_on_c_byte_exact() {
    with_replicas("handover", LONG_LEASE, |r| async move {
        let [a, b, c] = &r.up;
        let app = repo("team/app");
        let data = random_bytes(4 * MIN_PART_SIZE + 3 * MIB + 17, 11);
        let digest = Digest::sha256_of(&data);
        let id = a
            .start(&app, Algorithm::Sha256, Some("tester"))
            .await
            .expect("start");
        // Requests smaller than a part (held in the row), crossing a part boundary, tiny, and
        // spanning several parts, each on the replica named.
        let plan = [
            (a, 0..MIB, 0),
            (a, MIB..9 * MIB, 1),
            (b, 9 * MIB..9 * MIB + 100, 1),
            (b, 9 * MIB + 100..21 * MIB, 4),
            (c, 21 * MIB..data.len(), 4),
        ];
        for (replica, range, parts) in plan {
            let offset = replica
                .append(&app, id, range.start as u64, chunked(&data[range.clone()]))
                .await
                .expect("append");
            assert_eq!(offset, range.end as u64);
            for other in &r.up {
                assert_eq!(other.offset(&app, id).await.expect("offset"), offset);
            }
            let recorded = r
                .sql_i64(
                    "SELECT count(*) FROM upload_parts WHERE session_id = $1::text::uuid",
                    &id.to_string(),
                )
                .await;
            assert_eq!(recorded, parts, "after {range:?}");
        }
        assert_eq!(r.open_multipart_uploads().len(), 1);
        assert_eq!(
            c.finish(&app, id, &digest).await.expect("finish"),
            data.len() as u64
        );
        let back = read_range(&r.objects, &digest, 0..data.len() as u64).await;
        assert!(back == data, "the blob read back differs");
        r.assert_gone(&app, id).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
        assert!(matches!(
            c.finish(&app, id, &digest).await,
            Err(UploadsError::NotFound)
        ));
        let size = r
            .sql_i64(
                "SELECT size FROM blobs WHERE digest = $1",
                &digest.to_string(),
            )
            .await;
        assert_eq!(size, data.len() as i64);
        let check = raw(&r.url).await;

        // The same bytes pushed to another repository: linked, not stored twice.
        let other = repo("team/other");
        let again = b
            .start(&other, Algorithm::Sha256, None)
            .await
            .expect("start");
        b.append(&other, again, 0, chunked(&data))
            .await
            .expect("append");
        assert_eq!(
            a.finish(&other, again, &digest).await.expect("finish"),
            data.len() as u64
        );
        r.assert_gone(&other, again).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
        let links: Vec<(String, bool)> = check
            .query(
                "SELECT r.name, l.pushed FROM repo_blobs l JOIN repositories r ON r.id = l.repo_id
                  WHERE l.digest = $1 ORDER BY r.name",
                &[&digest.to_string()],
            )
            .await
            .expect("links")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(
            links,
            vec![
                ("team/app".to_string(), true),
                ("team/other".to_string(), true)
            ]
        );
        let listed: Vec<_> = r.objects.list().try_collect().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        // A session is bound to its repository.
        let elsewhere = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        assert!(matches!(
            b.append(&other, elsewhere, 0, chunked(b"x")).await,
            Err(UploadsError::NotFound)
        ));
    });
}

#[test]
fn empty_small_exact_and_sha512_uploads_complete_across_replicas() {
    with_replicas("shapes", LONG_LEASE, |r| async move {
        let [a, b, c] = &r.up;
        let app = repo("team/shapes");
        // Zero bytes: no request body at all.
        let empty = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        let digest = Digest::sha256_of(b"");
        assert_eq!(b.finish(&app, empty, &digest).await.expect("finish"), 0);
        assert_eq!(r.objects.head(&digest).await.expect("head"), Some(0));
        r.assert_gone(&app, empty).await;

        // A small blob in three requests on three replicas: one PUT, no multipart upload.
        let small = random_bytes(1000, 12);
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        for (replica, range) in [(a, 0..10), (b, 10..600), (c, 600..1000)] {
            replica
                .append(&app, id, range.start as u64, chunked(&small[range]))
                .await
                .expect("append");
        }
        let no_upload = r
            .sql_i64(
                "SELECT count(*) FROM upload_sessions WHERE id = $1::text::uuid AND s3_upload_id IS NULL",
                &id.to_string(),
            )
            .await;
        assert_eq!(no_upload, 1);
        let small_digest = Digest::sha256_of(&small);
        assert_eq!(
            a.finish(&app, id, &small_digest).await.expect("finish"),
            1000
        );
        assert!(read_range(&r.objects, &small_digest, 0..1000).await == small);
        r.assert_gone(&app, id).await;

        // A small blob whose session started a multipart upload for a first part that never
        // went up: finishing it as one PUT aborts that upload.
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        b.append(&app, id, 0, chunked(&small[..999]))
            .await
            .expect("append");
        let key = r.objects.upload_key(&id.to_string());
        let started = r.objects.create_parts(&key).await.expect("create");
        raw(&r.url)
            .await
            .execute(
                "UPDATE upload_sessions SET s3_upload_id = $2 WHERE id = $1::text::uuid",
                &[&id.to_string(), &started],
            )
            .await
            .expect("record the upload");
        assert_eq!(r.open_multipart_uploads().len(), 1);
        let shorter = Digest::sha256_of(&small[..999]);
        assert_eq!(c.finish(&app, id, &shorter).await.expect("finish"), 999);
        assert!(read_range(&r.objects, &shorter, 0..999).await == small[..999]);
        r.assert_gone(&app, id).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());

        // Exactly two parts: nothing is left for a last part.
        let exact = random_bytes(2 * MIN_PART_SIZE, 13);
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        a.append(&app, id, 0, chunked(&exact))
            .await
            .expect("append");
        let tail = r
            .sql_i64(
                "SELECT length(tail)::bigint FROM upload_sessions WHERE id = $1::text::uuid",
                &id.to_string(),
            )
            .await;
        assert_eq!(tail, 0);
        let exact_digest = Digest::sha256_of(&exact);
        b.finish(&app, id, &exact_digest).await.expect("finish");
        assert!(read_range(&r.objects, &exact_digest, 0..exact.len() as u64).await == exact);
        r.assert_gone(&app, id).await;

        // sha512: its hash state goes from replica to replica too.
        let long = random_bytes(MIN_PART_SIZE + 3 * MIB + 5, 14);
        let mut hasher = Digester::new(Algorithm::Sha512);
        hasher.update(&long);
        let long_digest = hasher.finish();
        let id = a.start(&app, Algorithm::Sha512, None).await.expect("start");
        a.append(&app, id, 0, chunked(&long[..6 * MIB]))
            .await
            .expect("append");
        b.append(&app, id, 6 * MIB as u64, chunked(&long[6 * MIB..]))
            .await
            .expect("append");
        c.finish(&app, id, &long_digest).await.expect("finish");
        assert!(read_range(&r.objects, &long_digest, 0..long.len() as u64).await == long);
        r.assert_gone(&app, id).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
    });
}

#[test]
fn a_wrong_digest_leaves_no_object_and_no_multipart_upload() {
    with_replicas("wrong", LONG_LEASE, |r| async move {
        let [a, b, _] = &r.up;
        let app = repo("team/wrong");
        let claimed = Digest::sha256_of(b"something else");
        for (len, seed) in [(2 * MIN_PART_SIZE + 2 * MIB + 5, 21), (1000, 22)] {
            let data = random_bytes(len, seed);
            let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
            a.append(&app, id, 0, chunked(&data)).await.expect("append");
            let err = b
                .finish(&app, id, &claimed)
                .await
                .expect_err("wrong digest");
            let actual = Digest::sha256_of(&data);
            assert!(
                matches!(&err, UploadsError::DigestMismatch { expected, actual: got }
                    if *expected == claimed && *got == actual),
                "{err}"
            );
            for d in [&claimed, &actual] {
                assert_eq!(r.objects.head(d).await.expect("head"), None, "{d} visible");
            }
            r.assert_gone(&app, id).await;
            assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
        }
        // A wrong digest of another algorithm than the session hashes is refused the same
        // way (the bytes are hashed again with it, from the assembled object).
        let data = random_bytes(MIN_PART_SIZE + 10, 23);
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        a.append(&app, id, 0, chunked(&data)).await.expect("append");
        let wrong = Digest::of(Algorithm::Sha512, b"something else");
        let err = b.finish(&app, id, &wrong).await.expect_err("wrong sha512");
        assert!(matches!(err, UploadsError::DigestMismatch { .. }), "{err}");
        r.assert_gone(&app, id).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
        let listed: Vec<_> = r.objects.list().try_collect().await.expect("list");
        assert!(listed.is_empty(), "{listed:?}");
    });
}

/// One chunk, sent only once `gate` opens; `polled` says the append has started reading.
fn gated(
    chunk: Vec<u8>,
    polled: tokio::sync::oneshot::Sender<()>,
    gate: tokio::sync::oneshot::Receiver<()>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    stream::once(async move {
        let _ = polled.send(());
        let _ = gate.await;
        Ok(Bytes::from(chunk))
    })
}

#[test]
fn of_concurrent_appends_to_one_session_exactly_one_succeeds() {
    with_replicas("race", LONG_LEASE, |r| async move {
        let app = repo("team/race");
        let [a, b, c] = &r.up;
        let first = random_bytes(3 * MIB, 31);
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        a.append(&app, id, 0, chunked(&first))
            .await
            .expect("append");
        let at = first.len() as u64;

        // Two appends at the same offset on A and B; whichever takes the session holds it
        // (its body stalls until the other has answered).
        let mut gates = Vec::new();
        let mut tasks = Vec::new();
        for (i, replica) in [a, b].into_iter().enumerate() {
            let (polled_tx, _polled_rx) = tokio::sync::oneshot::channel();
            let (gate_tx, gate_rx) = tokio::sync::oneshot::channel();
            gates.push(gate_tx);
            let chunk = random_bytes(4 * MIB, 40 + i as u64);
            let (replica, app) = (replica.clone(), app.clone());
            tasks.push(tokio::spawn(async move {
                let got = replica
                    .append(&app, id, at, gated(chunk.clone(), polled_tx, gate_rx))
                    .await;
                (chunk, got)
            }));
        }
        let (loser, winner) =
            match futures_util::future::select(tasks.pop().expect("b"), tasks.pop().expect("a"))
                .await
            {
                futures_util::future::Either::Left((done, other))
                | futures_util::future::Either::Right((done, other)) => (done, other),
            };
        let (_, lost) = loser.expect("task");
        assert!(matches!(lost, Err(UploadsError::InUse)), "{lost:?}");
        for gate in gates {
            let _ = gate.send(());
        }
        let (won_bytes, won) = winner.await.expect("task");

        let offset = won.expect("the holder's append");
        assert_eq!(offset, at + won_bytes.len() as u64);
        for replica in &r.up {
            assert_eq!(replica.offset(&app, id).await.expect("offset"), offset);
        }
        // The loser retrying at the offset it knew is told where the session is.
        assert!(matches!(
            b.append(&app, id, at, chunked(b"late")).await,
            Err(UploadsError::OffsetMismatch { expected, offset: now }) if expected == at && now == offset
        ));

        // Twelve appends at once, spread over the replicas, all at the same offset: exactly
        // one lands, the others are told the session is busy or has moved on.
        let racers = (0..12).map(|i| {
            let replica = r.up[i % 3].clone();
            let app = app.clone();
            let chunk = random_bytes(64 * 1024 + i, 50 + i as u64);
            tokio::spawn(async move {
                let got = replica.append(&app, id, offset, chunked(&chunk)).await;
                (chunk, got)
            })
        });
        let results: Vec<(Vec<u8>, Result<u64, UploadsError>)> =
            futures_util::future::join_all(racers)
                .await
                .into_iter()
                .map(|t| t.expect("task"))
                .collect();
        let landed: Vec<&Vec<u8>> = results
            .iter()
            .filter(|(_, got)| got.is_ok())
            .map(|(chunk, _)| chunk)
            .collect();
        assert_eq!(
            landed.len(),
            1,
            "{:?}",
            results.iter().map(|(_, g)| g).collect::<Vec<_>>()
        );
        for (_, got) in &results {
            assert!(
                matches!(
                    got,
                    Ok(_) | Err(UploadsError::InUse) | Err(UploadsError::OffsetMismatch { .. })
                ),
                "{got:?}"
            );
        }
        let end = offset + landed[0].len() as u64;
        assert_eq!(c.offset(&app, id).await.expect("offset"), end);
        let whole = [first, won_bytes, landed[0].clone()].concat();
        let digest = Digest::sha256_of(&whole);
        assert_eq!(
            c.finish(&app, id, &digest).await.expect("finish"),
            whole.len() as u64
        );
        assert!(read_range(&r.objects, &digest, 0..end).await == whole);
    });
}

/// `data` in uneven chunks, then a source that never sends more (after saying so on
/// `reached`).
fn stalling(
    data: &[u8],
    reached: tokio::sync::oneshot::Sender<()>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut reached = Some(reached);
    chunked(data).chain(stream::poll_fn(move |_| {
        if let Some(tx) = reached.take() {
            let _ = tx.send(());
        }
        std::task::Poll::Pending
    }))
}

/// Retries `append` while the session is held (by a request being dropped, or a dead
/// replica's lease), at most about a minute.
async fn append_when_free(
    up: &Uploads,
    repo: &RepoName,
    id: SessionId,
    at: u64,
    data: &[u8],
) -> Result<u64, UploadsError> {
    for _ in 0..600 {
        match up.append(repo, id, at, chunked(data)).await {
            Err(UploadsError::InUse) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => return other,
        }
    }
    Err(UploadsError::InUse)
}

#[test]
fn an_interrupted_append_leaves_the_session_resumable_from_its_last_recorded_offset() {
    with_replicas("dropped", Duration::from_secs(3), |r| async move {
        let app = repo("team/dropped");
        let [a, b, c] = &r.up;
        let data = random_bytes(3 * MIN_PART_SIZE + MIB, 61);
        let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        a.append(&app, id, 0, chunked(&data[..3 * MIB]))
            .await
            .expect("append");

        // A request that sends 6 MiB more (one part fills at 5 MiB) and is then dropped.
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let append = a.append(
            &app,
            id,
            3 * MIB as u64,
            stalling(&data[3 * MIB..9 * MIB], reached_tx),
        );
        tokio::select! {
            got = append => panic!("a stalled append ended: {got:?}"),
            reached = reached_rx => reached.expect("the body reached its stall"),
        }
        // The session is at the end of the part that was recorded; the 4 MiB after it are
        // not part of it.
        let part_end = MIN_PART_SIZE as u64;
        assert_eq!(b.offset(&app, id).await.expect("offset"), part_end);
        let stale = append_when_free(b, &app, id, 3 * MIB as u64, b"x").await;
        assert!(
            matches!(stale, Err(UploadsError::OffsetMismatch { offset, .. }) if offset == part_end),
            "{stale:?}"
        );

        // A body that fails after another part: the session ends at that part, released at
        // once.
        let failing =
            chunked(&data[MIN_PART_SIZE..MIN_PART_SIZE + 7 * MIB]).chain(stream::iter([Err(
                std::io::Error::other("client went away"),
            )]));
        let err = b
            .append(&app, id, part_end, failing)
            .await
            .expect_err("source error");
        assert!(matches!(err, UploadsError::Source(_)), "{err}");
        let second_end = 2 * MIN_PART_SIZE as u64;
        assert_eq!(c.offset(&app, id).await.expect("offset"), second_end);

        // A replica that dies holding the session (its request never ends, never releases):
        // the others are refused until its lease runs out, then take over.
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let mut dead = Box::pin(c.append(
            &app,
            id,
            second_end,
            stalling(
                &data[second_end as usize..second_end as usize + MIB],
                reached_tx,
            ),
        ));
        tokio::select! {
            got = &mut dead => panic!("a stalled append ended: {got:?}"),
            reached = reached_rx => reached.expect("the body reached its stall"),
        }
        std::mem::forget(dead);
        assert!(matches!(
            a.append(&app, id, second_end, chunked(b"x")).await,
            Err(UploadsError::InUse)
        ));
        let end = append_when_free(a, &app, id, second_end, &data[second_end as usize..])
            .await
            .expect("taken over after the lease");
        assert_eq!(end, data.len() as u64);
        let digest = Digest::sha256_of(&data);
        b.finish(&app, id, &digest).await.expect("finish");
        assert!(read_range(&r.objects, &digest, 0..end).await == data);
        r.assert_gone(&app, id).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
    });
}

#[test]
fn cancel_and_reap_leave_nothing_behind() {
    with_replicas("reap", LONG_LEASE, |r| async move {
        let app = repo("team/reap");
        let [a, b, c] = &r.up;
        let big = random_bytes(2 * MIN_PART_SIZE + 2 * MIB, 71);
        let session_with_parts = || async {
            let id = a.start(&app, Algorithm::Sha256, None).await.expect("start");
            a.append(&app, id, 0, chunked(&big)).await.expect("append");
            id
        };
        // Cancel on another replica than the one that wrote.
        let x = session_with_parts().await;
        assert_eq!(r.open_multipart_uploads().len(), 1);
        b.cancel(&app, x).await.expect("cancel");
        r.assert_gone(&app, x).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
        assert!(matches!(
            b.cancel(&app, x).await,
            Err(UploadsError::NotFound)
        ));
        assert!(matches!(
            a.append(&app, x, 0, chunked(b"x")).await,
            Err(UploadsError::NotFound)
        ));

        // Cancel while a request holds the session: the request's bytes go nowhere.
        let held = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        let (polled_tx, polled_rx) = tokio::sync::oneshot::channel();
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel();
        let writer = {
            let (a, app, body) = (a.clone(), app.clone(), big.clone());
            tokio::spawn(async move {
                a.append(&app, held, 0, gated(body, polled_tx, gate_rx))
                    .await
            })
        };
        polled_rx.await.expect("the append holds the session");
        c.cancel(&app, held).await.expect("cancel");
        gate_tx.send(()).expect("the append waits");
        let lost = writer.await.expect("task");
        assert!(matches!(lost, Err(UploadsError::Lost)), "{lost:?}");
        r.assert_gone(&app, held).await;
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());

        // Reap: two abandoned sessions (one with parts, one with only a tail), one active,
        // and one abandoned but still held by a live request.
        let old_parts = session_with_parts().await;
        let old_tail = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        a.append(&app, old_tail, 0, chunked(&big[..1000]))
            .await
            .expect("append");
        let active = session_with_parts().await;
        let old_held = a.start(&app, Algorithm::Sha256, None).await.expect("start");
        let check = raw(&r.url).await;
        for id in [old_parts, old_tail, old_held] {
            check
                .execute(
                    "UPDATE upload_sessions SET touched_at = now() - interval '2 hours'
                      WHERE id = $1::text::uuid",
                    &[&id.to_string()],
                )
                .await
                .expect("age");
        }
        check
            .execute(
                "UPDATE upload_sessions SET holder = 'elsewhere', held_until = now() + interval '1 hour'
                  WHERE id = $1::text::uuid",
                &[&old_held.to_string()],
            )
            .await
            .expect("hold");
        assert_eq!(r.open_multipart_uploads().len(), 2);
        assert_eq!(
            c.reap(Duration::from_secs(3 * 3600)).await.expect("reap"),
            0
        );
        assert_eq!(c.reap(Duration::from_secs(3600)).await.expect("reap"), 2);
        r.assert_gone(&app, old_parts).await;
        r.assert_gone(&app, old_tail).await;
        assert_eq!(r.open_multipart_uploads().len(), 1);
        assert_eq!(
            b.offset(&app, active).await.expect("offset"),
            big.len() as u64
        );
        assert_eq!(b.offset(&app, old_held).await.expect("offset"), 0);
        assert_eq!(c.reap(Duration::from_secs(3600)).await.expect("reap"), 0);
        // The active session still completes.
        let digest = Digest::sha256_of(&big);
        b.finish(&app, active, &digest).await.expect("finish");
        assert_eq!(r.open_multipart_uploads(), Vec::<String>::new());
    });
}

// ---- the private registry's metadata (links, manifests, tags, referrers, listings) ----------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A manifest as a handler would hand it to `put_manifest`: bytes with deliberately odd
/// formatting (stored byte-exact) and what it references.
struct Pushed {
    body: Vec<u8>,
    digest: Digest,
    media_type: &'static str,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
    subject: Option<Digest>,
    artifact_type: Option<String>,
    descriptor: Option<serde_json::Value>,
}

impl Pushed {
    fn image(blobs: &[Digest], subject: Option<&Digest>, artifact_type: Option<&str>) -> Self {
        let layers: Vec<String> = blobs[1..]
            .iter()
            .map(|d| format!("{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\", \"digest\":\"{d}\",\"size\":1}}"))
            .collect();
        let mut body = format!(
            "{{\n  \"schemaVersion\": 2,\t\"mediaType\":\"{OCI_MANIFEST}\",\n\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{}\",\"size\":1}},\"layers\":[{}]",
            blobs[0],
            layers.join(",  ")
        );
        if let Some(s) = subject {
            body.push_str(&format!(
                ",\"subject\":{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"{s}\",\"size\":1}}"
            ));
        }
        if let Some(t) = artifact_type {
            body.push_str(&format!(",\"artifactType\":\"{t}\""));
        }
        body.push_str("}   \n");
        Self::new(
            body.into_bytes(),
            OCI_MANIFEST,
            blobs,
            &[],
            subject,
            artifact_type,
        )
    }

    fn index(children: &[Digest]) -> Self {
        let entries: Vec<String> = children
            .iter()
            .map(|d| format!("{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"{d}\",\"size\":1}}"))
            .collect();
        let body = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[{}]}}",
            entries.join(",")
        );
        Self::new(body.into_bytes(), OCI_INDEX, &[], children, None, None)
    }

    fn new(
        body: Vec<u8>,
        media_type: &'static str,
        blobs: &[Digest],
        children: &[Digest],
        subject: Option<&Digest>,
        artifact_type: Option<&str>,
    ) -> Self {
        let digest = Digest::sha256_of(&body);
        let descriptor = subject.map(|_| {
            serde_json::json!({
                "mediaType": media_type,
                "digest": digest.to_string(),
                "size": body.len(),
                "artifactType": artifact_type,
            })
        });
        Self {
            body,
            digest,
            media_type,
            blobs: blobs.to_vec(),
            children: children.to_vec(),
            subject: subject.cloned(),
            artifact_type: artifact_type.map(str::to_string),
            descriptor,
        }
    }

    fn to<'a>(&'a self, repo: &'a RepoName, tags: &'a [Tag]) -> NewManifest<'a> {
        NewManifest {
            repo,
            digest: &self.digest,
            media_type: self.media_type,
            body: &self.body,
            blobs: &self.blobs,
            children: &self.children,
            subject: self.subject.as_ref(),
            artifact_type: self.artifact_type.as_deref(),
            referrer_descriptor: self.descriptor.as_ref(),
            tags,
            pushed: true,
        }
    }
}

fn tags(names: &[&str]) -> Vec<Tag> {
    names.iter().map(|t| t.parse().expect("tag")).collect()
}

/// Links blobs of `contents` into `repo`; their digests.
async fn link_all(db: &Db, repo: &RepoName, contents: &[&str]) -> Vec<Digest> {
    let mut out = Vec::new();
    for c in contents {
        let d = Digest::sha256_of(c.as_bytes());
        db.link_blob(repo, &d, c.len() as u64, true)
            .await
            .expect("link");
        out.push(d);
    }
    out
}

/// Whether `repo` has manifest `digest`.
async fn has_manifest(db: &Db, repo: &RepoName, digest: &Digest) -> bool {
    db.manifest(repo, digest).await.expect("read").is_some()
}

/// The one `bigint` a query without parameters returns.
async fn count(check: &tokio_postgres::Client, query: &str) -> i64 {
    check.query_one(query, &[]).await.expect(query).get(0)
}

/// The texts a query for `digest` returns.
async fn texts(check: &tokio_postgres::Client, query: &str, digest: &Digest) -> Vec<String> {
    let rows = check
        .query(query, &[&digest.to_string()])
        .await
        .expect(query);
    rows.iter().map(|r| r.get(0)).collect()
}

/// Rows of `table` (a name from this file, never from input).
async fn rows_in(check: &tokio_postgres::Client, table: &str) -> i64 {
    count(check, &format!("SELECT count(*) FROM {table}")).await
}

#[test]
fn blob_links_and_mounts_are_per_repository() {
    with_database("links", |url| async move {
        let db = db(&url, 2).await;
        let check = raw(&url).await;
        let (app, other, third) = (repo("team/app"), repo("team/other"), repo("team/third"));
        let d = Digest::sha256_of(b"layer");
        assert!(!db.repo_exists(&app).await.expect("exists"));
        db.link_blob(&app, &d, 5, false).await.expect("link");
        assert!(db.repo_exists(&app).await.expect("exists"));
        assert_eq!(db.blob_size(&app, &d).await.expect("size"), Some(5));
        assert_eq!(db.blob_size(&other, &d).await.expect("size"), None);
        assert_eq!(db.stored_blob_size(&d).await.expect("size"), Some(5));
        let unknown = Digest::sha256_of(b"nothing");
        assert_eq!(db.stored_blob_size(&unknown).await.expect("size"), None);

        // A mount links what the source links, and nothing else; a failed mount creates no
        // repository.
        assert_eq!(
            db.mount_blob(&other, &app, &d).await.expect("mount"),
            Some(5)
        );
        assert_eq!(db.blob_size(&other, &d).await.expect("size"), Some(5));
        assert_eq!(
            db.mount_blob(&third, &app, &unknown).await.expect("mount"),
            None
        );
        assert_eq!(
            db.mount_blob(&third, &repo("no/such"), &d)
                .await
                .expect("mount"),
            None
        );
        assert!(!db.repo_exists(&third).await.expect("exists"));
        assert_eq!(rows_in(&check, "blobs").await, 1);

        // `pushed` sticks once a push made the link; a fill's link stays a fill's.
        let pushed = |r: &'static str| {
            let check = &check;
            async move {
                check
                    .query_one(
                        "SELECT l.pushed FROM repo_blobs l JOIN repositories r ON r.id = l.repo_id
                          WHERE r.name = $1",
                        &[&r],
                    )
                    .await
                    .expect("pushed")
                    .get::<_, bool>(0)
            }
        };
        assert!(!pushed("team/app").await);
        assert!(pushed("team/other").await);
        db.link_blob(&app, &d, 5, true).await.expect("link");
        db.link_blob(&app, &d, 5, false).await.expect("link");
        assert!(pushed("team/app").await);

        // Unlinking is per repository; the stored blob stays for GC.
        assert!(db.unlink_blob(&app, &d).await.expect("unlink"));
        assert!(!db.unlink_blob(&app, &d).await.expect("unlink"));
        assert_eq!(db.blob_size(&app, &d).await.expect("size"), None);
        assert_eq!(db.blob_size(&other, &d).await.expect("size"), Some(5));
        assert_eq!(db.stored_blob_size(&d).await.expect("size"), Some(5));
        assert_eq!(db.mount_blob(&third, &app, &d).await.expect("mount"), None);
    });
}

#[test]
fn a_manifest_is_stored_byte_exact_only_when_all_it_references_is_there() {
    with_database("manifests", |url| async move {
        let db = db(&url, 2).await;
        let check = raw(&url).await;
        let (app, other) = (repo("team/app"), repo("team/other"));
        let linked = link_all(&db, &app, &["config", "layer one"]).await;
        // Stored, but linked only in another repository.
        let elsewhere = link_all(&db, &other, &["layer two"]).await;
        let never = Digest::sha256_of(b"never uploaded");
        let image = Pushed::image(
            &[
                linked[0].clone(),
                linked[1].clone(),
                elsewhere[0].clone(),
                never.clone(),
            ],
            None,
            None,
        );
        let latest = tags(&["latest"]);
        let err = db
            .put_manifest(&image.to(&app, &latest))
            .await
            .expect_err("refused");
        match err {
            PutManifestError::Missing(missing) => {
                assert_eq!(missing, vec![elsewhere[0].clone(), never.clone()])
            }
            other => panic!("{other}"),
        }
        // Refused into a repository that does not exist: not even the repository appears.
        let fresh = repo("team/fresh");
        assert!(matches!(
            db.put_manifest(&image.to(&fresh, &latest)).await,
            Err(PutManifestError::Missing(m)) if m.len() == 4
        ));
        assert!(!db.repo_exists(&fresh).await.expect("exists"));
        for table in [
            "manifests",
            "manifest_blobs",
            "repo_manifests",
            "tags",
            "tag_history",
        ] {
            assert_eq!(rows_in(&check, table).await, 0, "{table}");
        }
        assert!(!has_manifest(&db, &app, &image.digest).await);

        // With everything linked it is stored, read back byte for byte, in this repository only.
        link_all(&db, &app, &["layer two"]).await;
        db.link_blob(&app, &never, 14, true).await.expect("link");
        db.put_manifest(&image.to(&app, &latest))
            .await
            .expect("put");
        let (media_type, body) = db
            .manifest(&app, &image.digest)
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(media_type, OCI_MANIFEST);
        assert!(body == image.body, "the manifest read back differs");
        assert!(!has_manifest(&db, &other, &image.digest).await);
        assert_eq!(
            db.tag(&app, &latest[0]).await.expect("tag"),
            Some(image.digest.clone())
        );
        let mut want: Vec<String> = image.blobs.iter().map(Digest::to_string).collect();
        want.sort();
        assert_eq!(
            texts(
                &check,
                "SELECT blob_digest FROM manifest_blobs WHERE manifest_digest = $1 ORDER BY 1",
                &image.digest
            )
            .await,
            want
        );
        // Pushing it again changes nothing but is fine.
        db.put_manifest(&image.to(&app, &latest))
            .await
            .expect("put");
        assert_eq!(rows_in(&check, "manifests").await, 1);
        assert_eq!(rows_in(&check, "tag_history").await, 1);

        // An index needs its children in the same repository.
        let index = Pushed::index(std::slice::from_ref(&image.digest));
        let multi = tags(&["multi"]);
        assert!(matches!(
            db.put_manifest(&index.to(&other, &multi)).await,
            Err(PutManifestError::Missing(m)) if m == vec![image.digest.clone()]
        ));
        db.put_manifest(&index.to(&app, &multi))
            .await
            .expect("index");
        assert_eq!(
            texts(
                &check,
                "SELECT child_digest FROM manifest_children WHERE manifest_digest = $1",
                &index.digest
            )
            .await,
            vec![image.digest.to_string()]
        );
        // The same bytes in another repository share the one `manifests` row.
        for d in &image.blobs {
            db.mount_blob(&other, &app, d).await.expect("mount");
        }
        db.put_manifest(&image.to(&other, &[])).await.expect("put");
        assert_eq!(rows_in(&check, "manifests").await, 2);
        assert!(has_manifest(&db, &other, &image.digest).await);
    });
}

#[test]
fn tags_move_and_delete_with_history_and_a_deleted_manifest_takes_its_tags() {
    with_database("tagmoves", |url| async move {
        let db = db(&url, 2).await;
        let check = raw(&url).await;
        let app = repo("team/app");
        let blobs = link_all(&db, &app, &["config", "layer"]).await;
        let first = Pushed::image(&blobs, None, None);
        let second = Pushed::image(&[blobs[1].clone(), blobs[0].clone()], None, None);
        let (latest, v1): (Tag, Tag) = ("latest".parse().expect("tag"), "v1".parse().expect("tag"));
        db.put_manifest(&first.to(&app, &tags(&["v1", "latest", "v1"])))
            .await
            .expect("put");
        assert_eq!(
            db.tags_of(&app, &first.digest).await.expect("tags"),
            vec!["latest", "v1"]
        );
        db.put_manifest(&second.to(&app, &tags(&["latest"])))
            .await
            .expect("put");
        assert_eq!(
            db.tags_of(&app, &first.digest).await.expect("tags"),
            vec!["v1"]
        );
        assert_eq!(
            db.tags_of(&app, &second.digest).await.expect("tags"),
            vec!["latest"]
        );
        let change = |previous: Option<&Digest>, digest: Option<&Digest>| TagChange {
            previous: previous.cloned(),
            digest: digest.cloned(),
        };
        assert_eq!(
            db.tag_history(&app, &latest).await.expect("history"),
            vec![
                change(None, Some(&first.digest)),
                change(Some(&first.digest), Some(&second.digest)),
            ]
        );

        // Deleting a tag records it; the manifest stays.
        assert!(db.delete_tag(&app, &latest).await.expect("delete"));
        assert!(!db.delete_tag(&app, &latest).await.expect("delete"));
        assert!(
            !db.delete_tag(&repo("no/such"), &latest)
                .await
                .expect("delete")
        );
        assert_eq!(db.tag(&app, &latest).await.expect("tag"), None);
        assert!(has_manifest(&db, &app, &second.digest).await);
        // Created again after the deletion: a fresh chain link.
        assert_eq!(
            db.put_tag(&app, &latest, &second.digest)
                .await
                .expect("tag"),
            TagMove::Created
        );
        assert_eq!(
            db.tag_history(&app, &latest).await.expect("history")[2..],
            [
                change(Some(&second.digest), None),
                change(None, Some(&second.digest)),
            ]
        );

        // Deleting a manifest takes every tag naming it (each with a history row) and nothing
        // else; its bytes stay for GC.
        db.put_tag(&app, &"also".parse().expect("tag"), &first.digest)
            .await
            .expect("tag");
        assert!(
            db.delete_manifest(&app, &first.digest)
                .await
                .expect("delete")
        );
        assert!(
            !db.delete_manifest(&app, &first.digest)
                .await
                .expect("delete")
        );
        assert!(
            !db.delete_manifest(&repo("no/such"), &first.digest)
                .await
                .expect("delete")
        );
        assert!(!has_manifest(&db, &app, &first.digest).await);
        assert_eq!(
            db.tags_of(&app, &first.digest).await.expect("tags"),
            Vec::<String>::new()
        );
        assert_eq!(
            db.list_tags(&app, None, 10).await.expect("list"),
            Some((vec!["latest".to_string()], false))
        );
        assert_eq!(
            db.tag_history(&app, &v1).await.expect("history"),
            vec![
                change(None, Some(&first.digest)),
                change(Some(&first.digest), None)
            ]
        );
        assert_eq!(rows_in(&check, "manifests").await, 2);
        // Pushed again, it is back.
        db.put_manifest(&first.to(&app, &[])).await.expect("put");
        assert!(has_manifest(&db, &app, &first.digest).await);
    });
}

#[test]
fn referrers_are_filtered_by_artifact_type_and_leave_with_their_manifest() {
    with_database("referrers", |url| async move {
        let db = db(&url, 2).await;
        let (app, other) = (repo("team/app"), repo("team/other"));
        let blobs = link_all(&db, &app, &["config", "layer"]).await;
        let subject = Pushed::image(&blobs, None, None);
        db.put_manifest(&subject.to(&app, &[]))
            .await
            .expect("subject");
        let signature = "application/vnd.dev.cosign.artifact.sig.v1+json";
        let sbom = "application/spdx+json";
        let referrers: Vec<Pushed> = [
            (signature, "sig one"),
            (sbom, "sbom"),
            (signature, "sig two"),
        ]
        .iter()
        .map(|(t, content)| {
            let b = Digest::sha256_of(content.as_bytes());
            Pushed::image(&[blobs[0].clone(), b], Some(&subject.digest), Some(t))
        })
        .collect();
        for (r, content) in referrers.iter().zip(["sig one", "sbom", "sig two"]) {
            link_all(&db, &app, &[content]).await;
            db.put_manifest(&r.to(&app, &[])).await.expect("referrer");
        }
        let descriptors = |pushed: &[&Pushed]| -> Vec<serde_json::Value> {
            let mut v: Vec<&Pushed> = pushed.to_vec();
            v.sort_by_key(|p| p.digest.to_string());
            v.iter()
                .map(|p| p.descriptor.clone().expect("descriptor"))
                .collect()
        };
        let all = db
            .referrers(&app, &subject.digest, None)
            .await
            .expect("list");
        assert_eq!(all, descriptors(&referrers.iter().collect::<Vec<_>>()));
        assert_eq!(
            db.referrers(&app, &subject.digest, Some(signature))
                .await
                .expect("list"),
            descriptors(&[&referrers[0], &referrers[2]])
        );
        assert_eq!(
            db.referrers(&app, &subject.digest, Some(sbom))
                .await
                .expect("list"),
            descriptors(&[&referrers[1]])
        );
        assert!(
            db.referrers(&app, &subject.digest, Some("text/plain"))
                .await
                .expect("list")
                .is_empty()
        );
        assert!(
            db.referrers(&other, &subject.digest, None)
                .await
                .expect("list")
                .is_empty()
        );
        assert!(
            db.referrers(&app, &blobs[0], None)
                .await
                .expect("list")
                .is_empty()
        );
        // A deleted referrer leaves the list.
        assert!(
            db.delete_manifest(&app, &referrers[0].digest)
                .await
                .expect("delete")
        );
        assert_eq!(
            db.referrers(&app, &subject.digest, Some(signature))
                .await
                .expect("list"),
            descriptors(&[&referrers[2]])
        );
    });
}

/// A database of the same server whose default collation is ICU's `en-US` (case-insensitive
/// first, punctuation last): byte order there has to be asked for.
async fn icu_database(url: &str, name: &str) -> String {
    raw(url)
        .await
        .batch_execute(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        ))
        .await
        .expect("create an ICU database");
    let (server, _) = url.rsplit_once('/').expect("a URL with a database");
    let url = format!("{server}/{name}");
    let collates: bool = raw(&url)
        .await
        .query_one("SELECT 'a' < 'B'", &[])
        .await
        .expect("compare")
        .get(0);
    assert!(collates, "the database does not collate as en-US");
    url
}

/// Every page of `n` from `page(last)`, checking that only the last says there is no more.
async fn all_pages<F, Fut>(n: usize, mut page: F) -> Vec<String>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = (Vec<String>, bool)>,
{
    let mut out: Vec<String> = Vec::new();
    loop {
        let (items, more) = page(out.last().cloned()).await;
        assert!(items.len() <= n);
        if more {
            assert_eq!(items.len(), n, "a short page with more to come");
        }
        out.extend(items);
        if !more {
            return out;
        }
    }
}

#[test]
fn tag_lists_and_the_catalog_page_in_byte_order() {
    with_database("listing", |url| async move {
        let url = icu_database(&url, "listing_icu").await;
        let db = db(&url, 2).await;
        let app = repo("team/app");
        let digest = Digest::sha256_of(b"manifest");
        let mut names = vec![
            "Z9", "a", "a-b", "a.b", "a_b", "B", "b", "latest", "v1.0", "v1.0-rc", "v10", "v2",
            "_x", "0",
        ];
        for t in &names {
            db.put_tag(&app, &t.parse().expect("tag"), &digest)
                .await
                .expect("tag");
        }
        names.sort(); // byte order
        for n in [1, 3, 5, names.len(), 100] {
            let got = all_pages(n, |last| {
                let (db, app) = (&db, &app);
                async move {
                    db.list_tags(app, last.as_deref(), n)
                        .await
                        .expect("list")
                        .expect("the repository exists")
                }
            })
            .await;
            assert_eq!(got, names, "pages of {n}");
        }
        // `last` need not be a tag; after the end is empty.
        assert_eq!(
            db.list_tags(&app, Some("a0"), 3).await.expect("list"),
            Some((vec!["a_b".to_string(), "b".into(), "latest".into()], true))
        );
        assert_eq!(
            db.list_tags(&app, Some("v2"), 3).await.expect("list"),
            Some((vec![], false))
        );
        assert_eq!(
            db.list_tags(&app, None, 0).await.expect("list"),
            Some((vec![], true))
        );
        // Unknown repository: None (a page after some `last` is empty, as in the local profile);
        // a repository without tags: an empty list.
        let unknown = repo("no/such");
        assert_eq!(db.list_tags(&unknown, None, 10).await.expect("list"), None);
        assert_eq!(
            db.list_tags(&unknown, Some("a"), 10).await.expect("list"),
            Some((vec![], false))
        );
        let bare = repo("team/bare");
        link_all(&db, &bare, &["x"]).await;
        assert_eq!(
            db.list_tags(&bare, None, 10).await.expect("list"),
            Some((vec![], false))
        );

        // The catalog: punctuation and nesting in byte order, filtered, across fetch batches.
        let mut repos: Vec<String> = [
            "a-b/c",
            "a.b/c",
            "a_b/c",
            "ab",
            "a/b",
            "z",
            "0numbers",
            "team/app-x",
            "team/app/sub",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        repos.extend((0..250).map(|i| format!("r{i:03}")));
        for r in &repos {
            link_all(&db, &repo(r), &["x"]).await;
        }
        repos.extend(["team/app".to_string(), "team/bare".to_string()]);
        repos.sort();
        for n in [2, 7, 1000] {
            let got = all_pages(n, |last| {
                let db = &db;
                async move {
                    db.catalog(last.as_deref(), n, |_| true)
                        .await
                        .expect("catalog")
                }
            })
            .await;
            assert_eq!(got, repos, "pages of {n}");
        }
        // One visible name in ten: a page needs several batches of the repository table.
        let visible =
            |name: &str| name.starts_with('r') && name.ends_with('7') || name.starts_with("team/");
        let want: Vec<String> = repos.iter().filter(|r| visible(r)).cloned().collect();
        assert_eq!(want.len(), 29);
        let got = all_pages(10, |last| {
            let db = &db;
            async move {
                db.catalog(last.as_deref(), 10, visible)
                    .await
                    .expect("catalog")
            }
        })
        .await;
        assert_eq!(got, want);
        assert_eq!(
            db.catalog(Some("r247"), 3, visible).await.expect("catalog"),
            (
                vec![
                    "team/app".to_string(),
                    "team/app-x".into(),
                    "team/app/sub".into()
                ],
                true
            )
        );
    });
}

#[test]
fn concurrent_manifest_pushes_of_one_tag_on_two_replicas_end_with_one_winner() {
    with_database("tagrace", |url| async move {
        let (a, b, c) = (db(&url, 4).await, db(&url, 4).await, db(&url, 4).await);
        let app = repo("team/app");
        let blobs = link_all(&a, &app, &["config", "layer"]).await;
        let writer = |replica: Db, name: &'static str, order: &'static [&'static str]| {
            let (app, blobs) = (app.clone(), blobs.clone());
            tokio::spawn(async move {
                let tags = tags(order);
                let mut pushed = Vec::new();
                for i in 0..20 {
                    // Distinct bytes, same references.
                    let mut m = Pushed::image(&blobs, None, None);
                    m.body
                        .extend_from_slice(format!("{name}{i}").repeat(i + 1).as_bytes());
                    m.digest = Digest::sha256_of(&m.body);
                    replica.put_manifest(&m.to(&app, &tags)).await.expect("put");
                    pushed.push(m.digest);
                }
                pushed
            })
        };
        // The two replicas name the tags in opposite orders: moves never deadlock.
        let (pa, pb) = tokio::join!(
            writer(a.clone(), " a", &["latest", "stable"]),
            writer(b.clone(), " b", &["stable", "latest"])
        );
        let pushed: HashSet<Digest> = pa.expect("a").into_iter().chain(pb.expect("b")).collect();
        assert_eq!(pushed.len(), 40);
        let (latest, stable): (Tag, Tag) = (
            "latest".parse().expect("tag"),
            "stable".parse().expect("tag"),
        );
        let mut seen = Vec::new();
        for replica in [&a, &b, &c] {
            seen.push(replica.tag(&app, &latest).await.expect("read"));
            seen.push(replica.tag(&app, &stable).await.expect("read"));
        }
        // Both tags moved in each push's one transaction: they name the same last push.
        let winner = seen[0].clone().expect("tagged");
        assert!(seen.iter().all(|s| s.as_ref() == Some(&winner)), "{seen:?}");
        assert!(pushed.contains(&winner));
        assert!(has_manifest(&c, &app, &winner).await);
        for tag in [&latest, &stable] {
            let history = c.tag_history(&app, tag).await.expect("history");
            assert_eq!(history.len(), 40, "{tag}");
            assert_eq!(history[0].previous, None);
            for pair in history.windows(2) {
                assert_eq!(pair[1].previous, pair[0].digest);
            }
            assert_eq!(history[39].digest.as_ref(), Some(&winner));
        }
    });
}

/// A GC's collection of one blob: lock its row, and delete it (links first) only if no
/// manifest references it. Whether it deleted.
async fn collect_blob(url: &str, digest: &Digest) -> bool {
    let mut gc = raw(url).await;
    let tx = gc.transaction().await.expect("begin");
    if !lock_blob_row(&tx, digest).await {
        return false;
    }
    let referenced: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM manifest_blobs WHERE blob_digest = $1)",
            &[&digest.to_string()],
        )
        .await
        .expect("refs")
        .get(0);
    if !referenced {
        delete_blob_rows(&tx, digest).await;
    }
    tx.commit().await.expect("commit");
    !referenced
}

/// GC's first step: the blob's row, locked; whether it is there.
async fn lock_blob_row(tx: &tokio_postgres::Transaction<'_>, digest: &Digest) -> bool {
    tx.query_opt(
        "SELECT 1 FROM blobs WHERE digest = $1 FOR UPDATE",
        &[&digest.to_string()],
    )
    .await
    .expect("lock")
    .is_some()
}

/// GC's last step: the links, then the blob's row.
async fn delete_blob_rows(tx: &tokio_postgres::Transaction<'_>, digest: &Digest) {
    for query in [
        "DELETE FROM repo_blobs WHERE digest = $1",
        "DELETE FROM blobs WHERE digest = $1",
    ] {
        tx.execute(query, &[&digest.to_string()])
            .await
            .expect(query);
    }
}

/// Waits until `n` sessions of this database wait for a lock (a condition, not a time), or
/// until `done` says the task expected to wait finished without waiting (the assertions on
/// its result then tell what went wrong).
async fn lock_waiters(check: &tokio_postgres::Client, n: i64, done: impl Fn() -> bool) {
    loop {
        let waiting = count(
            check,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        if waiting >= n || done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `put_manifest` of an image of `blobs` in a task of its own.
fn spawn_push(
    db: &Db,
    repo: &RepoName,
    blobs: &[Digest],
    tags: Vec<Tag>,
) -> tokio::task::JoinHandle<Result<(), PutManifestError>> {
    let (db, repo, m) = (db.clone(), repo.clone(), Pushed::image(blobs, None, None));
    tokio::spawn(async move { db.put_manifest(&m.to(&repo, &tags)).await })
}

/// Manifest references to a blob whose row is gone.
const DANGLING: &str = "SELECT count(*) FROM manifest_blobs m
    LEFT JOIN blobs b ON b.digest = m.blob_digest WHERE b.digest IS NULL";

#[test]
fn a_manifest_racing_a_blob_collection_never_references_a_deleted_blob() {
    with_database("gcrace", |url| async move {
        let db = db(&url, 4).await;
        let check = raw(&url).await;
        let app = repo("team/app");
        let config = link_all(&db, &app, &["config"]).await.remove(0);

        // GC first: it holds the blob row, the push waits for it and then finds the blob gone.
        let doomed = link_all(&db, &app, &["doomed"]).await.remove(0);
        let mut gc = raw(&url).await;
        let gc_tx = gc.transaction().await.expect("begin");
        assert!(lock_blob_row(&gc_tx, &doomed).await);
        let image = Pushed::image(&[config.clone(), doomed.clone()], None, None);
        let push = spawn_push(&db, &app, &image.blobs, tags(&["latest"]));
        lock_waiters(&check, 1, || push.is_finished()).await;
        delete_blob_rows(&gc_tx, &doomed).await;
        gc_tx.commit().await.expect("commit");
        assert!(matches!(
            push.await.expect("task"),
            Err(PutManifestError::Missing(m)) if m == vec![doomed.clone()]
        ));
        assert!(!has_manifest(&db, &app, &image.digest).await);
        assert_eq!(rows_in(&check, "manifest_blobs").await, 0);

        // The push first: while it is held (here on its tag's row) the blob row cannot be
        // taken; a GC waiting for it finds the manifest's reference and keeps the blob.
        let kept = link_all(&db, &app, &["kept"]).await.remove(0);
        let latest = tags(&["latest"]);
        db.put_tag(&app, &latest[0], &config).await.expect("tag");
        let mut holder = raw(&url).await;
        let hold = holder.transaction().await.expect("begin");
        hold.query_one("SELECT 1 FROM tags WHERE tag = 'latest' FOR UPDATE", &[])
            .await
            .expect("hold the tag");
        let image = Pushed::image(&[config.clone(), kept.clone()], None, None);
        let push = spawn_push(&db, &app, &image.blobs, latest.clone());
        lock_waiters(&check, 1, || push.is_finished()).await;
        let err = check
            .query_one(
                "SELECT 1 FROM blobs WHERE digest = $1 FOR UPDATE NOWAIT",
                &[&kept.to_string()],
            )
            .await
            .expect_err("the blob row is locked by the push");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
            "{err}"
        );
        let collect = {
            let (url, kept) = (url.clone(), kept.clone());
            tokio::spawn(async move { collect_blob(&url, &kept).await })
        };
        lock_waiters(&check, 2, || push.is_finished() || collect.is_finished()).await;
        hold.rollback().await.expect("release");
        push.await.expect("task").expect("put");
        assert!(
            !collect.await.expect("task"),
            "GC deleted a referenced blob"
        );
        assert_eq!(db.stored_blob_size(&kept).await.expect("size"), Some(4));
        assert!(has_manifest(&db, &app, &image.digest).await);

        // Free races: each ends with the manifest stored or the blob collected, never both.
        for i in 0..30 {
            let content = format!("raced {i}");
            let blob = link_all(&db, &app, &[&content]).await.remove(0);
            let m = Pushed::image(&[config.clone(), blob.clone()], None, None);
            let push = spawn_push(&db, &app, &m.blobs, vec![]);
            let collected = collect_blob(&url, &blob).await;
            let stored = match push.await.expect("task") {
                Ok(()) => true,
                Err(PutManifestError::Missing(_)) => false,
                Err(e) => panic!("{e}"),
            };
            assert!(
                stored != collected,
                "round {i}: stored {stored}, collected {collected}"
            );
            assert_eq!(count(&check, DANGLING).await, 0, "round {i}");
        }
    });
}

#[test]
fn upload_session_caps_hold_across_replicas_per_client_and_in_all() {
    with_replicas("session_caps", LONG_LEASE, |r| async move {
        let mut capped = Vec::new();
        for replica in ["a", "b"] {
            capped.push(Uploads::new(
                db(&r.url, 2).await,
                r.objects.clone(),
                UploadOptions {
                    replica: replica.into(),
                    lease: LONG_LEASE,
                    max_sessions: 3,
                    max_sessions_per_client: 2,
                },
            ));
        }
        let (a, b) = (&capped[0], &capped[1]);
        let repo: RepoName = "team/caps".parse().expect("repo");
        let start = |u: &Uploads, client: &'static str| {
            let (u, repo) = (u.clone(), repo.clone());
            async move { u.start(&repo, Algorithm::Sha256, Some(client)).await }
        };
        let first = start(a, "c1").await.expect("c1's first session");
        start(b, "c1").await.expect("c1's second session, on B");
        assert!(
            matches!(start(a, "c1").await, Err(UploadsError::TooMany { .. })),
            "a third session for c1"
        );
        start(b, "c2").await.expect("c2's session: three in all");
        assert!(
            matches!(start(a, "c3").await, Err(UploadsError::TooMany { .. })),
            "a fourth session in all"
        );
        // Ending one makes room again.
        a.cancel(&repo, first).await.expect("cancel");
        start(b, "c1").await.expect("room after a cancel");
    });
}
