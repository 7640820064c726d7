//! The cluster's event outbox against a real PostgreSQL 15: a change and its events commit
//! together or not at all (a push referencing a blob the repository lacks records nothing; a
//! delete of what is not there records nothing; a tag delete's event names the digest the tag
//! had), and events commit in `seq` order, so a reader following a cursor never passes an
//! event still being written, however many pushes run at once.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use transship::cluster::manifests::{NewManifest, PutManifestError};
use transship::cluster::pg::Db;
use transship::oci::{Digest, RepoName, Tag};

const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn manifest_body(config: &Digest, n: usize) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": n},
        "layers": [],
    })
    .to_string()
    .into_bytes()
}

/// Runs `f` on a fresh database of a fresh PostgreSQL (skipped where none is installed).
fn with_db<F: std::future::Future<Output = ()>>(name: &str, f: impl FnOnce(Db) -> F) {
    common::engines::with_db(name, 8, f);
}

async fn outbox(db: &Db) -> Vec<(u64, String)> {
    let (rows, _) = db.events_after(0, 10_000).await.expect("events");
    rows.into_iter()
        .map(|r| (r.seq, String::from_utf8(r.record).expect("utf-8")))
        .collect()
}

async fn push(
    db: &Db,
    repo: &RepoName,
    config: &Digest,
    n: usize,
    tag: &Tag,
    event: &str,
) -> Result<Digest, PutManifestError> {
    let body = manifest_body(config, n);
    let digest = Digest::sha256_of(&body);
    db.put_manifest_recording(
        &NewManifest {
            repo,
            digest: &digest,
            media_type: MEDIA_TYPE,
            body: &body,
            blobs: std::slice::from_ref(config),
            children: &[],
            subject: None,
            artifact_type: None,
            referrer_descriptor: None,
            tags: std::slice::from_ref(tag),
            pushed: true,
        },
        &[event.as_bytes().to_vec()],
    )
    .await
    .map(|()| digest)
}

#[test]
fn a_change_and_its_events_commit_together() {
    with_db("events_tx", |db| async move {
        let repo: RepoName = "team/app".parse().expect("repo");
        let tag: Tag = "v1".parse().expect("tag");
        let config = Digest::sha256_of(b"config");

        // The config blob is not linked: the push fails, and its event is not recorded.
        let failed = push(&db, &repo, &config, 1, &tag, r#"{"n":"failed"}"#).await;
        assert!(
            matches!(failed, Err(PutManifestError::Missing(ref d)) if d == std::slice::from_ref(&config)),
            "a push of a manifest whose blob is missing fails"
        );
        assert_eq!(outbox(&db).await, vec![], "a failed push records no event");

        db.link_blob(&repo, &config, 6, true).await.expect("link");
        let digest = push(&db, &repo, &config, 1, &tag, r#"{"n":"pushed"}"#)
            .await
            .expect("push");
        let events = outbox(&db).await;
        assert_eq!(events.len(), 1, "the push recorded its event: {events:?}");
        assert_eq!(events[0].1, r#"{"n":"pushed"}"#);

        // A tag delete: the event is made of the digest the tag named, in the delete's
        // transaction; a delete of a tag that is not there records nothing.
        let mut named = None;
        assert!(
            db.delete_tag_recording(&repo, &tag, |d| {
                named = Some(d.to_string());
                vec![format!(r#"{{"deleted":"{d}"}}"#).into_bytes()]
            })
            .await
            .expect("delete tag")
        );
        assert_eq!(named.as_deref(), Some(digest.to_string().as_str()));
        assert!(
            !db.delete_tag_recording(&repo, &tag, |_| vec![b"{}".to_vec()])
                .await
                .expect("delete again"),
            "the tag is gone"
        );
        let events = outbox(&db).await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1].1, format!(r#"{{"deleted":"{digest}"}}"#));
        assert!(events[0].0 < events[1].0, "numbered in commit order");

        // A manifest delete records only when the manifest was there.
        assert!(
            db.delete_manifest_recording(&repo, &digest, &[b"{\"m\":1}".to_vec()])
                .await
                .expect("delete manifest")
        );
        assert!(
            !db.delete_manifest_recording(&repo, &digest, &[b"{\"m\":2}".to_vec()])
                .await
                .expect("delete manifest again")
        );
        let events = outbox(&db).await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[2].1, r#"{"m":1}"#);

        // A lease-fenced cursor: set by the lease holder, refused once the lease is gone.
        let cursors = db.open_event_cursors(&["hook"]).await.expect("cursors");
        assert_eq!(
            cursors,
            vec![events[2].0],
            "a new endpoint starts at the end"
        );
        let lease = db
            .acquire_job("events:hook", "test", std::time::Duration::from_secs(30))
            .await
            .expect("acquire")
            .expect("free");
        assert!(
            db.set_event_cursor("hook", 1, "events:hook", &lease)
                .await
                .expect("set")
        );
        db.drop_job_lease("events:hook", &lease)
            .await
            .expect("drop");
        assert!(
            !db.set_event_cursor("hook", 2, "events:hook", &lease)
                .await
                .expect("set")
        );
        assert_eq!(db.event_cursor("hook").await.expect("cursor"), Some(1));
    });
}

#[test]
fn a_reader_following_the_outbox_never_passes_an_event_being_written() {
    with_db("events_order", |db| async move {
        let repo: RepoName = "team/app".parse().expect("repo");
        let config = Digest::sha256_of(b"config");
        db.link_blob(&repo, &config, 6, true).await.expect("link");
        const PUSHES: usize = 40;
        // A reader moving a cursor as the delivery task does: to the last event it read, or
        // to `upto` when the read was short. Every event must be seen exactly once.
        let stop = Arc::new(tokio::sync::Notify::new());
        let reader = {
            let (db, stop) = (db.clone(), stop.clone());
            tokio::spawn(async move {
                let mut cursor = 0;
                let mut seen = Vec::new();
                let stopped = stop.notified();
                tokio::pin!(stopped);
                let mut last_round = false;
                loop {
                    let (rows, upto) = db.events_after(cursor, 3).await.expect("read");
                    let short = rows.len() < 3;
                    for r in rows {
                        seen.push(String::from_utf8(r.record).expect("utf-8"));
                        cursor = r.seq;
                    }
                    if short {
                        cursor = cursor.max(upto);
                        if last_round {
                            return seen;
                        }
                    }
                    tokio::select! {
                        () = &mut stopped => last_round = true,
                        () = tokio::task::yield_now() => {}
                    }
                }
            })
        };
        let mut pushes = Vec::new();
        for i in 0..PUSHES {
            let (db, repo, config) = (db.clone(), repo.clone(), config.clone());
            pushes.push(tokio::spawn(async move {
                let tag: Tag = format!("t{}", i % 4).parse().expect("tag");
                push(&db, &repo, &config, i, &tag, &format!("{i}"))
                    .await
                    .map_err(|e| e.to_string())
                    .expect("push");
            }));
        }
        for p in pushes {
            p.await.expect("push task");
        }
        stop.notify_one();
        let seen = reader.await.expect("reader");
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(seen.len(), PUSHES, "each event read once: {seen:?}");
        assert_eq!(unique.len(), PUSHES, "no event read twice: {seen:?}");
    });
}

#[test]
fn events_of_a_later_transaction_wait_for_an_earlier_one_to_commit() {
    with_db("events_wait", |db| async move {
        // An event written but not committed yet...
        let mut client = db.client().await.expect("client");
        let tx = client.transaction().await.expect("begin");
        transship::cluster::events::insert_events(&tx, &[b"first".to_vec()])
            .await
            .expect("insert");
        // ...and one recorded after it, from another connection.
        let later = {
            let db = db.clone();
            tokio::spawn(async move { db.append_events(&[b"second".to_vec()]).await })
        };
        // Until the later one has finished or waits for the earlier one's lock.
        let watcher = db.client().await.expect("client");
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await
                .expect("locks")
                .get(0);
            if waiting > 0 || later.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // A reader now must not see the later event: it would move past the earlier one.
        let (rows, upto) = db.events_after(0, 10).await.expect("read");
        assert!(
            rows.is_empty(),
            "an event committed past one still being written: {:?}",
            rows.iter().map(|r| r.seq).collect::<Vec<_>>()
        );
        assert_eq!(upto, 0);
        tx.commit().await.expect("commit");
        later.await.expect("task").expect("append");
        let events = outbox(&db).await;
        let records: Vec<&str> = events.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(records, ["first", "second"]);
    });
}
