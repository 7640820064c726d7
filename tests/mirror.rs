//! The pull-through cache against a real upstream (CNCF distribution on loopback, seeded by
//! the test): misses fill the cache, hits never reach the upstream, every spelling of a name
//! shares one cache entry, tags are revalidated with HEAD, outages serve what is cached. Tag
//! lists are the upstream's (under the name the client asked for, paged, cached for
//! `tag_ttl`, served stale while it is down); `PagedUpstream`, a tiny scripted upstream in
//! this file, covers upstreams that page their lists with `Link` (distribution 2.8 does not).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::images::{Egress, Sandbox, programs_installed};
use common::upstream::{self, Distribution};
use common::*;
use serde_json::{Value, json};
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

// ---------------------------------------------------------------------------------------------
// Tag lists
// ---------------------------------------------------------------------------------------------

/// Points `tags` at the image `img` in the upstream repository `repo`.
fn tag_upstream(up: &Distribution, repo: &str, img: &Seeded, tags: &[&str]) {
    let h = Http::new(&up.url());
    for tag in tags {
        let r = h.push_manifest(repo, tag, OCI_MANIFEST, img.manifest.as_bytes());
        assert_eq!(r.status, 201, "tagging {repo}:{tag} upstream");
    }
}

fn tags_of(r: &Resp) -> Vec<String> {
    serde_json::from_value(r.json()["tags"].clone()).expect("a tags array")
}

#[test]
fn tag_lists_are_the_upstreams_under_the_name_asked_for() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let img = seed(&up, "library/lister", "latest", 9, 100);
    // distribution lists tags in no particular order: transship sorts them.
    tag_upstream(&up, "library/lister", &img, &["2.0", "1.0", "edge", "1.1"]);
    let s = mirror_of(&up, Duration::from_secs(3600));
    let h = Http::for_server(&s);
    let all = ["1.0", "1.1", "2.0", "edge", "latest"];

    // Nothing was pulled yet: the list is the upstream's, under each spelling of the name.
    let r = h.get("/v2/library/lister/tags/list");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"name": "library/lister", "tags": all}));
    assert_eq!(
        (r.header("x-cache"), r.header("oci-namespace")),
        (Some("MISS"), Some("docker.io"))
    );
    assert_eq!(r.header("link"), None);
    for (path, name) in [
        ("/v2/lister/tags/list", "lister"),
        (
            "/v2/docker.io/library/lister/tags/list",
            "docker.io/library/lister",
        ),
        (
            "/v2/library/lister/tags/list?ns=docker.io",
            "library/lister",
        ),
    ] {
        let r = h.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json(), json!({"name": name, "tags": all}), "{path}");
        assert_eq!(r.header("x-cache"), Some("HIT"), "{path}");
    }

    // Paging toward the client, with a Link to the next page like the private registry's.
    let r = h.get("/v2/lister/tags/list?n=2");
    assert_eq!(tags_of(&r), ["1.0", "1.1"]);
    assert_eq!(
        r.header("link"),
        Some("</v2/lister/tags/list?last=1.1&n=2>; rel=\"next\"")
    );
    let r = h.get("/v2/lister/tags/list?last=1.1&n=2");
    assert_eq!(tags_of(&r), ["2.0", "edge"]);
    assert_eq!(
        r.header("link"),
        Some("</v2/lister/tags/list?last=edge&n=2>; rel=\"next\"")
    );
    let r = h.get("/v2/lister/tags/list?last=edge&n=2");
    assert_eq!(
        (tags_of(&r), r.header("link")),
        (vec!["latest".into()], None)
    );
    let r = h.get("/v2/library/lister/tags/list?n=1&ns=docker.io");
    assert_eq!(
        r.header("link"),
        Some("</v2/library/lister/tags/list?last=1.0&n=1&ns=docker.io>; rel=\"next\"")
    );
    let r = h.get("/v2/lister/tags/list?n=0");
    assert_eq!((tags_of(&r).len(), r.header("link")), (0, None));
    let r = h.get("/v2/lister/tags/list?n=x");
    assert_eq!(
        (r.status, r.error_code()),
        (400, "PAGINATION_NUMBER_INVALID".to_string())
    );

    // skopeo sees the upstream's tags through the mirror.
    if programs_installed("mirror", &["skopeo"]) {
        let sb = Sandbox::insecure(&[s.addr.to_string()], Egress::LoopbackOnly);
        let out: Value = serde_json::from_str(
            &sb.skopeo()
                .args(["list-tags", "--tls-verify=false"])
                .arg(format!("docker://{}/library/lister", s.addr))
                .run(),
        )
        .expect("skopeo list-tags JSON");
        assert_eq!(out["Tags"], json!(all));
    }

    // One upstream request for all of it: the list is cached for tag_ttl.
    assert_eq!(up.count("GET", "/v2/library/lister/tags/list"), 1);

    // A repository the upstream does not know.
    let r = h.get("/v2/library/nosuch/tags/list");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
}

#[test]
fn tag_lists_follow_the_upstream_and_survive_its_outage() {
    if !upstream::available() {
        return;
    }
    let mut up = Distribution::start();
    let img = seed(&up, "library/lists", "a", 10, 100);
    tag_upstream(&up, "library/lists", &img, &["b"]);
    seed(&up, "library/pulled", "x", 11, 100);
    let s = mirror_of(&up, Duration::ZERO);
    let h = Http::for_server(&s);

    let r = h.get("/v2/library/lists/tags/list");
    assert_eq!(
        (tags_of(&r), r.header("x-cache")),
        (vec!["a".into(), "b".into()], Some("MISS"))
    );
    // With tag_ttl 0 every list asks the upstream, and sees a new tag at once.
    tag_upstream(&up, "library/lists", &img, &["c"]);
    let r = h.get("/v2/library/lists/tags/list");
    assert_eq!(tags_of(&r), ["a", "b", "c"]);
    assert_eq!(up.count("GET", "/v2/library/lists/tags/list"), 2);
    // A repository only pulled from, never listed.
    assert_eq!(h.get("/v2/library/pulled/manifests/x").status, 200);

    up.stop();
    // The last list fetched, while within stale_if_error.
    let r = h.get("/v2/lists/tags/list");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"name": "lists", "tags": ["a", "b", "c"]}));
    assert_eq!(r.header("x-cache"), Some("STALE"));
    let r = h.get("/v2/lists/tags/list?n=1&last=a");
    assert_eq!(
        (tags_of(&r), r.header("link")),
        (
            vec!["b".into()],
            Some("</v2/lists/tags/list?last=b&n=1>; rel=\"next\"")
        )
    );
    // Never listed: the tags cached here.
    let r = h.get("/v2/library/pulled/tags/list");
    assert_eq!(
        (r.status, tags_of(&r), r.header("x-cache")),
        (200, vec!["x".into()], Some("STALE"))
    );
    // Nothing known: a clean 503.
    let r = h.get("/v2/library/unseen/tags/list");
    assert_eq!((r.status, r.error_code()), (503, "UNAVAILABLE".to_string()));

    // Back up: its tags deleted upstream meanwhile (distribution then lists `"tags": null`).
    up.restart();
    let r = Http::new(&up.url()).delete(&format!("/v2/library/lists/manifests/{}", img.digest));
    assert_eq!(r.status, 202);
    let r = h.get("/v2/lists/tags/list");
    assert_eq!(
        (r.status, tags_of(&r), r.header("x-cache")),
        (200, Vec::<String>::new(), Some("MISS"))
    );
}

#[test]
fn offline_upstream_lists_only_cached_tags() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let img = seed(&up, "library/air2", "v1", 12, 100);
    tag_upstream(&up, "library/air2", &img, &["v2"]);
    let s = mirror_of(&up, Duration::from_secs(3600));
    assert_eq!(
        Http::for_server(&s).get("/v2/air2/manifests/v1").status,
        200
    );
    let url = up.url();
    let s = TestServer::start_in(s.stop(), move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].offline = true;
        c
    });
    let h = Http::for_server(&s);
    let r = h.get("/v2/air2/tags/list");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"name": "air2", "tags": ["v1"]}));
    let r = h.get("/v2/library/never/tags/list");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
    assert_eq!(up.count("GET", "/v2/library/air2/tags/list"), 0);
}

/// A scripted upstream that pages tag lists with `Link` headers; it records the path and
/// query of every request.
struct PagedUpstream {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The answer for `path?query`, asked for the `nth` time (from 0): status, tags and the
/// `Link` header.
fn paged_answer(path: &str, query: &str, nth: usize) -> (u16, Vec<String>, Option<String>) {
    let page: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("page="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    match path {
        // t00..t09 in pages of three, each page in reverse order; an invalid tag name on the
        // first page and a duplicate across pages. The first page links to another host: only
        // its query may be used.
        "/v2/library/paged/tags/list" => {
            let mut tags: Vec<String> = (page * 3..(page * 3 + 3).min(10))
                .rev()
                .map(|i| format!("t{i:02}"))
                .collect();
            match page {
                0 => tags.push("not a tag!".into()),
                1 => tags.push("t00".into()),
                _ => {}
            }
            let link = match page {
                0 => Some(
                    "<http://192.0.2.1:1/v2/library/paged/tags/list?page=1>; rel=\"next\"".into(),
                ),
                1 | 2 => Some(format!(
                    "</v2/library/paged/tags/list?page={}>; rel=\"next\"",
                    page + 1
                )),
                _ => None,
            };
            (200, tags, link)
        }
        // Every page links to the same next page.
        "/v2/library/loop/tags/list" => (
            200,
            vec!["x".into()],
            Some("</v2/library/loop/tags/list?page=7>; rel=\"next\"".into()),
        ),
        // An endless list.
        "/v2/library/endless/tags/list" => (
            200,
            vec![format!("e{page:04}")],
            Some(format!(
                "</v2/library/endless/tags/list?page={}>; rel=\"next\"",
                page + 1
            )),
        ),
        // Listed once, then deleted (404), then the upstream fails (500).
        "/v2/library/vanishing/tags/list" => match nth {
            0 => (200, vec!["v".into()], None),
            1 => (404, Vec::new(), None),
            _ => (500, Vec::new(), None),
        },
        _ => (404, Vec::new(), None),
    }
}

impl PagedUpstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let nth = {
                    let mut seen = seen2.lock().unwrap();
                    let nth = seen
                        .iter()
                        .filter(|t: &&String| t.split('?').next() == Some(path))
                        .count();
                    seen.push(target.clone());
                    nth
                };
                let (status, tags, link) = paged_answer(path, query, nth);
                let body = if status == 200 {
                    json!({"name": "ignored", "tags": tags}).to_string()
                } else {
                    r#"{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}"#.to_string()
                };
                let link = link.map(|l| format!("Link: {l}\r\n")).unwrap_or_default();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{link}Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests_for(&self, path: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.split('?').next() == Some(path))
            .cloned()
            .collect()
    }
}

impl Drop for PagedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn paged_upstream_lists_are_followed_within_caps() {
    let up = PagedUpstream::start();
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].tag_ttl = HumanDuration(Duration::from_secs(3600));
        c
    });
    let h = Http::for_server(&s);

    // Every page, in order, from this upstream only; sorted, deduplicated, invalid names dropped.
    let r = h.get("/v2/library/paged/tags/list");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let want: Vec<String> = (0..10).map(|i| format!("t{i:02}")).collect();
    assert_eq!(tags_of(&r), want);
    assert_eq!(
        up.requests_for("/v2/library/paged/tags/list"),
        [
            "/v2/library/paged/tags/list",
            "/v2/library/paged/tags/list?page=1",
            "/v2/library/paged/tags/list?page=2",
            "/v2/library/paged/tags/list?page=3",
        ]
    );
    // Paged toward the client over the whole list; cached, so no new upstream request.
    let r = h.get("/v2/library/paged/tags/list?n=4&last=t03");
    assert_eq!(tags_of(&r), ["t04", "t05", "t06", "t07"]);
    assert_eq!(up.requests_for("/v2/library/paged/tags/list").len(), 4);

    // A link to the page just fetched ends the list.
    let r = h.get("/v2/library/loop/tags/list");
    assert_eq!((r.status, tags_of(&r)), (200, vec!["x".to_string()]));
    assert_eq!(up.requests_for("/v2/library/loop/tags/list").len(), 2);

    // An endless list is cut at 100 pages.
    let r = h.get("/v2/library/endless/tags/list");
    assert_eq!(r.status, 200);
    let got = tags_of(&r);
    assert_eq!(
        (
            got.len(),
            got.first().map(String::as_str),
            got.last().map(String::as_str)
        ),
        (100, Some("e0000"), Some("e0099"))
    );
    assert_eq!(up.requests_for("/v2/library/endless/tags/list").len(), 100);

    let r = h.get("/v2/library/missing/tags/list");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
}

#[test]
fn a_repository_gone_upstream_is_never_listed_stale() {
    let up = PagedUpstream::start();
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].tag_ttl = HumanDuration(Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let path = "/v2/library/vanishing/tags/list";
    let r = h.get(path);
    assert_eq!((r.status, tags_of(&r)), (200, vec!["v".to_string()]));
    let r = h.get(path);
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
    // The upstream now fails: the list it had before the 404 is not served.
    let r = h.get(path);
    assert_eq!((r.status, r.error_code()), (503, "UNAVAILABLE".to_string()));
    assert_eq!(up.requests_for(path).len(), 3);
}
