//! Cluster-wide eviction and pins of the pull-through cache against the real engines
//! (SeaweedFS and PostgreSQL 15): a budgeted pass removes the least recently pulled unpinned
//! images (manifests, tags with history, pulls, links, then blob rows and objects), keeps what
//! pins (by digest, by tag, by platform), pushes and kept images hold, waits for a concurrent
//! push or re-put and then keeps what it references, and runs on one replica at a time.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::engines::{Postgres, SeaweedFs};
use common::random_bytes;
use futures_util::stream;
use transship::cluster::cache::CachedManifest;
use transship::cluster::cache_evict::{
    Budget, ClusterEvictReport, Selection, evict_cache, evict_cache_job, evict_now,
    evict_now_recording, no_events,
};
use transship::cluster::cache_pins::{CachePinError, PinOf};
use transship::cluster::manifests::NewManifest;
use transship::cluster::objects::Objects;
use transship::cluster::pg::Db;
use transship::oci::{Digest, RepoName, Tag};

const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The engines and one database with its bucket.
struct Env {
    _s3: Option<SeaweedFs>,
    _pg: Option<Postgres>,
    db: Db,
    objects: Objects,
    url: String,
}

async fn env(s3: SeaweedFs, pg: Postgres, name: &str) -> Env {
    s3.create_bucket(name);
    let url = pg.create_database(name).await;
    let db = open(&url).await;
    let objects = s3.objects(name, None);
    Env {
        _s3: Some(s3),
        _pg: Some(pg),
        db,
        objects,
        url,
    }
}

async fn open(url: &str) -> Db {
    common::engines::open_db(url, 4).await
}

fn engines() -> Option<(SeaweedFs, Postgres)> {
    if !SeaweedFs::available() || !Postgres::available() {
        eprintln!("SeaweedFS or PostgreSQL missing: skipped");
        return None;
    }
    Some((SeaweedFs::start(), Postgres::start()))
}

fn repo(name: &str) -> RepoName {
    name.parse().expect("repo")
}

fn tag(t: &str) -> Tag {
    t.parse().expect("tag")
}

/// Puts `len` bytes into the bucket and links them into `repo` (`pushed` or as a fill).
async fn blob(e: &Env, repo: &RepoName, len: usize, seed: u64, pushed: bool) -> Digest {
    let data = random_bytes(len, seed);
    let digest = Digest::sha256_of(&data);
    e.objects
        .put_verified(
            &digest,
            len as u64,
            stream::iter([Ok::<_, std::io::Error>(Bytes::from(data))]),
        )
        .await
        .expect("put blob");
    e.db.link_blob(repo, &digest, len as u64, pushed)
        .await
        .expect("link");
    digest
}

/// A manifest (an index if it has children).
async fn put(
    e: &Env,
    repo: &RepoName,
    body: &[u8],
    blobs: &[Digest],
    children: &[Digest],
    tags: &[Tag],
    pushed: bool,
) -> Digest {
    let digest = Digest::sha256_of(body);
    let media_type = if children.is_empty() { IMAGE } else { INDEX };
    e.db.put_manifest(&NewManifest {
        repo,
        digest: &digest,
        media_type,
        body,
        blobs,
        children,
        subject: None,
        artifact_type: None,
        referrer_descriptor: None,
        tags,
        pushed,
    })
    .await
    .map_err(|e| e.to_string())
    .expect("put manifest");
    digest
}

/// An image manifest of `config` and `layers` (sizes as given), tagged `tags`.
async fn image(
    e: &Env,
    repo: &RepoName,
    blobs: &[(Digest, usize)],
    tags: &[Tag],
    pushed: bool,
) -> Digest {
    let desc = |(d, s): &(Digest, usize)| serde_json::json!({"mediaType": "application/octet-stream", "digest": d.to_string(), "size": s});
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": IMAGE,
        "config": desc(&blobs[0]),
        "layers": blobs[1..].iter().map(desc).collect::<Vec<_>>(),
    })
    .to_string();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    put(e, repo, body.as_bytes(), &digests, &[], tags, pushed).await
}

/// Records a pull of `digest` in `repo` `hours_ago` hours ago.
async fn pulled(e: &Env, repo: &RepoName, digest: &Digest, hours_ago: i64) {
    e.db.client()
        .await
        .expect("client")
        .execute(
            "INSERT INTO cache_access (repo_id, digest, last_pulled, pulls)
             SELECT id, $2, now() - $3::bigint * interval '1 hour', 1 FROM repositories WHERE name = $1",
            &[&repo.as_str(), &digest.to_string(), &hours_ago],
        )
        .await
        .expect("record pull");
}

/// Rows of `table` naming `digest`.
async fn count(e: &Env, table: &str, digest: &Digest) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE digest = $1");
    let client = e.db.client().await.expect("client");
    let row = client.query_one(&sql, &[&digest.to_string()]).await;
    row.expect("query").get(0)
}

async fn cached_manifest(e: &Env, digest: &Digest) -> bool {
    count(e, "repo_manifests", digest).await > 0
}

/// Whether the blob's row and its object are both there (and, if not, that neither is).
async fn stored(e: &Env, digest: &Digest) -> bool {
    let row = count(e, "blobs", digest).await > 0;
    let object = e.objects.head(digest).await.expect("head").is_some();
    assert_eq!(row, object, "{digest}: row {row}, object {object}");
    row
}

/// Waits until some other session of the database waits on a lock (a pass blocked by the
/// test's transaction).
async fn until_a_session_waits(e: &Env) {
    loop {
        let waiting: i64 =
            e.db.client()
                .await
                .expect("client")
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .await
                .expect("activity")
                .get(0);
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_budgeted_pass_evicts_the_least_recently_pulled_and_keeps_pins_and_pushes() {
    let Some((s3, pg)) = engines() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let e = env(s3, pg, "evict").await;
        let cache = repo("docker.io/library/app");
        let private = repo("team/app");

        // A pushed image whose layer a cached image (F) shares.
        let c_p = blob(&e, &private, 70, 1, true).await;
        let l_p = blob(&e, &private, 5000, 2, true).await;
        let p = image(&e, &private, &[(c_p.clone(), 70), (l_p.clone(), 5000)], &[tag("v1")], true).await;
        e.db.link_blob(&cache, &l_p, 5000, false).await.expect("link");

        let c_f = blob(&e, &cache, 10, 3, false).await;
        let f = image(&e, &cache, &[(c_f.clone(), 10), (l_p.clone(), 5000)], &[tag("f")], false).await;
        let c_a = blob(&e, &cache, 100, 4, false).await;
        let l_a = blob(&e, &cache, 1000, 5, false).await;
        let a = image(&e, &cache, &[(c_a.clone(), 100), (l_a.clone(), 1000)], &[tag("a")], false).await;
        let c_b = blob(&e, &cache, 20, 6, false).await;
        let l_s = blob(&e, &cache, 2000, 7, false).await;
        let b = image(&e, &cache, &[(c_b.clone(), 20), (l_s.clone(), 2000)], &[tag("b")], false).await;
        let c_c = blob(&e, &cache, 30, 8, false).await;
        let l_c = blob(&e, &cache, 4000, 9, false).await;
        let c = image(&e, &cache, &[(c_c.clone(), 30), (l_c.clone(), 4000)], &[tag("c")], false).await;
        let c_d = blob(&e, &cache, 40, 10, false).await;
        let d = image(&e, &cache, &[(c_d.clone(), 40), (l_s.clone(), 2000)], &[tag("d")], false).await;
        // An index of two platforms, the arm64 child also tagged.
        let c_e1 = blob(&e, &cache, 50, 11, false).await;
        let l_e1 = blob(&e, &cache, 500, 12, false).await;
        let e1 = image(&e, &cache, &[(c_e1.clone(), 50), (l_e1.clone(), 500)], &[], false).await;
        let c_e2 = blob(&e, &cache, 60, 13, false).await;
        let l_e2 = blob(&e, &cache, 600, 14, false).await;
        let e2 = image(&e, &cache, &[(c_e2.clone(), 60), (l_e2.clone(), 600)], &[tag("e-arm64")], false).await;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [
                {"mediaType": IMAGE, "digest": e1.to_string(), "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": IMAGE, "digest": e2.to_string(), "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        })
        .to_string();
        let ix = put(&e, &cache, index.as_bytes(), &[], &[e1.clone(), e2.clone()], &[tag("e")], false).await;

        // Pulls, oldest first: F, A, B, C, E (by its child), D; pins on C (by tag) and on E
        // for amd64 only.
        for (digest, hours) in [(&f, 10), (&a, 9), (&b, 8), (&c, 7), (&e1, 6), (&d, 1)] {
            pulled(&e, &cache, digest, hours).await;
        }
        assert_eq!(e.db.pin(&cache, &PinOf::Tag(tag("c")), &[]).await.expect("pin c"), c);
        assert_eq!(
            e.db.pin(&cache, &PinOf::Tag(tag("e")), &["linux/amd64".into()])
                .await
                .expect("pin e"),
            ix
        );
        assert!(e.db.is_tag_pinned(&cache, &tag("e")).await.expect("pinned"));
        assert!(!e.db.is_tag_pinned(&cache, &tag("a")).await.expect("pinned"));
        // Only cached images can be pinned: not a pushed one, not an unknown tag.
        assert!(matches!(
            e.db.pin(&private, &PinOf::Digest(p.clone()), &[]).await,
            Err(CachePinError::NotCached(_))
        ));
        assert!(matches!(
            e.db.pin(&cache, &PinOf::Tag(tag("nope")), &[]).await,
            Err(CachePinError::NotCached(_))
        ));

        // Cached bytes: every pull-through blob but the pushed layer.
        let total = 10 + 100 + 1000 + 20 + 2000 + 30 + 4000 + 40 + 50 + 500 + 60 + 600;
        let usage = e.db.cache_usage().await.expect("usage");
        assert_eq!(usage.cached_bytes, total);
        assert_eq!(usage.images, 6, "F, A, B, C, D and the index");

        // The listing: cost, children and pins of each image.
        let listed = e.db.cached_images().await.expect("images");
        let facts = |d: &Digest| {
            let i = listed.iter().find(|i| i.digest == d.to_string()).expect("listed");
            (i.children, i.own_bytes, i.shared_bytes, i.pinned)
        };
        assert_eq!(listed.len(), 6);
        assert_eq!(facts(&ix), (2, 1210, 0, "partial"));
        assert_eq!(facts(&b), (0, 20, 2000, "no"));
        assert_eq!(facts(&f), (0, 10, 5000, "no"));
        assert_eq!(facts(&c), (0, 4030, 0, "yes"));
        let a_listed = listed.iter().find(|i| i.digest == a.to_string()).expect("a");
        assert_eq!((a_listed.tags.clone(), a_listed.pulls), (vec!["a".to_string()], 1));

        // Within the budget: nothing happens.
        let idle = evict_cache(&e.db, &e.objects, Budget { max_size: total, evict_to: 0 })
            .await
            .expect("pass");
        assert_eq!(idle.images_evicted + idle.blobs_removed, 0, "{idle}");

        // Over it: down to 7000 needs 1410 bytes: F (10: its layer is pushed), A (1100), B
        // (20: its layer is D's too), C is pinned, then the index's arm64 child (660).
        let report = evict_cache(&e.db, &e.objects, Budget { max_size: 8000, evict_to: 7000 })
            .await
            .expect("pass");
        assert_eq!(
            report,
            ClusterEvictReport {
                cached_bytes_before: total,
                cached_bytes_after: total - 1790,
                images_evicted: 3,
                manifests_removed: 4,
                tags_removed: 4,
                blobs_removed: 6,
                bytes_freed: 1790,
                images_skipped: 0,
                images_gave_way: 0,
            }
        );
        for gone in [&f, &a, &b, &e2] {
            assert!(!cached_manifest(&e, gone).await, "{gone} still cached");
            assert_eq!(
                count(&e, "cache_access", gone).await,
                0
            );
        }
        for kept in [&c, &d, &ix, &e1, &p] {
            assert!(cached_manifest(&e, kept).await, "{kept} was evicted");
        }
        for gone in [&c_f, &c_a, &l_a, &c_b, &c_e2, &l_e2] {
            assert!(!stored(&e, gone).await, "{gone} still stored");
            assert_eq!(
                count(&e, "repo_blobs", gone).await,
                0
            );
        }
        for kept in [&l_s, &c_c, &l_c, &c_d, &c_e1, &l_e1, &c_p, &l_p] {
            assert!(stored(&e, kept).await, "{kept} was removed");
        }
        // The pushed layer keeps its pushed link; the cache's link to it went with F.
        assert_eq!(e.db.blob_size(&private, &l_p).await.expect("size"), Some(5000));
        assert_eq!(e.db.blob_size(&cache, &l_p).await.expect("size"), None);
        assert_eq!(e.db.blob_size(&cache, &l_s).await.expect("size"), Some(2000));
        // Tags of evicted images are gone, with a deletion in their history.
        for (t, digest) in [("a", &a), ("b", &b), ("f", &f), ("e-arm64", &e2)] {
            assert_eq!(e.db.tag(&cache, &tag(t)).await.expect("tag"), None, "{t}");
            let history = e.db.tag_history(&cache, &tag(t)).await.expect("history");
            let last = history.last().expect("a history");
            assert_eq!((last.previous.as_ref(), last.digest.as_ref()), (Some(digest), None));
        }
        for t in ["c", "d", "e"] {
            assert!(e.db.tag(&cache, &tag(t)).await.expect("tag").is_some(), "{t}");
        }
        assert_eq!(e.db.tag(&private, &tag("v1")).await.expect("tag"), Some(p.clone()));

        // Two replicas' passes at once: one runs, the other finds the job taken.
        let other = open(&e.url).await;
        let all = Budget { max_size: 0, evict_to: 0 };
        let every = Duration::from_secs(60);
        let (one, two) = tokio::join!(
            evict_cache_job(&e.db, &e.objects, "replica-a", all, every, every, &no_events),
            evict_cache_job(&other, &e.objects, "replica-b", all, every, every, &no_events),
        );
        let ran: Vec<ClusterEvictReport> =
            [one.expect("a"), two.expect("b")].into_iter().flatten().collect();
        assert_eq!(ran.len(), 1, "{ran:?}");
        // Everything unpinned went: D and the shared layer; the pinned stay, the pushed too.
        assert_eq!(ran[0].images_evicted, 1, "{}", ran[0]);
        assert_eq!(ran[0].blobs_removed, 2, "{}", ran[0]);
        assert!(!stored(&e, &l_s).await);
        assert!(!cached_manifest(&e, &d).await);
        for kept in [&c, &ix, &e1] {
            assert!(cached_manifest(&e, kept).await, "{kept} was evicted");
        }
        assert_eq!(
            e.db.cache_usage().await.expect("usage").cached_bytes,
            30 + 4000 + 50 + 500
        );
        // Kept for the interval: neither replica runs it again.
        assert_eq!(
            evict_cache_job(&other, &e.objects, "replica-b", all, every, every, &no_events)
                .await
                .expect("b"),
            None
        );

        // Pins listed; unpinning the tag drops its digest pin too, and C may go.
        let pins = e.db.pins().await.expect("pins");
        assert_eq!(pins.len(), 4, "{pins:?}");
        let e_tag_pin = pins.iter().find(|p| p.tag.as_deref() == Some("e")).expect("tag pin");
        assert_eq!(e_tag_pin.platforms, vec!["linux/amd64".to_string()]);
        let e_digest_pin = pins
            .iter()
            .find(|p| p.digest.as_deref() == Some(ix.to_string().as_str()))
            .expect("digest pin");
        assert_eq!(e_digest_pin.via_tag.as_deref(), Some("e"));
        assert_eq!(e.db.unpin(&cache, &PinOf::Tag(tag("c"))).await.expect("unpin"), 2);
        assert_eq!(e.db.unpin(&cache, &PinOf::Tag(tag("c"))).await.expect("unpin"), 0);
        // A digest pin on the index keeps it whole: the amd64 child stays anyway.
        e.db.pin(&cache, &PinOf::Digest(ix.clone()), &[]).await.expect("pin");
        let report = evict_now(&e.db, &e.objects, Selection::PulledBefore(u64::MAX))
            .await
            .expect("evict");
        assert_eq!((report.images_evicted, report.blobs_removed), (1, 2), "{report}");
        assert!(!cached_manifest(&e, &c).await);
        assert!(cached_manifest(&e, &e1).await);
        // Without its pins the index goes whole, with its tag.
        assert_eq!(e.db.unpin(&cache, &PinOf::Digest(ix.clone())).await.expect("unpin"), 1);
        assert_eq!(e.db.unpin(&cache, &PinOf::Tag(tag("e"))).await.expect("unpin"), 2);
        // Recorded in the image's transaction: one `cache.evict`, with its tag.
        let record = |repo: &str, root: &str, tag: Option<&str>| {
            vec![format!("evict {repo} {root} {}", tag.unwrap_or("-")).into_bytes()]
        };
        let before = e.db.last_event_seq().await.expect("seq");
        let report = evict_now_recording(&e.db, &e.objects, Selection::Image(&cache, &ix), &record)
            .await
            .expect("evict");
        assert_eq!((report.images_evicted, report.manifests_removed), (1, 2), "{report}");
        assert_eq!(e.db.tag(&cache, &tag("e")).await.expect("tag"), None);
        let (events, _) = e.db.events_after(before, 100).await.expect("events");
        let events: Vec<String> = events
            .into_iter()
            .map(|r| String::from_utf8(r.record).expect("utf-8"))
            .collect();
        assert_eq!(events, [format!("evict {cache} {ix} e")]);
        assert_eq!(e.db.cache_usage().await.expect("usage"), Default::default());
        // The private registry is untouched throughout.
        for kept in [&c_p, &l_p] {
            assert!(stored(&e, kept).await);
        }
        assert!(cached_manifest(&e, &p).await);
    });
}

#[test]
fn a_pass_waits_for_a_concurrent_push_or_re_put_and_keeps_what_it_references() {
    let Some((s3, pg)) = engines() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let e = env(s3, pg, "evictrace").await;
        let cache = repo("docker.io/library/app");
        let private = repo("team/app");
        let c_g = blob(&e, &cache, 10, 21, false).await;
        let l_g = blob(&e, &cache, 3000, 22, false).await;
        let g = image(&e, &cache, &[(c_g.clone(), 10), (l_g.clone(), 3000)], &[tag("g")], false).await;
        let c_h = blob(&e, &cache, 20, 23, false).await;
        let h = image(&e, &cache, &[(c_h.clone(), 20)], &[tag("h")], false).await;

        // A push referencing G's layer holds its row as put_manifest does, and commits a
        // private manifest referencing it while the pass waits.
        let mut pusher = e.db.client().await.expect("client");
        let push = pusher.transaction().await.expect("tx");
        push.execute(
            "SELECT 1 FROM blobs WHERE digest = $1 FOR KEY SHARE",
            &[&l_g.to_string()],
        )
        .await
        .expect("lock");
        let pass = evict_now(&e.db, &e.objects, Selection::Image(&cache, &g));
        let commit_push = async {
            until_a_session_waits(&e).await;
            let body = b"{\"pushed\":true}";
            let digest = Digest::sha256_of(body).to_string();
            push.execute(
                "INSERT INTO repositories (name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&private.as_str()],
            )
            .await
            .expect("repo");
            push.execute(
                "WITH r AS (SELECT id FROM repositories WHERE name = $1),
                      m AS (INSERT INTO manifests (digest, media_type, body) VALUES ($2, $4, $3)),
                      mb AS (INSERT INTO manifest_blobs (manifest_digest, blob_digest) VALUES ($2, $5)),
                      rb AS (INSERT INTO repo_blobs (repo_id, digest, pushed) SELECT id, $5, true FROM r)
                 INSERT INTO repo_manifests (repo_id, digest, pushed) SELECT id, $2, true FROM r",
                &[&private.as_str(), &digest, &body.as_slice(), &IMAGE, &l_g.to_string()],
            )
            .await
            .expect("push");
            push.commit().await.expect("commit");
        };
        let (report, ()) = tokio::join!(pass, commit_push);
        let report = report.expect("pass");
        assert_eq!((report.images_evicted, report.blobs_removed), (1, 1), "{report}");
        assert!(!cached_manifest(&e, &g).await);
        assert!(!stored(&e, &c_g).await);
        assert!(stored(&e, &l_g).await, "the pushed manifest's layer was removed");
        assert_eq!(e.db.blob_size(&private, &l_g).await.expect("size"), Some(3000));

        // A pull re-putting H while a pass evicts it: the pass waits, sees the re-put and
        // leaves the image whole.
        let mut puller = e.db.client().await.expect("client");
        let reput = puller.transaction().await.expect("tx");
        reput
            .execute(
                "UPDATE repo_manifests SET linked_at = now() WHERE digest = $1",
                &[&h.to_string()],
            )
            .await
            .expect("re-put");
        let pass = evict_now(&e.db, &e.objects, Selection::Image(&cache, &h));
        let commit_reput = async {
            until_a_session_waits(&e).await;
            reput.commit().await.expect("commit");
        };
        let (report, ()) = tokio::join!(pass, commit_reput);
        let report = report.expect("pass");
        assert_eq!((report.images_evicted, report.images_skipped), (0, 1), "{report}");
        assert!(cached_manifest(&e, &h).await);
        assert!(stored(&e, &c_h).await);
        assert_eq!(e.db.tag(&cache, &tag("h")).await.expect("tag"), Some(h.clone()));
        // A put of an index takes its children `FOR KEY SHARE`, then its own row: a pass
        // evicting it waits on the children, not holding the index's row, so the put
        // proceeds (a pass holding the index first would deadlock with it).
        let mut kids = Vec::new();
        for n in 0..2u64 {
            let config = blob(&e, &cache, 10, 40 + n, false).await;
            kids.push(image(&e, &cache, &[(config, 10)], &[], false).await);
        }
        let body = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": kids.iter().map(|k| serde_json::json!({"mediaType": IMAGE, "digest": k.to_string(), "size": 1})).collect::<Vec<_>>()}).to_string();
        let ix = put(&e, &cache, body.as_bytes(), &[], &kids, &[], false).await;
        let put_again = puller.transaction().await.expect("tx");
        let kid_names: Vec<String> = kids.iter().map(Digest::to_string).collect();
        put_again
            .query(
                r#"SELECT digest FROM repo_manifests WHERE digest = ANY($1)
                    ORDER BY digest COLLATE "C" FOR KEY SHARE"#,
                &[&kid_names],
            )
            .await
            .expect("children");
        let pass = evict_now(&e.db, &e.objects, Selection::Image(&cache, &ix));
        let finish_put = async {
            until_a_session_waits(&e).await;
            put_again
                .execute(
                    "UPDATE repo_manifests SET linked_at = now() WHERE digest = $1",
                    &[&ix.to_string()],
                )
                .await
                .expect("the put's own row");
            put_again.commit().await.expect("commit");
        };
        let (report, ()) = tokio::join!(pass, finish_put);
        let report = report.expect("pass");
        assert_eq!(
            (report.images_evicted, report.images_skipped, report.images_gave_way),
            (0, 1, 0),
            "{report}"
        );
        for kept in kids.iter().chain([&ix]) {
            assert!(cached_manifest(&e, kept).await);
        }

        // The next pass may take it.
        let report = evict_now(&e.db, &e.objects, Selection::Image(&cache, &h))
            .await
            .expect("pass");
        assert_eq!(report.images_evicted, 1, "{report}");
        assert!(!stored(&e, &c_h).await);
    });
}

/// `transship cache ARGS --json --config CONFIG` (through the replica's admin socket).
fn cache_cli(config: &std::path::Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    common::cache_cli_run(config, args)
}

/// Replicas answer `cache pin|pins|evict|unpin` from the shared database (pinned on one, seen
/// and honoured on the other), and a replica with `cache.max_size` keeps the shared cache
/// within it.
#[test]
fn replicas_share_pins_and_eviction_and_keep_the_budget() {
    use common::replicas::{Replicas, blob_key};
    if !Replicas::available() {
        eprintln!("SeaweedFS, PostgreSQL or psql missing: skipped");
        return;
    }
    let mut r = Replicas::start(2);
    let configs: Vec<std::path::PathBuf> = (0..2)
        .map(|i| r.dir.path().join(format!("replica-{i}/transship.toml")))
        .collect();
    let config = |i: usize| configs[i].clone();
    let cache = repo("docker.io/library/app");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Three cached images of 1000-byte layers, pulled 5, 3 and 1 hours ago.
    let (images, layers) = rt.block_on(async {
        let e = Env {
            db: open(&r.db_url).await,
            objects: r.s3.objects(&r.bucket, None),
            url: r.db_url.clone(),
            _s3: None,
            _pg: None,
        };
        let mut images = Vec::new();
        let mut layers = Vec::new();
        for (n, t) in ["a", "b", "c"].into_iter().enumerate() {
            let seed = 100 + 2 * n as u64;
            let config = blob(&e, &cache, 10, seed, false).await;
            let layer = blob(&e, &cache, 1000, seed + 1, false).await;
            let digest = image(
                &e,
                &cache,
                &[(config, 10), (layer.clone(), 1000)],
                &[tag(t)],
                false,
            )
            .await;
            pulled(&e, &cache, &digest, 5 - 2 * n as i64).await;
            images.push(digest);
            layers.push(layer);
        }
        (images, layers)
    });
    let present = |r: &Replicas, d: &Digest| {
        !r.sql(&format!(
            "SELECT 1 FROM repo_manifests WHERE digest = '{d}'"
        ))
        .is_empty()
    };

    // Pinned through replica A, listed by B.
    let (ok, pinned, err) = cache_cli(&config(0), &["pin", "docker.io/library/app:a"]);
    assert!(ok, "{err}");
    assert_eq!(pinned["digest"], images[0].to_string());
    assert_eq!(pinned["repository"], cache.as_str());
    let (ok, pins, err) = cache_cli(&config(1), &["pins"]);
    assert!(ok, "{err}");
    let listed = pins["pins"].as_array().expect("pins");
    assert!(listed.iter().any(|p| p["tag"] == "a"), "{pins}");
    assert!(
        listed
            .iter()
            .any(|p| p["digest"] == images[0].to_string() && p["via_tag"] == "a"),
        "{pins}"
    );

    // Listed by B from the database, newest pull first, A pinned; A's tag history.
    let (ok, listed, err) = cache_cli(&config(1), &["ls", "--sort", "last-pulled"]);
    assert!(ok, "{err}");
    let rows: Vec<(String, String, u64, String)> = listed["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| {
            (
                i["digest"].as_str().unwrap_or_default().to_string(),
                i["tags"].to_string(),
                i["own_bytes"].as_u64().unwrap_or_default(),
                i["pinned"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let row = |n: usize, t: &str, pinned: &str| {
        (
            images[n].to_string(),
            format!("[\"{t}\"]"),
            1010,
            pinned.to_string(),
        )
    };
    assert_eq!(
        rows,
        vec![row(2, "c", "no"), row(1, "b", "no"), row(0, "a", "yes")]
    );
    assert_eq!(listed["usage"]["cached_bytes"], 3030, "{listed}");
    assert_eq!(listed["images"][0]["upstream"], "docker.io", "{listed}");
    let (ok, history, err) = cache_cli(&config(1), &["history", "docker.io/library/app:a"]);
    assert!(ok, "{err}");
    assert_eq!(
        history["resolutions"][0]["digest"],
        images[0].to_string(),
        "{history}"
    );
    assert_eq!(
        history["resolutions"].as_array().map(Vec::len),
        Some(1),
        "{history}"
    );

    // Evicted through B: gone for everyone, its layer out of the bucket; the pinned one stays.
    let (ok, evicted, err) = cache_cli(&config(1), &["evict", "docker.io/library/app:b"]);
    assert!(ok, "{err}");
    assert_eq!(evicted["report"]["images_evicted"], 1, "{evicted}");
    assert_eq!(evicted["report"]["blobs_removed"], 2, "{evicted}");
    assert!(!present(&r, &images[1]));
    assert!(
        !r.objects("blobs")
            .contains_key(&blob_key(&layers[1].to_string()))
    );
    let (ok, _, err) = cache_cli(&config(0), &["evict", "docker.io/library/app:a"]);
    assert!(!ok && err.contains("pinned"), "{err}");
    assert!(present(&r, &images[0]));

    // A budget of 1500 bytes on replica A: the unpinned image goes, the pinned one stays.
    let text = std::fs::read_to_string(config(0)).expect("config");
    let text = text
        .replace("# max_size = \"50GiB\"", "max_size = 1500")
        .replace("check_interval = \"10s\"", "check_interval = \"1s\"");
    std::fs::write(config(0), text).expect("config");
    r.restart(0);
    while present(&r, &images[2]) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(present(&r, &images[0]));
    assert!(
        r.objects("blobs")
            .contains_key(&blob_key(&layers[0].to_string()))
    );
    assert!(
        !r.objects("blobs")
            .contains_key(&blob_key(&layers[2].to_string()))
    );
    assert!(r.log(0).contains("cluster cache eviction"), "{}", r.log(0));

    // Unpinned through B: the tag pin and the digest pin it made.
    let (ok, unpinned, err) = cache_cli(&config(1), &["unpin", "docker.io/library/app:a"]);
    assert!(ok, "{err}");
    assert_eq!(unpinned["removed"], 2, "{unpinned}");
    assert!(
        r.sql("SELECT 1 FROM cache_pins UNION ALL SELECT 1 FROM cache_tag_pins")
            .is_empty()
    );
}

/// A pull putting an index again while a pass evicts it, many times over: neither fails (no
/// deadlock: both take the children before the index), and the image ends whole or absent,
/// never an index without its children or a blob row without its object.
#[test]
fn re_putting_an_index_while_it_is_evicted_ends_whole_or_absent() {
    let Some((s3, pg)) = engines() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let e = env(s3, pg, "evictindex").await;
        let cache = repo("docker.io/library/app");
        let (mut kept, mut evicted) = (0, 0);
        for round in 0..24u64 {
            let mut children = Vec::new();
            for arch in 0..3u64 {
                let seed = 1000 + round * 10 + arch;
                let config = blob(&e, &cache, 10, seed, false).await;
                children.push(image(&e, &cache, &[(config, 10)], &[], false).await);
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": INDEX,
                "manifests": children.iter().map(|c| serde_json::json!({"mediaType": IMAGE, "digest": c.to_string(), "size": 1})).collect::<Vec<_>>(),
                "annotations": {"round": round.to_string()},
            })
            .to_string();
            let ix = put(&e, &cache, index.as_bytes(), &[], &children, &[tag("1")], false).await;
            let tags = [tag("1")];
            let manifest = NewManifest {
                repo: &cache,
                digest: &ix,
                media_type: INDEX,
                body: index.as_bytes(),
                blobs: &[],
                children: &children,
                subject: None,
                artifact_type: None,
                referrer_descriptor: None,
                tags: &tags,
                pushed: false,
            };
            // Odd rounds re-put the index as the cache's writer does (a pull through another
            // replica): it locks only the index's row and its tag, never the children.
            let by_cache = round % 2 == 1;
            let again = async {
                if by_cache {
                    let cached = CachedManifest {
                        repo: &cache,
                        digest: &ix,
                        media_type: INDEX,
                        body: index.as_bytes(),
                        blobs: &[],
                        children: &children,
                        tag: Some(&tags[0]),
                        tag_seen: Some(&ix),
                    };
                    e.db.put_cached_manifest(&cached, |_| Vec::new())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    match e.db.put_manifest(&manifest).await {
                        Ok(())
                        | Err(transship::cluster::manifests::PutManifestError::Missing(_)) => Ok(()),
                        Err(other) => Err(other.to_string()),
                    }
                }
            };
            let pass = evict_now(&e.db, &e.objects, Selection::Image(&cache, &ix));
            let (again, pass) = tokio::join!(again, pass);
            let report = pass.expect("the pass failed");
            assert_eq!(report.images_gave_way, 0, "round {round}: {report}");
            again.unwrap_or_else(|e| panic!("round {round}: the re-put failed: {e}"));
            if by_cache && report.images_evicted == 1 {
                // Evicted first: the cache's put then brought the index back alone, tagged (its
                // children are fetched again on demand), never a child without its blobs.
                evicted += 1;
                for c in &children {
                    assert!(!cached_manifest(&e, c).await, "round {round}: {c} kept");
                }
                if cached_manifest(&e, &ix).await {
                    assert_eq!(e.db.tag(&cache, &tag("1")).await.expect("tag"), Some(ix.clone()));
                    let report = evict_now(&e.db, &e.objects, Selection::Image(&cache, &ix))
                        .await
                        .expect("pass");
                    assert_eq!(report.images_evicted, 1, "round {round}: {report}");
                }
            } else if cached_manifest(&e, &ix).await {
                kept += 1;
                for c in &children {
                    assert!(cached_manifest(&e, c).await, "round {round}: index without {c}");
                }
                assert_eq!(report.images_evicted, 0, "round {round}: {report}");
                // Evicted for good before the next round.
                let report = evict_now(&e.db, &e.objects, Selection::Image(&cache, &ix))
                    .await
                    .expect("pass");
                assert_eq!(report.images_evicted, 1, "round {round}: {report}");
            } else {
                evicted += 1;
                assert_eq!(e.db.tag(&cache, &tag("1")).await.expect("tag"), None);
            }
            assert_eq!(e.db.cache_usage().await.expect("usage").cached_bytes, 0);
        }
        eprintln!("kept {kept} times, evicted {evicted} times");
    });
}

/// A fill's blob is recorded only while its object is in the bucket, under the digest's fence:
/// an eviction or GC that removed the rows and is removing the object makes the record wait,
/// then find the object gone and record nothing (never a row without bytes).
#[test]
fn a_filled_blob_is_recorded_only_while_its_object_is_there() {
    let Some((s3, pg)) = engines() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let e = env(s3, pg, "evictfill").await;
        let cache = repo("docker.io/library/app");
        let put_object = |seed: u64| {
            let data = random_bytes(100, seed);
            let digest = Digest::sha256_of(&data);
            let objects = &e.objects;
            async move {
                objects
                    .put_verified(
                        &digest,
                        100,
                        stream::iter([Ok::<_, std::io::Error>(Bytes::from(data))]),
                    )
                    .await
                    .expect("put");
                digest
            }
        };
        let there = put_object(51).await;
        assert!(
            e.db.record_filled_blob(&e.objects, &cache, &there, 100, &[])
                .await
                .expect("record")
        );
        assert_eq!(
            e.db.blob_size(&cache, &there).await.expect("size"),
            Some(100)
        );
        assert!(stored(&e, &there).await);

        let gone = put_object(52).await;
        e.objects.delete(&gone).await.expect("delete");
        assert!(
            !e.db
                .record_filled_blob(&e.objects, &cache, &gone, 100, &[])
                .await
                .expect("record")
        );
        assert!(!stored(&e, &gone).await);

        // A removal holding the fence, about to delete the object.
        let racing = put_object(53).await;
        let mut remover = e.db.client().await.expect("client");
        let fence = remover.transaction().await.expect("tx");
        fence
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 7411))",
                &[&racing.to_string()],
            )
            .await
            .expect("fence");
        let record =
            e.db.record_filled_blob(&e.objects, &cache, &racing, 100, &[]);
        let remove = async {
            until_a_session_waits(&e).await;
            e.objects.delete(&racing).await.expect("delete");
            fence.commit().await.expect("commit");
        };
        let (recorded, ()) = tokio::join!(record, remove);
        assert!(!recorded.expect("record"));
        assert!(!stored(&e, &racing).await, "a row without its object");
    });
}
