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

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::{self, Distribution};
use common::*;
use serde_json::{Value, json};
use transship::config::HumanDuration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
/// The tag every fixture is seeded under (and the name its OCI layout gives it).
const TAG: &str = "v1";
/// The second upstream's name (the first is the default, `docker.io`).
const SECOND: &str = "ghcr.io";

// ---------------------------------------------------------------------------------------------
// Running clients

/// Whether `program` is an executable on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Reports a test that cannot run: a failure under CI (which installs every client), else a
/// loud SKIP. Returns false so callers can `if !... { return; }`.
fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so every mirror client test must run");
    }
    eprintln!("SKIP: {why}");
    false
}

/// True when the upstream and every program are installed; otherwise reports a skip.
fn have(programs: &[&str]) -> bool {
    if !upstream::available() {
        return false;
    }
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    missing.is_empty()
        || skip(&format!(
            "not installed: {} (scripts/test installs it)",
            missing.join(", ")
        ))
}

/// containerd needs root (its snapshotter mounts and chowns).
fn have_containerd() -> bool {
    if !have(&["containerd", "ctr"]) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip("containerd needs root")
}

/// A client command line: captures stdout and stderr and panics with both when it fails.
struct Tool {
    cmd: Command,
    line: String,
}

impl Tool {
    fn new(program: impl AsRef<OsStr>) -> Self {
        let mut cmd = Command::new(program.as_ref());
        cmd.stdin(Stdio::null())
            // Loopback goes direct; anything else goes to a proxy on a closed loopback port
            // and fails at once: no client can fall back to a public registry.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env("https_proxy", "http://127.0.0.1:9");
        Self {
            cmd,
            line: program.as_ref().to_string_lossy().into_owned(),
        }
    }

    fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.line.push(' ');
        self.line.push_str(&arg.as_ref().to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    fn args<S: AsRef<OsStr>>(self, args: impl IntoIterator<Item = S>) -> Self {
        args.into_iter().fold(self, |tool, a| tool.arg(a))
    }

    fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Runs to completion; returns (stdout, stderr). Panics with both unless it succeeds.
    fn output(mut self) -> (Vec<u8>, String) {
        let out = self
            .cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", self.line));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "`{}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            self.line,
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
        (out.stdout, stderr)
    }

    fn run_bytes(self) -> Vec<u8> {
        self.output().0
    }

    fn run(self) -> String {
        String::from_utf8_lossy(&self.run_bytes()).into_owned()
    }

    /// Runs to completion; returns stderr. Panics unless it fails.
    fn fails(mut self) -> String {
        let out = self
            .cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", self.line));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`{}` succeeded but should have failed\n--- stderr ---\n{stderr}",
            self.line
        );
        stderr
    }

    /// Runs and returns what it logged on stderr (clients' debug logs name every request).
    fn run_log(self) -> String {
        self.output().1
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture images: real tar layers, gzip-wrapped, with correct diff_ids; OCI or Docker schema2

/// A ustar archive of regular files (mode 0644, owner root, mtime 0).
fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let digits = format!("{value:0width$o}", width = field.len() - 1);
        field[..digits.len()].copy_from_slice(digits.as_bytes());
    }
    let mut out = Vec::new();
    for (name, data) in files {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A valid gzip stream of `data` in stored (uncompressed) deflate blocks.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let len = chunk.len() as u16;
        out.push(u8::from(chunks.peek().is_none()));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// The media types of one manifest format.
struct Format {
    manifest: &'static str,
    index: &'static str,
    config: &'static str,
    layer: &'static str,
}

const OCI: Format = Format {
    manifest: OCI_MANIFEST,
    index: OCI_INDEX,
    config: OCI_CONFIG,
    layer: OCI_LAYER_GZIP,
};

const DOCKER: Format = Format {
    manifest: DOCKER_MANIFEST,
    index: DOCKER_LIST,
    config: DOCKER_CONFIG,
    layer: DOCKER_LAYER_GZIP,
};

/// One platform image of a fixture.
struct Image {
    manifest: Vec<u8>,
    digest: String,
    config_digest: String,
    /// Uncompressed layer tars; their digests are the config's `diff_ids`.
    layer_tars: Vec<Vec<u8>>,
    /// Digests of the gzip layer blobs, in manifest order.
    layer_digests: Vec<String>,
}

/// An image (or an index of images) in memory.
struct Layout {
    format: &'static Format,
    /// What `TAG` names: (media type, digest, bytes).
    top: (&'static str, String, Vec<u8>),
    images: Vec<Image>,
    /// Manifests (image manifests and the index) by digest.
    manifests: BTreeMap<String, Vec<u8>>,
    /// Configs and layers by digest.
    blobs: BTreeMap<String, Vec<u8>>,
}

impl Layout {
    /// A single-platform image (linux/amd64) with two layers.
    fn single(seed: u64, format: &'static Format) -> Self {
        let mut l = Self::empty(format);
        let image = l.add_image(seed, "amd64");
        l.top = (
            format.manifest,
            image.digest.clone(),
            image.manifest.clone(),
        );
        l.images.push(image);
        l
    }

    /// An index (OCI index or Docker manifest list) over linux/amd64 and linux/arm64.
    fn multi_arch(seed: u64, format: &'static Format) -> Self {
        let mut l = Self::empty(format);
        let mut entries = Vec::new();
        for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
            let image = l.add_image(seed + 10 * i as u64, arch);
            entries.push(json!({
                "mediaType": format.manifest,
                "digest": image.digest,
                "size": image.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            }));
            l.images.push(image);
        }
        let index = json!({"schemaVersion": 2, "mediaType": format.index, "manifests": entries})
            .to_string()
            .into_bytes();
        let digest = sha256(&index);
        l.manifests.insert(digest.clone(), index.clone());
        l.top = (format.index, digest, index);
        l
    }

    fn empty(format: &'static Format) -> Self {
        Self {
            format,
            top: ("", String::new(), Vec::new()),
            images: Vec::new(),
            manifests: BTreeMap::new(),
            blobs: BTreeMap::new(),
        }
    }

    fn add_blob(&mut self, bytes: Vec<u8>) -> String {
        let digest = sha256(&bytes);
        self.blobs.insert(digest.clone(), bytes);
        digest
    }

    fn add_image(&mut self, seed: u64, arch: &str) -> Image {
        // One layer of over a megabyte and one small one.
        let layer_tars = vec![
            tar(&[
                ("app.bin", &random_bytes(1_200_000 + seed as usize, seed)),
                (
                    "README",
                    format!("mirror e2e image {seed} for {arch}\n").as_bytes(),
                ),
            ]),
            tar(&[("data.bin", &random_bytes(50_001, seed + 1))]),
        ];
        let diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256(t)).collect();
        let layer_type = self.format.layer;
        let layers: Vec<Value> = layer_tars
            .iter()
            .map(|t| {
                let gz = gzip(t);
                let size = gz.len();
                json!({"mediaType": layer_type, "digest": self.add_blob(gz), "size": size})
            })
            .collect();
        let layer_digests = layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/app.bin"], "Env": [format!("E2E_SEED={seed}")]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string()
        .into_bytes();
        let config_size = config.len();
        let config_digest = self.add_blob(config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.format.manifest,
            "config": {"mediaType": self.format.config, "digest": config_digest, "size": config_size},
            "layers": layers,
        })
        .to_string()
        .into_bytes();
        let digest = sha256(&manifest);
        self.manifests.insert(digest.clone(), manifest.clone());
        Image {
            manifest,
            digest,
            config_digest,
            layer_tars,
            layer_digests,
        }
    }

    /// Writes it as an OCI image layout to `dir` (created), naming the top `TAG`.
    fn write(&self, dir: &Path) -> PathBuf {
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": self.top.0,
                "digest": self.top.1,
                "size": self.top.2.len(),
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }],
        });
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index.to_string().into_bytes()),
        ];
        for (digest, bytes) in self.manifests.iter().chain(&self.blobs) {
            files.push((
                format!("blobs/{}", digest.replacen(':', "/", 1)),
                bytes.clone(),
            ));
        }
        for (name, bytes) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        dir.to_path_buf()
    }

    /// Every digest: manifests and blobs.
    fn all(&self) -> BTreeMap<String, Vec<u8>> {
        let mut all = self.blobs.clone();
        all.extend(self.manifests.clone());
        all
    }
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
    let read = || {
        let text = std::fs::read_to_string(up.dir.path().join("registry.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                    .iter()
                    .find_map(|m| {
                        let start = line.find(&format!("\"{m} "))? + 1;
                        let len = line[start..].find(" HTTP/")?;
                        Some(line[start..start + len].to_string())
                    })
            })
            .collect::<Vec<_>>()
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
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

/// Byte equality without dumping megabytes when it fails.
fn assert_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    assert!(
        actual == expected,
        "{what}: got {} bytes ({}), expected {} bytes ({})",
        actual.len(),
        sha256(actual),
        expected.len(),
        sha256(expected)
    );
}

/// Every file under `dir/blobs` of an OCI layout, by digest (checking each hashes to its name).
fn oci_dir_blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for alg in std::fs::read_dir(dir.join("blobs")).expect("blobs/") {
        let alg = alg.unwrap();
        for f in std::fs::read_dir(alg.path()).unwrap() {
            let f = f.unwrap();
            let digest = format!(
                "{}:{}",
                alg.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
            let bytes = std::fs::read(f.path()).unwrap();
            assert_eq!(sha256(&bytes), digest, "{} is corrupt", f.path().display());
            out.insert(digest, bytes);
        }
    }
    out
}

/// An OCI layout pulled by a client holds exactly `layout`: `TAG` names the same top manifest,
/// and every manifest and blob is present and byte-identical.
fn assert_same_layout(pulled: &Path, layout: &Layout) {
    let index: Value = serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap())
        .expect("index.json is JSON");
    let desc = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == TAG)
        .unwrap_or_else(|| panic!("no {TAG:?} in {index}"));
    assert_eq!(desc["digest"], layout.top.1.as_str(), "{TAG} in index.json");
    assert_eq!(desc["mediaType"], layout.top.0);
    let got = oci_dir_blobs(pulled);
    let expected = layout.all();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "digests in the pulled layout"
    );
    for (digest, bytes) in &expected {
        assert_bytes(&format!("pulled {digest}"), &got[digest], bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Client sandboxes

/// Private configuration for skopeo and podman: the given `registries.conf` (loopback only, no
/// search registries), an accept-anything signature policy, no credentials, private storage.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new(registries_conf: &str) -> Self {
        assert!(
            registries_conf.contains("unqualified-search-registries = []"),
            "{registries_conf}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        for d in ["registries.d", "tmp", "storage", "run", "podman-tmp"] {
            std::fs::create_dir(p.join(d)).unwrap();
        }
        let files = [
            ("registries.conf", registries_conf.to_string()),
            (
                "policy.json",
                r#"{"default":[{"type":"insecureAcceptAnything"}]}"#.to_string(),
            ),
            ("auth.json", "{}".to_string()),
            (
                "storage.conf",
                format!(
                    "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                    p.join("storage").display(),
                    p.join("run").display()
                ),
            ),
            (
                "containers.conf",
                format!(
                    "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n",
                    p.join("podman-tmp/events.log").display(),
                    p.join("podman-tmp").display()
                ),
            ),
        ];
        for (name, text) in files {
            std::fs::write(p.join(name), text).unwrap();
        }
        Self { dir }
    }

    /// Only the given plain-HTTP registries, by address.
    fn insecure(registries: &[String]) -> Self {
        let mut conf = "unqualified-search-registries = []\n".to_string();
        for r in registries {
            conf.push_str(&format!(
                "\n[[registry]]\nlocation = \"{r}\"\ninsecure = true\n"
            ));
        }
        Self::new(&conf)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn with_env(&self, tool: Tool) -> Tool {
        tool.env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .env("TMPDIR", self.path("tmp"))
            .env("XDG_DATA_HOME", self.path("tmp"))
    }

    fn skopeo(&self) -> Tool {
        self.with_env(Tool::new("skopeo"))
            .arg("--policy")
            .arg(self.path("policy.json"))
            .arg("--registries.d")
            .arg(self.path("registries.d"))
    }

    fn podman(&self) -> Tool {
        self.with_env(Tool::new("podman"))
            .arg("--root")
            .arg(self.path("storage"))
            .arg("--runroot")
            .arg(self.path("run"))
            .arg("--tmpdir")
            .arg(self.path("podman-tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--events-backend",
                "file",
                "--cgroup-manager",
                "cgroupfs",
            ])
    }
}

/// A private containerd daemon (its own root, state and socket in a temp dir), stopped by PID
/// when dropped — also when the test fails. Pulls with `ctr` resolve and fetch in the `ctr`
/// process itself, configured by a hosts directory the test writes.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    #[allow(clippy::zombie_processes)] // reaped by Drop
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""
"#,
            root = p.join("root").display(),
            state = p.join("state").display(),
            sock = p.join("containerd.sock").display(),
        );
        std::fs::write(p.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(p.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(p.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut daemon = Self { child, dir };
        daemon.wait_ready();
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("containerd exited ({status}):\n{}", self.log());
            }
            let ok = self.dir.path().join("containerd.sock").exists()
                && Command::new("ctr")
                    .arg("--address")
                    .arg(self.dir.path().join("containerd.sock"))
                    .arg("version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr` against this daemon, in namespace `e2e`.
    fn ctr(&self) -> Tool {
        Tool::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["--namespace", "e2e"])
    }

    /// A hosts directory sending every pull for `registry` to the mirror at `mirror`
    /// (`host:port`): the mirror as a pull/resolve host and as the server, so there is no
    /// public fallback at all.
    fn hosts_dir(&self, registry: &str, mirror: &str) -> PathBuf {
        let dir = self.dir.path().join("hosts");
        std::fs::create_dir_all(dir.join(registry)).unwrap();
        std::fs::write(
            dir.join(registry).join("hosts.toml"),
            format!(
                "server = \"http://{mirror}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        dir
    }

    /// `ctr --debug images pull` of `reference` through `hosts`; returns the debug log, which
    /// names every URL requested.
    fn pull(&self, hosts: &Path, reference: &str, all_platforms: bool) -> String {
        let mut tool = self
            .ctr()
            .args(["--debug", "images", "pull", "--plain-http", "--hosts-dir"])
            .arg(hosts)
            .args(["--snapshotter", "native"]);
        if all_platforms {
            tool = tool.arg("--all-platforms");
        }
        tool.arg(reference).run_log()
    }

    /// Removes the image and garbage-collects everything it held.
    fn forget(&self, reference: &str) {
        self.ctr().args(["images", "rm", "--sync", reference]).run();
        assert_eq!(
            self.ctr().args(["content", "ls", "--quiet"]).run().trim(),
            "",
            "content left after removing {reference}"
        );
    }

    /// The content store holds exactly `expected`, byte for byte.
    fn assert_content(&self, expected: &BTreeMap<String, Vec<u8>>) {
        let mut content: Vec<String> = self
            .ctr()
            .args(["content", "ls", "--quiet"])
            .run()
            .lines()
            .map(str::to_string)
            .collect();
        content.sort();
        assert_eq!(content, expected.keys().cloned().collect::<Vec<_>>());
        for (digest, bytes) in expected {
            let got = self.ctr().args(["content", "get", digest]).run_bytes();
            assert_bytes(&format!("containerd content {digest}"), &got, bytes);
        }
    }

    /// The digest `ctr images ls` gives `reference`.
    fn image_digest(&self, reference: &str) -> String {
        let listed = self.ctr().args(["images", "ls"]).run();
        let row = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .unwrap_or_else(|| panic!("{reference} not in\n{listed}"));
        row.split_whitespace()
            .find(|f| f.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no digest in {row}"))
            .to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown; SIGKILL if it does not go.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let layout = Layout::single(11, &OCI);
    let image = &layout.images[0];
    seed(&up, "library/ctrimg", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start();
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
    let layout = Layout::single(81, &OCI);
    let image = &layout.images[0];
    seed(&up, "library/fresh", &layout);
    let seeded = upstream_requests(&up).len();
    // Tags are revalidated on every request.
    let s = mirror(&up, None, Duration::ZERO);
    let h = Http::for_server(&s);
    let daemon = Containerd::start();
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
    let decoy = Layout::single(21, &OCI);
    let layout = Layout::single(22, &OCI);
    let image = &layout.images[0];
    seed(&first, "org/app", &decoy);
    seed(&second, "org/app", &layout);
    let first_seeded = upstream_requests(&first).len();
    let second_seeded = upstream_requests(&second).len();
    let s = mirror(&first, Some(&second), HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start();
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
    let layout = Layout::single(31, &OCI);
    let image = &layout.images[0];
    let tool = Layout::single(32, &OCI);
    seed(&up, "library/podimg", &layout);
    seed(&second, "org/tool", &tool);
    let seeded = upstream_requests(&up).len();
    let second_seeded = upstream_requests(&second).len();
    let s = mirror(&up, Some(&second), HOUR);
    let h = Http::for_server(&s);
    // Each registry lives at transship under its name as a path prefix; nothing else is
    // known, so there is no public fallback.
    let sb = Sandbox::new(&format!(
        "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"{0}/docker.io\"\ninsecure = true\n\n[[registry]]\nprefix = \"{SECOND}\"\nlocation = \"{0}/{SECOND}\"\ninsecure = true\n",
        s.addr
    ));
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
    let layout = Layout::single(41, &OCI);
    seed(&up, "library/skoimg", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()]);
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
    let sb = Sandbox::insecure(&[s.addr.to_string(), upstream_addr.clone()]);
    let layout = Layout::multi_arch(51, &OCI);
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
    let sb = Sandbox::insecure(&[s.addr.to_string(), upstream_addr.clone()]);
    let layout = Layout::single(61, &OCI);
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
    let layout = Layout::multi_arch(71, &DOCKER);
    seed(&up, "library/dlist", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let daemon = Containerd::start();
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
    let layout = Layout::single(91, &OCI);
    seed(&up, "library/base-a", &layout);
    seed(&up, "library/base-b", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()]);
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
    let layout = Layout::multi_arch(101, &OCI);
    seed(&up, "library/rush", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()]);
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
    let layout = Layout::multi_arch(111, &OCI);
    let amd64 = &layout.images[0];
    seed(&up, "library/mirrored", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let h = Http::for_server(&s);
    // The usual production setup: docker.io keeps its own location, with transship as its
    // mirror. Here the "own location" is a closed loopback port, so a fallback past the
    // mirror would fail instead of reaching Docker Hub.
    let sb = Sandbox::new(&format!(
        "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:9\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{}/docker.io\"\ninsecure = true\n",
        s.addr
    ));
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
    let layout = Layout::multi_arch(121, &OCI);
    seed(&up, "library/herd", &layout);
    let seeded = upstream_requests(&up).len();
    let s = mirror(&up, None, HOUR);
    let sb = Sandbox::insecure(&[s.addr.to_string()]);
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
