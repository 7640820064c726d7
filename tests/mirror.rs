//! The pull-through cache against a real upstream (CNCF distribution on loopback, seeded by
//! the test): misses fill the cache, hits never reach the upstream, every spelling of a name
//! shares one cache entry, tags are revalidated with HEAD, outages serve what is cached.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::upstream::{self, Distribution};
use common::*;
use transship::config::HumanDuration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image pushed to the upstream: manifest bytes and digest, layer bytes and digest.
struct Seeded {
    manifest: String,
    digest: String,
    layer: Vec<u8>,
    layer_digest: String,
    config_digest: String,
}

fn seed(up: &Distribution, repo: &str, tag: &str, seed: u64, layer_len: usize) -> Seeded {
    let h = Http::new(&up.url());
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let layer = random_bytes(layer_len, seed);
    let config_digest = h.push_blob(repo, config.as_bytes());
    let layer_digest = h.push_blob(repo, &layer);
    let manifest = image_manifest(
        (&config_digest, config.len()),
        &[(&layer_digest, layer.len())],
    );
    let r = h.push_manifest(repo, tag, OCI_MANIFEST, manifest.as_bytes());
    assert_eq!(
        r.status,
        201,
        "seeding upstream: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    Seeded {
        digest: sha256(manifest.as_bytes()),
        manifest,
        layer,
        layer_digest,
        config_digest,
    }
}

fn mirror_of(up: &Distribution, tag_ttl: Duration) -> TestServer {
    let url = up.url();
    TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].tag_ttl = HumanDuration(tag_ttl);
        c.upstreams[0].not_found_ttl = HumanDuration(Duration::from_secs(60));
        c
    })
}

fn accept_oci() -> [(&'static str, &'static str); 1] {
    [("accept", OCI_MANIFEST)]
}

#[test]
fn pulls_through_once_then_serves_every_spelling_from_cache() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let img = seed(&up, "library/alpine", "3.20", 1, 200_000);
    let s = mirror_of(&up, Duration::from_secs(3600));
    let h = Http::for_server(&s);

    let r = h.send(
        "GET",
        "/v2/library/alpine/manifests/3.20",
        &accept_oci(),
        Bytes::new(),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(r.header("oci-namespace"), Some("docker.io"));
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(r.header("docker-content-digest"), Some(img.digest.as_str()));
    assert_eq!(&r.body[..], img.manifest.as_bytes());

    let blob = format!("/v2/library/alpine/blobs/{}", img.layer_digest);
    let r = h.get(&blob);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert!(r.body == img.layer);
    // Right after the fill, a request may still follow the spool while the blob is made
    // durable (COALESCED); either way it never reaches the upstream again.
    let r = h.get(&blob);
    assert!(
        matches!(r.header("x-cache"), Some("HIT" | "COALESCED")),
        "{:?}",
        r.header("x-cache")
    );
    assert!(r.body == img.layer);
    let local: transship::oci::RepoName = "docker.io/library/alpine".parse().unwrap();
    let digest: transship::oci::Digest = img.layer_digest.parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.app.store.blob_size(&local, &digest).unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fill never committed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = h.get(&blob);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == img.layer);

    // Every spelling of the same image is one cache entry.
    for path in [
        "/v2/alpine/manifests/3.20".to_string(),
        "/v2/library/alpine/manifests/3.20?ns=docker.io".to_string(),
        "/v2/docker.io/library/alpine/manifests/3.20".to_string(),
        format!("/v2/alpine/manifests/{}", img.digest),
    ] {
        let r = h.send("GET", &path, &accept_oci(), Bytes::new());
        assert_eq!(
            (r.status, r.header("x-cache")),
            (200, Some("HIT")),
            "{path}"
        );
        assert_eq!(&r.body[..], img.manifest.as_bytes(), "{path}");
    }
    let r = h.get(&format!(
        "/v2/docker.io/library/alpine/blobs/{}?ns=docker.io",
        img.layer_digest
    ));
    assert_eq!(r.header("x-cache"), Some("HIT"));
    // Range on a cached blob.
    let r = h.send("GET", &blob, &[("range", "bytes=10-19")], Bytes::new());
    assert_eq!((r.status, &r.body[..]), (206, &img.layer[10..20]));

    // Exactly one upstream GET per object.
    assert_eq!(
        up.count(
            "GET",
            &format!("/v2/library/alpine/blobs/{}", img.layer_digest)
        ),
        1
    );
    assert_eq!(
        up.count("GET", "/v2/library/alpine/manifests/3.20")
            + up.count(
                "GET",
                &format!("/v2/library/alpine/manifests/{}", img.digest)
            ),
        1
    );
    // Mirror namespaces are read-only.
    let r = h.send(
        "PUT",
        "/v2/library/alpine/manifests/x",
        &[("content-type", OCI_MANIFEST)],
        img.manifest.clone(),
    );
    assert_eq!((r.status, r.error_code()), (403, "DENIED".to_string()));

    let metrics = String::from_utf8(h.get("/metrics").body.to_vec()).unwrap();
    assert!(
        metrics.contains(
            r#"transship_cache_requests_total{kind="blob",result="HIT",upstream="docker.io"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"transship_cache_requests_total{kind="manifest",result="MISS",upstream="docker.io"} 1"#
    ));
    assert!(metrics.contains(&format!(
        "transship_upstream_fetched_bytes_total{{upstream=\"docker.io\"}} {}",
        img.layer.len()
    )));
    assert!(s.app.fsck(false).unwrap().is_clean());
}

#[test]
fn tags_are_revalidated_with_head_and_refetched_only_when_moved() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let v1 = seed(&up, "library/app", "latest", 2, 1000);
    let s = mirror_of(&up, Duration::ZERO);
    let h = Http::for_server(&s);
    let get = || {
        h.send(
            "GET",
            "/v2/library/app/manifests/latest",
            &accept_oci(),
            Bytes::new(),
        )
    };

    assert_eq!(
        get().header("docker-content-digest"),
        Some(v1.digest.as_str())
    );
    for _ in 0..3 {
        let r = get();
        assert_eq!(
            (r.header("x-cache"), r.header("docker-content-digest")),
            (Some("HIT"), Some(v1.digest.as_str()))
        );
    }
    assert_eq!(
        up.count("HEAD", "/v2/library/app/manifests/latest"),
        4,
        "every request past tag_ttl revalidates with HEAD"
    );
    let gets = || {
        up.count("GET", "/v2/library/app/manifests/latest")
            + up.count("GET", &format!("/v2/library/app/manifests/{}", v1.digest))
    };
    assert_eq!(gets(), 1, "the manifest was downloaded once");

    // The tag moves upstream: the next request fetches the new manifest by digest.
    let v2 = seed(&up, "library/app", "latest", 3, 1000);
    let r = get();
    assert_eq!(
        (r.header("x-cache"), r.header("docker-content-digest")),
        (Some("MISS"), Some(v2.digest.as_str()))
    );
    assert_eq!(&r.body[..], v2.manifest.as_bytes());
    assert_eq!(
        up.count("GET", &format!("/v2/library/app/manifests/{}", v2.digest)),
        1
    );
    let history = s
        .app
        .store
        .tag_history(
            &"docker.io/library/app".parse().unwrap(),
            &"latest".parse().unwrap(),
        )
        .unwrap();
    let digests: Vec<&str> = history.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(digests, vec![v1.digest.as_str(), v2.digest.as_str()]);

    // Deleted upstream: 404, and the tag is forgotten (no stale copy of a deleted tag).
    assert_eq!(
        Http::new(&up.url())
            .delete(&format!("/v2/library/app/manifests/{}", v2.digest))
            .status,
        202
    );
    let r = get();
    assert_eq!(
        (r.status, r.error_code()),
        (404, "MANIFEST_UNKNOWN".to_string())
    );
}

#[test]
fn upstream_404s_are_404_and_remembered() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    seed(&up, "library/real", "v1", 4, 100);
    let s = mirror_of(&up, Duration::ZERO);
    let h = Http::for_server(&s);
    for _ in 0..3 {
        let r = h.get("/v2/library/real/manifests/nope");
        assert_eq!(
            (r.status, r.error_code()),
            (404, "MANIFEST_UNKNOWN".to_string())
        );
    }
    assert_eq!(
        up.count("HEAD", "/v2/library/real/manifests/nope"),
        1,
        "the 404 is cached for not_found_ttl"
    );
    let missing = sha256(b"not there");
    let r = h.get(&format!("/v2/library/real/blobs/{missing}"));
    assert_eq!(
        (r.status, r.error_code()),
        (404, "BLOB_UNKNOWN".to_string())
    );
    let r = h.head(&format!("/v2/library/real/blobs/{missing}"));
    assert_eq!(r.status, 404);
    let r = h.get("/v2/x/manifests/v1?ns=quay.io");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
    assert!(super_clean(&s));
}

fn super_clean(s: &TestServer) -> bool {
    blob_files(s.data_dir()).is_empty() && s.app.fsck(false).unwrap().is_clean()
}

#[test]
fn head_of_an_uncached_blob_does_not_download_it() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let img = seed(&up, "library/headme", "v1", 5, 50_000);
    let s = mirror_of(&up, Duration::from_secs(3600));
    let h = Http::for_server(&s);
    let r = h.head(&format!("/v2/library/headme/blobs/{}", img.layer_digest));
    assert_eq!((r.status, r.header("content-length")), (200, Some("50000")));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.layer_digest.as_str())
    );
    assert_eq!(
        up.count(
            "GET",
            &format!("/v2/library/headme/blobs/{}", img.layer_digest)
        ),
        0
    );
    assert!(blob_files(s.data_dir()).is_empty());
}

#[test]
fn outage_serves_what_is_cached_and_fails_cleanly_otherwise() {
    if !upstream::available() {
        return;
    }
    let mut up = Distribution::start();
    let img = seed(&up, "library/web", "stable", 6, 30_000);
    let other = seed(&up, "library/web", "other", 7, 30_000);
    let s = mirror_of(&up, Duration::ZERO);
    let h = Http::for_server(&s);
    let r = h.send(
        "GET",
        "/v2/library/web/manifests/stable",
        &accept_oci(),
        Bytes::new(),
    );
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(
        h.get(&format!("/v2/library/web/blobs/{}", img.layer_digest))
            .status,
        200
    );

    up.stop();
    // The cached tag is served stale (tag_ttl 0 means it would otherwise be revalidated).
    let r = h.send(
        "GET",
        "/v2/library/web/manifests/stable",
        &accept_oci(),
        Bytes::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("STALE")));
    assert_eq!(&r.body[..], img.manifest.as_bytes());
    let r = h.get(&format!("/v2/library/web/manifests/{}", img.digest));
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    let r = h.get(&format!("/v2/library/web/blobs/{}", img.layer_digest));
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == img.layer);
    // Not cached: a clean registry error, no hang.
    let r = h.get("/v2/library/web/manifests/other");
    assert_eq!((r.status, r.error_code()), (503, "UNAVAILABLE".to_string()));
    let r = h.get(&format!("/v2/library/web/blobs/{}", other.layer_digest));
    assert_eq!((r.status, r.error_code()), (503, "UNAVAILABLE".to_string()));

    up.restart();
    let r = h.send(
        "GET",
        "/v2/library/web/manifests/other",
        &accept_oci(),
        Bytes::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
}

#[test]
fn offline_upstream_serves_only_the_cache() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let img = seed(&up, "library/air", "v1", 8, 10_000);
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].offline = true;
        c
    });
    let h = Http::for_server(&s);
    assert_eq!(h.get("/v2/library/air/manifests/v1").status, 404);
    assert_eq!(
        h.get(&format!("/v2/library/air/blobs/{}", img.layer_digest))
            .status,
        404
    );
    assert_eq!(
        up.count("GET", "/v2/library/air/manifests/v1")
            + up.count("HEAD", "/v2/library/air/manifests/v1"),
        0,
        "offline never contacts the upstream"
    );
    let _ = img.config_digest;
}
