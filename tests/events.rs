//! Notifications end to end: the real binary, a real webhook receiver on loopback (a small
//! hyper server that records what it gets and can be down or failing), real pushes, deletes
//! and pull-through fills. Events acknowledged before a `kill -9` are delivered after the
//! restart, at least once, in order, in each format, signed; a receiver that never answers
//! dead-letters them and `transship events retry` sends them again.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::upstream::Distribution;
use common::webhook::*;
use common::*;
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SECRET: &str = "s3cret-for-signing";

/// The embedded default config with data in `dir`, upstreams at `upstream`, plus `extra`.
fn config_in(dir: &Path, upstream: &str, extra: &str) -> PathBuf {
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "data_dir = \"./transship-data\"",
            &format!("data_dir = {:?}", dir.join("data").display().to_string()),
        )
        .replace(
            "url = \"https://registry-1.docker.io\"",
            &format!("url = {upstream:?}"),
        )
        .replace("tag_ttl = \"5m\"", "tag_ttl = \"0s\"");
    let path = dir.join("transship.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).expect("write config");
    path
}

fn transship(args: &[&str], config: &Path) -> String {
    let out = std::process::Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run transship");
    assert!(
        out.status.success(),
        "transship {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn signature(body: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// The accepted deliveries at `path`, duplicates (same event id) dropped after the first;
/// checks every signature on the way.
fn distinct(r: &Receiver, path: &str) -> Vec<Value> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for g in r.accepted(path) {
        assert_eq!(
            g.headers
                .get("x-transship-signature")
                .and_then(|v| v.to_str().ok()),
            Some(signature(&g.body).as_str()),
            "the HMAC signature verifies"
        );
        let id = g.headers["x-transship-event-id"]
            .to_str()
            .unwrap()
            .to_string();
        if seen.insert(id) {
            out.push(serde_json::from_slice(&g.body).expect("JSON body"));
        }
    }
    out
}

/// One expected event: action, tag, digest.
type Expected = (&'static str, Option<&'static str>, String);

#[test]
fn acknowledged_pushes_and_deletes_survive_kill_9_and_a_down_receiver_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::down();
    let mut extra = String::new();
    for (path, format) in [
        ("/dist", "distribution"),
        ("/ce", "cloudevents"),
        ("/gcr", "gcr"),
    ] {
        extra.push_str(&format!(
            "[[notify]]\nname = \"{format}\"\nurl = \"{}\"\nformat = \"{format}\"\nevents = [\"push\", \"delete\"]\nsecret = \"{SECRET}\"\nhost = \"registry.test\"\ntimeout = \"5s\"\n",
            receiver.url(path)
        ));
    }
    let config = config_in(dir.path(), "http://127.0.0.1:9", &extra);
    let log = dir.path().join("transship.log");

    let server = BinaryServer::start(&config, &log);
    let h = Http::new(&server.url(""));
    let (_, d1) = push_image(&h, "local/app", "v1", 1);
    let (_, d2) = push_image(&h, "local/app", "v2", 2);
    assert_eq!(h.delete("/v2/local/app/manifests/v2").status, 202);
    assert_eq!(
        h.delete(&format!("/v2/local/app/manifests/{d1}")).status,
        202
    );
    let (_, d3) = push_image(&h, "local/app", "v3", 3);
    // Every change above was acknowledged while the receiver was down: nothing delivered.
    server.kill9();

    // Stopped: the outbox lists what each endpoint still has to deliver.
    let pending = transship(&["events", "ls"], &config);
    for name in ["distribution", "cloudevents", "gcr"] {
        assert_eq!(
            pending
                .lines()
                .filter(|l| l.starts_with(&format!("{name}\t")))
                .count(),
            5,
            "pending for {name}:\n{pending}"
        );
    }

    receiver.state.fail_next.store(4, Ordering::SeqCst);
    receiver.up();
    let server = BinaryServer::start(&config, &log);
    for path in ["/dist", "/ce", "/gcr"] {
        wait_until(&format!("five events at {path}"), || {
            distinct(&receiver, path).len() >= 5
        });
    }
    assert!(receiver.refused() >= 4, "the first deliveries were refused");

    let expected: Vec<Expected> = vec![
        ("push", Some("v1"), d1.clone()),
        ("push", Some("v2"), d2.clone()),
        ("delete", Some("v2"), d2.clone()),
        ("delete", None, d1.clone()),
        ("push", Some("v3"), d3.clone()),
    ];

    let dist = distinct(&receiver, "/dist");
    let got: Vec<Expected> = dist
        .iter()
        .map(|b| {
            let e = &b["events"][0];
            assert_eq!(e["target"]["repository"], "local/app");
            (
                leak(e["action"].as_str().unwrap()),
                e["target"]["tag"].as_str().map(leak),
                e["target"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected, "distribution, in order");
    for g in receiver.accepted("/dist") {
        assert_eq!(
            g.headers["content-type"],
            "application/vnd.docker.distribution.events.v1+json"
        );
    }

    let ce = distinct(&receiver, "/ce");
    let got: Vec<Expected> = ce
        .iter()
        .map(|b| {
            assert_eq!(b["specversion"], "1.0");
            assert_eq!(b["data"]["repository"], "local/app");
            let t = b["type"].as_str().unwrap();
            (
                leak(t.trim_start_matches("dev.transship.")),
                b["data"]["tag"].as_str().map(leak),
                b["data"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected, "cloudevents, in order");
    assert_eq!(
        receiver.accepted("/ce")[0].headers["content-type"],
        "application/cloudevents+json"
    );
    // The same event keeps its id across formats (one outbox sequence number).
    assert_eq!(ce[0]["id"], dist[0]["events"][0]["id"], "stable event ids");

    let gcr = distinct(&receiver, "/gcr");
    let name = "registry.test/local/app";
    let want = vec![
        serde_json::json!({"action":"INSERT","digest":format!("{name}@{d1}"),"tag":format!("{name}:v1")}),
        serde_json::json!({"action":"INSERT","digest":format!("{name}@{d2}"),"tag":format!("{name}:v2")}),
        serde_json::json!({"action":"DELETE","digest":format!("{name}@{d2}"),"tag":format!("{name}:v2")}),
        serde_json::json!({"action":"DELETE","digest":format!("{name}@{d1}")}),
        serde_json::json!({"action":"INSERT","digest":format!("{name}@{d3}"),"tag":format!("{name}:v3")}),
    ];
    assert_eq!(gcr, want, "gcr, in order");

    // Delivered everywhere: nothing pending, and the metrics say so.
    wait_until("the outbox to drain", || {
        let m = Http::new(&server.url("")).get("/metrics");
        let text = String::from_utf8_lossy(&m.body).into_owned();
        ["distribution", "cloudevents", "gcr"].iter().all(|n| {
            text.contains(&format!("transship_events_pending{{endpoint=\"{n}\"}} 0"))
                && text.contains(&format!(
                    "transship_events_total{{endpoint=\"{n}\",outcome=\"delivered\"}}"
                ))
        })
    });
    assert_eq!(
        transship(&["events", "ls"], &config).lines().count(),
        0,
        "nothing pending"
    );
    server.terminate();
    // Bounded: what every endpoint delivered left the outbox.
    let store = transship::store::Store::open(
        &dir.path().join("data"),
        transship::store::StoreOptions::default(),
    )
    .unwrap();
    assert!(store.events_after(0, 10).unwrap().0.is_empty());
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

#[test]
fn dead_letters_after_max_age_are_listed_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::down();
    receiver.state.fail_all.store(true, Ordering::SeqCst);
    receiver.up();
    let extra = format!(
        "[[notify]]\nname = \"hook\"\nurl = \"{}\"\nformat = \"gcr\"\nsecret = \"{SECRET}\"\nhost = \"registry.test\"\nmax_age = \"2s\"\n",
        receiver.url("/hook")
    );
    let config = config_in(dir.path(), "http://127.0.0.1:9", &extra);
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let h = Http::new(&server.url(""));
    let (_, digest) = push_image(&h, "local/dead", "v1", 7);

    wait_until("the event to be dead-lettered", || {
        transship(&["events", "ls", "--failed"], &config)
            .lines()
            .any(|l| l.starts_with("hook\t") && l.contains(&digest))
    });
    let metrics = String::from_utf8_lossy(&h.get("/metrics").body).into_owned();
    assert!(
        metrics.contains("transship_events_total{endpoint=\"hook\",outcome=\"dead_lettered\"} 1"),
        "{metrics}"
    );
    assert!(receiver.accepted("/hook").is_empty());
    assert!(receiver.refused() >= 2, "retried before giving up");

    receiver.state.fail_all.store(false, Ordering::SeqCst);
    let out = std::process::Command::new(binary())
        .args(["events", "retry", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 events queued"));
    wait_until("the retried event to arrive", || {
        !distinct(&receiver, "/hook").is_empty()
    });
    assert_eq!(
        distinct(&receiver, "/hook"),
        vec![serde_json::json!({
            "action": "INSERT",
            "digest": format!("registry.test/local/dead@{digest}"),
            "tag": "registry.test/local/dead:v1",
        })]
    );
    wait_until("the dead letter to go", || {
        transship(&["events", "ls", "--failed"], &config).is_empty()
    });

    // A retry asked for while the server is stopped goes to the store directly and is
    // delivered when the server is back.
    receiver.state.fail_all.store(true, Ordering::SeqCst);
    let (_, digest2) = push_image(&h, "local/dead", "v2", 8);
    wait_until("the second event to be dead-lettered", || {
        transship(&["events", "ls", "--failed"], &config).contains(&digest2)
    });
    server.terminate();
    receiver.state.fail_all.store(false, Ordering::SeqCst);
    transship(&["events", "retry", "--endpoint", "hook"], &config);
    assert!(
        transship(&["events", "ls", "--failed"], &config).contains("\tretrying"),
        "marked for retry"
    );
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    wait_until("the second retried event", || {
        distinct(&receiver, "/hook").len() >= 2
    });
    assert_eq!(
        distinct(&receiver, "/hook")[1]["digest"],
        format!("registry.test/local/dead@{digest2}")
    );
    server.terminate();
}

/// A receiver that refuses an event for what it is (a 4xx) gets it once: it is dead-lettered
/// at once and the next event goes through, instead of waiting out `max_age` (24h here).
#[test]
fn a_refused_event_is_dead_lettered_at_once_and_the_next_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::down();
    receiver.state.fail_with.store(422, Ordering::SeqCst);
    receiver.state.fail_next.store(1, Ordering::SeqCst);
    receiver.up();
    let extra = format!(
        "[[notify]]\nname = \"strict\"\nurl = \"{}\"\nformat = \"cloudevents\"\nsecret = \"{SECRET}\"\n",
        receiver.url("/strict")
    );
    let config = config_in(dir.path(), "http://127.0.0.1:9", &extra);
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let h = Http::new(&server.url(""));
    let (_, first) = push_image(&h, "local/strict", "v1", 21);
    let (_, second) = push_image(&h, "local/strict", "v2", 22);
    wait_until("the second push delivered", || {
        distinct(&receiver, "/strict")
            .iter()
            .any(|b| b["data"]["digest"] == second.as_str())
    });
    assert_eq!(receiver.refused(), 1, "the refused event was sent once");
    let failed = transship(&["events", "ls", "--failed"], &config);
    assert!(failed.contains(&first), "{failed}");
    server.terminate();
}

#[test]
fn cache_fills_moved_upstream_tags_and_pulls_are_reported() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let seed = |tag: &str, seed: u64| {
        let h = Http::new(&up.url());
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
        let layer = random_bytes(5000, seed);
        let c = h.push_blob("library/app", config.as_bytes());
        let l = h.push_blob("library/app", &layer);
        let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
        assert_eq!(
            h.push_manifest("library/app", tag, OCI_MANIFEST, m.as_bytes())
                .status,
            201
        );
        (sha256(m.as_bytes()), l)
    };
    let (d1, layer1) = seed("latest", 11);

    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::down();
    receiver.up();
    let extra = format!(
        "[[notify]]\nname = \"cache\"\nurl = \"{}\"\nformat = \"cloudevents\"\nevents = [\"cache.fill\", \"tag.moved\", \"cache.evict\"]\nsecret = \"{SECRET}\"\n[[notify]]\nname = \"pulls\"\nurl = \"{}\"\nformat = \"distribution\"\nevents = [\"pull\"]\nsecret = \"{SECRET}\"\n",
        receiver.url("/cache"),
        receiver.url("/pulls")
    );
    let config = config_in(dir.path(), &up.url(), &extra);
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let h = Http::new(&server.url(""));
    let get_latest = || {
        let r = h.send(
            "GET",
            "/v2/library/app/manifests/latest",
            &[("accept", OCI_MANIFEST)],
            Bytes::new(),
        );
        assert_eq!(r.status, 200);
        r.header("docker-content-digest").unwrap().to_string()
    };
    assert_eq!(get_latest(), d1);
    assert_eq!(
        h.get(&format!("/v2/library/app/blobs/{layer1}")).status,
        200
    );
    wait_until("two cache fills", || {
        distinct(&receiver, "/cache").len() >= 2
    });

    let (d2, _) = seed("latest", 12);
    assert_eq!(get_latest(), d2);
    wait_until("the moved tag", || distinct(&receiver, "/cache").len() >= 4);

    let got: Vec<(String, String, Option<String>)> = distinct(&receiver, "/cache")
        .iter()
        .map(|b| {
            assert_eq!(b["data"]["repository"], "docker.io/library/app");
            (
                b["type"].as_str().unwrap().to_string(),
                b["data"]["digest"].as_str().unwrap().to_string(),
                b["data"]["previous"].as_str().map(str::to_string),
            )
        })
        .collect();
    let fill = "dev.transship.cache.fill".to_string();
    let moved = "dev.transship.tag.moved".to_string();
    assert_eq!(got[0], (fill.clone(), d1.clone(), None), "{got:?}");
    assert_eq!(got[1], (fill.clone(), layer1, None), "{got:?}");
    // The new manifest's fill and the tag's move are one write: both, in this order.
    assert_eq!(got[2], (fill, d2.clone(), None), "{got:?}");
    assert_eq!(got[3], (moved, d2.clone(), Some(d1.clone())), "{got:?}");

    // Pulls go only to the endpoint that asked for them: one per manifest GET.
    wait_until("two pulls", || distinct(&receiver, "/pulls").len() >= 2);
    let pulls: Vec<(String, String, String)> = distinct(&receiver, "/pulls")
        .iter()
        .map(|b| {
            let e = &b["events"][0];
            (
                e["action"].as_str().unwrap().to_string(),
                e["target"]["tag"].as_str().unwrap().to_string(),
                e["target"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let pull = |d: &str| ("pull".to_string(), "latest".to_string(), d.to_string());
    assert_eq!(pulls, vec![pull(&d1), pull(&d2)]);

    // Evicting the image the tag points at is reported too, with the tag it had.
    transship(&["cache", "evict", "library/app:latest"], &config);
    wait_until("the eviction", || distinct(&receiver, "/cache").len() >= 5);
    let evicted = &distinct(&receiver, "/cache")[4];
    assert_eq!(evicted["type"], "dev.transship.cache.evict", "{evicted}");
    assert_eq!(evicted["data"]["digest"], d2.as_str(), "{evicted}");
    assert_eq!(evicted["data"]["tag"], "latest", "{evicted}");
    server.terminate();
}
