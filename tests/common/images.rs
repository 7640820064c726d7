//! Client fixtures shared by the end-to-end client suites (`clients`, `mirror_clients`):
//! hand-built images (real tar layers, gzip-wrapped, with correct `diff_ids`; OCI or Docker
//! schema2) and their OCI image layouts, assertions on layouts clients pull back, the `Tool`
//! process runner, the private skopeo/podman `Sandbox`, the private `Containerd` daemon, and
//! the skip-or-fail check for clients that are not installed.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Http, random_bytes, sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
/// The name every fixture layout gives its image (`org.opencontainers.image.ref.name`), and
/// the tag tests push or seed it under.
pub const TAG: &str = "v1";

// ---------------------------------------------------------------------------------------------
// Running clients

/// Whether `program` is an executable on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Reports a test that cannot run: a failure under CI (which installs every client), else a
/// loud SKIP. `suite` names the tests in the CI failure ("client", "mirror client"). Returns
/// false so callers can `if !... { return; }`.
pub fn skip(suite: &str, why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so every {suite} test must run");
    }
    eprintln!("SKIP: {why}");
    false
}

/// True when every program is on PATH; otherwise reports a skip (see `skip`).
pub fn programs_installed(suite: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    missing.is_empty()
        || skip(
            suite,
            &format!(
                "not installed: {} (scripts/test installs it)",
                missing.join(", ")
            ),
        )
}

/// True when containerd and `ctr` are installed and we are root (containerd's snapshotter
/// mounts and chowns); otherwise reports a skip (see `skip`).
pub fn containerd_usable(suite: &str) -> bool {
    if !programs_installed(suite, &["containerd", "ctr"]) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip(suite, "containerd needs root")
}

/// Where a client's requests may go besides loopback (which always goes direct, never through
/// a proxy).
#[derive(Clone, Copy, Debug)]
pub enum Egress {
    /// Wherever the client's own settings send them: the test gives it loopback addresses only.
    Unrestricted,
    /// Nowhere: anything else goes to a proxy on a closed loopback port and fails at once, so
    /// no client can fall back to a public registry.
    LoopbackOnly,
}

/// A client command line: captures stdout and stderr and panics with both when it fails.
pub struct Tool {
    cmd: Command,
    line: String,
}

impl Tool {
    pub fn new(program: impl AsRef<OsStr>, egress: Egress) -> Self {
        let mut cmd = Command::new(program.as_ref());
        cmd.stdin(Stdio::null())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        if let Egress::LoopbackOnly = egress {
            cmd.env("HTTP_PROXY", "http://127.0.0.1:9")
                .env("HTTPS_PROXY", "http://127.0.0.1:9")
                .env("http_proxy", "http://127.0.0.1:9")
                .env("https_proxy", "http://127.0.0.1:9");
        }
        Self {
            cmd,
            line: program.as_ref().to_string_lossy().into_owned(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.line.push(' ');
        self.line.push_str(&arg.as_ref().to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    pub fn args<S: AsRef<OsStr>>(self, args: impl IntoIterator<Item = S>) -> Self {
        args.into_iter().fold(self, |tool, a| tool.arg(a))
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn dir(mut self, dir: &Path) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// Feeds the file at `path` to standard input (for `--password-stdin`).
    pub fn stdin_file(mut self, path: &Path) -> Self {
        let file = std::fs::File::open(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        self.line.push_str(&format!(" <{}", path.display()));
        self.cmd.stdin(file);
        self
    }

    /// Runs to completion; returns (stdout, stderr). Panics with both unless it succeeds.
    pub fn output(mut self) -> (Vec<u8>, String) {
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

    /// Runs to completion; returns stdout. Panics (with stdout and stderr) unless it succeeds.
    pub fn run_bytes(self) -> Vec<u8> {
        self.output().0
    }

    /// `run_bytes`, as text.
    pub fn run(self) -> String {
        String::from_utf8_lossy(&self.run_bytes()).into_owned()
    }

    /// Runs to completion; returns stderr. Panics unless it fails.
    pub fn fails(mut self) -> String {
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
    pub fn run_log(self) -> String {
        self.output().1
    }
}

/// A client command with every loopback address exempt from any proxy in the environment
/// (Go clients honour CIDRs in `NO_PROXY`; the common default names 127.0.0.1 only): for
/// replicas on 127.0.0.2 and up.
pub fn loopback_only(tool: Tool) -> Tool {
    tool.env("NO_PROXY", "127.0.0.0/8,localhost")
        .env("no_proxy", "127.0.0.0/8,localhost")
}

// ---------------------------------------------------------------------------------------------
// Fixture images: real tar layers, gzip-wrapped, with correct diff_ids; OCI or Docker schema2

/// A ustar archive of regular files (mode 0644, owner root, mtime 0).
pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
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
pub fn gzip(data: &[u8]) -> Vec<u8> {
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
pub struct Format {
    pub manifest: &'static str,
    pub index: &'static str,
    pub config: &'static str,
    pub layer: &'static str,
}

pub const OCI: Format = Format {
    manifest: OCI_MANIFEST,
    index: OCI_INDEX,
    config: OCI_CONFIG,
    layer: OCI_LAYER_GZIP,
};

pub const DOCKER: Format = Format {
    manifest: DOCKER_MANIFEST,
    index: DOCKER_LIST,
    config: DOCKER_CONFIG,
    layer: DOCKER_LAYER_GZIP,
};

/// One platform image of a fixture.
pub struct Image {
    pub manifest: Vec<u8>,
    pub digest: String,
    pub config_digest: String,
    /// Uncompressed layer tars; their digests are the config's `diff_ids`.
    pub layer_tars: Vec<Vec<u8>>,
    /// Digests of the gzip layer blobs, in manifest order.
    pub layer_digests: Vec<String>,
}

/// What the two layers of each fixture image hold besides its seed: a `app.bin` of over a
/// megabyte (`app_bin` bytes plus the seed) with a `README` starting `readme`, and a small
/// `data.bin` of `data_bin` bytes. Each suite has its own, so their images never share bytes.
pub struct LayerRecipe {
    pub app_bin: usize,
    pub data_bin: usize,
    pub readme: &'static str,
}

/// An image (or an index of images) in memory, written out as an OCI image layout or archive
/// naming its top `TAG`.
pub struct Layout {
    pub format: &'static Format,
    pub recipe: &'static LayerRecipe,
    /// What `TAG` names: (media type, digest, bytes).
    pub top: (&'static str, String, Vec<u8>),
    pub images: Vec<Image>,
    /// Manifests (image manifests and the index) by digest.
    pub manifests: BTreeMap<String, Vec<u8>>,
    /// Configs and layers by digest.
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl Layout {
    /// A single-platform image (linux/amd64) with two layers.
    pub fn single(seed: u64, format: &'static Format, recipe: &'static LayerRecipe) -> Self {
        let mut l = Self::empty(format, recipe);
        let image = l.add_image(seed, "amd64");
        l.top = (
            format.manifest,
            image.digest.clone(),
            image.manifest.clone(),
        );
        l.images.push(image);
        l
    }

    /// An index (OCI index or Docker manifest list) over linux/amd64 and linux/arm64 images,
    /// two layers each.
    pub fn multi_arch(seed: u64, format: &'static Format, recipe: &'static LayerRecipe) -> Self {
        let mut l = Self::empty(format, recipe);
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

    fn empty(format: &'static Format, recipe: &'static LayerRecipe) -> Self {
        Self {
            format,
            recipe,
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
        let recipe = self.recipe;
        let layer_tars = vec![
            tar(&[
                (
                    "app.bin",
                    &random_bytes(recipe.app_bin + seed as usize, seed),
                ),
                (
                    "README",
                    format!("{} {seed} for {arch}\n", recipe.readme).as_bytes(),
                ),
            ]),
            tar(&[("data.bin", &random_bytes(recipe.data_bin, seed + 1))]),
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

    /// Every file of the OCI image layout (path relative to its root, contents).
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
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

    /// Writes it as an OCI image layout to `dir` (created).
    pub fn write(&self, dir: &Path) -> PathBuf {
        for (name, bytes) in self.files() {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        dir.to_path_buf()
    }

    /// The OCI image layout as an OCI archive (a tar of its files).
    pub fn archive(&self) -> Vec<u8> {
        let files = self.files();
        let entries: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        tar(&entries)
    }

    /// Every digest: manifests and blobs.
    pub fn all(&self) -> BTreeMap<String, Vec<u8>> {
        let mut all = self.blobs.clone();
        all.extend(self.manifests.clone());
        all
    }
}

/// Where an OCI image layout keeps `digest`.
fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

// ---------------------------------------------------------------------------------------------
// Assertions on what a registry serves

/// The registry serves `manifest` under `reference` byte-exact, with its type and digest.
pub fn assert_manifest(h: &Http, repo: &str, reference: &str, media_type: &str, manifest: &[u8]) {
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
pub fn assert_blob(h: &Http, repo: &str, digest: &str, bytes: &[u8]) {
    let r = h.get(&format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(r.status, 200, "GET {repo} blob {digest}");
    assert_bytes(&format!("{repo} blob {digest}"), &r.body, bytes);
}

/// The registry holds the whole layout under `repo:TAG`.
pub fn assert_registry_holds(h: &Http, repo: &str, layout: &Layout) {
    assert_manifest(h, repo, TAG, layout.top.0, &layout.top.2);
    for image in &layout.images {
        assert_manifest(
            h,
            repo,
            &image.digest,
            layout.format.manifest,
            &image.manifest,
        );
    }
    for (digest, bytes) in &layout.blobs {
        assert_blob(h, repo, digest, bytes);
    }
    assert_tags(h, repo, &[TAG]);
}

/// The tag list of `repo` is exactly `tags`.
pub fn assert_tags(h: &Http, repo: &str, tags: &[&str]) {
    let r = h.get(&format!("/v2/{repo}/tags/list"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tags"], json!(tags), "tags of {repo}");
}

// ---------------------------------------------------------------------------------------------
// Assertions on what clients pulled

/// Byte equality without dumping megabytes when it fails.
pub fn assert_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    assert!(
        actual == expected,
        "{what}: got {} bytes ({}), expected {} bytes ({})",
        actual.len(),
        sha256(actual),
        expected.len(),
        sha256(expected)
    );
}

/// The mirror now serves `digest` of `repo` (any spelling) from its cache, byte-exact.
pub fn assert_cached_blob(h: &Http, repo: &str, digest: &str, bytes: &[u8]) {
    let r = h.get(&format!("/v2/{repo}/blobs/{digest}"));
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("HIT")),
        "{repo}@{digest}"
    );
    assert_bytes(&format!("cached {repo}@{digest}"), &r.body, bytes);
}

/// Every file under `dir/blobs`, by digest (checking each hashes to its name).
pub fn oci_dir_blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
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
pub fn oci_dir_ref(dir: &Path, name: &str) -> Value {
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
pub fn assert_same_layout(pulled: &Path, layout: &Layout) {
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

// ---------------------------------------------------------------------------------------------
// Client sandboxes

/// Private configuration for skopeo and podman: the given `registries.conf` (loopback only, no
/// search registries), an accept-anything signature policy, no credentials, private storage.
pub struct Sandbox {
    dir: tempfile::TempDir,
    egress: Egress,
}

impl Sandbox {
    pub fn new(registries_conf: &str, egress: Egress) -> Self {
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
        Self { dir, egress }
    }

    /// Only the given plain-HTTP registries, by address.
    pub fn insecure(registries: &[String], egress: Egress) -> Self {
        let mut conf = "unqualified-search-registries = []\n".to_string();
        for r in registries {
            conf.push_str(&format!(
                "\n[[registry]]\nlocation = \"{r}\"\ninsecure = true\n"
            ));
        }
        Self::new(&conf, egress)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn with_env(&self, tool: Tool) -> Tool {
        tool.env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .env("TMPDIR", self.path("tmp"))
            // Rootless runs keep their blob-info cache here instead of the user's.
            .env("XDG_DATA_HOME", self.path("tmp"))
    }

    pub fn skopeo(&self) -> Tool {
        self.with_env(Tool::new("skopeo", self.egress))
            .arg("--policy")
            .arg(self.path("policy.json"))
            .arg("--registries.d")
            .arg(self.path("registries.d"))
    }

    pub fn podman(&self) -> Tool {
        self.with_env(Tool::new("podman", self.egress))
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
pub struct Containerd {
    child: Child,
    pub dir: tempfile::TempDir,
    egress: Egress,
}

impl Containerd {
    #[allow(clippy::zombie_processes)] // reaped by Drop
    pub fn start(egress: Egress) -> Self {
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
        let mut daemon = Self { child, dir, egress };
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
    pub fn ctr(&self) -> Tool {
        Tool::new("ctr", self.egress)
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["--namespace", "e2e"])
    }

    /// Imports an image archive into the content store as `e2e/src:<tag>` (native snapshotter).
    pub fn import(&self, archive: &Path) {
        self.ctr()
            .args([
                "images",
                "import",
                "--snapshotter",
                "native",
                "--base-name",
                "e2e/src",
            ])
            .arg(archive)
            .run();
    }

    /// A hosts directory sending every pull for `registry` to the mirror at `mirror`
    /// (`host:port`): the mirror as a pull/resolve host and as the server, so there is no
    /// public fallback at all.
    pub fn hosts_dir(&self, registry: &str, mirror: &str) -> PathBuf {
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
    pub fn pull(&self, hosts: &Path, reference: &str, all_platforms: bool) -> String {
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
    pub fn forget(&self, reference: &str) {
        self.ctr().args(["images", "rm", "--sync", reference]).run();
        assert_eq!(
            self.ctr().args(["content", "ls", "--quiet"]).run().trim(),
            "",
            "content left after removing {reference}"
        );
    }

    /// The content store holds exactly `expected`, byte for byte.
    pub fn assert_content(&self, expected: &BTreeMap<String, Vec<u8>>) {
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
    pub fn image_digest(&self, reference: &str) -> String {
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
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// Stops a daemon the test started, by its PID: SIGTERM for a clean shutdown, SIGKILL if it
/// has not exited within `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    stop_child_with(child, libc::SIGTERM, grace);
}

/// `stop_child` with the daemon's own shutdown signal (e.g. SIGINT for PostgreSQL).
pub fn stop_child_with(child: &mut Child, signal: libc::c_int, grace: Duration) {
    // SAFETY: signalling a child this test started (and has not reaped yet).
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
