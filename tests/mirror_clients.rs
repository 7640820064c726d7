//! The pull-through cache end to end: real clients (containerd's `ctr`, podman, skopeo) pull
//! through transship from a real upstream (CNCF distribution on loopback, seeded by the test),
//! the way they would be configured in production — containerd with a `hosts.toml` mirror
//! (`?ns=`), podman with a `registries.conf` location carrying a path prefix, skopeo by plain
//! address. Every test checks byte for byte what the client got, counts in the upstream's
//! access log exactly what reached it (one GET per blob; nothing at all on a cached re-pull),
//! and ends with a clean fsck.
//!
//! No client may ever reach a public registry: every client's configuration names loopback
//! addresses only, and every client runs with an HTTP(S) proxy on a closed loopback port, so a
//! request to any other host fails at once instead of leaving the machine. A missing client is
//! a loud SKIP locally and a failure when `CI` is set.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::images::*;
use common::upstream::{self, Distribution};
use common::*;
use serde_json::{Value, json};
use transship::config::HumanDuration;

/// The second upstream's name (the first is the default, `docker.io`).
const SECOND: &str = "ghcr.io";

/// Names this suite in the CI failure for a missing client (see `skip`).
const SUITE: &str = "mirror client";
/// Loopback goes direct; anything else goes to a proxy on a closed loopback port and fails at
/// once: no client can fall back to a public registry.
const EGRESS: Egress = Egress::LoopbackOnly;
/// What this suite's fixture images hold.
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 1_200_000,
    data_bin: 50_001,
    readme: "mirror e2e image",
};

/// True when the upstream and every program are installed; otherwise reports a skip.
fn have(programs: &[&str]) -> bool {
    upstream::available() && programs_installed(SUITE, programs)
}

/// True when the upstream and containerd are installed and we are root; otherwise reports a
/// skip.
fn have_containerd() -> bool {
    upstream::available() && containerd_usable(SUITE)
}

// ---------------------------------------------------------------------------------------------
// The upstream: seeding it, and what reached it

/// Pushes `layout` to the upstream with plain registry API calls: blobs, then every image
/// manifest by digest, then the top under `TAG` (a list's children must exist first).
fn seed(up: &Distribution, repo: &str, layout: &Layout) {
    let h = Http::new(&up.url());
    for (digest, bytes) in &layout.blobs {
        assert_eq!(&h.push_blob(repo, bytes), digest, "seeding {repo}");
    }
    for image in &layout.images {
        let r = h.push_manifest(repo, &image.digest, layout.format.manifest, &image.manifest);
        assert_eq!(r.status, 201, "seeding {repo}@{}: {r:?}", image.digest);
    }
    let r = h.push_manifest(repo, TAG, layout.top.0, &layout.top.2);
    assert_eq!(r.status, 201, "seeding {repo}:{TAG}: {r:?}");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(layout.top.1.as_str())
    );
}

/// Every request in the upstream's access log so far, as `"METHOD /path?query"`, in order.
/// Waits until the log stops growing: distribution writes an access-log line just after the
/// response, so the last one can trail the client that received it.
fn upstream_requests(up: &Distribution) -> Vec<String> {
    up.requests()
}

/// The requests that reached the upstream after a snapshot of `before` of them.
fn upstream_requests_since(up: &Distribution, before: usize) -> Vec<String> {
    upstream_requests(up).split_off(before)
}

/// `requests` (to the upstream) hold exactly one GET of each blob in `fetched`, and no other
/// request for any blob.
fn assert_one_get_per_blob(requests: &[String], repo: &str, fetched: &[&String]) {
    let blob_requests: Vec<&String> = requests.iter().filter(|r| r.contains("/blobs/")).collect();
    let mut expected: Vec<String> = fetched
        .iter()
        .map(|d| format!("GET /v2/{repo}/blobs/{d}"))
        .collect();
    expected.sort();
    let mut got: Vec<String> = blob_requests.iter().map(|r| r.to_string()).collect();
    got.sort();
    assert_eq!(got, expected, "blob requests upstream:\n{requests:#?}");
}

// ---------------------------------------------------------------------------------------------
// The mirror

/// A `tag_ttl` long enough that a re-pull never needs the upstream.
const HOUR: Duration = Duration::from_secs(3600);

/// transship with `docker.io` (the default upstream) served by `first`, and, if given, `ghcr.io`
/// served by `second`; tags are fresh for `tag_ttl`.
fn mirror(first: &Distribution, second: Option<&Distribution>, tag_ttl: Duration) -> TestServer {
    let first = first.url();
    let second = second.map(Distribution::url);
    TestServer::start_with(move |mut c| {
        c.upstreams[0].url = first;
        c.upstreams[0].tag_ttl = HumanDuration(tag_ttl);
        if let Some(url) = second {
            let mut u = c.upstreams[0].clone();
            u.name = toml::Spanned::new(0..0, SECOND.parse().unwrap());
            u.aliases = Vec::new();
            u.default = false;
            u.url = url;
            c.upstreams.push(u);
        }
        c
    })
}

/// One series of the mirror's `/metrics` (0 if absent), e.g.
/// `transship_cache_requests_total{kind="blob",result="HIT",upstream="docker.io"}`.
fn metric(h: &Http, series: &str) -> u64 {
    let text = String::from_utf8(h.get("/metrics").body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{series}: {v:?}: {e}")) as u64
        })
        .unwrap_or(0)
}

fn cache_requests(h: &Http, upstream: &str, kind: &str, result: &str) -> u64 {
    metric(
        h,
        &format!(
            "transship_cache_requests_total{{kind=\"{kind}\",result=\"{result}\",upstream=\"{upstream}\"}}"
        ),
    )
}

/// The mirror now serves `digest` of `repo` (any spelling) from its cache, byte-exact.
fn assert_cached_blob(h: &Http, repo: &str, digest: &str, bytes: &[u8]) {
    let r = h.get(&format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("HIT")),
        "{repo}@{digest}"
    );
    assert_bytes(&format!("cached {repo}@{digest}"), &r.body, bytes);
}

/// The mirror now serves manifest `reference` of `repo` from its cache, byte-exact, typed.
fn assert_cached_manifest(h: &Http, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("accept", ACCEPT_ALL)],
        Vec::new(),
    );
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("HIT")),
        "{repo}:{reference}: {r:?}"
    );
    assert_eq!(r.header("content-type"), Some(media_type));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256(bytes).as_str())
    );
    assert_bytes(&format!("cached {repo}:{reference}"), &r.body, bytes);
}

fn assert_fsck_clean(s: &TestServer) {
    let report = s.app.fsck(false).expect("fsck runs");
    assert!(report.is_clean(), "fsck problems: {:#?}", report.problems);
    assert!(report.blobs_checked > 0 && report.manifests_checked > 0);
}

/// One request as `ctr --debug` logged it ("do request"), with the answer it logged for the
/// same URL ("fetch response received").
#[derive(Debug, Clone)]
struct CtrRequest {
    method: String,
    url: String,
    status: String,
    x_cache: String,
}

/// The value of `key` in a logfmt line (`key=value` or `key="quoted \"value\""`).
fn logfmt(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let Some(quoted) = rest.strip_prefix('"') else {
        return Some(rest.split(' ').next().unwrap_or("").to_string());
    };
    let mut out = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Every request a `ctr --debug` log shows, in order, with the status and `X-Cache` of its
/// answer.
fn ctr_requests(log: &str) -> Vec<CtrRequest> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.contains("msg=\"do request\"") {
            continue;
        }
        let url = logfmt(line, "url").unwrap_or_else(|| panic!("no url in {line}"));
        let response = lines[i + 1..]
            .iter()
            .find(|l| {
                l.contains("msg=\"fetch response received\"")
                    && logfmt(l, "url").as_deref() == Some(url.as_str())
            })
            .unwrap_or_else(|| panic!("no response logged for {url}:\n{log}"));
        out.push(CtrRequest {
            method: logfmt(line, "request.method").unwrap_or_default(),
            status: logfmt(response, "response.status").unwrap_or_default(),
            x_cache: logfmt(response, "response.header.x-cache").unwrap_or_default(),
            url,
        });
    }
    assert!(!out.is_empty(), "no requests in the ctr debug log:\n{log}");
    out
}

/// What a pull through the mirror at `base` (`http://host:port/v2/<repo>/`) looks like from
/// containerd: every request carries `?ns=<ns>`; first a HEAD of the tag, answered with
/// `X-Cache: <tag>`; then a GET by digest of each of `fetched`, exactly once, answered with the
/// `X-Cache` that `cache` gives that digest; every answer a 200.
fn assert_ctr_pull(
    requests: &[CtrRequest],
    base: &str,
    ns: &str,
    fetched: &[&String],
    tag: &str,
    cache: &dyn Fn(&str) -> &'static str,
) {
    let shown = || format!("{requests:#?}");
    let suffix = format!("?ns={ns}");
    for r in requests {
        assert!(
            r.url.starts_with(base) && r.url.ends_with(&suffix),
            "ctr asked something else: {}",
            shown()
        );
        assert_eq!(r.status, "200 OK", "{}", shown());
    }
    let first = &requests[0];
    assert_eq!(
        (
            first.method.as_str(),
            first.url.as_str(),
            first.x_cache.as_str()
        ),
        (
            "HEAD",
            format!("{base}manifests/{TAG}{suffix}").as_str(),
            tag
        ),
        "{}",
        shown()
    );
    let mut got: Vec<String> = requests[1..]
        .iter()
        .map(|r| {
            let digest = r.url[..r.url.len() - suffix.len()]
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            assert_eq!(
                (r.method.as_str(), r.x_cache.as_str()),
                ("GET", cache(&digest)),
                "{digest}: {}",
                shown()
            );
            digest
        })
        .collect();
    got.sort();
    let mut expected: Vec<String> = fetched.iter().map(|d| d.to_string()).collect();
    expected.sort();
    assert_eq!(got, expected, "what ctr fetched by digest: {}", shown());
}

/// Every blob of `layout`, plus the manifests given.
fn digests<'a>(layout: &'a Layout, manifests: &[&'a String]) -> Vec<&'a String> {
    layout
        .blobs
        .keys()
        .chain(manifests.iter().copied())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn containerd_pulls_through_the_mirror_once_and_then_from_cache() {
    if !have_containerd() {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::single(11, &OCI, &LAYERS);
    let image = &layout.images[0];
    seed(&up, "library/ctrimg", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start(EGRESS);
    let hosts = daemon.hosts_dir("docker.io", &s.addr.to_string());
    let reference = format!("docker.io/library/ctrimg:{TAG}");
    let base = format!("http://{}/v2/library/ctrimg/", s.addr);
    let fetched = digests(&layout, &[&image.digest]);
    let all_hits = |_: &str| "HIT";

    // containerd sends every request to the mirror with the original registry in `?ns=`.
    // The HEAD of the tag fills the manifest, so its GET by digest is already a hit.
    let log = daemon.pull(&hosts, &reference, false);
    let cold = |d: &str| if d == image.digest { "HIT" } else { "MISS" };
    assert_ctr_pull(
        &ctr_requests(&log),
        &base,
        "docker.io",
        &fetched,
        "MISS",
        &cold,
    );
    assert_eq!(daemon.image_digest(&reference), image.digest);
    daemon.assert_content(&layout.all());

    // The upstream saw a HEAD of the tag, the manifest GET once, and one GET per blob.
    let first = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &first,
        "library/ctrimg",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    let manifests: Vec<&String> = first.iter().filter(|r| r.contains("/manifests/")).collect();
    assert_eq!(
        manifests,
        [
            &format!("HEAD /v2/library/ctrimg/manifests/{TAG}"),
            &format!("GET /v2/library/ctrimg/manifests/{}", image.digest),
        ],
        "{first:#?}"
    );
    let blobs = layout.blobs.len() as u64;
    assert_eq!(cache_requests(&h, "docker.io", "blob", "MISS"), blobs);
    assert_eq!(cache_requests(&h, "docker.io", "blob", "HIT"), 0);
    assert_eq!(cache_requests(&h, "docker.io", "manifest", "MISS"), 1);

    // Forget the image in containerd, pull again: everything comes from the cache.
    daemon.forget(&reference);
    let log = daemon.pull(&hosts, &reference, false);
    assert_ctr_pull(
        &ctr_requests(&log),
        &base,
        "docker.io",
        &fetched,
        "HIT",
        &all_hits,
    );
    assert_eq!(daemon.image_digest(&reference), image.digest);
    daemon.assert_content(&layout.all());
    assert_eq!(
        upstream_requests_since(&up, seeded),
        first,
        "the re-pull reached the upstream"
    );

    // Docker Hub's one-component spelling (`ctrimg`, which is `library/ctrimg`) is the same
    // cache entry: a third pull under that name is all hits too.
    daemon.forget(&reference);
    let short = format!("docker.io/ctrimg:{TAG}");
    let log = daemon.pull(&hosts, &short, false);
    let short_base = format!("http://{}/v2/ctrimg/", s.addr);
    assert_ctr_pull(
        &ctr_requests(&log),
        &short_base,
        "docker.io",
        &fetched,
        "HIT",
        &all_hits,
    );
    assert_eq!(daemon.image_digest(&short), image.digest);
    daemon.assert_content(&layout.all());
    assert_eq!(upstream_requests_since(&up, seeded), first);

    assert_eq!(cache_requests(&h, "docker.io", "blob", "MISS"), blobs);
    assert_eq!(cache_requests(&h, "docker.io", "blob", "HIT"), 2 * blobs);
    assert_eq!(cache_requests(&h, "docker.io", "manifest", "MISS"), 1);
    assert_eq!(cache_requests(&h, "docker.io", "manifest", "HIT"), 5);
    for (digest, bytes) in &layout.blobs {
        assert_cached_blob(&h, "docker.io/library/ctrimg", digest, bytes);
    }
    drop(daemon);
    assert_fsck_clean(&s);
}

#[test]
fn containerd_repull_revalidates_the_tag_with_one_head_and_survives_an_outage() {
    if !have_containerd() {
        return;
    }
    let mut up = Distribution::start();
    let layout = Layout::single(81, &OCI, &LAYERS);
    let image = &layout.images[0];
    seed(&up, "library/fresh", &layout);
    let seeded = upstream_requests(&up).len();
    // Tags are revalidated on every request.
    let s = mirror(&up, None, Duration::ZERO);
    let h = Http::for_server(&s);
    let daemon = Containerd::start(EGRESS);
    let hosts = daemon.hosts_dir("docker.io", &s.addr.to_string());
    let reference = format!("docker.io/library/fresh:{TAG}");
    let base = format!("http://{}/v2/library/fresh/", s.addr);
    let fetched = digests(&layout, &[&image.digest]);
    let all_hits = |_: &str| "HIT";

    daemon.pull(&hosts, &reference, false);
    let first = upstream_requests_since(&up, seeded);
    daemon.forget(&reference);

    // The tag is older than tag_ttl: one HEAD upstream confirms it, nothing is downloaded.
    let log = daemon.pull(&hosts, &reference, false);
    assert_ctr_pull(
        &ctr_requests(&log),
        &base,
        "docker.io",
        &fetched,
        "HIT",
        &all_hits,
    );
    let mut expected = first.clone();
    expected.push(format!("HEAD /v2/library/fresh/manifests/{TAG}"));
    assert_eq!(upstream_requests_since(&up, seeded), expected);
    daemon.forget(&reference);

    // The upstream is down: the cached tag is served stale, blobs from the cache, and the
    // pull succeeds.
    up.stop();
    let log = daemon.pull(&hosts, &reference, false);
    assert_ctr_pull(
        &ctr_requests(&log),
        &base,
        "docker.io",
        &fetched,
        "STALE",
        &all_hits,
    );
    assert_eq!(daemon.image_digest(&reference), image.digest);
    daemon.assert_content(&layout.all());
    assert_eq!(cache_requests(&h, "docker.io", "manifest", "STALE"), 1);
    assert_eq!(
        cache_requests(&h, "docker.io", "blob", "MISS"),
        layout.blobs.len() as u64
    );
    drop(daemon);
    assert_fsck_clean(&s);
}

#[test]
fn containerd_ns_routes_to_the_second_upstream() {
    if !have_containerd() {
        return;
    }
    // The same repository name on both upstreams, holding different images.
    let first = Distribution::start();
    let second = Distribution::start();
    let decoy = Layout::single(21, &OCI, &LAYERS);
    let layout = Layout::single(22, &OCI, &LAYERS);
    let image = &layout.images[0];
    seed(&first, "org/app", &decoy);
    seed(&second, "org/app", &layout);
    let first_seeded = upstream_requests(&first).len();
    let second_seeded = upstream_requests(&second).len();
    let s = mirror(&first, Some(&second), HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start(EGRESS);
    let hosts = daemon.hosts_dir(SECOND, &s.addr.to_string());
    let reference = format!("{SECOND}/org/app:{TAG}");
    let fetched = digests(&layout, &[&image.digest]);
    let cold = |d: &str| if d == image.digest { "HIT" } else { "MISS" };

    // containerd names the registry in `?ns=`; the path is the bare repository.
    let log = daemon.pull(&hosts, &reference, false);
    let base = format!("http://{}/v2/org/app/", s.addr);
    assert_ctr_pull(&ctr_requests(&log), &base, SECOND, &fetched, "MISS", &cold);
    assert_eq!(daemon.image_digest(&reference), image.digest);
    daemon.assert_content(&layout.all());

    assert_eq!(
        upstream_requests_since(&first, first_seeded),
        Vec::<String>::new(),
        "the default upstream was asked"
    );
    let got = upstream_requests_since(&second, second_seeded);
    assert_one_get_per_blob(&got, "org/app", &layout.blobs.keys().collect::<Vec<_>>());
    assert_eq!(
        cache_requests(&h, SECOND, "blob", "MISS"),
        layout.blobs.len() as u64
    );
    assert_eq!(cache_requests(&h, "docker.io", "blob", "MISS"), 0);
    assert_eq!(cache_requests(&h, "docker.io", "manifest", "MISS"), 0);
    // Cached as ghcr.io/org/app (also reachable by path prefix); docker.io's org/app is
    // another repository and was never touched.
    for (digest, bytes) in &layout.blobs {
        assert_cached_blob(&h, "ghcr.io/org/app", digest, bytes);
    }
    assert_cached_manifest(&h, "ghcr.io/org/app", TAG, OCI_MANIFEST, &image.manifest);

    // A registry transship has no upstream for: a clean failure, and nobody is asked.
    let hosts = daemon.hosts_dir("quay.io", &s.addr.to_string());
    let err = daemon
        .ctr()
        .args(["images", "pull", "--plain-http", "--hosts-dir"])
        .arg(&hosts)
        .arg(format!("quay.io/org/app:{TAG}"))
        .fails();
    assert!(err.contains("not found"), "{err}");
    assert_eq!(
        upstream_requests_since(&first, first_seeded),
        Vec::<String>::new()
    );
    assert_eq!(upstream_requests_since(&second, second_seeded), got);
    drop(daemon);
    assert_fsck_clean(&s);
}

#[test]
fn podman_pulls_through_a_registries_conf_location_with_a_path_prefix() {
    if !have(&["podman"]) {
        return;
    }
    let up = Distribution::start();
    let second = Distribution::start();
    let layout = Layout::single(31, &OCI, &LAYERS);
    let image = &layout.images[0];
    let tool = Layout::single(32, &OCI, &LAYERS);
    seed(&up, "library/podimg", &layout);
    seed(&second, "org/tool", &tool);
    let seeded = upstream_requests(&up).len();
    let second_seeded = upstream_requests(&second).len();
    let s = mirror(&up, Some(&second), HOUR);
    let h = Http::for_server(&s);
    // Each registry lives at transship under its name as a path prefix; nothing else is
    // known, so there is no public fallback.
    let sb = Sandbox::new(
        &format!(
            "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"{0}/docker.io\"\ninsecure = true\n\n[[registry]]\nprefix = \"{SECOND}\"\nlocation = \"{0}/{SECOND}\"\ninsecure = true\n",
            s.addr
        ),
        EGRESS,
    );
    let name = format!("docker.io/library/podimg:{TAG}");

    let log = sb
        .podman()
        .args(["--log-level", "debug", "pull", "--signature-policy"])
        .arg(sb.path("policy.json"))
        .arg(&name)
        .run_log();
    // podman asks for the manifest under the prefixed name, over plain HTTP.
    let manifest_url = format!(
        "http://{}/v2/docker.io/library/podimg/manifests/{TAG}",
        s.addr
    );
    assert!(log.contains(&manifest_url), "{manifest_url} not in\n{log}");

    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&name).run())
            .expect("podman image inspect JSON");
    let inspect = &inspect[0];
    assert_eq!(inspect["Digest"], image.digest.as_str());
    assert_eq!(
        format!("sha256:{}", inspect["Id"].as_str().unwrap()),
        image.config_digest
    );
    let diff_ids: Vec<String> = image.layer_tars.iter().map(|t| sha256(t)).collect();
    assert_eq!(inspect["RootFS"]["Layers"], json!(diff_ids));
    assert_eq!(
        inspect["RepoTags"],
        json!([format!("docker.io/library/podimg:{TAG}")])
    );

    // podman stored our tars, byte for byte.
    let saved = sb.path("saved");
    sb.podman()
        .args(["save", "--format", "oci-dir", "--uncompressed", "--output"])
        .arg(&saved)
        .arg(&name)
        .run();
    let blobs = oci_dir_blobs(&saved);
    for (digest, tar) in diff_ids.iter().zip(&image.layer_tars) {
        let got = blobs
            .get(digest)
            .unwrap_or_else(|| panic!("podman save has no layer {digest}"));
        assert_bytes(&format!("saved layer {digest}"), got, tar);
    }

    // One upstream GET per blob; all under the plain upstream name, never the prefix.
    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &got,
        "library/podimg",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    assert!(
        got.iter()
            .all(|r| r.starts_with("HEAD /v2/library/podimg/manifests/")
                || r.starts_with("GET /v2/library/podimg/")),
        "{got:#?}"
    );
    assert_eq!(
        cache_requests(&h, "docker.io", "blob", "MISS"),
        layout.blobs.len() as u64
    );
    for (digest, bytes) in &layout.blobs {
        assert_cached_blob(&h, "library/podimg", digest, bytes);
    }

    // Forget it and pull again: nothing reaches the upstream.
    sb.podman().args(["rmi", "--all", "--force"]).run();
    sb.podman()
        .args(["pull", "--quiet", "--signature-policy"])
        .arg(sb.path("policy.json"))
        .arg(&name)
        .run();
    assert_eq!(upstream_requests_since(&up, seeded), got);

    // The second upstream, by its own prefix: routed there, and only there.
    let tool_name = format!("{SECOND}/org/tool:{TAG}");
    let log = sb
        .podman()
        .args(["--log-level", "debug", "pull", "--signature-policy"])
        .arg(sb.path("policy.json"))
        .arg(&tool_name)
        .run_log();
    let manifest_url = format!("http://{}/v2/{SECOND}/org/tool/manifests/{TAG}", s.addr);
    assert!(log.contains(&manifest_url), "{manifest_url} not in\n{log}");
    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&tool_name).run())
            .expect("podman image inspect JSON");
    assert_eq!(inspect[0]["Digest"], tool.images[0].digest.as_str());
    assert_eq!(upstream_requests_since(&up, seeded), got);
    assert_one_get_per_blob(
        &upstream_requests_since(&second, second_seeded),
        "org/tool",
        &tool.blobs.keys().collect::<Vec<_>>(),
    );
    assert_eq!(
        cache_requests(&h, SECOND, "blob", "MISS"),
        tool.blobs.len() as u64
    );
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_copies_an_oci_image_through_the_mirror_byte_exact() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::single(41, &OCI, &LAYERS);
    seed(&up, "library/skoimg", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let remote = format!("docker://{}/library/skoimg:{TAG}", s.addr);

    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(&remote)
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);
    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &got,
        "library/skoimg",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    assert_eq!(
        cache_requests(&h, "docker.io", "blob", "MISS"),
        layout.blobs.len() as u64
    );

    // A second copy (by the short name) comes from the cache alone.
    let again = sb.path("again");
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(format!("docker://{}/skoimg:{TAG}", s.addr))
        .arg(format!("oci:{}:{TAG}", again.display()))
        .run();
    assert_same_layout(&again, &layout);
    assert_eq!(upstream_requests_since(&up, seeded), got);
    assert_eq!(
        cache_requests(&h, "docker.io", "blob", "HIT"),
        layout.blobs.len() as u64
    );
    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    // The mirror namespace is read-only: a push is refused, and no write reaches the
    // upstream. (skopeo first asks whether the blobs exist there; those HEADs are reads,
    // which the mirror answers from the upstream.)
    let stored = blob_files(s.data_dir());
    let src = layout.write(&sb.path("src"));
    let err = sb
        .skopeo()
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(format!("docker://{}/library/pushed:{TAG}", s.addr))
        .fails();
    assert!(err.contains("denied"), "{err}");
    let after = upstream_requests_since(&up, seeded);
    assert_eq!(after[..got.len()], got[..]);
    for r in &after[got.len()..] {
        assert!(
            r.starts_with("HEAD /v2/library/pushed/blobs/"),
            "a push to the mirror reached the upstream: {after:#?}"
        );
    }
    assert_eq!(blob_files(s.data_dir()), stored);
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_copies_a_multi_arch_index_through_the_mirror_with_all() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let upstream_addr = format!("127.0.0.1:{}", up.port);
    let sb = Sandbox::insecure(&[s.addr.to_string(), upstream_addr.clone()], EGRESS);
    let layout = Layout::multi_arch(51, &OCI, &LAYERS);
    let src = layout.write(&sb.path("src"));

    // Seeded with skopeo, as is.
    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(format!("docker://{upstream_addr}/library/multi:{TAG}"))
        .run();
    let seeded = upstream_requests(&up).len();

    let out = sb.path("out");
    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{}/library/multi:{TAG}", s.addr))
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);

    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &got,
        "library/multi",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    // The index (by tag) and each platform manifest once.
    let manifest_gets = got
        .iter()
        .filter(|r| r.starts_with("GET /v2/library/multi/manifests/"))
        .count();
    assert_eq!(manifest_gets, 3, "{got:#?}");
    assert_cached_manifest(&h, "library/multi", TAG, OCI_INDEX, &layout.top.2);
    for image in &layout.images {
        assert_cached_manifest(
            &h,
            "library/multi",
            &image.digest,
            OCI_MANIFEST,
            &image.manifest,
        );
    }
    for (digest, bytes) in &layout.blobs {
        assert_cached_blob(&h, "library/multi", digest, bytes);
    }
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_pulls_a_docker_schema2_image_through_the_mirror() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let upstream_addr = format!("127.0.0.1:{}", up.port);
    let sb = Sandbox::insecure(&[s.addr.to_string(), upstream_addr.clone()], EGRESS);
    let layout = Layout::single(61, &OCI, &LAYERS);
    let image = &layout.images[0];
    let src = layout.write(&sb.path("src"));

    // skopeo converts the OCI fixture to Docker schema2 on the way in.
    sb.skopeo()
        .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(format!("docker://{upstream_addr}/library/s2:{TAG}"))
        .run();
    let r = Http::new(&up.url()).send(
        "GET",
        &format!("/v2/library/s2/manifests/{TAG}"),
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some(DOCKER_MANIFEST));
    let manifest = r.body.to_vec();
    let m = r.json();
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], DOCKER_LAYER_GZIP);
            l["digest"].as_str().unwrap()
        })
        .collect();
    assert_eq!(layers, image.layer_digests);
    let seeded = upstream_requests(&up).len();

    // Pulled through the mirror into a dir: layout, which keeps the manifest as served.
    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/library/s2:{TAG}", s.addr))
        .arg(format!("dir:{}", out.display()))
        .run();
    assert_bytes(
        "pulled manifest.json",
        &std::fs::read(out.join("manifest.json")).unwrap(),
        &manifest,
    );
    for (digest, bytes) in &layout.blobs {
        let file = out.join(digest.trim_start_matches("sha256:"));
        assert_bytes(
            &format!("pulled {digest}"),
            &std::fs::read(file).unwrap(),
            bytes,
        );
    }
    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(&got, "library/s2", &layout.blobs.keys().collect::<Vec<_>>());
    assert_cached_manifest(&h, "library/s2", TAG, DOCKER_MANIFEST, &manifest);
    // A client that reads only Docker schema2 gets it by tag, from the cache.
    let r = h.send(
        "GET",
        &format!("/v2/library/s2/manifests/{TAG}"),
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert_bytes("docker-only GET", &r.body, &manifest);
    assert_fsck_clean(&s);
}

#[test]
fn containerd_pulls_a_docker_manifest_list_through_the_mirror() {
    if !have_containerd() {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::multi_arch(71, &DOCKER, &LAYERS);
    seed(&up, "library/dlist", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start(EGRESS);
    let hosts = daemon.hosts_dir("docker.io", &s.addr.to_string());
    let reference = format!("docker.io/library/dlist:{TAG}");

    // Every platform: the list (its HEAD fills it), both images, every blob.
    let log = daemon.pull(&hosts, &reference, true);
    let manifests: Vec<&String> = layout.manifests.keys().collect();
    let list = layout.top.1.as_str();
    assert_ctr_pull(
        &ctr_requests(&log),
        &format!("http://{}/v2/library/dlist/", s.addr),
        "docker.io",
        &digests(&layout, &manifests),
        "MISS",
        &|d| if d == list { "HIT" } else { "MISS" },
    );
    assert_eq!(daemon.image_digest(&reference), layout.top.1);
    daemon.assert_content(&layout.all());

    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &got,
        "library/dlist",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    let mut manifest_requests: Vec<&str> = got
        .iter()
        .filter(|r| r.contains("/manifests/"))
        .map(String::as_str)
        .collect();
    manifest_requests.sort();
    let mut expected: Vec<String> = layout
        .manifests
        .keys()
        .map(|d| format!("GET /v2/library/dlist/manifests/{d}"))
        .chain([format!("HEAD /v2/library/dlist/manifests/{TAG}")])
        .collect();
    expected.sort();
    assert_eq!(manifest_requests, expected, "{got:#?}");
    assert_cached_manifest(&h, "library/dlist", TAG, DOCKER_LIST, &layout.top.2);
    for image in &layout.images {
        assert_cached_manifest(
            &h,
            "library/dlist",
            &image.digest,
            DOCKER_MANIFEST,
            &image.manifest,
        );
    }
    // A client that cannot read lists gets the linux/amd64 image for the tag, from the cache.
    let r = h.send(
        "GET",
        &format!("/v2/library/dlist/manifests/{TAG}"),
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")), "{r:?}");
    assert_eq!(r.header("content-type"), Some(DOCKER_MANIFEST));
    assert_bytes(
        "docker-only GET of a list",
        &r.body,
        &layout.images[0].manifest,
    );
    drop(daemon);
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_downloads_a_layer_shared_by_two_repositories_once() {
    if !have(&["skopeo"]) {
        return;
    }
    // The same image in two upstream repositories (a base image under two names).
    let up = Distribution::start();
    let layout = Layout::single(91, &OCI, &LAYERS);
    seed(&up, "library/base-a", &layout);
    seed(&up, "library/base-b", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    for (i, repo) in ["library/base-a", "library/base-b"].into_iter().enumerate() {
        let out = sb.path(&format!("out{i}"));
        sb.skopeo()
            .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
            .arg(format!("docker://{}/{repo}:{TAG}", s.addr))
            .arg(format!("oci:{}:{TAG}", out.display()))
            .run();
        assert_same_layout(&out, &layout);
    }
    // base-a downloaded every blob; base-b only had the upstream confirm it has them (HEAD),
    // and linked what was already stored.
    let got = upstream_requests_since(&up, seeded);
    let blob_requests = |repo: &str| -> Vec<String> {
        let mut v: Vec<String> = got
            .iter()
            .filter(|r| r.contains(&format!("/v2/{repo}/blobs/")))
            .cloned()
            .collect();
        v.sort();
        v
    };
    let expected = |method: &str, repo: &str| -> Vec<String> {
        layout
            .blobs
            .keys()
            .map(|d| format!("{method} /v2/{repo}/blobs/{d}"))
            .collect()
    };
    assert_eq!(
        blob_requests("library/base-a"),
        expected("GET", "library/base-a")
    );
    assert_eq!(
        blob_requests("library/base-b"),
        expected("HEAD", "library/base-b")
    );
    for repo in ["library/base-a", "library/base-b"] {
        for (digest, bytes) in &layout.blobs {
            assert_cached_blob(&h, repo, digest, bytes);
        }
    }
    // Stored once.
    assert_eq!(blob_files(s.data_dir()).len(), layout.blobs.len());
    assert_fsck_clean(&s);
}

#[test]
fn concurrent_skopeo_pulls_of_a_cold_image_download_each_blob_once() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::multi_arch(101, &OCI, &LAYERS);
    seed(&up, "library/rush", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let outs: Vec<PathBuf> = (0..3).map(|i| sb.path(&format!("out{i}"))).collect();
    let pulls: Vec<_> = outs
        .iter()
        .map(|out| {
            let tool = sb
                .skopeo()
                .args([
                    "copy",
                    "--all",
                    "--preserve-digests",
                    "--src-tls-verify=false",
                ])
                .arg(format!("docker://{}/library/rush:{TAG}", s.addr))
                .arg(format!("oci:{}:{TAG}", out.display()));
            std::thread::spawn(move || tool.run())
        })
        .collect();
    // Every pull finishes before any result is looked at.
    let results: Vec<_> = pulls.into_iter().map(|p| p.join()).collect();
    for r in results {
        r.expect("skopeo pull");
    }
    for out in &outs {
        assert_same_layout(out, &layout);
    }
    // However the three interleaved, each blob came from the upstream once; the other
    // requests for it waited for that download or were hits.
    let got = upstream_requests_since(&up, seeded);
    assert_one_get_per_blob(
        &got,
        "library/rush",
        &layout.blobs.keys().collect::<Vec<_>>(),
    );
    let blobs = layout.blobs.len() as u64;
    assert_eq!(cache_requests(&h, "docker.io", "blob", "MISS"), blobs);
    assert_eq!(
        cache_requests(&h, "docker.io", "blob", "COALESCED")
            + cache_requests(&h, "docker.io", "blob", "HIT"),
        2 * blobs
    );
    assert_fsck_clean(&s);
}

#[test]
fn podman_pulls_one_platform_of_an_index_through_a_registry_mirror_entry() {
    if !have(&["podman"]) {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::multi_arch(111, &OCI, &LAYERS);
    let amd64 = &layout.images[0];
    seed(&up, "library/mirrored", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    // The usual production setup: docker.io keeps its own location, with transship as its
    // mirror. Here the "own location" is a closed loopback port, so a fallback past the
    // mirror would fail instead of reaching Docker Hub.
    let sb = Sandbox::new(
        &format!(
            "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:9\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{}/docker.io\"\ninsecure = true\n",
            s.addr
        ),
        EGRESS,
    );
    let name = format!("docker.io/library/mirrored:{TAG}");
    let log = sb
        .podman()
        .args(["--log-level", "debug", "pull", "--platform", "linux/amd64"])
        .arg("--signature-policy")
        .arg(sb.path("policy.json"))
        .arg(&name)
        .run_log();
    let manifest_url = format!(
        "http://{}/v2/docker.io/library/mirrored/manifests/{TAG}",
        s.addr
    );
    assert!(log.contains(&manifest_url), "{manifest_url} not in\n{log}");
    assert!(
        !log.contains("//127.0.0.1:9/"),
        "podman went past the mirror:\n{log}"
    );
    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&name).run())
            .expect("podman image inspect JSON");
    // podman records the index digest (what the tag names) and runs the amd64 image.
    assert_eq!(inspect[0]["Digest"], layout.top.1.as_str());
    assert_eq!(
        format!("sha256:{}", inspect[0]["Id"].as_str().unwrap()),
        amd64.config_digest
    );

    // Only the index, the amd64 image and its blobs were fetched; arm64 never was.
    let got = upstream_requests_since(&up, seeded);
    let mut fetched = amd64.layer_digests.clone();
    fetched.push(amd64.config_digest.clone());
    assert_one_get_per_blob(
        &got,
        "library/mirrored",
        &fetched.iter().collect::<Vec<_>>(),
    );
    let mut manifests: Vec<&str> = got
        .iter()
        .filter(|r| r.contains("/manifests/"))
        .map(String::as_str)
        .collect();
    manifests.sort();
    let mut expected = vec![
        format!("GET /v2/library/mirrored/manifests/{}", layout.top.1),
        format!("GET /v2/library/mirrored/manifests/{}", amd64.digest),
        format!("HEAD /v2/library/mirrored/manifests/{TAG}"),
    ];
    expected.sort();
    assert_eq!(manifests, expected, "{got:#?}");
    assert_cached_manifest(&h, "library/mirrored", TAG, OCI_INDEX, &layout.top.2);
    // A cache holding an index without all its children is consistent.
    assert_fsck_clean(&s);
}

#[test]
fn concurrent_skopeo_pulls_of_a_cold_image_fetch_each_manifest_once() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let layout = Layout::multi_arch(121, &OCI, &LAYERS);
    seed(&up, "library/herd", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let pulls: Vec<_> = (0..4)
        .map(|i| {
            let tool = sb
                .skopeo()
                .args([
                    "copy",
                    "--all",
                    "--preserve-digests",
                    "--src-tls-verify=false",
                ])
                .arg(format!("docker://{}/library/herd:{TAG}", s.addr))
                .arg(format!(
                    "oci:{}:{TAG}",
                    sb.path(&format!("out{i}")).display()
                ));
            std::thread::spawn(move || tool.run())
        })
        .collect();
    // Every pull finishes before any result is looked at.
    let results: Vec<_> = pulls.into_iter().map(|p| p.join()).collect();
    for r in results {
        r.expect("skopeo pull");
    }
    let got = upstream_requests_since(&up, seeded);
    for digest in layout.manifests.keys() {
        let path = format!("GET /v2/library/herd/manifests/{digest}");
        assert_eq!(
            got.iter().filter(|r| **r == path).count(),
            1,
            "{path}: {got:#?}"
        );
    }
}
