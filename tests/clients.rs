//! End to end with real clients: skopeo (OCI, Docker schema2, multi-arch `--all`), podman,
//! containerd's `ctr` against a private containerd daemon, and oras-py (artifacts and the
//! referrers API) push to and pull from the real server, and every test checks byte for byte
//! both what the client got back and what the registry holds, then that fsck is clean.
//!
//! Images are built by hand as OCI image layouts (real tar layers, gzip-wrapped, with correct
//! `diff_ids`), so no client ever needs a public registry; every client is configured to talk
//! to 127.0.0.1 only. A missing client is a loud SKIP locally and a failure when `CI` is set.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
/// The name every fixture layout gives its image (`org.opencontainers.image.ref.name`).
const TAG: &str = "v1";

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

/// Reports a client that cannot run: a failure under CI (which installs every client), else
/// a loud SKIP. Returns false so callers can `if !... { return; }`.
fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so every client test must run");
    }
    eprintln!("SKIP: {why}");
    false
}

/// True when every program is on PATH; otherwise reports a skip.
fn have(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    missing.is_empty()
        || skip(&format!(
            "not installed: {} (scripts/test installs it)",
            missing.join(", ")
        ))
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
            // Belt and braces: nothing may go through a proxy, all traffic is to loopback.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
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

    fn dir(mut self, dir: &Path) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// Runs to completion; returns stdout. Panics (with stdout and stderr) unless it succeeds.
    fn run_bytes(mut self) -> Vec<u8> {
        let out = self
            .cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", self.line));
        assert!(
            out.status.success(),
            "`{}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.line,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `run_bytes`, as text.
    fn run(self) -> String {
        String::from_utf8_lossy(&self.run_bytes()).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture images: tar, gzip and OCI image layouts, built in memory

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

/// A valid gzip stream of `data` in stored (uncompressed) deflate blocks: deterministic and
/// dependency-free; random layer data would not compress anyway.
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

/// An OCI image layout, in memory: one image or an index of several, named `TAG`.
struct Layout {
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
    fn single(seed: u64) -> Self {
        let mut l = Self::empty();
        let image = l.add_image(seed, "amd64");
        l.top = (OCI_MANIFEST, image.digest.clone(), image.manifest.clone());
        l.images.push(image);
        l
    }

    /// An OCI index over linux/amd64 and linux/arm64 images, two layers each.
    fn multi_arch(seed: u64) -> Self {
        let mut l = Self::empty();
        let mut entries = Vec::new();
        for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
            let image = l.add_image(seed + 10 * i as u64, arch);
            entries.push(json!({
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": image.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            }));
            l.images.push(image);
        }
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
            .to_string()
            .into_bytes();
        let digest = sha256(&index);
        l.manifests.insert(digest.clone(), index.clone());
        l.top = (OCI_INDEX, digest, index);
        l
    }

    fn empty() -> Self {
        Self {
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
                ("app.bin", &random_bytes(1_300_000 + seed as usize, seed)),
                (
                    "README",
                    format!("e2e image {seed} for {arch}\n").as_bytes(),
                ),
            ]),
            tar(&[("data.bin", &random_bytes(70_001, seed + 1))]),
        ];
        let diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256(t)).collect();
        let layers: Vec<Value> = layer_tars
            .iter()
            .map(|t| {
                let gz = gzip(t);
                let size = gz.len();
                json!({"mediaType": OCI_LAYER_GZIP, "digest": self.add_blob(gz), "size": size})
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
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
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

    /// Every file of the layout (path relative to its root, contents).
    fn files(&self) -> Vec<(String, Vec<u8>)> {
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
            files.push((blob_path(digest), bytes.clone()));
        }
        files
    }

    /// Writes the layout to `dir` (created).
    fn write(&self, dir: &Path) -> PathBuf {
        for (name, bytes) in self.files() {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        dir.to_path_buf()
    }

    /// The layout as an OCI archive (a tar of its files).
    fn archive(&self) -> Vec<u8> {
        let files = self.files();
        let entries: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        tar(&entries)
    }

    /// Every digest of the layout: manifests and blobs.
    fn all(&self) -> BTreeMap<String, Vec<u8>> {
        let mut all = self.blobs.clone();
        all.extend(self.manifests.clone());
        all
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

// ---------------------------------------------------------------------------------------------
// Assertions

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

/// Every file under `dir/blobs`, by digest (checking each hashes to its name).
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

/// The descriptor `index.json` of an OCI layout gives for `name`.
fn oci_dir_ref(dir: &Path, name: &str) -> Value {
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap())
        .expect("index.json is JSON");
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {index}"))
        .clone()
}

/// An OCI layout pulled back by a client holds exactly the pushed image: `TAG` names the same
/// manifest digest, and every blob is present and byte-identical.
fn assert_same_layout(pulled: &Path, layout: &Layout) {
    let desc = oci_dir_ref(pulled, TAG);
    assert_eq!(
        desc["digest"],
        layout.top.1.as_str(),
        "{TAG} in pulled index.json"
    );
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

/// The registry serves `manifest` under `reference` byte-exact, with its type and digest.
fn assert_manifest(h: &Http, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) {
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("accept", ACCEPT_ALL)],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "GET {repo} manifest {reference}: {r:?}");
    assert_bytes(&format!("{repo} manifest {reference}"), &r.body, manifest);
    assert_eq!(
        r.header("content-type"),
        Some(media_type),
        "{repo}:{reference}"
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256(manifest).as_str())
    );
}

/// The registry serves the blob `digest` of `repo` byte-exact.
fn assert_blob(h: &Http, repo: &str, digest: &str, bytes: &[u8]) {
    let r = h.get(&format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(r.status, 200, "GET {repo} blob {digest}");
    assert_bytes(&format!("{repo} blob {digest}"), &r.body, bytes);
}

/// The registry holds the whole layout under `repo:TAG`.
fn assert_registry_holds(h: &Http, repo: &str, layout: &Layout) {
    assert_manifest(h, repo, TAG, layout.top.0, &layout.top.2);
    for image in &layout.images {
        assert_manifest(h, repo, &image.digest, OCI_MANIFEST, &image.manifest);
    }
    for (digest, bytes) in &layout.blobs {
        assert_blob(h, repo, digest, bytes);
    }
    assert_tags(h, repo, &[TAG]);
}

fn assert_tags(h: &Http, repo: &str, tags: &[&str]) {
    let r = h.get(&format!("/v2/{repo}/tags/list"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tags"], json!(tags), "tags of {repo}");
}

fn assert_fsck_clean(s: &TestServer) {
    let report = s.app.store.fsck(false).expect("fsck runs");
    assert!(report.is_clean(), "fsck problems: {:#?}", report.problems);
    assert!(report.blobs_checked > 0 && report.manifests_checked > 0);
}

// ---------------------------------------------------------------------------------------------
// Client sandboxes

/// Private configuration for the containers/image clients (skopeo, podman): only the test
/// server is known (as an insecure, plain-HTTP registry), no search registries, no mirrors, no
/// credentials, an accept-anything signature policy and private storage.
struct Sandbox {
    dir: tempfile::TempDir,
    registry: String,
}

impl Sandbox {
    fn new(s: &TestServer) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = s.addr.to_string();
        let p = dir.path();
        for d in ["registries.d", "tmp", "storage", "run", "podman-tmp"] {
            std::fs::create_dir(p.join(d)).unwrap();
        }
        let files = [
            (
                "registries.conf",
                format!(
                    "unqualified-search-registries = []\n\n[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"
                ),
            ),
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
        Self { dir, registry }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `docker://` reference on the test server.
    fn docker_ref(&self, repo: &str) -> String {
        format!("docker://{}/{repo}:{TAG}", self.registry)
    }

    fn with_env(&self, tool: Tool) -> Tool {
        tool.env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .env("TMPDIR", self.path("tmp"))
            // Rootless runs keep their blob-info cache here instead of the user's.
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
/// when dropped — also when the test fails.
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

    /// Waits until the daemon answers `ctr version` (or panics with its log if it exits or
    /// never does).
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

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn skopeo_round_trips_an_oci_image_byte_exact() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::new(&s);
    let layout = Layout::single(1);
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/oci";
    let remote = sb.docker_ref(repo);

    sb.skopeo()
        .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();
    assert_registry_holds(&h, repo, &layout);

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(&remote)
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);

    // Registry to registry: skopeo mounts (or re-uploads) the blobs into a second repository.
    let copy = "local/e2e/oci-copy";
    sb.skopeo()
        .args([
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(&remote)
        .arg(sb.docker_ref(copy))
        .run();
    assert_registry_holds(&h, copy, &layout);
    let tags: Value = serde_json::from_str(
        &sb.skopeo()
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{}/{copy}", sb.registry))
            .run(),
    )
    .expect("skopeo list-tags JSON");
    assert_eq!(tags["Tags"], json!([TAG]));

    // skopeo delete removes the copy's manifest (by digest) and nothing of the original.
    sb.skopeo()
        .args(["delete", "--tls-verify=false"])
        .arg(sb.docker_ref(copy))
        .run();
    for reference in [TAG, layout.top.1.as_str()] {
        let r = h.get(&format!("/v2/{copy}/manifests/{reference}"));
        assert_eq!(r.status, 404, "{copy}:{reference} after delete");
        assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    }
    assert_tags(&h, copy, &[]);
    assert_registry_holds(&h, repo, &layout);
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_pushes_docker_schema2_and_pulls_it_back() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::new(&s);
    let layout = Layout::single(2);
    let image = &layout.images[0];
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/schema2";
    let remote = sb.docker_ref(repo);

    sb.skopeo()
        .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();

    // skopeo converted the manifest; config and layers are the same bytes.
    let r = h.get(&format!("/v2/{repo}/manifests/{TAG}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256(&r.body).as_str())
    );
    let manifest = r.body.to_vec();
    let m = r.json();
    assert_eq!(m["mediaType"], DOCKER_MANIFEST);
    assert_eq!(m["config"]["mediaType"], DOCKER_CONFIG);
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
    for (digest, bytes) in &layout.blobs {
        assert_blob(&h, repo, digest, bytes);
    }
    let head = h.head(&format!("/v2/{repo}/manifests/{}", sha256(&manifest)));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        head.header("content-length"),
        Some(manifest.len().to_string().as_str())
    );

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &manifest);

    // Pull into a dir: layout, which keeps the manifest and every blob as served.
    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(&remote)
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
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_all_round_trips_a_multi_arch_index() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::new(&s);
    let layout = Layout::multi_arch(3);
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/multi";
    let remote = sb.docker_ref(repo);

    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();
    assert_registry_holds(&h, repo, &layout);

    // A client that accepts only Docker schema2 gets no OCI index (and no substitute).
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{TAG}"),
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    let out = sb.path("out");
    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(&remote)
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);
    assert_fsck_clean(&s);
}

#[test]
fn podman_pushes_and_pulls_an_image() {
    if !have(&["podman"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::new(&s);
    let layout = Layout::single(4);
    let image = &layout.images[0];
    let archive = sb.path("image.tar");
    std::fs::write(&archive, layout.archive()).unwrap();
    let repo = "local/e2e/podman";
    let name = format!("{}/{repo}:{TAG}", sb.registry);

    // Into podman's (private, vfs) storage from an OCI archive; its ID is the config digest.
    sb.podman().args(["load", "--input"]).arg(&archive).run();
    let id = sb.podman().args(["images", "--quiet", "--no-trunc"]).run();
    assert_eq!(id.trim(), image.config_digest);
    sb.podman().args(["tag", id.trim(), &name]).run();

    let digestfile = sb.path("pushed.digest");
    sb.podman()
        .args(["push", "--tls-verify=false", "--digestfile"])
        .arg(&digestfile)
        .arg(&name)
        .run();
    let pushed = std::fs::read_to_string(&digestfile).unwrap();

    // What the registry holds: the manifest podman reported, over our config and layers.
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{TAG}"),
        &[("accept", ACCEPT_ALL)],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("docker-content-digest"), Some(pushed.trim()));
    assert_eq!(sha256(&r.body), pushed.trim());
    let m = r.json();
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    assert_blob(
        &h,
        repo,
        &image.config_digest,
        &layout.blobs[&image.config_digest],
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), image.layer_tars.len());
    for l in layers {
        let digest = l["digest"].as_str().unwrap();
        let blob = h.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(blob.status, 200, "layer {digest}");
        assert_eq!(sha256(&blob.body), digest);
        assert_eq!(blob.body.len() as u64, l["size"].as_u64().unwrap());
        if let Some(original) = layout.blobs.get(digest) {
            assert_bytes(&format!("layer {digest}"), &blob.body, original);
        }
    }

    // Forget the image, then pull it from the registry.
    sb.podman().args(["rmi", "--all", "--force"]).run();
    assert_eq!(sb.podman().args(["images", "--quiet"]).run().trim(), "");
    sb.podman()
        .args(["pull", "--tls-verify=false", "--quiet"])
        .arg(&name)
        .run();
    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&name).run())
            .expect("podman image inspect JSON");
    let inspect = &inspect[0];
    assert_eq!(inspect["Digest"], pushed.trim());
    assert_eq!(
        format!("sha256:{}", inspect["Id"].as_str().unwrap()),
        image.config_digest
    );
    let diff_ids: Vec<String> = image.layer_tars.iter().map(|t| sha256(t)).collect();
    assert_eq!(inspect["RootFS"]["Layers"], json!(diff_ids));

    // The layers as podman stored them are our tars, byte for byte.
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
    assert_bytes(
        "saved config",
        &blobs[&image.config_digest],
        &layout.blobs[&image.config_digest],
    );
    assert_fsck_clean(&s);
}

#[test]
fn containerd_ctr_pushes_and_pulls_an_image() {
    if !have(&["containerd", "ctr"]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !skip("containerd needs root") {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let layout = Layout::single(5);
    let image = &layout.images[0];
    let daemon = Containerd::start();
    let archive = daemon.dir.path().join("image.tar");
    std::fs::write(&archive, layout.archive()).unwrap();
    let repo = "local/e2e/ctr";
    let remote = format!("{}/{repo}:{TAG}", s.addr);

    daemon
        .ctr()
        .args([
            "images",
            "import",
            "--snapshotter",
            "native",
            "--base-name",
            "e2e/src",
        ])
        .arg(&archive)
        .run();
    daemon
        .ctr()
        .args([
            "images",
            "push",
            "--plain-http",
            &remote,
            &format!("e2e/src:{TAG}"),
        ])
        .run();
    assert_registry_holds(&h, repo, &layout);

    // Remove the image and garbage-collect its content, so the pull has to fetch everything.
    daemon
        .ctr()
        .args(["images", "rm", "--sync", &format!("e2e/src:{TAG}")])
        .run();
    assert_eq!(
        daemon.ctr().args(["content", "ls", "--quiet"]).run().trim(),
        ""
    );

    daemon
        .ctr()
        .args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "native",
            &remote,
        ])
        .run();
    let listed = daemon.ctr().args(["images", "ls"]).run();
    let row = listed
        .lines()
        .find(|l| l.starts_with(&remote))
        .unwrap_or_else(|| panic!("{remote} not in\n{listed}"));
    assert!(row.contains(&image.digest), "{row}");
    let mut content: Vec<String> = daemon
        .ctr()
        .args(["content", "ls", "--quiet"])
        .run()
        .lines()
        .map(str::to_string)
        .collect();
    content.sort();
    assert_eq!(content, layout.all().into_keys().collect::<Vec<_>>());
    for (digest, bytes) in layout.all() {
        let got = daemon.ctr().args(["content", "get", &digest]).run_bytes();
        assert_bytes(&format!("pulled {digest}"), &got, &bytes);
    }
    drop(daemon);
    assert_fsck_clean(&s);
}

/// oras-py: push an artifact (chunked upload), push a second one whose `subject` is the
/// first, and pull the first back. Prints one JSON line with what it did.
const ORAS_SCRIPT: &str = r#"
import json, sys
import oras.client, oras.oci

host = sys.argv[1]
target = host + "/local/e2e/art"
client = oras.client.OrasClient(hostname=host, insecure=True)

r = client.push(target=target + ":v1", files=["payload.bin:application/vnd.e2e.payload"],
                do_chunked=True, chunk_size=65536, quiet=True)
subject_digest = r.headers["Docker-Content-Digest"]
raw = client.session.get("http://%s/v2/local/e2e/art/manifests/%s" % (host, subject_digest),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
raw.raise_for_status()
subject = oras.oci.Subject(mediaType=raw.headers["Content-Type"], digest=subject_digest,
                           size=len(raw.content))
r = client.push(target=target + ":sig", files=["signature.json:application/vnd.e2e.sig.payload"],
                manifest_config="sig-config.json:application/vnd.e2e.signature.v1+json",
                manifest_annotations={"e2e.role": "signature"}, subject=subject, quiet=True)
referrer_digest = r.headers["Docker-Content-Digest"]
pulled = client.pull(target=target + ":v1", outdir="pulled")
print(json.dumps({"subject": subject_digest, "referrer": referrer_digest, "pulled": pulled}))
"#;

#[test]
fn oras_py_pushes_an_artifact_and_a_referrer() {
    if !have(&["python3"]) {
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import oras.client"])
        .output()
        .expect("python3");
    if !probe.status.success()
        && !skip("python module oras (oras-py) not installed (scripts/test installs it)")
    {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let work = tempfile::tempdir().unwrap();
    let payload = random_bytes(300_001, 6);
    let signature = br#"{"signed":"local/e2e/art:v1"}"#;
    let sig_config = br#"{"kind":"e2e-signature"}"#;
    std::fs::write(work.path().join("payload.bin"), &payload).unwrap();
    std::fs::write(work.path().join("signature.json"), signature).unwrap();
    std::fs::write(work.path().join("sig-config.json"), sig_config).unwrap();
    std::fs::write(work.path().join("e2e_oras.py"), ORAS_SCRIPT).unwrap();
    let repo = "local/e2e/art";

    let out = Tool::new("python3")
        .arg("e2e_oras.py")
        .arg(s.addr.to_string())
        .dir(work.path())
        .run();
    let result: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("oras script output ({e}): {out}"));
    let subject = result["subject"].as_str().unwrap();
    let referrer = result["referrer"].as_str().unwrap();

    // What oras-py pulled back is the file it pushed.
    let pulled = result["pulled"].as_array().unwrap();
    assert_eq!(pulled.len(), 1, "{result}");
    let pulled = work.path().join(pulled[0].as_str().unwrap());
    assert_bytes("oras pull", &std::fs::read(pulled).unwrap(), &payload);

    // What the registry holds: both manifests, the payload, the signature and its config.
    let m = h.get(&format!("/v2/{repo}/manifests/{TAG}"));
    assert_eq!(m.status, 200);
    assert_eq!(sha256(&m.body), subject);
    let layer = &m.json()["layers"][0];
    assert_eq!(layer["mediaType"], "application/vnd.e2e.payload");
    assert_eq!(
        layer["annotations"]["org.opencontainers.image.title"],
        "payload.bin"
    );
    assert_blob(&h, repo, &sha256(&payload), &payload);
    let r = h.get(&format!("/v2/{repo}/manifests/sig"));
    assert_eq!(r.status, 200);
    assert_eq!(sha256(&r.body), referrer);
    let sig = r.json();
    assert_eq!(sig["subject"]["digest"], subject);
    assert_eq!(sig["subject"]["size"], m.body.len());
    assert_blob(&h, repo, &sha256(signature), signature);
    assert_blob(&h, repo, &sha256(sig_config), sig_config);
    assert_tags(&h, repo, &["sig", TAG]);

    // The referrers API lists the signature, typed by its config's media type.
    assert_eq!(sig["annotations"], json!({"e2e.role": "signature"}));
    let expected = json!({
        "mediaType": OCI_MANIFEST,
        "digest": referrer,
        "size": r.body.len(),
        "artifactType": "application/vnd.e2e.signature.v1+json",
        "annotations": {"e2e.role": "signature"},
    });
    let refs = h.get(&format!("/v2/{repo}/referrers/{subject}"));
    assert_eq!(refs.status, 200);
    assert_eq!(refs.header("content-type"), Some(OCI_INDEX));
    let index = refs.json();
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["manifests"], json!([expected]), "{index}");
    let filtered = h.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.e2e.signature.v1%2Bjson"
    ));
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(filtered.json()["manifests"], json!([expected]));
    let other = h.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.e2e.other"
    ));
    assert_eq!(other.json()["manifests"], json!([]));
    // Nothing refers to the signature.
    let none = h.get(&format!("/v2/{repo}/referrers/{referrer}"));
    assert_eq!(none.json()["manifests"], json!([]));
    assert_fsck_clean(&s);
}
