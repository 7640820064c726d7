//! Cluster-wide garbage collection against the real engines (SeaweedFS and PostgreSQL 15):
//! what a manifest in a repository references stays, an unreferenced blob goes (its rows and
//! its object), a recent push's blob stays for the push window, an object the database does not
//! know goes, a deleted manifest releases its blobs, and only one replica runs at a time.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::engines::{Postgres, SeaweedFs};
use common::random_bytes;
use futures_util::stream;
use transship::cluster::gc::{ClusterGcReport, GcWindows, collect_garbage};
use transship::cluster::manifests::NewManifest;
use transship::cluster::objects::Objects;
use transship::cluster::pg::{Db, PgOptions};
use transship::oci::{Digest, RepoName, Tag};

const BUCKET: &str = "transship-gc";

async fn put_blob(objects: &Objects, data: &[u8]) -> Digest {
    let digest = Digest::sha256_of(data);
    let body = Bytes::copy_from_slice(data);
    objects
        .put_verified(
            &digest,
            data.len() as u64,
            stream::iter([Ok::<_, std::io::Error>(body)]),
        )
        .await
        .expect("put blob");
    digest
}

fn image_manifest(config: &Digest, size: usize) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": size},
        "layers": [],
    })
    .to_string()
    .into_bytes()
}

/// One GC run by replica A, run again at once if asked (no interval between runs).
async fn gc(db: &Db, objects: &Objects, windows: GcWindows) -> Option<ClusterGcReport> {
    collect_garbage(
        db,
        objects,
        "replica-a",
        windows,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await
    .expect("gc")
}

async fn rows(db: &Db, sql: &str, digest: &Digest) -> i64 {
    db.client()
        .await
        .expect("client")
        .query_one(sql, &[&digest.to_string()])
        .await
        .expect("query")
        .get(0)
}

#[test]
fn gc_removes_what_nothing_references_and_keeps_the_rest() {
    if !SeaweedFs::available() || !Postgres::available() {
        return;
    }
    let s3 = SeaweedFs::start();
    s3.create_bucket(BUCKET);
    let pg = Postgres::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = pg.create_database("gc").await;
        let db = Db::open(&PgOptions {
            url,
            password: None,
            pool_size: 4,
            ca_roots: None,
        })
        .await
        .expect("open db");
        let objects = s3.objects(BUCKET, None);
        let repo: RepoName = "team/app".parse().expect("repo");
        let config_bytes = random_bytes(1000, 1);
        let referenced = put_blob(&objects, &config_bytes).await;
        let unreferenced = put_blob(&objects, &random_bytes(2000, 2)).await;
        let pushed = put_blob(&objects, &random_bytes(3000, 3)).await;
        let unrecorded = put_blob(&objects, &random_bytes(4000, 4)).await;
        db.link_blob(&repo, &referenced, 1000, true)
            .await
            .expect("link");
        db.link_blob(&repo, &unreferenced, 2000, false)
            .await
            .expect("link");
        db.link_blob(&repo, &pushed, 3000, true)
            .await
            .expect("link");
        let body = image_manifest(&referenced, config_bytes.len());
        let manifest = Digest::sha256_of(&body);
        let tag: Tag = "v1".parse().expect("tag");
        db.put_manifest(&NewManifest {
            repo: &repo,
            digest: &manifest,
            media_type: "application/vnd.oci.image.manifest.v1+json",
            body: &body,
            blobs: std::slice::from_ref(&referenced),
            children: &[],
            subject: None,
            artifact_type: None,
            referrer_descriptor: None,
            tags: std::slice::from_ref(&tag),
            pushed: true,
        })
        .await
        .map_err(|_| "put_manifest failed")
        .expect("manifest");
        // Every object and row is past the grace period at once; a push's link is protected
        // for an hour.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let windows = GcWindows {
            grace: Duration::ZERO,
            push: Duration::from_secs(3600),
        };

        // Another replica holds the job: this one does nothing.
        let other = db
            .acquire_job("gc", "replica-b", Duration::from_secs(60))
            .await
            .expect("acquire")
            .expect("free");
        let skipped = gc(&db, &objects, windows).await;
        assert_eq!(skipped, None);
        assert!(objects.head(&unreferenced).await.expect("head").is_some());
        db.release_job("gc", other).await.expect("release");

        let report = gc(&db, &objects, windows).await.expect("ran");
        assert_eq!(report.blobs_removed, 1, "{report}");
        assert_eq!(report.bytes_freed, 2000, "{report}");
        assert_eq!(report.orphan_objects_removed, 1, "{report}");
        assert_eq!(objects.head(&unreferenced).await.expect("head"), None);
        assert_eq!(objects.head(&unrecorded).await.expect("head"), None);
        assert_eq!(objects.head(&referenced).await.expect("head"), Some(1000));
        assert_eq!(objects.head(&pushed).await.expect("head"), Some(3000));
        let count = "SELECT count(*) FROM blobs WHERE digest = $1";
        assert_eq!(rows(&db, count, &unreferenced).await, 0);
        assert_eq!(
            rows(
                &db,
                "SELECT count(*) FROM repo_blobs WHERE digest = $1",
                &unreferenced
            )
            .await,
            0
        );
        assert_eq!(rows(&db, count, &referenced).await, 1);
        assert_eq!(
            db.blob_size(&repo, &referenced).await.expect("size"),
            Some(1000)
        );

        // Deleting the manifest releases its config blob (and the manifest's own row).
        assert!(db.delete_manifest(&repo, &manifest).await.expect("delete"));
        db.client()
            .await
            .expect("client")
            .execute(
                "UPDATE repo_blobs SET linked_at = now() - interval '2 hours'",
                &[],
            )
            .await
            .expect("age the links");
        let report = gc(&db, &objects, windows).await.expect("ran");
        assert_eq!(report.manifests_removed, 1, "{report}");
        assert_eq!(report.blobs_removed, 2, "{report}");
        assert_eq!(objects.head(&referenced).await.expect("head"), None);
        assert_eq!(objects.head(&pushed).await.expect("head"), None);
        assert_eq!(
            rows(
                &db,
                "SELECT count(*) FROM manifests WHERE digest = $1",
                &manifest
            )
            .await,
            0
        );
    });
}
