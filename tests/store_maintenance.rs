//! Background maintenance of the store against the real server and its real data dir: scrub
//! finds bytes damaged at rest and takes them out of service (private and pull-through cache
//! repositories, by API and by the periodic loop, cancellable), and GC removing blobs does not
//! hold up pushes and pulls.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::upstream::{self, Distribution};
use common::*;
use transship::config::{ByteSize, HumanDuration};

fn blob_path(s: &TestServer, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    s.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn flip_byte(path: &std::path::Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(path, &bytes).unwrap();
}

fn metric(h: &Http, name: &str) -> Option<u64> {
    let text = String::from_utf8(h.get("/metrics").body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn scrub_quarantines_a_blob_damaged_at_rest() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let good_data = random_bytes(300_000, 7);
    let good = h.push_blob("local/scrub", &good_data);
    let data = random_bytes(5000, 8);
    let victim = h.push_blob("local/scrub", &data);
    let also = h.send(
        "POST",
        &format!("/v2/local/scrub2/blobs/uploads/?mount={victim}&from=local/scrub"),
        &[],
        Bytes::new(),
    );
    assert_eq!(also.status, 201, "mounted into a second repository");
    // Served once, so the hot caches know the links.
    assert_eq!(h.get(&format!("/v2/local/scrub/blobs/{victim}")).body, data);

    flip_byte(&blob_path(&s, &victim), 100);
    assert_ne!(
        std::fs::read(blob_path(&s, &victim)).unwrap(),
        data,
        "the damage is real"
    );
    // A small blob served once is held in memory, verified: the damage is not served.
    let served = h.get(&format!("/v2/local/scrub/blobs/{victim}"));
    assert_eq!(served.body, data);

    let report = transship::maintenance::scrub_pass(&s.app, &|| false).unwrap();
    assert!(report.completed);
    assert_eq!(report.blobs_checked, 2);
    assert_eq!(
        report
            .quarantined
            .iter()
            .map(|(d, _)| d.to_string())
            .collect::<Vec<_>>(),
        vec![victim.clone()]
    );
    assert!(report.quarantined[0].1.contains("hashes to"), "{report:?}");

    for repo in ["local/scrub", "local/scrub2"] {
        let r = h.get(&format!("/v2/{repo}/blobs/{victim}"));
        assert_eq!(r.status, 404, "{repo}: damaged bytes are never served");
        assert_eq!(r.error_code(), "BLOB_UNKNOWN");
        assert_eq!(h.head(&format!("/v2/{repo}/blobs/{victim}")).status, 404);
    }
    assert_eq!(
        h.get(&format!("/v2/local/scrub/blobs/{good}")).body,
        good_data
    );
    assert_eq!(metric(&h, "transship_scrub_corrupt_total"), Some(1));
    assert_eq!(
        metric(&h, "transship_scrub_bytes_total"),
        Some((good_data.len() + data.len()) as u64)
    );
    assert_eq!(metric(&h, "transship_scrub_passes_total"), Some(1));
    let hex = victim.trim_start_matches("sha256:");
    assert!(
        s.data_dir()
            .join("quarantine")
            .join(format!("sha256-{hex}"))
            .exists()
    );
    assert!(!blob_path(&s, &victim).exists());
    let fsck = s.app.store.fsck(false).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
    assert_eq!(s.app.store.usage(), (good_data.len() as u64, 1));

    // Pushed again, it is whole again; the next pass finds nothing.
    assert_eq!(h.push_blob("local/scrub", &data), victim);
    assert_eq!(h.get(&format!("/v2/local/scrub/blobs/{victim}")).body, data);
    let again = transship::maintenance::scrub_pass(&s.app, &|| false).unwrap();
    assert!(again.quarantined.is_empty(), "{again:?}");
    assert_eq!(metric(&h, "transship_scrub_corrupt_total"), Some(1));
}

#[test]
fn scrub_finds_truncated_and_missing_files_and_stops_when_asked() {
    let s = TestServer::start_with(|mut c| {
        c.scrub.rate = ByteSize(0);
        c
    });
    let h = Http::for_server(&s);
    let short = h.push_blob("local/scrub", &random_bytes(10_000, 1));
    let gone = h.push_blob("local/scrub", &random_bytes(10_000, 2));
    let keep_data = random_bytes(10_000, 3);
    let keep = h.push_blob("local/scrub", &keep_data);

    // Asked to stop at once: nothing is read, nothing changes.
    let stopped = transship::maintenance::scrub_pass(&s.app, &|| true).unwrap();
    assert!(!stopped.completed);
    assert_eq!(stopped.bytes_checked, 0);
    assert_eq!(metric(&h, "transship_scrub_passes_total"), Some(0));

    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_path(&s, &short))
        .unwrap();
    f.set_len(5000).unwrap();
    std::fs::remove_file(blob_path(&s, &gone)).unwrap();
    let report = transship::maintenance::scrub_pass(&s.app, &|| false).unwrap();
    let mut found: Vec<String> = report
        .quarantined
        .iter()
        .map(|(d, _)| d.to_string())
        .collect();
    found.sort();
    let mut expected = vec![short.clone(), gone.clone()];
    expected.sort();
    assert_eq!(found, expected, "{report:?}");
    for d in [&short, &gone] {
        assert_eq!(h.get(&format!("/v2/local/scrub/blobs/{d}")).status, 404);
    }
    assert_eq!(
        h.get(&format!("/v2/local/scrub/blobs/{keep}")).body,
        keep_data
    );
    let fsck = s.app.store.fsck(false).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
}

/// The real binary, which starts the maintenance loops, with `scrub.interval` from its file.
#[test]
fn periodic_scrub_runs_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("transship.toml");
    let data_dir = dir.path().join("data");
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "data_dir = \"./transship-data\"",
            &format!("data_dir = {:?}", data_dir.display().to_string()),
        )
        .replace(
            "url = \"https://registry-1.docker.io\"",
            "url = \"http://127.0.0.1:9\"",
        )
        .replace("interval = \"24h\"", "interval = \"50ms\"");
    assert!(text.contains("interval = \"50ms\""));
    std::fs::write(&config_path, text).unwrap();
    let log = dir.path().join("transship.log");
    let server = BinaryServer::start(&config_path, &log);
    let h = Http::new(&server.url(""));
    let data = random_bytes(4096, 11);
    let victim = h.push_blob("local/periodic", &data);
    let hex = victim.trim_start_matches("sha256:");
    flip_byte(&data_dir.join("blobs/sha256").join(&hex[..2]).join(hex), 0);
    // Polls until the loop has run (no timing assertion: the test runner's timeout bounds it).
    while metric(&h, "transship_scrub_corrupt_total") != Some(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        h.get(&format!("/v2/local/periodic/blobs/{victim}")).status,
        404
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("damaged blob quarantined"), "{text}");
}

#[test]
fn scrubbed_cache_blob_is_fetched_again_from_upstream() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let uh = Http::new(&up.url());
    let layer = random_bytes(200_000, 21);
    let digest = uh.push_blob("library/scrubbed", &layer);
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c
    });
    let h = Http::for_server(&s);
    let path = format!("/v2/library/scrubbed/blobs/{digest}");
    assert_eq!(h.get(&path).body, layer);
    // The fill commits after the body is out: wait until the blob is stored.
    let parsed: transship::oci::Digest = digest.parse().unwrap();
    while !s.app.store.has_blob_anywhere(&parsed).unwrap() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let upstream_gets = up.count("GET", &format!("/v2/library/scrubbed/blobs/{digest}"));
    assert_eq!(h.get(&path).body, layer, "served from the cache");
    assert_eq!(
        up.count("GET", &format!("/v2/library/scrubbed/blobs/{digest}")),
        upstream_gets
    );

    flip_byte(&blob_path(&s, &digest), 1234);
    let report = transship::maintenance::scrub_pass(&s.app, &|| false).unwrap();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(h.get(&path).body, layer, "fetched again, whole");
    while !s.app.store.has_blob_anywhere(&parsed).unwrap() {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        up.count("GET", &format!("/v2/library/scrubbed/blobs/{digest}")) > upstream_gets,
        "the next pull went to the upstream"
    );
    assert_eq!(h.get(&path).body, layer);
    assert!(
        transship::maintenance::scrub_pass(&s.app, &|| false)
            .unwrap()
            .quarantined
            .is_empty()
    );
    let fsck = s.app.fsck(false).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
}

/// GC pauses in the middle of its work (some blobs already out of the index, their files not
/// yet removed) while a client pushes an image and pulls content: those requests must complete
/// while GC is paused, i.e. GC holds no lock they need between its units of work. The wait is
/// a deadlock guard, not a measurement.
#[test]
fn pushes_and_pulls_proceed_while_gc_runs() {
    let s = TestServer::start_with(|mut c| {
        c.gc.grace_period = HumanDuration(Duration::ZERO);
        c.uploads.abandon_after = HumanDuration(Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let loose: Vec<String> = (0..100u64)
        .map(|i| h.push_blob("local/gcbusy", &random_bytes(100 + i as usize, i)))
        .collect();
    let (_, kept) = push_image(&h, "local/kept", "v1", 5);

    let calls = AtomicUsize::new(0);
    let stalled = AtomicBool::new(false);
    let seen: Mutex<Option<(u16, u16, u16)>> = Mutex::new(None);
    let base = s.url("");
    let report = s
        .app
        .store
        .collect_garbage_until(&|| {
            // The second call: the first group is out of the index, nothing is finished.
            if calls.fetch_add(1, Ordering::SeqCst) != 1 {
                return false;
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let base = base.clone();
            let kept = kept.clone();
            std::thread::spawn(move || {
                let h = Http::new(&base);
                let (_, d) = push_image(&h, "local/during", "v1", 9);
                let a = h.get(&format!("/v2/local/during/manifests/{d}")).status;
                let b = h.get(&format!("/v2/local/kept/manifests/{kept}")).status;
                let c = h.get("/v2/local/kept/manifests/v1").status;
                let _ = tx.send((a, b, c));
            });
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(statuses) => *seen.lock().unwrap() = Some(statuses),
                Err(_) => stalled.store(true, Ordering::SeqCst),
            }
            false
        })
        .unwrap();
    assert!(
        !stalled.load(Ordering::SeqCst),
        "requests made while GC ran did not complete: GC held a lock they need"
    );
    assert_eq!(*seen.lock().unwrap(), Some((200, 200, 200)));
    assert_eq!(report.blobs_removed, 100, "{report}");
    for d in &loose {
        assert_eq!(h.get(&format!("/v2/local/gcbusy/blobs/{d}")).status, 404);
    }
    assert!(
        std::fs::read_dir(s.data_dir().join("trash"))
            .unwrap()
            .next()
            .is_none(),
        "every collected file is unlinked"
    );
    assert_eq!(h.get("/v2/local/during/manifests/v1").status, 200);
    let fsck = s.app.store.fsck(false).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
}

/// A GC stopped between units of work leaves a consistent store, and the next run finishes.
#[test]
fn gc_stopped_early_leaves_a_consistent_store() {
    let s = TestServer::start_with(|mut c| {
        c.gc.grace_period = HumanDuration(Duration::ZERO);
        c.uploads.abandon_after = HumanDuration(Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let loose: Vec<String> = (0..70u64)
        .map(|i| h.push_blob("local/gcstop", &random_bytes(200 + i as usize, 1000 + i)))
        .collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let first = s
        .app
        .store
        .collect_garbage_until(&|| calls.fetch_add(1, Ordering::SeqCst) >= 1)
        .unwrap();
    assert!(
        first.blobs_removed > 0 && first.blobs_removed < 70,
        "{first}"
    );
    let fsck = s.app.store.fsck(false).unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.problems);
    let second = s.app.store.collect_garbage().unwrap();
    assert_eq!(first.blobs_removed + second.blobs_removed, 70);
    for d in &loose {
        assert_eq!(h.head(&format!("/v2/local/gcstop/blobs/{d}")).status, 404);
    }
    assert_eq!(s.app.store.usage(), (0, 0));
    assert!(blob_files(s.data_dir()).is_empty());
}
