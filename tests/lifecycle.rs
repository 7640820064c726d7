//! Restarts, garbage collection and fsck, against the real server and its real data dir.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use transship::config::HumanDuration;

#[test]
fn pushes_and_upload_sessions_survive_a_restart() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (m, d) = push_image(&h, "local/persist", "v1", 21);
    let data = random_bytes(50_000, 22);
    let r = h.send(
        "POST",
        "/v2/local/persist/blobs/uploads/",
        &[],
        Bytes::new(),
    );
    let loc = r.header("location").unwrap().to_string();
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "0-19999")],
        Bytes::copy_from_slice(&data[..20_000]),
    );
    assert_eq!(r.status, 202);
    drop(h);
    let dir = s.stop();

    let s = TestServer::start_in(dir, |c| c);
    let h = Http::for_server(&s);
    assert_eq!(h.get("/v2/local/persist/manifests/v1").body, m.as_bytes());
    assert_eq!(
        h.get(&format!("/v2/local/persist/manifests/{d}")).status,
        200
    );
    // The session resumes where it was, with its hash state rebuilt from disk.
    let r = h.get(&loc);
    assert_eq!((r.status, r.header("range")), (204, Some("0-19999")));
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "20000-49999")],
        Bytes::copy_from_slice(&data[20_000..]),
    );
    assert_eq!(r.status, 202);
    let r = h.send(
        "PUT",
        &format!("{loc}?digest={}", sha256(&data)),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        h.get(&format!("/v2/local/persist/blobs/{}", sha256(&data)))
            .body,
        data
    );
}

fn no_grace(mut c: transship::config::Config) -> transship::config::Config {
    c.gc.grace_period = HumanDuration(Duration::ZERO);
    c.uploads.abandon_after = HumanDuration(Duration::ZERO);
    c
}

#[test]
fn gc_removes_only_unreferenced_blobs() {
    let s = TestServer::start_with(no_grace);
    let h = Http::for_server(&s);
    let (_, d) = push_image(&h, "local/gc", "keep", 31);
    let loose = h.push_blob("local/gc", b"no manifest references me");
    let shared_layer = random_bytes(3000, 32);
    let shared = h.push_blob("local/gc2", &shared_layer);
    let c = h.push_blob("local/gc2", b"{}");
    let m = image_manifest((&c, 2), &[(&shared, shared_layer.len())]);
    let r = h.push_manifest(
        "local/gc2",
        "t",
        "application/vnd.oci.image.manifest.v1+json",
        m.as_bytes(),
    );
    let m_digest = r.header("docker-content-digest").unwrap().to_string();
    let files_before = blob_files(s.data_dir()).len();

    let report = s.app.store.collect_garbage().unwrap();
    assert_eq!(report.blobs_removed, 1, "{report}");
    assert_eq!(blob_files(s.data_dir()).len(), files_before - 1);
    assert_eq!(h.get(&format!("/v2/local/gc/blobs/{loose}")).status, 404);
    assert_eq!(h.get("/v2/local/gc/manifests/keep").status, 200);
    assert_eq!(
        h.get(&format!("/v2/local/gc2/blobs/{shared}")).body,
        shared_layer
    );

    // Deleting the manifest makes its blobs collectable.
    assert_eq!(
        h.delete(&format!("/v2/local/gc2/manifests/{m_digest}"))
            .status,
        202
    );
    let report = s.app.store.collect_garbage().unwrap();
    assert_eq!(report.blobs_removed, 2, "{report}");
    assert_eq!(h.get(&format!("/v2/local/gc2/blobs/{shared}")).status, 404);
    assert_eq!(h.get(&format!("/v2/local/gc/manifests/{d}")).status, 200);
    assert!(s.app.store.fsck(false).unwrap().is_clean());
}

#[test]
fn grace_period_protects_fresh_uploads() {
    let s = TestServer::start(); // default grace: 1h
    let h = Http::for_server(&s);
    let d = h.push_blob("local/fresh", b"layer pushed before its manifest");
    let report = s.app.store.collect_garbage().unwrap();
    assert_eq!(report.blobs_removed, 0);
    assert_eq!(h.head(&format!("/v2/local/fresh/blobs/{d}")).status, 200);
}

#[test]
fn abandoned_uploads_are_reaped() {
    let s = TestServer::start_with(no_grace);
    let h = Http::for_server(&s);
    let r = h.send("POST", "/v2/local/reap/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    h.send("PATCH", &loc, &[], Bytes::from_static(b"partial"));
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(s.app.store.reap_uploads(Duration::ZERO).unwrap(), 1);
    assert_eq!(h.get(&loc).status, 404);
    assert_eq!(
        std::fs::read_dir(s.data_dir().join("ingest"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn fsck_finds_corruption_and_repair_quarantines_it() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (_, _) = push_image(&h, "local/fsck", "v1", 41);
    let victim = h.push_blob("local/fsck", &random_bytes(4096, 42));
    let report = s.app.store.fsck(false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.blobs_checked, 3);

    // Flip one byte of a stored blob.
    let hex = victim.trim_start_matches("sha256:");
    let path = s.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let report = s.app.store.fsck(false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&victim) && p.contains("hashes to")),
        "{:?}",
        report.problems
    );
    assert!(report.repairs.is_empty(), "no repair without --repair");

    let report = s.app.store.fsck(true).unwrap();
    assert!(!report.repairs.is_empty());
    assert!(
        s.data_dir()
            .join("quarantine")
            .join(format!("sha256-{hex}"))
            .exists()
    );
    assert!(!path.exists());
    let again = s.app.store.fsck(false).unwrap();
    assert!(again.is_clean(), "{:?}", again.problems);
    assert_eq!(
        h.get(&format!("/v2/local/fsck/blobs/{victim}")).status,
        404,
        "a corrupt blob is never served after repair"
    );
}

/// GC running continuously with no grace period while clients push: a push may be refused
/// (its layers were collected before its manifest arrived), but a manifest the registry
/// acknowledged never loses a blob.
#[test]
fn gc_racing_pushes_never_breaks_an_acknowledged_manifest() {
    let s = TestServer::start_with(no_grace);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (app, stop) = (s.app.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut removed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                removed += app.store.collect_garbage().expect("gc").blobs_removed;
            }
            removed
        })
    };
    let base = s.url("");
    let pushers: Vec<_> = (0..3u64)
        .map(|w| {
            let base = base.clone();
            std::thread::spawn(move || {
                let h = Http::new(&base);
                let mut acked = Vec::new();
                for i in 0..25u64 {
                    let repo = format!("local/race/w{w}");
                    let layer = random_bytes(2000 + i as usize, w * 100 + i);
                    let config = format!(r#"{{"w":{w},"i":{i}}}"#);
                    let l = h.push_blob(&repo, &layer);
                    let c = h.push_blob(&repo, config.as_bytes());
                    let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
                    let r = h.push_manifest(
                        &repo,
                        &format!("t{i}"),
                        "application/vnd.oci.image.manifest.v1+json",
                        m.as_bytes(),
                    );
                    match r.status {
                        201 => acked.push((repo, l, layer, c)),
                        400 => assert_eq!(r.error_code(), "MANIFEST_BLOB_UNKNOWN"),
                        other => panic!("unexpected status {other}"),
                    }
                }
                acked
            })
        })
        .collect();
    let acked: Vec<_> = pushers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let removed = gc.join().unwrap();
    let h = Http::for_server(&s);
    for (repo, l, layer, c) in &acked {
        assert_eq!(
            h.get(&format!("/v2/{repo}/blobs/{l}")).body,
            *layer,
            "acknowledged layer lost"
        );
        assert_eq!(
            h.head(&format!("/v2/{repo}/blobs/{c}")).status,
            200,
            "acknowledged config lost"
        );
    }
    assert!(s.app.store.fsck(false).unwrap().is_clean());
    eprintln!(
        "{} manifests acknowledged, {removed} blobs collected concurrently",
        acked.len()
    );
}
