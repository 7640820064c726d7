//! Access control end to end with real clients over HTTPS: skopeo, podman and containerd's
//! `ctr` log in (a password, a service-account JSON key file as `_json_key`, an access token as
//! `oauth2accesstoken`) against the real server serving a certificate from a test CA, push and
//! pull through the Bearer token flow, and are turned away when they should be (logged out,
//! revoked key or token, a viewer pushing or deleting, no or wrong credentials). Every test
//! checks the bytes the client got back and what the registry holds, over HTTPS too.
//!
//! The project `team` admits no anonymous access. alice is an editor declared in the config
//! file; victor is a user and viewer added through the admin API, like `transship user add`
//! and `transship member add` would. Every client trusts the test CA only through its own
//! options (`--cert-dir`, `--tlscacert`), keeps credentials in a private auth file, and talks
//! to 127.0.0.1 only. A missing client is a loud SKIP locally and a failure when `CI` is set.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::images::*;
use common::tls::{Ca, HttpsClient, client};
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use transship::auth::basic_header;
use transship::auth::keys::{KeyFile, Role, Subject, TokenKind, hash_password};

/// Names this suite in the CI failure for a missing client (see `skip`).
const SUITE: &str = "auth client";
/// No client may reach anything but 127.0.0.1.
const EGRESS: Egress = Egress::LoopbackOnly;
/// What this suite's fixture images hold.
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 1_100_000,
    data_bin: 40_003,
    readme: "auth e2e image",
};
const ALICE_PASSWORD: &str = "alice-correct-horse";
const VICTOR_PASSWORD: &str = "victor-battery-staple";
/// The project every test works in; anonymous callers may do nothing there.
const PROJECT: &str = "team";

fn have(programs: &[&str]) -> bool {
    programs_installed(SUITE, programs)
}

/// True if `text` mentions any of `words` (case-insensitive).
fn mentions(text: &str, words: &[&str]) -> bool {
    let text = text.to_lowercase();
    words.iter().any(|w| text.contains(&w.to_lowercase()))
}

/// The `user:password` an auth file (`auth.json`) stores for `host`, if any.
fn stored_credentials(authfile: &Path, host: &str) -> Option<String> {
    let text = std::fs::read_to_string(authfile).ok()?;
    let file: Value = serde_json::from_str(&text).expect("auth file is JSON");
    let auth = file["auths"][host]["auth"].as_str()?;
    let raw = STANDARD.decode(auth).expect("auth entry is base64");
    Some(String::from_utf8(raw).expect("auth entry is UTF-8"))
}

fn alice() -> String {
    basic_header("alice", ALICE_PASSWORD)
}

// ---------------------------------------------------------------------------------------------
// The registry side, over HTTPS

/// The server's own answers over HTTPS (trusting the test CA), for assertions on what clients
/// did and for seeding images as alice.
struct Registry {
    rt: tokio::runtime::Runtime,
    client: HttpsClient,
    base: String,
}

impl Registry {
    fn send(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Resp {
        let url = if path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = http::Request::builder().method(method).uri(url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        self.rt.block_on(async {
            let resp = self.client.request(req).await.expect("HTTPS request");
            let (parts, body) = resp.into_parts();
            Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: body.collect().await.expect("body").to_bytes(),
            }
        })
    }

    fn get(&self, path: &str, auth: Option<&str>) -> Resp {
        self.send("GET", path, auth, &[], Vec::new())
    }

    /// Pushes every blob and the top manifest of `layout` to `repo:TAG` (monolithic uploads).
    fn seed(&self, repo: &str, layout: &Layout, auth: &str) {
        for (digest, bytes) in &layout.blobs {
            let r = self.send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/"),
                Some(auth),
                &[],
                Vec::new(),
            );
            assert_eq!(r.status, 202, "POST upload: {r:?}");
            let loc = r.header("location").expect("location").to_string();
            let sep = if loc.contains('?') { '&' } else { '?' };
            let r = self.send(
                "PUT",
                &format!("{loc}{sep}digest={digest}"),
                Some(auth),
                &[("content-type", "application/octet-stream")],
                bytes.clone(),
            );
            assert_eq!(r.status, 201, "PUT upload of {digest}: {r:?}");
        }
        let r = self.send(
            "PUT",
            &format!("/v2/{repo}/manifests/{TAG}"),
            Some(auth),
            &[("content-type", layout.top.0)],
            layout.top.2.clone(),
        );
        assert_eq!(r.status, 201, "manifest PUT: {r:?}");
    }

    fn tags(&self, repo: &str, auth: &str) -> Value {
        let r = self.get(&format!("/v2/{repo}/tags/list"), Some(auth));
        assert_eq!(r.status, 200, "tags of {repo}: {r:?}");
        r.json()["tags"].clone()
    }

    /// The registry serves `manifest` under `reference` byte-exact, with its digest.
    fn assert_manifest(&self, auth: &str, repo: &str, reference: &str, manifest: &[u8]) {
        let r = self.send(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            Some(auth),
            &[("accept", ACCEPT_ALL)],
            Vec::new(),
        );
        assert_eq!(r.status, 200, "GET {repo} manifest {reference}: {r:?}");
        assert_bytes(&format!("{repo} manifest {reference}"), &r.body, manifest);
        assert_eq!(
            r.header("docker-content-digest"),
            Some(sha256(manifest).as_str())
        );
    }

    fn assert_blob(&self, auth: &str, repo: &str, digest: &str, bytes: &[u8]) {
        let r = self.get(&format!("/v2/{repo}/blobs/{digest}"), Some(auth));
        assert_eq!(r.status, 200, "GET {repo} blob {digest}");
        assert_bytes(&format!("{repo} blob {digest}"), &r.body, bytes);
    }

    /// The registry holds exactly the single-image `layout` under `repo:TAG`.
    fn assert_holds(&self, auth: &str, repo: &str, layout: &Layout) {
        self.assert_manifest(auth, repo, TAG, &layout.top.2);
        for (digest, bytes) in &layout.blobs {
            self.assert_blob(auth, repo, digest, bytes);
        }
        assert_eq!(self.tags(repo, auth), json!([TAG]), "tags of {repo}");
    }
}

// ---------------------------------------------------------------------------------------------
// The server and its identities

/// The server over HTTPS with project `team`, users alice (editor) and victor (viewer), and
/// the test CA laid out for each client.
struct Fixture {
    /// First, so its pooled connections close before the server's graceful shutdown, which
    /// would otherwise wait for them for its whole timeout.
    registry: Registry,
    server: TestServer,
    /// `127.0.0.1:PORT`, as clients name the registry.
    host: String,
    /// A containers `--cert-dir`: the CA certificate as `ca.crt`.
    cert_dir: PathBuf,
    /// The same certificate (`ctr --tlscacert`).
    ca_file: PathBuf,
    _tls: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let tls_dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("transship auth test CA");
        let tls = ca.issue_into(tls_dir.path());
        let cert_dir = tls_dir.path().join("certs.d");
        std::fs::create_dir_all(&cert_dir).unwrap();
        let ca_file = cert_dir.join("ca.crt");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let extra = format!(
            "[[user]]\nname = \"alice\"\npassword_hash = \"{}\"\n\n\
             [[project]]\nname = \"{PROJECT}\"\nanonymous = \"none\"\neditors = [\"alice\"]\n",
            hash_password(ALICE_PASSWORD)
        );
        let server = TestServer::start_with(move |c| {
            let mut c = test_config(&c.server.data_dir, &extra);
            c.server.tls = Some(tls);
            c
        });
        let ids = &server.app.auth.identities;
        ids.set_user("victor", VICTOR_PASSWORD).unwrap();
        ids.set_member(PROJECT, "victor", Role::Viewer).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let host = format!("127.0.0.1:{}", server.addr.port());
        let registry = Registry {
            rt,
            client: client(&ca.pem, true),
            base: format!("https://{host}"),
        };
        Self {
            server,
            host,
            cert_dir,
            ca_file,
            registry,
            _tls: tls_dir,
        }
    }

    /// A skopeo/podman sandbox that knows no registries: every reference names ours in full.
    fn sandbox(&self) -> Sandbox {
        Sandbox::new("unqualified-search-registries = []\n", EGRESS)
    }

    fn docker_ref(&self, repo: &str, tag: &str) -> String {
        format!("docker://{}/{repo}:{tag}", self.host)
    }

    /// A service-account key of `team` with the editor role, as `transship key create` writes
    /// it (pretty JSON, one trailing newline).
    fn create_key(&self, name: &str) -> (KeyFile, String) {
        let key = self
            .server
            .app
            .auth
            .identities
            .create_key(PROJECT, Role::Editor, name)
            .expect("create key");
        let text = serde_json::to_string_pretty(&key).unwrap() + "\n";
        (key, text)
    }

    /// An access token of alice: (id, token).
    fn create_token(&self) -> (String, String) {
        self.server
            .app
            .auth
            .identities
            .create_token(
                &Subject::User("alice".into()),
                TokenKind::Access,
                Duration::from_secs(3600),
                "laptop",
            )
            .expect("create token")
    }

    /// `skopeo login` (or `podman login`, per `tool`) to our registry with the secret read
    /// from stdin; returns the tool, ready to run or to fail.
    fn login(&self, tool: Tool, authfile: &Path, user: &str, secret: &Path) -> Tool {
        tool.args(["login", "--cert-dir"])
            .arg(&self.cert_dir)
            .arg("--authfile")
            .arg(authfile)
            .args(["--username", user, "--password-stdin"])
            .arg(&self.host)
            .stdin_file(secret)
    }

    /// `skopeo copy` of the OCI layout at `src` to `repo:tag`.
    fn skopeo_push(
        &self,
        sb: &Sandbox,
        authfile: &Path,
        src: &Path,
        repo: &str,
        tag: &str,
    ) -> Tool {
        sb.skopeo()
            .args(["copy", "--preserve-digests", "--dest-cert-dir"])
            .arg(&self.cert_dir)
            .arg("--authfile")
            .arg(authfile)
            .arg(format!("oci:{}:{TAG}", src.display()))
            .arg(self.docker_ref(repo, tag))
    }

    /// `skopeo copy` of `repo:TAG` into a new OCI layout at `out`.
    fn skopeo_pull(&self, sb: &Sandbox, authfile: &Path, repo: &str, out: &Path) -> Tool {
        sb.skopeo()
            .args(["copy", "--preserve-digests", "--src-cert-dir"])
            .arg(&self.cert_dir)
            .arg("--authfile")
            .arg(authfile)
            .arg(self.docker_ref(repo, TAG))
            .arg(format!("oci:{}:{TAG}", out.display()))
    }

    /// `skopeo inspect --raw` of `repo:TAG`.
    fn skopeo_inspect(&self, sb: &Sandbox, authfile: &Path, repo: &str) -> Tool {
        sb.skopeo()
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(&self.cert_dir)
            .arg("--authfile")
            .arg(authfile)
            .arg(self.docker_ref(repo, TAG))
    }
}

/// A `ctr --hosts-dir` sending everything for `host` to it over HTTPS (with the CA from
/// `--tlscacert`). Without one, ctr 1.6 speaks plain HTTP to any loopback registry, whatever
/// `--tlscacert` says.
fn ctr_hosts_dir(dir: &Path, host: &str) -> PathBuf {
    let hosts = dir.join("hosts");
    std::fs::create_dir_all(hosts.join(host)).unwrap();
    std::fs::write(
        hosts.join(host).join("hosts.toml"),
        // containerd 1.6 refuses a hosts.toml without a `host` table.
        format!(
            "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n"
        ),
    )
    .unwrap();
    hosts
}

/// Writes `secret` to `name` in the sandbox, for `--password-stdin`.
fn secret_file(sb: &Sandbox, name: &str, secret: &str) -> PathBuf {
    let path = sb.path(name);
    std::fs::write(&path, secret).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn skopeo_logs_in_with_a_password_round_trips_an_image_and_logs_out() {
    if !have(&["skopeo"]) {
        return;
    }
    let f = Fixture::start();
    let reg = &f.registry;
    // Anonymous callers get a Bearer challenge naming the token endpoint over HTTPS.
    let r = reg.get("/v2/", None);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"https://{}/v2/token\",service=\"transship\"",
                f.host
            )
            .as_str()
        )
    );

    let sb = f.sandbox();
    let authfile = sb.path("alice-auth.json");
    let password = secret_file(&sb, "alice.password", ALICE_PASSWORD);
    let said = f.login(sb.skopeo(), &authfile, "alice", &password).run();
    assert!(said.contains("Login Succeeded"), "{said}");
    assert_eq!(
        stored_credentials(&authfile, &f.host).as_deref(),
        Some(format!("alice:{ALICE_PASSWORD}").as_str())
    );

    let layout = Layout::single(1, &OCI, &LAYERS);
    let src = layout.write(&sb.path("src"));
    let repo = "team/app";
    f.skopeo_push(&sb, &authfile, &src, repo, TAG).run();
    reg.assert_holds(&alice(), repo, &layout);
    let out = sb.path("out");
    f.skopeo_pull(&sb, &authfile, repo, &out).run();
    assert_same_layout(&out, &layout);
    let raw = f.skopeo_inspect(&sb, &authfile, repo).run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    // Logged out, skopeo is anonymous and turned away; so is a plain anonymous request.
    let said = sb
        .skopeo()
        .args(["logout", "--authfile"])
        .arg(&authfile)
        .arg(&f.host)
        .run();
    assert!(said.contains("Removed login credentials"), "{said}");
    assert_eq!(stored_credentials(&authfile, &f.host), None);
    let err = f.skopeo_inspect(&sb, &authfile, repo).fails();
    assert!(
        mentions(&err, &["unauthorized"]) && err.contains("does not grant pull on team/app"),
        "{err}"
    );
    let r = reg.get(&format!("/v2/{repo}/manifests/{TAG}"), None);
    assert_eq!((r.status, r.error_code().as_str()), (401, "UNAUTHORIZED"));
}

#[test]
fn podman_logs_in_with_a_json_key_file_and_a_revoked_key_is_refused() {
    if !have(&["podman"]) {
        return;
    }
    let f = Fixture::start();
    let reg = &f.registry;
    let sb = f.sandbox();
    let (key, key_json) = f.create_key("ci");
    let key_path = secret_file(&sb, "key.json", &key_json);
    let authfile = sb.path("ci-auth.json");
    let said = f
        .login(sb.podman(), &authfile, "_json_key", &key_path)
        .run();
    assert!(said.contains("Login Succeeded"), "{said}");
    // podman joins the lines it reads from stdin: the stored password is the key file
    // without its line breaks, which is still the same JSON.
    let stored = stored_credentials(&authfile, &f.host).expect("stored login");
    let stored_key = stored
        .strip_prefix("_json_key:")
        .unwrap_or_else(|| panic!("{stored}"));
    assert_eq!(
        serde_json::from_str::<Value>(stored_key).expect("stored key file is JSON"),
        serde_json::to_value(&key).unwrap()
    );

    // Push from podman's storage: its ID is our config's digest.
    let layout = Layout::single(2, &OCI, &LAYERS);
    let image = &layout.images[0];
    let archive = sb.path("image.tar");
    std::fs::write(&archive, layout.archive()).unwrap();
    sb.podman().args(["load", "--input"]).arg(&archive).run();
    let id = sb.podman().args(["images", "--quiet", "--no-trunc"]).run();
    assert_eq!(id.trim(), image.config_digest);
    let repo = "team/podman";
    let name = format!("{}/{repo}:{TAG}", f.host);
    sb.podman().args(["tag", id.trim(), &name]).run();
    let digestfile = sb.path("pushed.digest");
    sb.podman()
        .args(["push", "--cert-dir"])
        .arg(&f.cert_dir)
        .arg("--authfile")
        .arg(&authfile)
        .arg("--digestfile")
        .arg(&digestfile)
        .arg(&name)
        .run();
    let pushed = std::fs::read_to_string(&digestfile).unwrap();
    let pushed = pushed.trim();

    // What the registry holds, read with the key file as Basic credentials: the manifest
    // podman reported, over our config and layers (recompressed by podman).
    let key_basic = basic_header("_json_key", &key_json);
    let r = reg.send(
        "GET",
        &format!("/v2/{repo}/manifests/{TAG}"),
        Some(&key_basic),
        &[("accept", ACCEPT_ALL)],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("docker-content-digest"), Some(pushed));
    assert_eq!(sha256(&r.body), pushed);
    let m = r.json();
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    reg.assert_blob(
        &key_basic,
        repo,
        &image.config_digest,
        &layout.blobs[&image.config_digest],
    );
    let layers = m["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), image.layer_tars.len());
    for l in layers {
        let digest = l["digest"].as_str().unwrap();
        let blob = reg.get(&format!("/v2/{repo}/blobs/{digest}"), Some(&key_basic));
        assert_eq!(blob.status, 200, "layer {digest}");
        assert_eq!(sha256(&blob.body), digest);
        assert_eq!(blob.body.len() as u64, l["size"].as_u64().unwrap());
    }

    // Forget the image and pull it back with the same login.
    sb.podman().args(["rmi", "--all", "--force"]).run();
    assert_eq!(sb.podman().args(["images", "--quiet"]).run().trim(), "");
    sb.podman()
        .args(["pull", "--quiet", "--cert-dir"])
        .arg(&f.cert_dir)
        .arg("--authfile")
        .arg(&authfile)
        .arg(&name)
        .run();
    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&name).run())
            .expect("podman image inspect JSON");
    let inspect = &inspect[0];
    assert_eq!(inspect["Digest"], pushed);
    assert_eq!(
        format!("sha256:{}", inspect["Id"].as_str().unwrap()),
        image.config_digest
    );
    let diff_ids: Vec<String> = image.layer_tars.iter().map(|t| sha256(t)).collect();
    assert_eq!(inspect["RootFS"]["Layers"], json!(diff_ids));

    // A revoked key: login fails and stores nothing; the key is refused on requests too.
    let (old, old_json) = f.create_key("old");
    f.server
        .app
        .auth
        .identities
        .revoke_key(&old.private_key_id)
        .unwrap();
    let old_path = secret_file(&sb, "old-key.json", &old_json);
    let revoked_auth = sb.path("revoked-auth.json");
    let err = f
        .login(sb.podman(), &revoked_auth, "_json_key", &old_path)
        .fails();
    assert!(mentions(&err, &["unauthorized", "invalid"]), "{err}");
    assert_eq!(stored_credentials(&revoked_auth, &f.host), None);
    let r = reg.get(
        &format!("/v2/{repo}/tags/list"),
        Some(&basic_header("_json_key", &old_json)),
    );
    assert_eq!((r.status, r.error_code().as_str()), (401, "UNAUTHORIZED"));
}

#[test]
fn an_access_token_logs_in_as_oauth2accesstoken_until_it_is_revoked() {
    if !have(&["podman", "skopeo"]) {
        return;
    }
    let f = Fixture::start();
    let sb = f.sandbox();
    let layout = Layout::single(3, &OCI, &LAYERS);
    let repo = "team/app";
    f.registry.seed(repo, &layout, &alice());
    let (token_id, token) = f.create_token();

    // podman logs in with the token; skopeo pulls with the auth file podman wrote.
    let authfile = sb.path("token-auth.json");
    let said = sb
        .podman()
        .args(["login", "--cert-dir"])
        .arg(&f.cert_dir)
        .arg("--authfile")
        .arg(&authfile)
        .args(["--username", "oauth2accesstoken", "--password", &token])
        .arg(&f.host)
        .run();
    assert!(said.contains("Login Succeeded"), "{said}");
    assert_eq!(
        stored_credentials(&authfile, &f.host),
        Some(format!("oauth2accesstoken:{token}"))
    );
    let out = sb.path("out");
    f.skopeo_pull(&sb, &authfile, repo, &out).run();
    assert_same_layout(&out, &layout);

    // Revoked: the stored login stops working at once, and logging in again is refused.
    f.server
        .app
        .auth
        .identities
        .revoke_token(&token_id)
        .unwrap();
    let err = f.skopeo_inspect(&sb, &authfile, repo).fails();
    assert!(mentions(&err, &["unauthorized", "invalid"]), "{err}");
    let again = sb.path("again-auth.json");
    let token_path = secret_file(&sb, "token", &token);
    let err = f
        .login(sb.podman(), &again, "oauth2accesstoken", &token_path)
        .fails();
    assert!(mentions(&err, &["unauthorized", "invalid"]), "{err}");
    assert_eq!(stored_credentials(&again, &f.host), None);
}

#[test]
fn a_viewer_pulls_but_cannot_push_or_delete() {
    if !have(&["skopeo"]) {
        return;
    }
    let f = Fixture::start();
    let reg = &f.registry;
    let sb = f.sandbox();
    let layout = Layout::single(4, &OCI, &LAYERS);
    let repo = "team/app";
    reg.seed(repo, &layout, &alice());

    let authfile = sb.path("victor-auth.json");
    let password = secret_file(&sb, "victor.password", VICTOR_PASSWORD);
    let said = f.login(sb.skopeo(), &authfile, "victor", &password).run();
    assert!(said.contains("Login Succeeded"), "{said}");
    let out = sb.path("out");
    f.skopeo_pull(&sb, &authfile, repo, &out).run();
    assert_same_layout(&out, &layout);

    // A push of another image under a new tag is denied; so is deleting alice's.
    let other = Layout::single(14, &OCI, &LAYERS);
    let src = other.write(&sb.path("other"));
    // (The token victor gets grants pull only: the registry answers 401 insufficient_scope,
    // which skopeo reports as "denied", with the server's reason.)
    let err = f.skopeo_push(&sb, &authfile, &src, repo, "v2").fails();
    assert!(
        mentions(&err, &["denied", "unauthorized", "403"])
            && err.contains("does not grant push on team/app"),
        "{err}"
    );
    let err = sb
        .skopeo()
        .args(["delete", "--cert-dir"])
        .arg(&f.cert_dir)
        .arg("--authfile")
        .arg(&authfile)
        .arg(f.docker_ref(repo, TAG))
        .fails();
    assert!(
        mentions(&err, &["denied", "unauthorized", "403"])
            && err.contains("does not grant delete on team/app"),
        "{err}"
    );

    // Nothing changed: the same tags, the same manifest, none of the other image's blobs.
    assert_eq!(reg.tags(repo, &alice()), json!([TAG]));
    reg.assert_manifest(&alice(), repo, TAG, &layout.top.2);
    for digest in other.blobs.keys() {
        let r = reg.send(
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            Some(&alice()),
            &[],
            Vec::new(),
        );
        assert_eq!(r.status, 404, "blob {digest} of the denied push");
    }
    // victor's Basic credentials on the registry API: pull yes, push 403 DENIED.
    let victor = basic_header("victor", VICTOR_PASSWORD);
    assert_eq!(reg.tags(repo, &victor), json!([TAG]));
    let r = reg.send(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        Some(&victor),
        &[],
        Vec::new(),
    );
    assert_eq!((r.status, r.error_code().as_str()), (403, "DENIED"));
}

#[test]
fn containerd_pulls_and_pushes_with_user_credentials_over_https() {
    if !containerd_usable(SUITE) {
        return;
    }
    let f = Fixture::start();
    let reg = &f.registry;
    let layout = Layout::single(5, &OCI, &LAYERS);
    let repo = "team/app";
    reg.seed(repo, &layout, &alice());
    let daemon = Containerd::start(EGRESS);
    let hosts = ctr_hosts_dir(daemon.dir.path(), &f.host);
    let remote = format!("{}/{repo}:{TAG}", f.host);
    let pull = |user: Option<String>| {
        let mut ctr = daemon
            .ctr()
            .args(["--debug", "images", "pull", "--snapshotter", "native"])
            .arg("--hosts-dir")
            .arg(&hosts)
            .arg("--tlscacert")
            .arg(&f.ca_file);
        if let Some(u) = user {
            ctr = ctr.args(["--user", &u]);
        }
        ctr.arg(&remote)
    };

    // No credentials, or a wrong password: refused, and nothing fetched.
    // (ctr's own error is its last line; the debug lines before it name every request.)
    let last_line = |err: String| err.trim_end().lines().last().unwrap_or("").to_string();
    let err = last_line(pull(None).fails());
    assert!(
        err.starts_with("ctr: ") && mentions(&err, &["pull access denied", "insufficient_scope"]),
        "{err}"
    );
    let err = last_line(pull(Some("alice:not-her-password".into())).fails());
    assert!(
        err.starts_with("ctr: ") && mentions(&err, &["401 unauthorized"]),
        "{err}"
    );
    assert_eq!(
        daemon.ctr().args(["content", "ls", "--quiet"]).run().trim(),
        ""
    );

    // alice's password: the pull fetches every byte, over HTTPS only.
    let log = pull(Some(format!("alice:{ALICE_PASSWORD}"))).run_log();
    let urls: Vec<&str> = log
        .split(" url=")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(!urls.is_empty(), "{log}");
    for url in &urls {
        assert!(
            url.trim_matches('"')
                .starts_with(&format!("https://{}/", f.host)),
            "{url} in\n{log}"
        );
    }
    assert_eq!(daemon.image_digest(&remote), layout.top.1);
    daemon.assert_content(&layout.all());

    // Push another image as alice, from an imported archive.
    let other = Layout::single(15, &OCI, &LAYERS);
    let archive = daemon.dir.path().join("other.tar");
    std::fs::write(&archive, other.archive()).unwrap();
    daemon.import(&archive);
    let pushed_repo = "team/ctr";
    daemon
        .ctr()
        .args([
            "images",
            "push",
            "--user",
            &format!("alice:{ALICE_PASSWORD}"),
        ])
        .arg("--hosts-dir")
        .arg(&hosts)
        .arg("--tlscacert")
        .arg(&f.ca_file)
        .arg(format!("{}/{pushed_repo}:{TAG}", f.host))
        .arg(format!("e2e/src:{TAG}"))
        .run();
    reg.assert_holds(&alice(), pushed_repo, &other);
}
