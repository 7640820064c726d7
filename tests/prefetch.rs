//! `transship prefetch` and `[[warm]]` lists end to end: the real binary against a real
//! upstream (CNCF distribution on loopback, seeded by skopeo from hand-built OCI layouts).
//! Prefetch goes through the running server's admin socket and, with the server stopped, on
//! the store directly; the upstream's access log shows exactly what was fetched (only the
//! requested platform of an index); skopeo then pulls every prefetched image through transship
//! byte-exact while the upstream sees nothing. A warm list keeps a moved tag current, and
//! checks an unmoved one with HEAD requests only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::images::*;
use common::upstream::{self, Distribution};
use common::*;

const SUITE: &str = "prefetch";
const EGRESS: Egress = Egress::LoopbackOnly;
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 300_000,
    data_bin: 20_001,
    readme: "prefetch e2e image",
};

fn have() -> bool {
    upstream::available() && programs_installed(SUITE, &["skopeo"])
}

/// A config for the binary: `docker.io` (default, tags fresh for an hour) and `ghcr.io`, both
/// served by `up`, plus `extra`.
fn write_config(dir: &Path, up: &Distribution, extra: &str) -> PathBuf {
    let path = dir.join("transship.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\n\n\
         [[upstream]]\nname = \"docker.io\"\nurl = {url:?}\naliases = [\"index.docker.io\"]\ndefault = true\ntag_ttl = \"1h\"\n\n\
         [[upstream]]\nname = \"ghcr.io\"\nurl = {url:?}\ntag_ttl = \"1h\"\n\n{extra}",
        data = dir.join("data").display().to_string(),
        url = up.url(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Pushes `layout` to `repo:TAG` upstream with skopeo (every platform, digests preserved).
fn seed(sb: &Sandbox, up: &Distribution, repo: &str, layout: &Layout) {
    let dir = tempfile::tempdir().expect("tempdir");
    layout.write(dir.path());
    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{TAG}", dir.path().display()))
        .arg(format!("docker://127.0.0.1:{}/{repo}:{TAG}", up.port))
        .run();
}

/// `transship prefetch ARGS --config CONFIG`: exit code, stdout, stderr.
fn prefetch(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("prefetch")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run transship prefetch");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn prefetch_ok(config: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = prefetch(config, args);
    assert_eq!(code, 0, "prefetch {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// The requests for `/v2/<repo>/…` in the upstream's access log, as "METHOD /path".
fn requests_for(up: &Distribution, repo: &str) -> Vec<String> {
    let prefix = format!("/v2/{repo}/");
    up.requests()
        .into_iter()
        .filter(|r| r.split(' ').nth(1).is_some_and(|p| p.starts_with(&prefix)))
        .collect()
}

/// How many GETs of `/v2/<repo>/<path>` reached the upstream.
fn gets(up: &Distribution, repo: &str, path: &str) -> usize {
    let want = format!("GET /v2/{repo}/{path}");
    requests_for(up, repo)
        .iter()
        .filter(|r| **r == want)
        .count()
}

/// Polls `check` every 100 ms until it holds; panics with `what` after a minute.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pulls `reference` (a path on transship) with skopeo into a new OCI layout; `extra` flags.
fn pull(sb: &Sandbox, server: &BinaryServer, reference: &str, extra: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .args(extra)
        .arg(format!("docker://{}/{reference}", server.addr))
        .arg(format!("oci:{}:{TAG}", out.path().display()))
        .run();
    out
}

/// The pulled layout holds exactly `image` of `layout`: its manifest under `TAG`, its config
/// and layers byte-exact, nothing else.
fn assert_pulled_image(pulled: &Path, layout: &Layout, image: &Image) {
    assert_eq!(oci_dir_ref(pulled, TAG)["digest"], image.digest.as_str());
    let got = oci_dir_blobs(pulled);
    let mut want: Vec<&String> = image.layer_digests.iter().collect();
    want.push(&image.config_digest);
    want.push(&image.digest);
    want.sort();
    assert_eq!(got.keys().collect::<Vec<_>>(), want, "pulled digests");
    for (digest, bytes) in &got {
        let expected = layout
            .blobs
            .get(digest)
            .or_else(|| layout.manifests.get(digest))
            .unwrap_or_else(|| panic!("{digest} is not in the image"));
        assert_bytes(digest, bytes, expected);
    }
}

#[test]
fn prefetch_online_and_offline_then_serve_without_the_upstream() {
    if !have() {
        return;
    }
    let mut up = Distribution::start();
    let sb = Sandbox::insecure(&[format!("127.0.0.1:{}", up.port)], EGRESS);
    let alpha = Layout::single(11, &OCI, &LAYERS);
    let multi = Layout::multi_arch(21, &OCI, &LAYERS);
    let charlie = Layout::single(71, &OCI, &LAYERS);
    seed(&sb, &up, "library/alpha", &alpha);
    seed(&sb, &up, "library/multi", &multi);
    seed(&sb, &up, "org/charlie", &charlie);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &up, "");
    let log = dir.path().join("transship.log");

    // With the server running: through its admin socket (the store is locked by the server,
    // so nothing else could have done it). One by tag with a full name, one index by short
    // name with one platform.
    let server = BinaryServer::start(&config, &log);
    let stdout = prefetch_ok(
        &config,
        &[
            "docker.io/library/alpha:v1",
            "multi:v1",
            "--platform",
            "linux/arm64",
            "--pin",
        ],
    );
    assert!(
        stdout.contains("prefetched 2 images: 6 blobs"),
        "summary: {stdout}"
    );
    // --pin: both are pinned by their tags, so eviction keeps them.
    let pins = std::process::Command::new(binary())
        .args(["cache", "pins", "--config"])
        .arg(&config)
        .output()
        .expect("cache pins");
    let pins = String::from_utf8_lossy(&pins.stdout);
    for pinned in ["docker.io/library/alpha:v1", "docker.io/library/multi:v1"] {
        assert!(pins.contains(pinned), "{pinned} not pinned: {pins}");
    }
    for d in alpha.blobs.keys() {
        assert_eq!(gets(&up, "library/alpha", &format!("blobs/{d}")), 1);
    }
    let (amd64, arm64) = (&multi.images[0], &multi.images[1]);
    for d in arm64.layer_digests.iter().chain([&arm64.config_digest]) {
        assert_eq!(
            gets(&up, "library/multi", &format!("blobs/{d}")),
            1,
            "arm64 blob {d}"
        );
    }
    for d in amd64.layer_digests.iter().chain([&amd64.config_digest]) {
        assert_eq!(
            gets(&up, "library/multi", &format!("blobs/{d}")),
            0,
            "amd64 blob {d} was fetched though only linux/arm64 was asked for"
        );
    }
    assert_eq!(
        gets(&up, "library/multi", &format!("manifests/{}", amd64.digest)),
        0,
        "the amd64 manifest was fetched"
    );
    // A platform the index does not have, an upstream that is not configured, an image the
    // upstream does not have: each named, non-zero exit.
    let (code, _, stderr) = prefetch(&config, &["multi:v1", "--platform", "linux/s390x"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("multi:v1")
            && stderr.contains("linux/s390x")
            && stderr.contains("linux/arm64"),
        "{stderr}"
    );
    assert_eq!(server.terminate().code(), Some(0));

    // With the server stopped: on the store directly, from a list file, by digest on the
    // second upstream; an image cached already fetches nothing.
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        format!(
            "# site A\nghcr.io/org/charlie@{}\ndocker.io/library/alpha:v1\n",
            charlie.top.1
        ),
    )
    .unwrap();
    let before = requests_for(&up, "library/alpha").len();
    let stdout = prefetch_ok(&config, &["--file", list.to_str().unwrap()]);
    assert!(
        stdout.contains("prefetched 2 images: 6 blobs"),
        "summary: {stdout}"
    );
    assert_eq!(
        requests_for(&up, "library/alpha").len(),
        before,
        "a cached, fresh image was asked for again"
    );
    for d in charlie.blobs.keys() {
        assert_eq!(
            gets(&up, "org/charlie", &format!("blobs/{d}")),
            1,
            "{:#?}",
            requests_for(&up, "org/charlie")
        );
    }
    let (code, stdout, stderr) = prefetch(
        &config,
        &[
            "quay.io/org/x:1",
            "library/nope:v1",
            "docker.io/library/alpha:v1",
        ],
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("no upstream named \"quay.io\" is configured"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 image(s) failed: quay.io/org/x:1, library/nope:v1"),
        "{stderr}"
    );
    assert!(stdout.contains("prefetched 1 images"), "{stdout}");

    // Serving what was prefetched: the upstream sees no request at all.
    let server = BinaryServer::start(&config, &log);
    let seen = [
        requests_for(&up, "library/alpha").len(),
        requests_for(&up, "library/multi").len(),
        requests_for(&up, "org/charlie").len(),
    ];
    let got = pull(&sb, &server, &format!("library/alpha:{TAG}"), &[]);
    assert_same_layout(got.path(), &alpha);
    let got = pull(
        &sb,
        &server,
        &format!("library/multi:{TAG}"),
        &["--override-arch", "arm64", "--override-os", "linux"],
    );
    assert_pulled_image(got.path(), &multi, arm64);
    assert_eq!(
        [
            requests_for(&up, "library/alpha").len(),
            requests_for(&up, "library/multi").len(),
            requests_for(&up, "org/charlie").len(),
        ],
        seen,
        "pulls of prefetched images reached the upstream"
    );
    // And with the upstream gone.
    up.stop();
    let got = pull(
        &sb,
        &server,
        &format!("ghcr.io/org/charlie@{}", charlie.top.1),
        &[],
    );
    assert_pulled_image(got.path(), &charlie, &charlie.images[0]);
    let got = pull(&sb, &server, &format!("library/alpha:{TAG}"), &[]);
    assert_same_layout(got.path(), &alpha);
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn a_warm_list_keeps_a_moved_tag_current_and_checks_an_unmoved_one_with_head_only() {
    if !have() {
        return;
    }
    let mut up = Distribution::start();
    let sb = Sandbox::insecure(&[format!("127.0.0.1:{}", up.port)], EGRESS);
    let first = Layout::single(41, &OCI, &LAYERS);
    let second = Layout::single(51, &OCI, &LAYERS);
    seed(&sb, &up, "library/warm", &first);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &up,
        "[[warm]]\nimages = [\"warm:v1\"]\ninterval = \"1s\"\n",
    );
    let log = dir.path().join("transship.log");
    let server = BinaryServer::start(&config, &log);
    let h = Http::new(&server.url(""));
    let fetched = |layout: &Layout| {
        layout
            .blobs
            .keys()
            .all(|d| gets(&up, "library/warm", &format!("blobs/{d}")) == 1)
    };
    // The first pass fills the cache on its own: no client asked.
    eventually("the warm list fetched the image", || fetched(&first));
    let manifest = |h: &Http| {
        h.send(
            "GET",
            &format!("/v2/library/warm/manifests/{TAG}"),
            &[("accept", ACCEPT_ALL)],
            Vec::new(),
        )
    };
    let r = manifest(&h);
    assert_eq!(r.header("x-cache"), Some("HIT"));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(first.top.1.as_str())
    );

    // Nothing moved: later passes ask with HEAD only (though the tag is fresh for an hour).
    let before = requests_for(&up, "library/warm").len();
    let head = format!("HEAD /v2/library/warm/manifests/{TAG}");
    eventually("two more warm checks", || {
        requests_for(&up, "library/warm")[before..]
            .iter()
            .filter(|r| **r == head)
            .count()
            >= 2
    });
    let since = requests_for(&up, "library/warm").split_off(before);
    assert!(
        since.iter().all(|r| *r == head),
        "unmoved tag checks: {since:#?}"
    );

    // The tag moves upstream: transship follows within an interval, blobs included.
    seed(&sb, &up, "library/warm", &second);
    eventually("the moved tag is current at transship", || {
        manifest(&h).header("docker-content-digest") == Some(second.top.1.as_str())
    });
    eventually("the moved tag's blobs are fetched", || fetched(&second));
    for (d, bytes) in &second.blobs {
        let r = h.get(&format!("/v2/library/warm/blobs/{d}"));
        assert_eq!(r.header("x-cache"), Some("HIT"), "{d}");
        assert_bytes(d, &r.body, bytes);
    }

    // The upstream goes away: the failure is logged and retried, and serving goes on.
    up.stop();
    let logged = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    eventually("a failed warm check is logged", || {
        logged("warm list: cannot refresh") && logged("warm list: retrying failed images")
    });
    let r = manifest(&h);
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (200, Some(second.top.1.as_str()))
    );
    assert_eq!(server.terminate().code(), Some(0));
    // Shutdown did not have to wait out `server.shutdown_timeout` for the warm loop.
    assert!(
        logged("background jobs stopped"),
        "the warm loop held up shutdown"
    );
}

/// Layers big enough that a fill takes a while, so a prefetch and a pull overlap.
const BIG: LayerRecipe = LayerRecipe {
    app_bin: 24_000_000,
    data_bin: 20_001,
    readme: "prefetch e2e big image",
};

#[test]
fn a_prefetch_and_a_client_pull_at_once_fetch_each_blob_once() {
    if !have() {
        return;
    }
    let up = Distribution::start();
    let sb = Sandbox::insecure(&[format!("127.0.0.1:{}", up.port)], EGRESS);
    let big = Layout::single(81, &OCI, &BIG);
    seed(&sb, &up, "library/big", &big);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &up, "");
    let server = BinaryServer::start(&config, &dir.path().join("transship.log"));
    let prefetcher = std::thread::spawn(move || prefetch_ok(&config, &["big:v1"]));
    let got = pull(&sb, &server, &format!("library/big:{TAG}"), &[]);
    let stdout = prefetcher.join().expect("prefetch thread");
    assert!(stdout.contains("prefetched 1 images: 3 blobs"), "{stdout}");
    assert_same_layout(got.path(), &big);
    for d in big.blobs.keys() {
        assert_eq!(gets(&up, "library/big", &format!("blobs/{d}")), 1, "{d}");
    }
    assert_eq!(
        gets(&up, "library/big", &format!("manifests/{}", big.top.1)),
        1
    );
}
