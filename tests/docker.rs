//! The real Docker daemon (Debian's `docker.io`, dockerd) against transship, configured the way
//! the README tells users to: `registry-mirrors` in `daemon.json` naming transship, whose
//! `docker.io` upstream is a real distribution registry seeded by the test; `docker login`
//! (password, `_json_key` key file, `oauth2accesstoken`), `docker push` and `docker pull` of
//! private images in a project; `docker logout`. Each test starts its own daemon as root with
//! everything under a temp dir (vfs storage, no iptables, no bridge, its own data-root,
//! exec-root, pidfile and unix socket), and stops it by PID when it ends, also on failure.
//!
//! No request may leave loopback: the daemon's only mirror is transship on 127.0.0.1, and it
//! runs with an HTTP(S) proxy on a closed loopback port, so its fallback to Docker Hub (what it
//! does when the mirror fails) fails at once instead of leaving the machine; a pull that did
//! not go through transship fails. A missing daemon is a loud SKIP locally and a failure when
//! `CI` is set (scripts/test installs `docker.io`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::images::*;
use common::upstream::{self, Distribution, assert_one_get_per_blob};
use common::*;
use serde_json::json;
use transship::auth::basic_header;
use transship::auth::keys::{Role, Subject, TokenKind, hash_password};
use transship::config::{HumanDuration, MirrorPull};

/// Names this suite in the CI failure for a missing program (see `skip`).
const SUITE: &str = "docker";
/// What this suite's upstream images hold (two layers each, about 600 KB).
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 600_000,
    data_bin: 30_011,
    readme: "docker e2e image",
};
const ALICE_PASSWORD: &str = "alice-docker-horse";
const VICTOR_PASSWORD: &str = "victor-docker-staple";
/// The project the push tests work in; anonymous callers may do nothing there.
const PROJECT: &str = "team";

/// True when dockerd, the docker CLI and the upstream are installed and we are root;
/// otherwise reports a skip.
fn have_docker() -> bool {
    if !(upstream::available() && programs_installed(SUITE, &["dockerd", "docker"])) {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip(SUITE, "dockerd needs root")
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// A private Docker daemon whose only registry mirror is `mirror`; stopped by PID when dropped.
struct Docker {
    child: Child,
    dir: tempfile::TempDir,
    host: String,
}

impl Docker {
    fn start(mirror: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let host = format!("unix://{}", root.join("docker.sock").display());
        let config = json!({
            "storage-driver": "vfs",
            "iptables": false,
            "ip6tables": false,
            "bridge": "none",
            "data-root": root.join("data"),
            "exec-root": root.join("exec"),
            "pidfile": root.join("docker.pid"),
            "hosts": [host],
            "registry-mirrors": [mirror],
        });
        let config_file = root.join("daemon.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        std::fs::create_dir_all(root.join("cfg")).unwrap();
        let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config_file)
            // Loopback goes direct; anything else (Docker Hub) to a closed port.
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start dockerd");
        let d = Self { child, dir, host };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("docker")
                .args(["version", "--format", "{{.Server.Version}}"])
                .env("DOCKER_HOST", &d.host)
                .env("DOCKER_CONFIG", d.config_dir())
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The CLI's own directory (`config.json`: logins).
    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("cfg")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The docker CLI, talking to this daemon only.
    fn cli(&self) -> Tool {
        Tool::new("docker", Egress::LoopbackOnly)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.config_dir())
    }

    fn pull(&self, reference: &str) -> String {
        self.cli().args(["pull", reference]).run()
    }

    /// The image ID (its config digest) the daemon holds under `reference`.
    fn image_id(&self, reference: &str) -> String {
        self.cli()
            .args(["image", "inspect", "--format", "{{.Id}}", reference])
            .run()
            .trim()
            .to_string()
    }

    /// Removes every image: the next pull downloads every layer again.
    fn remove_all_images(&self) {
        let ids = self.cli().args(["images", "-aq"]).run();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            self.cli().args(["rmi", "-f"]).args(ids).run();
        }
        assert_eq!(self.cli().args(["images", "-aq"]).run().trim(), "");
    }

    /// `docker login` to `registry` with the secret in the file `secret`.
    fn login(&self, registry: &str, user: &str, secret: &Path) -> Tool {
        self.cli()
            .args(["login", "--username", user, "--password-stdin", registry])
            .stdin_file(secret)
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop its containerd and unmount; SIGKILL after 30 s.
        stop_child(&mut self.child, Duration::from_secs(30));
        // A killed dockerd leaves its data-root mounted over itself: detach it (if mounted),
        // so the temp dir can be removed.
        if let Ok(path) = std::ffi::CString::new(self.path("data").as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; failure (nothing mounted) is harmless.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// transship and what it holds

/// transship whose `docker.io` upstream is `up`, with tags fresh for `tag_ttl` and pulls
/// allowed to `pull`, and `extra` config appended.
fn mirror(up: &Distribution, tag_ttl: Duration, extra: &str, pull: MirrorPull) -> TestServer {
    let url = up.url();
    let extra = extra.to_string();
    TestServer::start_with(move |c| {
        let mut c = test_config(&c.server.data_dir, &extra);
        c.upstreams[0].url = url;
        c.upstreams[0].tag_ttl = HumanDuration(tag_ttl);
        c.upstreams[0].pull = pull;
        c
    })
}

/// Config declaring the user alice (`ALICE_PASSWORD`), then `more`.
fn alice_and(more: &str) -> String {
    format!(
        "[[user]]\nname = \"alice\"\npassword_hash = \"{}\"\n\n{more}",
        hash_password(ALICE_PASSWORD)
    )
}

/// The blobs an image pull downloads: its config and layers.
fn image_blobs(image: &Image) -> Vec<&String> {
    std::iter::once(&image.config_digest)
        .chain(&image.layer_digests)
        .collect()
}

/// How many requests transship answered with this method, route and status (its `/metrics`).
fn answered(h: &Http, method: &str, route: &str, status: u16) -> u64 {
    let series = format!(
        "transship_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} "
    );
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}

// ---------------------------------------------------------------------------------------------
// Local images for pushes: `docker load` of an archive the test writes

/// A `docker save` archive of one linux/amd64 image over `layers` (uncompressed tars), tagged
/// `tag`; returns the archive and the image ID (the digest of its config).
fn docker_archive(tag: &str, layers: &[Vec<u8>]) -> (Vec<u8>, String) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/app.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes();
    let id = sha256(&config);
    let config_name = format!("{}.json", &id["sha256:".len()..]);
    let layer_names: Vec<String> = (0..layers.len()).map(|i| format!("layer{i}.tar")).collect();
    let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}])
        .to_string()
        .into_bytes();
    let mut files: Vec<(&str, &[u8])> = vec![
        ("manifest.json", &manifest),
        (config_name.as_str(), &config),
    ];
    files.extend(
        layer_names
            .iter()
            .zip(layers)
            .map(|(n, l)| (n.as_str(), l.as_slice())),
    );
    (tar(&files), id)
}

/// A layer tar holding one file of `len` pseudo-random bytes.
fn layer(name: &str, len: usize, seed: u64) -> Vec<u8> {
    tar(&[(name, &random_bytes(len, seed))])
}

// ---------------------------------------------------------------------------------------------
// The tests

/// `registry-mirrors`: an official image by its short name, a user image, a multi-arch index
/// (the daemon takes its own platform) and a pull by digest all come through transship, one
/// upstream GET per blob; after `docker rmi` the same pulls reach the upstream not at all.
#[test]
fn docker_pulls_through_registry_mirrors_and_repulls_from_the_cache() {
    if !have_docker() {
        return;
    }
    let up = Distribution::start();
    let alpine = Layout::single(1, &DOCKER, &LAYERS);
    let user = Layout::single(2, &OCI, &LAYERS);
    let multi = Layout::multi_arch(3, &DOCKER, &LAYERS);
    let pinned = Layout::single(4, &DOCKER, &LAYERS);
    up.seed("library/alpine", "latest", &alpine);
    up.seed("some/user-image", "1.0", &user);
    up.seed("library/multi", "v1", &multi);
    up.seed("some/pinned", "v1", &pinned);
    let seeded = up.requests().len();
    let s = mirror(&up, Duration::from_secs(3600), "", MirrorPull::Anonymous);
    let h = Http::for_server(&s);
    let docker = Docker::start(&s.url(""));

    let pinned_ref = format!("some/pinned@{}", pinned.top.1);
    // (reference, local repository, layout, the image the daemon runs)
    let pulls = [
        (
            "alpine:latest",
            "library/alpine",
            &alpine,
            &alpine.images[0],
        ),
        (
            "some/user-image:1.0",
            "some/user-image",
            &user,
            &user.images[0],
        ),
        ("multi:v1", "library/multi", &multi, &multi.images[0]),
        (
            pinned_ref.as_str(),
            "some/pinned",
            &pinned,
            &pinned.images[0],
        ),
    ];
    for (reference, repo, layout, image) in pulls {
        let before = up.requests().len();
        let out = docker.pull(reference);
        assert!(
            out.contains(&format!("Digest: {}", layout.top.1)),
            "{reference}: {out}"
        );
        assert_eq!(
            docker.image_id(reference),
            image.config_digest,
            "{reference}"
        );
        // Underneath: the bytes came from the upstream through transship, once each, and
        // transship holds them now.
        let blobs = image_blobs(image);
        let requests = up.requests().split_off(before);
        assert_one_get_per_blob(&requests, repo, &blobs);
        for digest in blobs {
            let bytes = &layout.blobs[digest];
            assert_cached_blob(&h, &format!("docker.io/{repo}"), digest, bytes);
        }
    }
    // The amd64 child of the index, never the arm64 one.
    let arm64 = &multi.images[1];
    let pulled = up.requests().split_off(seeded);
    assert!(
        !pulled
            .iter()
            .any(|r| r.contains(&arm64.digest) || r.contains(&arm64.config_digest)),
        "the daemon fetched the other platform: {pulled:#?}"
    );

    // Every image gone from the daemon: the same pulls again, from the cache alone.
    docker.remove_all_images();
    let before = up.requests();
    for (reference, _, layout, image) in pulls {
        let out = docker.pull(reference);
        assert!(out.contains("Pull complete"), "{reference}: {out}");
        assert!(
            out.contains(&format!("Digest: {}", layout.top.1)),
            "{reference}: {out}"
        );
        assert_eq!(docker.image_id(reference), image.config_digest);
    }
    assert_eq!(
        up.requests(),
        before,
        "a cached re-pull reached the upstream"
    );
}

/// An upstream outage after a first pull: the daemon still pulls the cached tag (transship
/// serves it stale). With transship itself down the daemon falls back to Docker Hub, which
/// it cannot reach here: the pull fails, so a pull that bypassed transship would be noticed.
#[test]
fn docker_pulls_a_cached_tag_during_an_upstream_outage() {
    if !have_docker() {
        return;
    }
    let mut up = Distribution::start();
    let app = Layout::single(11, &DOCKER, &LAYERS);
    up.seed("library/app", "latest", &app);
    // Every request revalidates the tag upstream.
    let s = mirror(&up, Duration::ZERO, "", MirrorPull::Anonymous);
    let h = Http::for_server(&s);
    let docker = Docker::start(&s.url(""));
    let image = &app.images[0];

    docker.pull("app:latest");
    assert_eq!(docker.image_id("app:latest"), image.config_digest);
    docker.remove_all_images();

    up.stop();
    let out = docker.pull("app:latest");
    assert!(out.contains(&format!("Digest: {}", app.top.1)), "{out}");
    assert_eq!(docker.image_id("app:latest"), image.config_digest);
    let r = h.send(
        "GET",
        "/v2/library/app/manifests/latest",
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("STALE")));

    // transship down: the daemon tries Docker Hub instead and fails.
    docker.remove_all_images();
    drop(h);
    drop(s);
    let err = docker.cli().args(["pull", "app:latest"]).fails();
    assert!(
        err.contains("registry-1.docker.io") || err.contains("proxyconnect"),
        "{err}"
    );
}

/// Private images with `docker login` (a user's password, a `_json_key` key file, an
/// `oauth2accesstoken`), `docker push` (streamed PATCH uploads; a second image's shared
/// layers are mounted across repositories), pull back after `docker rmi` with the same image
/// ID, `docker logout`; a viewer's push is refused at once; the Docker Hub login the daemon
/// sends to its mirror does not break mirror pulls.
#[test]
fn docker_logs_in_pushes_and_pulls_private_images() {
    if !have_docker() {
        return;
    }
    let up = Distribution::start();
    let alpine = Layout::single(21, &DOCKER, &LAYERS);
    up.seed("library/alpine", "latest", &alpine);
    let extra = alice_and(&format!(
        "[[project]]\nname = \"{PROJECT}\"\nanonymous = \"none\"\neditors = [\"alice\"]\n"
    ));
    let s = mirror(
        &up,
        Duration::from_secs(3600),
        &extra,
        MirrorPull::Anonymous,
    );
    let ids = &s.app.auth.identities;
    ids.set_user("victor", VICTOR_PASSWORD).unwrap();
    ids.set_member(PROJECT, "victor", Role::Viewer).unwrap();
    let registry = format!("127.0.0.1:{}", s.addr.port());
    let h = Http::for_server(&s).with_auth(&basic_header("alice", ALICE_PASSWORD));
    let docker = Docker::start(&s.url(""));
    let secret = |name: &str, text: &str| {
        let p = docker.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    // The daemon sends the Docker Hub login to its mirror. Docker Hub cannot be reached here,
    // so it is stored the way `docker login` stores it; it names a transship user with a
    // wrong password, which must not matter for a mirror pull.
    let hub = json!({"auths": {"https://index.docker.io/v1/": {
        "auth": STANDARD.encode(format!("alice:not-{ALICE_PASSWORD}")),
    }}});
    std::fs::write(docker.config_dir().join("config.json"), hub.to_string()).unwrap();
    assert_eq!(Http::for_server(&s).get("/v2/").status, 401);
    docker.pull("alpine:latest");
    assert_eq!(
        docker.image_id("alpine:latest"),
        alpine.images[0].config_digest
    );

    // Not logged in: our registry refuses.
    let app_ref = format!("{registry}/{PROJECT}/app:v1");
    let web_ref = format!("{registry}/{PROJECT}/web:v1");
    let shared = [
        layer("base.bin", 1_000_000, 31),
        layer("lib.bin", 700_000, 32),
    ];
    let (app_archive, app_id) = docker_archive(
        &app_ref,
        &[
            shared[0].clone(),
            shared[1].clone(),
            layer("app.bin", 500_000, 33),
        ],
    );
    let (web_archive, web_id) = docker_archive(
        &web_ref,
        &[
            shared[0].clone(),
            shared[1].clone(),
            layer("web.bin", 400_000, 34),
        ],
    );
    std::fs::write(docker.path("app.tar"), app_archive).unwrap();
    std::fs::write(docker.path("web.tar"), web_archive).unwrap();
    for archive in ["app.tar", "web.tar"] {
        docker
            .cli()
            .args(["load", "-i"])
            .arg(docker.path(archive))
            .run();
    }
    let err = docker.cli().args(["push", &app_ref]).fails();
    assert!(err.contains("denied"), "{err}");

    // alice logs in with her password; the CLI keeps the identity (refresh) token transship
    // returned, not the password.
    let password = secret("alice.password", ALICE_PASSWORD);
    docker.login(&registry, "alice", &password).run();
    let stored = std::fs::read_to_string(docker.config_dir().join("config.json")).unwrap();
    assert!(!stored.contains(&STANDARD.encode(format!("alice:{ALICE_PASSWORD}"))));
    assert!(stored.contains("identitytoken"), "{stored}");
    assert!(stored.contains("index.docker.io"), "{stored}");

    // Each blob (three layers and the config) goes up as one streamed PATCH.
    let patches = || answered(&h, "PATCH", "upload", 202);
    let mounts = || answered(&h, "POST", "upload_start", 201);
    let (patched, mounted) = (patches(), mounts());
    let out = docker.cli().args(["push", &app_ref]).run();
    assert!(!out.contains("Mounted from"), "{out}");
    assert_eq!((patches() - patched, mounts() - mounted), (4, 0));
    // The second image's shared layers are mounted from the first repository: two mounts,
    // and uploads only for its own layer and config.
    let (patched, mounted) = (patches(), mounts());
    let out = docker.cli().args(["push", &web_ref]).run();
    assert_eq!(
        out.matches(&format!("Mounted from {PROJECT}/app")).count(),
        2,
        "{out}"
    );
    assert_eq!((patches() - patched, mounts() - mounted), (2, 2));

    // What transship holds: each manifest names the pushed config, and the shared layers
    // are the same blobs in both repositories.
    let manifest = |repo: &str, tag: &str| {
        let r = h.send(
            "GET",
            &format!("/v2/{PROJECT}/{repo}/manifests/{tag}"),
            &[("accept", ACCEPT_ALL)],
            Vec::new(),
        );
        assert_eq!(r.status, 200, "{repo}: {r:?}");
        r.json()
    };
    let (app_m, web_m) = (manifest("app", "v1"), manifest("web", "v1"));
    assert_eq!(app_m["config"]["digest"], json!(app_id));
    assert_eq!(web_m["config"]["digest"], json!(web_id));
    let layers = |m: &serde_json::Value| -> Vec<String> {
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let (app_layers, web_layers) = (layers(&app_m), layers(&web_m));
    assert_eq!(app_layers.len(), 3);
    assert_eq!(app_layers[..2], web_layers[..2]);
    assert_ne!(app_layers[2], web_layers[2]);
    for d in &web_layers {
        let r = h.head(&format!("/v2/{PROJECT}/web/blobs/{d}"));
        assert_eq!(r.status, 200, "{d}");
    }

    // Pull back after rmi: the same image IDs.
    docker.remove_all_images();
    for (reference, id) in [(&app_ref, &app_id), (&web_ref, &web_id)] {
        docker.pull(reference);
        assert_eq!(&docker.image_id(reference), id);
    }

    // logout: the pull is refused.
    docker.cli().args(["logout", &registry]).run();
    docker.remove_all_images();
    let err = docker.cli().args(["pull", &app_ref]).fails();
    assert!(err.contains("denied") || err.contains("login"), "{err}");

    // A service-account key (editor of the project) as `_json_key`, from a file.
    let key = ids
        .create_key(PROJECT, Role::Editor, "ci")
        .expect("create key");
    let key_file = secret(
        "key.json",
        &(serde_json::to_string_pretty(&key).unwrap() + "\n"),
    );
    docker.login(&registry, "_json_key", &key_file).run();
    docker.pull(&app_ref);
    assert_eq!(docker.image_id(&app_ref), app_id);
    let v2 = format!("{registry}/{PROJECT}/app:v2");
    docker.cli().args(["tag", &app_ref, &v2]).run();
    docker.cli().args(["push", &v2]).run();
    // The same image under a second tag: the same manifest.
    assert_eq!(manifest("app", "v2"), app_m);
    docker.cli().args(["logout", &registry]).run();

    // An access token of alice as `oauth2accesstoken`.
    let (_, token) = ids
        .create_token(
            &Subject::User("alice".into()),
            TokenKind::Access,
            Duration::from_secs(3600),
            "laptop",
        )
        .expect("create token");
    let token_file = secret("token", &token);
    docker
        .login(&registry, "oauth2accesstoken", &token_file)
        .run();
    docker.remove_all_images();
    docker.pull(&web_ref);
    assert_eq!(docker.image_id(&web_ref), web_id);

    // victor, a viewer, may pull but not push: the daemon says so at once, no retries.
    let victor = secret("victor.password", VICTOR_PASSWORD);
    docker.login(&registry, "victor", &victor).run();
    docker.pull(&web_ref);
    let vic_ref = format!("{registry}/{PROJECT}/vic:v1");
    docker.cli().args(["tag", &web_ref, &vic_ref]).run();
    let err = docker.cli().args(["push", &vic_ref]).fails();
    assert!(
        err.contains("denied: requested access to the resource is denied"),
        "{err}"
    );
    assert!(!err.contains("Retrying"), "{err}");
    let r = h.get(&format!("/v2/{PROJECT}/vic/tags/list"));
    assert_eq!(r.status, 404, "{r:?}");

    // The mirror pull with the wrong Docker Hub password still works after all of that.
    docker.remove_all_images();
    docker.pull("alpine:latest");
    assert_eq!(
        docker.image_id("alpine:latest"),
        alpine.images[0].config_digest
    );
}

/// The daemon sends its Docker Hub login (`docker login` with no registry) to the mirror:
/// with `pull = "authenticated"` on transship's `docker.io` upstream, that login is what lets
/// the pull through, and without it the pull is refused. (Docker Hub cannot be reached here,
/// so the login is stored the way `docker login` stores it.)
#[test]
fn docker_sends_its_docker_hub_login_to_the_mirror() {
    if !have_docker() {
        return;
    }
    let up = Distribution::start();
    let alpine = Layout::single(41, &DOCKER, &LAYERS);
    up.seed("library/alpine", "latest", &alpine);
    let extra = alice_and("");
    let s = mirror(
        &up,
        Duration::from_secs(3600),
        &extra,
        MirrorPull::Authenticated,
    );
    let docker = Docker::start(&s.url(""));

    // No login: transship refuses (and the daemon's Docker Hub fallback fails too).
    docker.cli().args(["pull", "alpine:latest"]).fails();
    assert!(up.requests().iter().all(|r| !r.starts_with("GET")));

    let hub = json!({"auths": {"https://index.docker.io/v1/": {
        "auth": STANDARD.encode(format!("alice:{ALICE_PASSWORD}")),
    }}});
    std::fs::write(docker.config_dir().join("config.json"), hub.to_string()).unwrap();
    docker.pull("alpine:latest");
    assert_eq!(
        docker.image_id("alpine:latest"),
        alpine.images[0].config_digest
    );
}
