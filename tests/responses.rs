//! What every response carries whatever the handler: bounded metric labels (made-up methods),
//! `Allow` on 405, validators on a manifest 304, and every body byte counted once in
//! `transship_http_sent_bytes_total`.

mod common;

use bytes::Bytes;
use common::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The value of one unlabelled counter on `/metrics`, and the length of that scrape's body.
fn scrape(h: &Http, name: &str) -> (u64, usize) {
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap();
    (value, r.body.len())
}

#[test]
fn made_up_methods_add_at_most_one_series() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    h.get("/v2/");
    h.get("/metrics");
    // One made-up method may add its series (method="other"); forty more add none.
    let r = h.send("BREW0", "/v2/", &[], Bytes::new());
    assert_eq!(r.status, 405);
    let before = metric_series(&h);
    for i in 1..=40 {
        for path in ["/v2/", "/v2/local/x/manifests/latest", "/metrics"] {
            let r = h.send(&format!("BREW{i}"), path, &[], Bytes::new());
            assert!((400..500).contains(&r.status), "{path}: {}", r.status);
        }
    }
    let after = metric_series(&h);
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    // The two other routes may each add their `other` series once (counter + histogram).
    assert!(
        new.iter()
            .all(|l| !l.contains("BREW") && (l.contains("\"other\"") || !l.contains("method="))),
        "{new:#?}"
    );
    assert!(
        !after.iter().any(|l| l.contains("BREW")),
        "a client-chosen method became a label"
    );
    let requests = |v: &[String]| {
        v.iter()
            .filter(|l| l.starts_with("transship_http_requests_total"))
            .count()
    };
    assert!(requests(&after) <= requests(&before) + 2, "{:#?}", new);
}

#[test]
fn method_not_allowed_names_the_allowed_methods() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let d = sha256(b"x");
    for (method, path, allow) in [
        (
            "POST",
            "/v2/local/a/manifests/latest".to_string(),
            "GET, HEAD, PUT, DELETE",
        ),
        (
            "PATCH",
            format!("/v2/local/a/blobs/{d}"),
            "GET, HEAD, DELETE",
        ),
        ("DELETE", "/v2/local/a/tags/list".to_string(), "GET, HEAD"),
        ("PUT", "/v2/".to_string(), "GET, HEAD"),
        ("GET", "/v2/local/a/blobs/uploads/".to_string(), "POST"),
        ("DELETE", "/v2/_catalog".to_string(), "GET, HEAD"),
        ("PUT", "/v2/token".to_string(), "GET, POST"),
    ] {
        let r = h.send(method, &path, &[], Bytes::new());
        assert_eq!(r.status, 405, "{method} {path}: {r:?}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(r.error_code(), "UNSUPPORTED", "{method} {path}");
    }
}

#[test]
fn a_manifest_304_carries_its_validators() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (_, digest) = push_image(&h, "local/etag", "v1", 3);
    let etag = format!("\"{digest}\"");
    for reference in ["v1", digest.as_str()] {
        let r = h.send(
            "GET",
            &format!("/v2/local/etag/manifests/{reference}"),
            &[("if-none-match", &etag), ("accept", OCI_MANIFEST)],
            Bytes::new(),
        );
        assert_eq!(r.status, 304, "{reference}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()), "{reference}");
        assert_eq!(
            r.header("docker-content-digest"),
            Some(digest.as_str()),
            "{reference}"
        );
    }
    // And the 200 carries the same ETag.
    let r = h.get("/v2/local/etag/manifests/v1");
    assert_eq!((r.status, r.header("etag")), (200, Some(etag.as_str())));
}

#[test]
fn every_body_byte_sent_is_counted_once() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (manifest, digest) = push_image(&h, "local/bytes", "v1", 5);
    let blob = h.push_blob("local/bytes", &random_bytes(70_000, 5));
    let (before, scrape_len) = scrape(&h, "transship_http_sent_bytes_total");
    let mut received = scrape_len as u64;
    for (method, path) in [
        ("GET", "/v2/local/bytes/manifests/v1".to_string()),
        ("GET", format!("/v2/local/bytes/manifests/{digest}")),
        ("HEAD", "/v2/local/bytes/manifests/v1".to_string()),
        ("GET", format!("/v2/local/bytes/blobs/{blob}")),
        ("HEAD", format!("/v2/local/bytes/blobs/{blob}")),
        ("GET", format!("/v2/local/bytes/blobs/{digest}")),
        ("GET", "/v2/local/bytes/tags/list".to_string()),
        ("GET", "/v2/_catalog".to_string()),
        ("GET", "/v2/".to_string()),
        ("HEAD", "/v2/".to_string()),
        ("GET", "/v2/local/bytes/manifests/nope".to_string()),
        ("HEAD", "/v2/local/bytes/manifests/nope".to_string()),
        ("GET", "/v2/Bad/manifests/x".to_string()),
        ("BREW", "/v2/".to_string()),
        ("GET", "/healthz".to_string()),
    ] {
        let r = h.send(method, &path, &[], Bytes::new());
        if method == "HEAD" {
            assert!(r.body.is_empty(), "{path}");
        }
        received += r.body.len() as u64;
    }
    let r = h.send(
        "GET",
        &format!("/v2/local/bytes/blobs/{blob}"),
        &[("range", "bytes=100-1099")],
        Bytes::new(),
    );
    assert_eq!((r.status, r.body.len()), (206, 1000));
    received += 1000;
    assert_eq!(
        h.get("/v2/local/bytes/manifests/v1").body,
        manifest.as_bytes()
    );
    received += manifest.len() as u64;
    let (after, _) = scrape(&h, "transship_http_sent_bytes_total");
    assert_eq!(after - before, received);
}

#[test]
fn a_mirrored_manifest_answers_a_conditional_get_with_304() {
    use common::upstream::{self, Distribution};
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let uh = Http::new(&up.url());
    let c = uh.push_blob("library/cond", b"{}");
    let l = uh.push_blob("library/cond", b"layer");
    let m = image_manifest((&c, 2), &[(&l, 5)]);
    assert_eq!(
        uh.push_manifest("library/cond", "v1", OCI_MANIFEST, m.as_bytes())
            .status,
        201
    );
    let digest = sha256(m.as_bytes());
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c
    });
    let h = Http::for_server(&s);
    let etag = format!("\"{digest}\"");
    for _ in 0..2 {
        // A miss, then a hit: both conditional.
        let r = h.send(
            "GET",
            "/v2/library/cond/manifests/v1",
            &[("if-none-match", &etag), ("accept", OCI_MANIFEST)],
            Bytes::new(),
        );
        assert_eq!(r.status, 304, "{r:?}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }
    let r = h.send(
        "GET",
        "/v2/library/cond/manifests/v1",
        &[
            ("if-none-match", "\"sha256:other\""),
            ("accept", OCI_MANIFEST),
        ],
        Bytes::new(),
    );
    assert_eq!((r.status, &r.body[..]), (200, m.as_bytes()));
}
