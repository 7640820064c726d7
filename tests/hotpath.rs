//! The cheap request path: the access log (one line per request, buffered off the request
//! path, all of it written by shutdown, in the configured format) and small blobs served
//! from memory (verified bytes only, forgotten when their file goes).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use transship::config::HumanDuration;
use transship::oci::Digest;

/// The file of blob `digest` in `data_dir`.
fn blob_path(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn request_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("INFO request ") || l.contains(r#""message":"request""#))
        .collect()
}

/// Starts the real binary with `log_format`, sends a known mix of requests, stops it with
/// SIGTERM and returns the log.
fn serve_and_count(log_format: &str) -> (String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config_in(dir.path());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "log_format = \"text\"",
        &format!("log_format = \"{log_format}\""),
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(binary())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    // The bound address, from the startup line in either format.
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("transship serving")) {
            let at = line.find("127.0.0.1:").unwrap();
            let addr: String = line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            break addr;
        }
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let h = Http::new(&format!("http://{addr}"));
    let small = random_bytes(4096, 7);
    let d = h.push_blob("local/hot", &small);
    let mut sent = 2; // POST + PUT of the push
    for _ in 0..300 {
        assert_eq!(h.get(&format!("/v2/local/hot/blobs/{d}")).body, small);
        assert_eq!(h.head(&format!("/v2/local/hot/blobs/{d}")).status, 200);
        assert_eq!(h.get("/v2/local/hot/manifests/nope").status, 404);
        // A name with a quote: escaped in the line, not breaking it.
        assert_eq!(h.get("/v2/a%22b/blobs/sha256:x").status, 400);
        sent += 4;
    }
    assert_eq!(h.get("/v2/").status, 200);
    // Nothing was dropped, and the count is exported.
    let metrics = String::from_utf8(h.get("/metrics").body.to_vec()).unwrap();
    assert!(
        metrics.contains("\ntransship_log_dropped_lines_total 0\n"),
        "{metrics}"
    );
    sent += 2;
    // The last lines are still buffered now, at most a few ms old: shutdown writes them.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    (std::fs::read_to_string(&log).unwrap(), sent)
}

#[test]
fn every_request_gets_one_text_line_by_shutdown() {
    let (log, sent) = serve_and_count("text");
    let lines = request_lines(&log);
    // Nothing else sent requests: the address came from the log.
    assert_eq!(lines.len(), sent, "{log}");
    let blob = lines
        .iter()
        .find(|l| l.contains("method=GET route=\"blob\" repo=\"local/hot\" status=200"))
        .expect("a blob GET line");
    assert!(blob.contains(" bytes=4096 us="), "{blob}");
    assert!(blob.contains(" peer=127.0.0.1:"), "{blob}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#"route="blob" repo="a\"b" status=400"#)),
        "{log}"
    );
    // Ordered: the shutdown lines come after the last request's line.
    let last_request = log.rfind("INFO request ").unwrap();
    assert!(log.rfind(" stopped").unwrap() > last_request, "{log}");
    assert!(!log.contains("lines dropped"), "{log}");
}

#[test]
fn every_request_gets_one_json_line_by_shutdown() {
    let (log, sent) = serve_and_count("json");
    let lines = request_lines(&log);
    assert_eq!(lines.len(), sent, "{log}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["level"], "INFO");
        assert!(v["fields"]["status"].is_u64(), "{l}");
    }
    assert!(
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["fields"]["repo"] == "a\"b"),
        "{log}"
    );
}

#[test]
fn small_blobs_are_served_from_memory_once_verified() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let small = random_bytes(4096, 11);
    let d = h.push_blob("local/mem", &small);
    let digest: Digest = d.parse().unwrap();
    assert!(s.app.store.cached_small_blob(&digest).is_none());
    assert_eq!(h.get(&format!("/v2/local/mem/blobs/{d}")).body, small);
    assert!(s.app.store.cached_small_blob(&digest).is_some());

    // With its file moved away behind the server's back, the blob still comes from memory,
    // whole or in ranges, with the same headers.
    let path = blob_path(s.data_dir(), &d);
    let aside = path.with_extension("aside");
    std::fs::rename(&path, &aside).unwrap();
    let r = h.get(&format!("/v2/local/mem/blobs/{d}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, small);
    assert_eq!(r.header("content-length"), Some("4096"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.header("etag"), Some(format!("\"{d}\"").as_str()));
    let r = h.send(
        "GET",
        &format!("/v2/local/mem/blobs/{d}"),
        &[("range", "bytes=100-199")],
        bytes::Bytes::new(),
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, small[100..200]);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/4096"));
    // Other repositories still need their own link.
    assert_eq!(h.get(&format!("/v2/local/other/blobs/{d}")).status, 404);
    std::fs::rename(&aside, &path).unwrap();

    // Larger blobs are not kept: they stream from their files.
    let large = random_bytes(100 << 10, 12);
    let dl = h.push_blob("local/mem", &large);
    assert_eq!(h.get(&format!("/v2/local/mem/blobs/{dl}")).body, large);
    assert!(
        s.app
            .store
            .cached_small_blob(&dl.parse().unwrap())
            .is_none()
    );
}

#[test]
fn a_damaged_small_blob_is_never_cached() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let small = random_bytes(2048, 13);
    let d = h.push_blob("local/bad", &small);
    let path = blob_path(s.data_dir(), &d);
    let mut damaged = small.clone();
    damaged[0] ^= 0xff;
    std::fs::write(&path, &damaged).unwrap();
    // Served from the file, as before the cache existed (scrub is what finds it).
    let r = h.get(&format!("/v2/local/bad/blobs/{d}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, damaged);
    assert!(s.app.store.cached_small_blob(&d.parse().unwrap()).is_none());
    // Repaired on disk: now it is verified and kept.
    std::fs::write(&path, &small).unwrap();
    assert_eq!(h.get(&format!("/v2/local/bad/blobs/{d}")).body, small);
    assert!(s.app.store.cached_small_blob(&d.parse().unwrap()).is_some());
}

#[test]
fn a_collected_blob_leaves_memory_with_its_file() {
    let s = TestServer::start_with(|mut c| {
        c.gc.grace_period = HumanDuration(Duration::ZERO);
        c.uploads.abandon_after = HumanDuration(Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let small = random_bytes(1000, 14);
    let d = h.push_blob("local/gone", &small);
    let digest: Digest = d.parse().unwrap();
    assert_eq!(h.get(&format!("/v2/local/gone/blobs/{d}")).body, small);
    assert!(s.app.store.cached_small_blob(&digest).is_some());
    let report = s.app.store.collect_garbage().unwrap();
    assert_eq!(report.blobs_removed, 1, "{report}");
    assert!(s.app.store.cached_small_blob(&digest).is_none());
    assert_eq!(h.get(&format!("/v2/local/gone/blobs/{d}")).status, 404);
}

#[test]
fn the_cache_can_be_turned_off() {
    let s = TestServer::start_with(|mut c| {
        c.storage.small_blob_cache = transship::config::ByteSize(0);
        c
    });
    let h = Http::for_server(&s);
    let small = random_bytes(4096, 15);
    let d = h.push_blob("local/off", &small);
    assert_eq!(h.get(&format!("/v2/local/off/blobs/{d}")).body, small);
    assert!(s.app.store.cached_small_blob(&d.parse().unwrap()).is_none());
}
