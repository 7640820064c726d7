//! Air-gap bundles end to end, with the real binary: instance A (online, its upstream a real
//! distribution registry seeded by the test) fills its cache through skopeo pulls and takes a
//! project push; `transship export` writes bundles (through A's admin socket); instance B
//! (offline, upstream unreachable) imports them and real clients (skopeo, ctr) pull every
//! exported tag and digest through B byte for byte, while what was not exported answers 404.
//! Other tools read the bundle (`skopeo inspect/copy oci-archive:`). Deltas carry only what
//! changed and are refused where their predecessors are missing; a bundle with one flipped
//! byte is refused whole; `kill -9` during an import leaves nothing servable and a second
//! import completes it; re-importing changes nothing; fsck stays clean.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::images::*;
use common::upstream::{self, Distribution};
use common::*;

const SUITE: &str = "air-gap";
const EGRESS: Egress = Egress::LoopbackOnly;
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 1_100_000,
    data_bin: 40_003,
    readme: "air-gap image",
};

fn have(programs: &[&str]) -> bool {
    upstream::available() && programs_installed(SUITE, programs)
}

/// A config file for an instance in `dir`: docker.io served by `upstream`, or (offline) by
/// nothing at all.
fn write_config(dir: &Path, upstream: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (url, offline) = match upstream {
        Some(u) => (u.to_string(), false),
        None => ("http://127.0.0.1:9".to_string(), true),
    };
    let path = dir.join("transship.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = {:?}\nlisten = \"127.0.0.1:0\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{url}\"\ndefault = true\ntag_ttl = \"1h\"\noffline = {offline}\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

fn data_dir(config: &Path) -> PathBuf {
    config.parent().unwrap().join("data")
}

fn start(config: &Path) -> BinaryServer {
    BinaryServer::start(config, &config.parent().unwrap().join("server.log"))
}

/// `transship ARGS --config CONFIG`.
fn transship(config: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run transship")
}

fn succeeds(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "transship failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "transship succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Pushes `layout` with plain registry API calls: blobs, each image manifest by digest, then
/// the top under `TAG`.
fn push(base: &str, repo: &str, layout: &Layout) {
    let h = Http::new(base);
    for (digest, bytes) in &layout.blobs {
        assert_eq!(&h.push_blob(repo, bytes), digest, "pushing {repo}");
    }
    for image in &layout.images {
        let r = h.push_manifest(repo, &image.digest, layout.format.manifest, &image.manifest);
        assert_eq!(r.status, 201, "pushing {repo}@{}: {r:?}", image.digest);
    }
    let r = h.push_manifest(repo, TAG, layout.top.0, &layout.top.2);
    assert_eq!(r.status, 201, "pushing {repo}:{TAG}: {r:?}");
}

/// `skopeo copy` of `docker://ADDR/REMOTE` into a fresh OCI layout named `TAG`; returns its dir.
fn skopeo_pull(sb: &Sandbox, addr: &str, remote: &str, name: &str) -> PathBuf {
    let out = sb.path(name);
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(format!("docker://{addr}/{remote}"))
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    out
}

/// Everything one platform image is made of: its manifest, config and layers.
fn image_content(layout: &Layout, i: usize) -> BTreeMap<String, Vec<u8>> {
    let image = &layout.images[i];
    let mut out = BTreeMap::new();
    out.insert(image.digest.clone(), image.manifest.clone());
    for d in std::iter::once(&image.config_digest).chain(&image.layer_digests) {
        out.insert(d.clone(), layout.blobs[d].clone());
    }
    out
}

/// A pulled OCI layout holds exactly platform image `i` of `layout`, byte for byte.
fn assert_pulled_image(pulled: &Path, layout: &Layout, i: usize) {
    assert_eq!(
        oci_dir_ref(pulled, TAG)["digest"],
        layout.images[i].digest.as_str()
    );
    let got = oci_dir_blobs(pulled);
    let expected = image_content(layout, i);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (d, bytes) in &expected {
        assert_bytes(d, &got[d], bytes);
    }
}

/// The `index.json` of a plain-tar bundle.
fn bundle_index(bundle: &Path) -> serde_json::Value {
    let mut a = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("index.json") {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            return serde_json::from_slice(&v).unwrap();
        }
    }
    panic!("no index.json in {}", bundle.display());
}

/// Files in a directory of the data dir (recursively), by path.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn assert_fsck_clean(config: &Path) {
    let out = succeeds(transship(config, &["fsck"]));
    assert!(out.contains(" 0 problems"), "{out}");
}

#[test]
fn bundles_carry_a_cache_across_the_gap() {
    if !have(&["skopeo"]) {
        return;
    }
    let up = Distribution::start();
    let one = Layout::single(101, &OCI, &LAYERS);
    let multi = Layout::multi_arch(111, &OCI, &LAYERS);
    let app = Layout::single(121, &OCI, &LAYERS);
    let two = Layout::single(131, &OCI, &LAYERS);
    push(&up.url(), "library/one", &one);
    push(&up.url(), "library/multi", &multi);
    push(&up.url(), "library/two", &two);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // A fills its cache the way clients do: one image, and the amd64 half of an index.
    let cfg_a = write_config(&w.join("a"), Some(&up.url()));
    let a = start(&cfg_a);
    let a_addr = a.addr.to_string();
    let sb_a = Sandbox::insecure(std::slice::from_ref(&a_addr), EGRESS);
    skopeo_pull(&sb_a, &a_addr, &format!("library/one:{TAG}"), "a-one");
    let pulled = skopeo_pull(&sb_a, &a_addr, &format!("library/multi:{TAG}"), "a-multi");
    assert_pulled_image(&pulled, &multi, 0);
    push(&a.url(""), "local/app", &app);

    // Export through A's admin socket: every tag, one digest, as .tar and as .tar.zst.
    let one_digest = &one.images[0].digest;
    let by_digest = format!("docker.io/library/one@{one_digest}");
    let refs = [
        format!("docker.io/library/one:{TAG}"),
        format!("multi:{TAG}"),
        format!("local/app:{TAG}"),
        by_digest.clone(),
    ];
    let full = w.join("full.tar");
    let full_zst = w.join("full.tar.zst");
    for out in [&full, &full_zst] {
        let mut args = vec!["export", "--out", out.to_str().unwrap()];
        args.extend(refs.iter().map(String::as_str));
        let report = succeeds(transship(&cfg_a, &args));
        assert!(report.contains("exported 4 references"), "{report}");
    }
    assert!(w.join("full.tar.state.json").is_file());
    let names: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("partial")),
        "temporary files left: {names:?}"
    );
    // index.json names each reference in full, with when the tag was resolved.
    let index = bundle_index(&full);
    let entries = index["manifests"].as_array().unwrap();
    let named: Vec<&str> = entries
        .iter()
        .map(|e| {
            e["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        named,
        [
            "docker.io/library/one:v1",
            "docker.io/library/multi:v1",
            "local/app:v1",
            by_digest.as_str()
        ]
    );
    let resolved: u64 = entries[0]["annotations"]["io.transship.resolved"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        entries[2]["annotations"]
            .get("io.transship.resolved")
            .is_none()
    );

    // Other tools read the bundle.
    let archive = |r: &str| format!("oci-archive:{}:{r}", full.display());
    let raw = sb_a
        .skopeo()
        .args(["inspect", "--raw"])
        .arg(archive("docker.io/library/multi:v1"))
        .run();
    assert_bytes("inspect --raw of the index", raw.as_bytes(), &multi.top.2);
    let inspected = sb_a
        .skopeo()
        .arg("inspect")
        .arg(archive("docker.io/library/one:v1"))
        .run();
    assert!(inspected.contains(one_digest.as_str()), "{inspected}");
    let copied = sb_a.path("copied");
    sb_a.skopeo()
        .args(["copy", "--preserve-digests"])
        .arg(archive("local/app:v1"))
        .arg(format!("oci:{}:{TAG}", copied.display()))
        .run();
    assert_same_layout(&copied, &app);

    // B is offline: it has only what it imports (the zstd bundle, stopped-server path
    // elsewhere; here through B's admin socket).
    let cfg_b = write_config(&w.join("b"), None);
    let b = start(&cfg_b);
    let b_addr = b.addr.to_string();
    let hb = Http::new(&b.url(""));
    assert_eq!(
        hb.get(&format!("/v2/library/one/manifests/{TAG}")).status,
        404
    );
    let report = succeeds(transship(&cfg_b, &["import", full_zst.to_str().unwrap()]));
    assert!(report.contains("imported 4 references"), "{report}");
    // Imported cache images are pinned: eviction keeps what was carried across.
    let pins = succeeds(transship(&cfg_b, &["cache", "pins"]));
    assert!(
        pins.contains(&format!("docker.io/library/one:{TAG}")),
        "imported tag not pinned: {pins}"
    );
    // What is pinned travels on: `export --pinned` carries the imported cache images.
    let onward = work.path().join("onward.tar");
    let report = succeeds(transship(
        &cfg_b,
        &["export", "--out", onward.to_str().unwrap(), "--pinned"],
    ));
    assert!(report.contains("exported"), "{report}");
    let inspected = Tool::new("skopeo", EGRESS)
        .args(["inspect", "--raw"])
        .arg(format!(
            "oci-archive:{}:docker.io/library/one:{TAG}",
            onward.display()
        ))
        .run();
    assert!(inspected.contains("schemaVersion"), "{inspected}");

    let sb_b = Sandbox::insecure(std::slice::from_ref(&b_addr), EGRESS);
    let got = skopeo_pull(&sb_b, &b_addr, &format!("library/one:{TAG}"), "b-one");
    assert_same_layout(&got, &one);
    let got = skopeo_pull(
        &sb_b,
        &b_addr,
        &format!("library/one@{one_digest}"),
        "b-one-d",
    );
    assert_same_layout(&got, &one);
    let got = skopeo_pull(&sb_b, &b_addr, &format!("library/multi:{TAG}"), "b-multi");
    assert_pulled_image(&got, &multi, 0);
    let amd64 = &multi.images[0].digest;
    let got = skopeo_pull(
        &sb_b,
        &b_addr,
        &format!("library/multi@{amd64}"),
        "b-multi-d",
    );
    assert_pulled_image(&got, &multi, 0);
    let got = skopeo_pull(&sb_b, &b_addr, &format!("local/app:{TAG}"), "b-app");
    assert_same_layout(&got, &app);
    let raw = sb_b
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{b_addr}/library/multi:{TAG}"))
        .run();
    assert_bytes("the index through B", raw.as_bytes(), &multi.top.2);

    // The platform that was never pulled, and anything else B does not hold: a clean 404.
    let arm64 = &multi.images[1];
    let r = hb.get(&format!("/v2/library/multi/manifests/{}", arm64.digest));
    assert_eq!((r.status, r.error_code()), (404, "MANIFEST_UNKNOWN".into()));
    let r = hb.get(&format!("/v2/library/multi/blobs/{}", arm64.config_digest));
    assert_eq!(r.status, 404);
    let r = hb.get(&format!("/v2/library/two/manifests/{TAG}"));
    assert_eq!(r.status, 404);

    // ctr pulls the index (its own platform) and an image by digest through B.
    if containerd_usable(SUITE) {
        let daemon = Containerd::start(EGRESS);
        let hosts = daemon.hosts_dir("docker.io", &b_addr);
        let reference = format!("docker.io/library/multi:{TAG}");
        daemon.pull(&hosts, &reference, false);
        assert_eq!(daemon.image_digest(&reference), multi.top.1);
        let mut expected = image_content(&multi, 0);
        expected.insert(multi.top.1.clone(), multi.top.2.clone());
        daemon.assert_content(&expected);
        daemon.forget(&reference);
        let reference = format!("docker.io/library/one@{one_digest}");
        daemon.pull(&hosts, &reference, false);
        daemon.assert_content(&one.all());
    }

    // Importing the same content again (the plain tar this time) changes nothing.
    let again = succeeds(transship(&cfg_b, &["import", full.to_str().unwrap()]));
    assert!(
        again.contains("0 new blobs (0 bytes)") && again.contains("0 manifests and 0 tags written"),
        "{again}"
    );

    // An image the cache holds only the manifest of cannot be exported, nor a platform that
    // was never pulled; neither leaves a file behind.
    sb_a.skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{a_addr}/library/two:{TAG}"))
        .run();
    let refused = w.join("refused.tar");
    let err = fails(transship(
        &cfg_a,
        &["export", "--out", refused.to_str().unwrap(), "two:v1"],
    ));
    assert!(
        err.contains("cannot be exported") && err.contains(&two.images[0].layer_digests[0]),
        "{err}"
    );
    let err = fails(transship(
        &cfg_a,
        &[
            "export",
            "--out",
            refused.to_str().unwrap(),
            &format!("multi@{}", multi.images[1].digest),
        ],
    ));
    assert!(err.contains("is not in the store"), "{err}");
    let err = fails(transship(
        &cfg_a,
        &[
            "export",
            "--out",
            refused.to_str().unwrap(),
            "--platform",
            "linux/arm64",
            "multi:v1",
        ],
    ));
    assert!(err.contains("ask for platforms it has"), "{err}");
    let left: Vec<String> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("refused"))
        .collect();
    assert_eq!(left, Vec::<String>::new());

    // A delta: A caches one more image; the export since the full one carries only it.
    skopeo_pull(&sb_a, &a_addr, &format!("library/two:{TAG}"), "a-two");
    let delta = w.join("delta.tar");
    succeeds(transship(
        &cfg_a,
        &[
            "export",
            "--out",
            delta.to_str().unwrap(),
            "--all",
            "--since",
            w.join("full.tar.state.json").to_str().unwrap(),
        ],
    ));
    let own: usize = two.all().values().map(Vec::len).sum();
    let size = std::fs::metadata(&delta).unwrap().len() as usize;
    assert!(
        size >= own && size <= own + 12 * 1024,
        "delta is {size} bytes for an image of {own}"
    );
    let report = succeeds(transship(&cfg_b, &["import", delta.to_str().unwrap()]));
    assert!(
        report.contains("imported 4 references: 3 new blobs"),
        "{report}"
    );
    let got = skopeo_pull(&sb_b, &b_addr, &format!("library/two:{TAG}"), "b-two");
    assert_same_layout(&got, &two);
    drop(a);

    // C, empty and stopped: the delta is refused, naming what it lacks; a bundle with one
    // flipped byte is refused whole. Nothing of either is stored.
    let cfg_c = write_config(&w.join("c"), None);
    let err = fails(transship(&cfg_c, &["import", delta.to_str().unwrap()]));
    for d in one.blobs.keys() {
        assert!(err.contains(d.as_str()), "{d} not named: {err}");
    }
    let mut bytes = std::fs::read(&full).unwrap();
    let layer = &one.blobs[&one.images[0].layer_digests[0]];
    // The middle of the layer is its own random bytes, found nowhere else.
    let middle = &layer[layer.len() / 2..layer.len() / 2 + 64];
    let at = bytes
        .windows(64)
        .position(|w| w == middle)
        .expect("the layer is in the bundle");
    bytes[at] ^= 0x01;
    let flipped = w.join("flipped.tar");
    std::fs::write(&flipped, &bytes).unwrap();
    let err = fails(transship(&cfg_c, &["import", flipped.to_str().unwrap()]));
    assert!(
        err.contains(&one.images[0].layer_digests[0]) && err.contains("damaged"),
        "{err}"
    );
    let dc = data_dir(&cfg_c);
    assert_eq!(files_under(&dc.join("blobs")), Vec::<PathBuf>::new());
    assert_eq!(files_under(&dc.join("ingest")), Vec::<PathBuf>::new());
    let c = start(&cfg_c);
    let hc = Http::new(&c.url(""));
    for r in [
        format!("/v2/library/one/manifests/{TAG}"),
        format!("/v2/library/one/blobs/{}", one.images[0].layer_digests[1]),
        format!("/v2/local/app/manifests/{TAG}"),
    ] {
        assert_eq!(hc.get(&r).status, 404, "{r}");
    }
    c.terminate();
    // In order, C takes both (stopped-store path).
    succeeds(transship(&cfg_c, &["import", full.to_str().unwrap()]));
    succeeds(transship(&cfg_c, &["import", delta.to_str().unwrap()]));
    assert_fsck_clean(&cfg_c);

    // D's upstream is configured but unreachable: imported tags are served as long as they
    // are fresh or within stale_if_error, digests always.
    let cfg_d = write_config(&w.join("d"), Some("http://127.0.0.1:9"));
    let report = succeeds(transship(&cfg_d, &["import", full.to_str().unwrap()]));
    assert!(!report.contains("note:"), "{report}");
    let d = start(&cfg_d);
    let hd = Http::new(&d.url(""));
    let r = hd.get(&format!("/v2/library/one/manifests/{TAG}"));
    assert_eq!(r.status, 200);
    assert_bytes("one through D", &r.body, &one.top.2);
    drop(d);
    // A bundle whose tags were resolved long ago: E is told they need an upstream that
    // answers, or offline = true.
    let mut aged_bytes = std::fs::read(&full).unwrap();
    let pattern = format!("\"io.transship.resolved\":\"{resolved}\"");
    let mut replaced = 0;
    while let Some(at) = aged_bytes
        .windows(pattern.len())
        .position(|w| w == pattern.as_bytes())
    {
        let with = b"\"io.transship.resolved\":\"1000000000\"";
        assert_eq!(with.len(), pattern.len());
        aged_bytes[at..at + with.len()].copy_from_slice(with);
        replaced += 1;
    }
    assert!(replaced > 0);
    let aged = w.join("aged.tar");
    std::fs::write(&aged, &aged_bytes).unwrap();
    let cfg_e = write_config(&w.join("e"), Some("http://127.0.0.1:9"));
    let report = succeeds(transship(&cfg_e, &["import", aged.to_str().unwrap()]));
    assert!(
        report.contains("served only while it answers")
            && report.contains("docker.io/library/one:v1"),
        "{report}"
    );

    // B kept each tag with the time A resolved it.
    assert!(b.terminate().success());
    assert_fsck_clean(&cfg_b);
    let store =
        transship::store::Store::open(&data_dir(&cfg_b), Default::default()).expect("open B");
    let (digest, checked) = store
        .cached_tag(
            &"docker.io/library/one".parse().unwrap(),
            &TAG.parse().unwrap(),
        )
        .unwrap()
        .expect("tag imported");
    assert_eq!(
        (digest.to_string(), checked),
        (one_digest.clone(), resolved)
    );
}

#[test]
fn kill_9_during_an_import_leaves_nothing_servable_and_a_second_import_completes() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let app = Layout::multi_arch(141, &OCI, &LAYERS);

    // A bundle of a project image.
    let cfg_x = write_config(&w.join("x"), None);
    let x = start(&cfg_x);
    push(&x.url(""), "local/app", &app);
    let bundle = w.join("app.tar");
    succeeds(transship(
        &cfg_x,
        &["export", "--out", bundle.to_str().unwrap(), "local/app:v1"],
    ));
    drop(x);
    let bytes = std::fs::read(&bundle).unwrap();

    // The running server imports from a pipe that delivers half the bundle; then it dies.
    let cfg_y = write_config(&w.join("y"), None);
    let y = start(&cfg_y);
    let other = Layout::single(151, &OCI, &LAYERS);
    push(&y.url(""), "local/other", &other);
    let h = Http::new(&y.url(""));
    let assert_serves_other = |h: &Http| {
        let r = h.get(&format!("/v2/local/other/manifests/{TAG}"));
        assert_eq!(r.status, 200);
        assert_bytes("other", &r.body, &other.top.2);
        for (d, b) in &other.blobs {
            assert_bytes(d, &h.get(&format!("/v2/local/other/blobs/{d}")).body, b);
        }
    };
    let fifo = w.join("pipe.tar");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut cli = Command::new(binary())
        .args(["import", fifo.to_str().unwrap(), "--config"])
        .arg(&cfg_y)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        std::io::Write::write_all(&mut pipe, &bytes[..bytes.len() / 2]).unwrap();
        // The import waits for the rest; the server goes on serving meanwhile.
        assert_serves_other(&h);
        assert_eq!(h.get("/healthz").status, 200);
        y.kill9();
    }
    assert!(!cli.wait().unwrap().success());
    let ingest = files_under(&data_dir(&cfg_y).join("ingest"));
    assert!(
        ingest
            .iter()
            .any(|p| p.to_string_lossy().contains("import-")),
        "the import was not under way: {ingest:?}"
    );

    // Restarted: nothing of the image is served.
    let y = start(&cfg_y);
    let h = Http::new(&y.url(""));
    assert_serves_other(&h);
    assert_eq!(h.get(&format!("/v2/local/app/manifests/{TAG}")).status, 404);
    for image in &app.images {
        let r = h.get(&format!("/v2/local/app/manifests/{}", image.digest));
        assert_eq!(r.status, 404);
    }
    for d in app.blobs.keys() {
        assert_eq!(h.get(&format!("/v2/local/app/blobs/{d}")).status, 404);
    }

    // Importing again completes it; then everything is served byte for byte.
    succeeds(transship(&cfg_y, &["import", bundle.to_str().unwrap()]));
    let r = h.get(&format!("/v2/local/app/manifests/{TAG}"));
    assert_eq!(r.status, 200);
    assert_bytes("index", &r.body, &app.top.2);
    for (d, b) in app.all() {
        let path = if app.manifests.contains_key(&d) {
            format!("/v2/local/app/manifests/{d}")
        } else {
            format!("/v2/local/app/blobs/{d}")
        };
        let r = h.get(&path);
        assert_eq!(r.status, 200, "{path}");
        assert_bytes(&d, &r.body, &b);
    }
    assert!(y.terminate().success());
    assert_fsck_clean(&cfg_y);
}
