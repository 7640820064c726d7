//! Access control, black box against the real server: the full role × action matrix on project
//! and mirror repositories (with Basic credentials on every request, and again with Bearer
//! tokens from the token endpoint), the `docker login` token flow with refresh tokens, hostile
//! tokens, brute-force throttling, malformed credentials, and the push lock of an exposed
//! listener without users. Every denial is also checked to have changed nothing.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::upstream::{self, Distribution};
use common::*;
use transship::auth::basic_header;
use transship::auth::keys::{Role, Subject, TokenKind, hash_password};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const PASSWORD: &str = "correct horse battery";

/// Users, their roles, and the projects of the matrix.
fn extra_config(upstream_url: &str) -> String {
    let mut users = String::new();
    for name in ["olivia", "eddie", "victor", "mallory"] {
        users.push_str(&format!(
            "[[user]]\nname = \"{name}\"\npassword_hash = \"{}\"\n",
            hash_password(PASSWORD)
        ));
    }
    format!(
        r#"
{users}
[[project]]
name = "team"
anonymous = "none"
owners = ["olivia"]
editors = ["eddie"]
viewers = ["victor"]

[[project]]
name = "secret"
owners = ["olivia"]

[[project]]
name = "example.com/open"
anonymous = "pull"
anonymous_from = ["0.0.0.0/0", "::/0"]
owners = ["olivia"]

[[upstream]]
name = "authed.example"
url = "{upstream_url}"
pull = "authenticated"
"#
    )
}

struct Fixture {
    server: TestServer,
    _up: Distribution,
    /// The upstream image, as served through the mirror.
    mirror_manifest: String,
    key_json: String,
    access_token: String,
}

fn fixture() -> Option<Fixture> {
    if !upstream::available() {
        return None;
    }
    let up = Distribution::start();
    let (mirror_manifest, _) = push_image(&Http::new(&up.url()), "library/busybox", "1", 7);
    let url = up.url();
    let server = TestServer::start_with(|c| {
        let mut c = test_config(&c.server.data_dir, &extra_config(&url));
        c.upstreams[0].url = url.clone();
        c
    });
    let app = &server.app;
    let key = app
        .auth
        .identities
        .create_key("team", Role::Editor, "ci")
        .unwrap();
    let (_, access_token) = app
        .auth
        .identities
        .create_token(
            &Subject::User("eddie".into()),
            TokenKind::Access,
            Duration::from_secs(3600),
            "",
        )
        .unwrap();
    // The owner seeds the repositories the callers act on.
    let owner = Http::for_server(&server).with_auth(&basic_header("olivia", PASSWORD));
    push_image(&owner, "team/app", "v1", 1);
    push_image(&owner, "secret/app", "v1", 2);
    push_image(&owner, "example.com/open/app", "v1", 3);
    Some(Fixture {
        key_json: serde_json::to_string(&key).unwrap(),
        access_token,
        mirror_manifest,
        _up: up,
        server,
    })
}

/// What a caller may do on the project `team` (mirror rules are the same for everyone but
/// anonymous callers).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rights {
    None,
    Pull,
    PullPush,
}

struct Who {
    name: &'static str,
    basic: Option<String>,
    team: Rights,
    /// May pull `secret/app` (the mount source outside `team`).
    secret: bool,
}

fn callers(f: &Fixture) -> Vec<Who> {
    let user = |n: &str| Some(basic_header(n, PASSWORD));
    vec![
        Who {
            name: "anonymous",
            basic: None,
            team: Rights::None,
            secret: false,
        },
        Who {
            name: "viewer",
            basic: user("victor"),
            team: Rights::Pull,
            secret: false,
        },
        Who {
            name: "editor",
            basic: user("eddie"),
            team: Rights::PullPush,
            secret: false,
        },
        Who {
            name: "owner",
            basic: user("olivia"),
            team: Rights::PullPush,
            secret: true,
        },
        Who {
            name: "nomember",
            basic: user("mallory"),
            team: Rights::None,
            secret: false,
        },
        Who {
            name: "key",
            basic: Some(basic_header("_json_key", &f.key_json)),
            team: Rights::PullPush,
            secret: false,
        },
        Who {
            name: "token",
            basic: Some(basic_header("oauth2accesstoken", &f.access_token)),
            team: Rights::PullPush,
            secret: false,
        },
    ]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// Basic credentials on every request.
    Basic,
    /// A token from the token endpoint, asked for the scopes the test needs.
    Bearer,
}

/// Gets a token for `who`, asking for everything the matrix will try.
fn bearer_for(http: &Http, who: &Who) -> String {
    let n = who.name;
    let scopes = [
        "repository:team/app:pull,push,delete".to_string(),
        format!("repository:team/nested/push-{n}:pull,push"),
        format!("repository:team/del-{n}-bearer:pull,delete"),
        format!("repository:team/mount-{n}:pull,push"),
        format!("repository:team/mount2-{n}:pull,push"),
        "repository:secret/app:pull".into(),
        "repository:library/busybox:pull,push".into(),
        "repository:authed.example/library/busybox:pull".into(),
        "registry:catalog:*".into(),
    ];
    let query: Vec<String> = scopes
        .iter()
        .map(|s| format!("scope={}", s.replace(':', "%3A").replace(',', "%2C")))
        .collect();
    let path = format!("/v2/token?service=transship&{}", query.join("&"));
    let headers: Vec<(&str, &str)> = who
        .basic
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let r = http.send("GET", &path, &headers, Bytes::new());
    assert_eq!(
        r.status,
        200,
        "{n}: token request: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() >= 60);
    v["token"].as_str().unwrap().to_string()
}

/// The status a denied request gets: 401 with a challenge for anonymous callers and for
/// tokens lacking the scope, 403 for known callers without the role.
fn denied_status(who: &Who, mode: Mode) -> u16 {
    if who.basic.is_none() || mode == Mode::Bearer {
        401
    } else {
        403
    }
}

fn check_denied(r: &Resp, who: &Who, mode: Mode, what: &str) {
    let want = denied_status(who, mode);
    assert_eq!(
        r.status,
        want,
        "{} ({mode:?}) {what}: {:?}",
        who.name,
        String::from_utf8_lossy(&r.body)
    );
    let code = r.error_code();
    assert_eq!(
        code,
        if want == 401 {
            "UNAUTHORIZED"
        } else {
            "DENIED"
        },
        "{} {what}",
        who.name
    );
    if want == 401 {
        let c = r
            .header("www-authenticate")
            .expect("a 401 carries a challenge");
        assert!(c.starts_with("Bearer realm=\"http://"), "{c}");
        assert!(c.contains("service=\"transship\""), "{c}");
    }
}

fn run_matrix(f: &Fixture, mode: Mode) {
    let anon = Http::for_server(&f.server);
    let owner = Http::for_server(&f.server).with_auth(&basic_header("olivia", PASSWORD));
    let seed_blob = {
        let r = owner.get("/v2/team/app/manifests/v1");
        let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        m["layers"][0]["digest"].as_str().unwrap().to_string()
    };
    let secret_blob = {
        let r = owner.get("/v2/secret/app/manifests/v1");
        let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        m["layers"][0]["digest"].as_str().unwrap().to_string()
    };
    for (i, who) in callers(f).iter().enumerate() {
        let n = who.name;
        let http = match (mode, &who.basic) {
            (Mode::Basic, Some(b)) => Http::for_server(&f.server).with_auth(b),
            (Mode::Basic, None) => Http::for_server(&f.server),
            (Mode::Bearer, _) => {
                let t = bearer_for(&anon, who);
                Http::for_server(&f.server).with_auth(&format!("Bearer {t}"))
            }
        };
        let can_pull = who.team != Rights::None;
        let can_push = who.team == Rights::PullPush;

        // pull
        let r = http.get("/v2/team/app/manifests/v1");
        if can_pull {
            assert_eq!(r.status, 200, "{n} pull");
            assert_eq!(r.body, owner.get("/v2/team/app/manifests/v1").body);
            assert_eq!(
                http.get(&format!("/v2/team/app/blobs/{seed_blob}")).status,
                200
            );
        } else {
            check_denied(&r, who, mode, "pull");
            check_denied(
                &http.get(&format!("/v2/team/app/blobs/{seed_blob}")),
                who,
                mode,
                "blob pull",
            );
        }

        // push
        // Nested repositories follow their project.
        let repo = format!("team/nested/push-{n}");
        let r = http.send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        );
        if can_push {
            assert_eq!(r.status, 202, "{n} push");
            push_image(&http, &repo, "v", 100 + i as u64);
            assert_eq!(owner.get(&format!("/v2/{repo}/manifests/v")).status, 200);
        } else {
            check_denied(&r, who, mode, "push");
            let m = image_manifest((&seed_blob, 1), &[]);
            let r = http.push_manifest(&repo, "v", OCI_MANIFEST, m.as_bytes());
            check_denied(&r, who, mode, "manifest push");
            assert_eq!(
                owner.get(&format!("/v2/{repo}/tags/list")).status,
                404,
                "{n}: denied push left a trace"
            );
        }

        // delete (a manifest the owner pushed for this caller)
        let repo = format!("team/del-{n}-{}", format!("{mode:?}").to_lowercase());
        let (_, digest) = push_image(&owner, &repo, "x", 200 + i as u64);
        let del = http.delete(&format!("/v2/{repo}/manifests/{digest}"));
        let after = owner.get(&format!("/v2/{repo}/manifests/{digest}")).status;
        if can_push {
            assert_eq!(del.status, 202, "{n} delete");
            assert_eq!(after, 404);
        } else {
            check_denied(&del, who, mode, "delete");
            assert_eq!(after, 200, "{n}: denied delete removed the manifest");
        }

        // mount: from a repository the caller may pull, and from one they may not
        let target = format!("team/mount-{n}");
        let r = http.send(
            "POST",
            &format!("/v2/{target}/blobs/uploads/?mount={seed_blob}&from=team/app"),
            &[],
            Bytes::new(),
        );
        if can_push {
            assert_eq!(r.status, 201, "{n} mount from team/app");
            assert_eq!(
                owner
                    .head(&format!("/v2/{target}/blobs/{seed_blob}"))
                    .status,
                200
            );
        } else {
            check_denied(&r, who, mode, "mount");
        }
        let target = format!("team/mount2-{n}");
        let r = http.send(
            "POST",
            &format!("/v2/{target}/blobs/uploads/?mount={secret_blob}&from=secret/app"),
            &[],
            Bytes::new(),
        );
        match (can_push, who.secret) {
            (true, true) => assert_eq!(r.status, 201, "{n} mount from secret/app"),
            (true, false) => {
                // No pull on the source: an ordinary upload session, nothing mounted.
                assert_eq!(
                    r.status, 202,
                    "{n} mount from secret/app falls back to upload"
                );
                assert_eq!(
                    owner
                        .head(&format!("/v2/{target}/blobs/{secret_blob}"))
                        .status,
                    404
                );
            }
            (false, _) => check_denied(&r, who, mode, "mount from secret"),
        }

        // mirror: anonymous-pull upstream, authenticated-only upstream, and never push
        let r = http.get("/v2/library/busybox/manifests/1");
        assert_eq!(r.status, 200, "{n} mirror pull");
        assert_eq!(r.body, f.mirror_manifest.as_bytes());
        let r = http.get("/v2/authed.example/library/busybox/manifests/1");
        if who.basic.is_some() {
            assert_eq!(r.status, 200, "{n} authenticated mirror pull");
            assert_eq!(r.body, f.mirror_manifest.as_bytes());
        } else {
            assert_eq!(r.status, 401, "{n} authenticated mirror pull");
            assert_eq!(r.error_code(), "UNAUTHORIZED");
        }
        let r = http.send(
            "POST",
            "/v2/library/busybox/blobs/uploads/",
            &[],
            Bytes::new(),
        );
        assert_eq!(r.status, 403, "{n} mirror push");
        assert_eq!(r.error_code(), "DENIED");
        let r = http.delete("/v2/library/busybox/manifests/1");
        assert!(
            r.status == 403 || r.status == 401,
            "{n} mirror delete: {}",
            r.status
        );

        // catalog: only what the caller may pull
        let r = http.get("/v2/_catalog?n=1000");
        assert_eq!(
            r.status,
            200,
            "{n} catalog: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let repos: Vec<String> = r.json()["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let has = |name: &str| repos.iter().any(|r| r == name);
        assert_eq!(has("team/app"), can_pull, "{n} catalog team/app: {repos:?}");
        assert_eq!(
            has("secret/app"),
            who.secret,
            "{n} catalog secret/app: {repos:?}"
        );
        assert!(
            has("example.com/open/app"),
            "{n} catalog open project: {repos:?}"
        );
        assert!(
            has("docker.io/library/busybox"),
            "{n} catalog mirror: {repos:?}"
        );
        assert_eq!(
            has("authed.example/library/busybox"),
            who.basic.is_some(),
            "{n} catalog authenticated mirror: {repos:?}"
        );
    }
}

#[test]
fn role_matrix_with_basic_credentials() {
    let Some(f) = fixture() else { return };
    run_matrix(&f, Mode::Basic);
}

#[test]
fn role_matrix_with_bearer_tokens() {
    let Some(f) = fixture() else { return };
    run_matrix(&f, Mode::Bearer);
}
