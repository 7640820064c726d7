//! The pull-through cache's shared state against a real PostgreSQL 15: a cached manifest and
//! its tag in one transaction (its references recorded for GC, its pull, its events); a tag
//! move is compare-and-set against what the lookup read, so a slower replica's older upstream
//! answer never moves a tag back; a pinned tag is never forgotten; pulls reported by several
//! replicas add up (only for cached manifests); tag history is pruned by age and count.

mod common;

use transship::cluster::cache::{CachedManifest, PullRecord};
use transship::cluster::pg::Db;
use transship::cluster::tags::TagMove;
use transship::oci::{Digest, RepoName, Tag};

const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const REPO: &str = "mirror.test/library/app";

fn manifest(n: u8) -> (Digest, Vec<u8>, Digest) {
    let layer = Digest::sha256_of(&[n; 32]);
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::sha256_of(&[n]).to_string(), "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer.to_string(), "size": 32}],
    })
    .to_string()
    .into_bytes();
    (Digest::sha256_of(&body), body, layer)
}

fn with_db<F: std::future::Future<Output = ()>>(name: &str, f: impl FnOnce(Db) -> F) {
    common::engines::with_db(name, 4, f);
}

async fn rows(db: &Db, sql: &str) -> Vec<Vec<String>> {
    let client = db.client().await.expect("client");
    client
        .simple_query(sql)
        .await
        .expect(sql)
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Caches manifest `n` (tagged `tag`, read as naming `seen`); returns its digest and what the
/// tag did, and the events it recorded.
async fn put(
    db: &Db,
    n: u8,
    tag: Option<&Tag>,
    seen: Option<&Digest>,
) -> (Digest, Option<TagMove>, Vec<String>) {
    let (digest, body, layer) = manifest(n);
    let repo: RepoName = REPO.parse().expect("repo");
    let blobs = [Digest::sha256_of(&[n]), layer];
    let m = CachedManifest {
        repo: &repo,
        digest: &digest,
        media_type: MEDIA_TYPE,
        body: &body,
        blobs: &blobs,
        children: &[],
        tag,
        tag_seen: seen,
    };
    let mut events = Vec::new();
    let put = db
        .put_cached_manifest(&m, |p| {
            if p.new_here {
                events.push(format!("fill {digest}"));
            }
            if let Some(TagMove::Moved { previous }) = &p.tag {
                events.push(format!("moved {previous} -> {digest}"));
            }
            events.iter().map(|e| e.clone().into_bytes()).collect()
        })
        .await
        .expect("put");
    (digest, put.tag, events)
}

async fn tag_row(db: &Db) -> Vec<Vec<String>> {
    rows(db, "SELECT digest, checked_at IS NOT NULL FROM tags").await
}

#[test]
fn a_cached_manifest_and_its_tag_are_one_transaction_and_a_move_never_goes_back() {
    with_db("cache_cas", |db| async move {
        let tag: Tag = "v1".parse().expect("tag");
        let (d1, moved, events) = put(&db, 1, Some(&tag), None).await;
        assert_eq!(moved, Some(TagMove::Created));
        assert_eq!(events, [format!("fill {d1}")]);
        assert_eq!(tag_row(&db).await, [[d1.to_string(), "t".into()]]);
        // GC sees what it references; the repository holds it as a cache fill; a pull.
        let (_, _, layer) = manifest(1);
        assert_eq!(
            rows(&db, "SELECT blob_digest FROM manifest_blobs ORDER BY 1").await,
            {
                let mut v = vec![
                    vec![Digest::sha256_of(&[1]).to_string()],
                    vec![layer.to_string()],
                ];
                v.sort();
                v
            }
        );
        assert_eq!(
            rows(&db, "SELECT pushed FROM repo_manifests").await,
            [["f"]]
        );
        assert_eq!(
            rows(&db, "SELECT count(*) FROM cache_access").await,
            [["1"]]
        );

        // Replica C read v1 -> d1 and the upstream said d2: moved.
        let (d2, moved, events) = put(&db, 2, Some(&tag), Some(&d1)).await;
        assert_eq!(
            moved,
            Some(TagMove::Moved {
                previous: d1.clone()
            })
        );
        assert_eq!(
            events,
            [format!("fill {d2}"), format!("moved {d1} -> {d2}")]
        );
        // Replica B read v1 -> d1 too, but its (older) answer d3 commits after C's: the
        // manifest is cached, the tag stays where C put it, no move is recorded.
        let (d3, moved, events) = put(&db, 3, Some(&tag), Some(&d1)).await;
        assert_eq!(moved, None);
        assert_eq!(events, [format!("fill {d3}")]);
        assert_eq!(tag_row(&db).await, [[d2.to_string(), "t".into()]]);
        // A lookup that read the tag as it is moves it (and one that finds it already there
        // confirms it).
        let (_, moved, _) = put(&db, 3, Some(&tag), Some(&d2)).await;
        assert_eq!(
            moved,
            Some(TagMove::Moved {
                previous: d2.clone()
            })
        );
        let (_, moved, events) = put(&db, 3, Some(&tag), Some(&d1)).await;
        assert_eq!((moved, events), (Some(TagMove::Unchanged), vec![]));
        assert_eq!(
            rows(
                &db,
                "SELECT coalesce(previous, '-'), digest FROM tag_history ORDER BY id"
            )
            .await,
            [
                ["-".to_string(), d1.to_string()],
                [d1.to_string(), d2.to_string()],
                [d2.to_string(), d3.to_string()],
            ]
        );
        // A tag created meanwhile by another replica is not overwritten by a lookup that saw
        // none.
        let other: Tag = "v2".parse().expect("tag");
        put(&db, 4, Some(&other), None).await;
        let (_, moved, _) = put(&db, 5, Some(&other), None).await;
        assert_eq!(moved, None);
        // A tag deleted meanwhile (forgotten, evicted) is no newer answer: created again.
        let repo: RepoName = REPO.parse().expect("repo");
        let (d4, _, _) = put(&db, 4, None, None).await;
        assert!(db.forget_cached_tag(&repo, &other).await.expect("forget"));
        let (_, moved, _) = put(&db, 5, Some(&other), Some(&d4)).await;
        assert_eq!(moved, Some(TagMove::Created));
    });
}

#[test]
fn a_pinned_tag_is_not_forgotten_and_a_forgotten_one_leaves_history() {
    with_db("cache_forget", |db| async move {
        let repo: RepoName = REPO.parse().expect("repo");
        let (pinned, loose): (Tag, Tag) =
            ("keep".parse().expect("tag"), "go".parse().expect("tag"));
        let (d, _, _) = put(&db, 1, Some(&pinned), None).await;
        put(&db, 1, Some(&loose), None).await;
        rows(
            &db,
            &format!(
                "INSERT INTO cache_tag_pins (repo_id, tag) \
                 SELECT id, 'keep' FROM repositories WHERE name = '{REPO}'"
            ),
        )
        .await;
        assert!(db.is_tag_pinned(&repo, &pinned).await.expect("pinned?"));
        assert!(!db.forget_cached_tag(&repo, &pinned).await.expect("forget"));
        assert!(db.forget_cached_tag(&repo, &loose).await.expect("forget"));
        assert_eq!(
            rows(&db, "SELECT tag FROM tags").await,
            [["keep"]],
            "the pinned tag stays"
        );
        assert_eq!(
            rows(
                &db,
                "SELECT tag, coalesce(digest, '-'), previous FROM tag_history \
                 WHERE digest IS NULL"
            )
            .await,
            [["go".to_string(), "-".to_string(), d.to_string()]]
        );
        // A move of the pinned tag pins the digest it moves to, for the tag's sake.
        let (d2, _, _) = put(&db, 2, Some(&pinned), Some(&d)).await;
        assert_eq!(
            rows(&db, "SELECT digest, reason FROM cache_pins").await,
            [[d2.to_string(), ":keep".to_string()]]
        );
    });
}

#[test]
fn pulls_from_several_replicas_add_up_for_cached_manifests_only() {
    with_db("cache_pulls", |db| async move {
        let (d, _, _) = put(&db, 1, None, None).await;
        let (_, _, layer) = manifest(1);
        let record = |digest: &Digest, age: u64, pulls: u64| PullRecord {
            repo: REPO.to_string(),
            digest: digest.to_string(),
            age,
            pulls,
        };
        let unknown = PullRecord {
            repo: "mirror.test/never".into(),
            ..record(&d, 0, 7)
        };
        // Cached (a pull) two days ago.
        rows(
            &db,
            "UPDATE cache_access SET last_pulled = now() - interval '2 days'",
        )
        .await;
        // Replica A: the manifest, a blob (no image) and a repository never cached.
        let mut a = vec![record(&d, 3600, 2), record(&layer, 0, 5), unknown];
        assert_eq!(db.record_pulls(&mut a).await.expect("record"), 1);
        // Replica B, later.
        let mut b = vec![record(&d, 60, 3)];
        assert_eq!(db.record_pulls(&mut b).await.expect("record"), 1);
        assert_eq!(
            rows(
                &db,
                "SELECT digest, pulls, now() - last_pulled BETWEEN interval '50 seconds' \
                 AND interval '120 seconds' FROM cache_access"
            )
            .await,
            [[d.to_string(), "5".to_string(), "t".to_string()]],
            "pulls add up; the latest pull (by the database's clock) wins"
        );
    });
}

#[test]
fn tag_history_is_pruned_by_age_and_by_count_and_the_upkeep_runs_once() {
    with_db("cache_history", |db| async move {
        let tag: Tag = "v1".parse().expect("tag");
        let mut seen = None;
        for n in 1..=6 {
            let (d, _, _) = put(&db, n, Some(&tag), seen.as_ref()).await;
            seen = Some(d);
        }
        // The two oldest moves happened long ago; so did the only entry of another tag (the
        // newest entry of a tag stays however old, as locally).
        let quiet: Tag = "quiet".parse().expect("tag");
        put(&db, 9, Some(&quiet), None).await;
        rows(
            &db,
            "UPDATE tag_history SET at = now() - interval '100 days' \
             WHERE id IN (SELECT id FROM tag_history ORDER BY id LIMIT 2) OR tag = 'quiet'",
        )
        .await;
        let day = std::time::Duration::from_secs(86_400);
        let prune = |entries, limit| db.prune_tag_history(90 * day, entries, limit);
        // By age: the two old rows of v1 go (in batches of one: the caller loops).
        assert_eq!(prune(100, 1).await.expect("prune"), 1);
        assert_eq!(prune(100, 10).await.expect("prune"), 1);
        let count = "SELECT tag, count(*) FROM tag_history GROUP BY tag ORDER BY tag";
        assert_eq!(rows(&db, count).await, [["quiet", "1"], ["v1", "4"]]);
        // By count: the newest two of each tag stay.
        assert_eq!(prune(2, 10).await.expect("prune"), 2);
        assert_eq!(
            rows(&db, "SELECT digest FROM tag_history ORDER BY id").await,
            [
                [manifest(5).0.to_string()],
                [seen.expect("last").to_string()],
                [manifest(9).0.to_string()],
            ]
        );
        // The hourly upkeep, on one replica an hour: pull records of digests no longer
        // cached go too.
        rows(
            &db,
            "DELETE FROM repo_manifests WHERE digest = (SELECT digest FROM tags WHERE tag = 'quiet')",
        )
        .await;
        let hour = std::time::Duration::from_secs(3600);
        let upkeep =
            |owner| transship::cluster::cache::upkeep_records(&db, owner, 90 * day, 2, hour);
        assert_eq!(upkeep("a").await.expect("upkeep"), Some(1));
        assert_eq!(
            upkeep("b").await.expect("upkeep"),
            None,
            "a holds the job for the hour"
        );
        assert_eq!(
            rows(&db, "SELECT count(*) FROM cache_access").await,
            [["6"]]
        );
    });
}
