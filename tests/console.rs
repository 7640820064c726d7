//! The console, black box: the real server, headless Chromium driving it over the DevTools
//! protocol (real navigation, forms and cookies), oras-py for a referrer, a real upstream
//! registry for the cache pages, and a plain HTTP client for what a browser cannot forge or
//! for what must have happened underneath. Screenshots of every page land in
//! `target/tmp/console-shots/`.

mod browser;
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::images::{Egress, Tool, skip};
use common::upstream::{self, Distribution};
use common::*;
use serde_json::Value;
use transship::auth::basic_header;
use transship::auth::keys::{Role, Subject, TokenKind, hash_password};
use transship::config::HumanDuration;

const SUITE: &str = "console";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const PASSWORD: &str = "correct horse battery";
const JSON: [(&str, &str); 1] = [("accept", "application/json")];

fn browser() -> Option<browser::Browser> {
    let b = browser::Browser::start();
    if b.is_none() && !skip(SUITE, "chromium not installed (scripts/test installs it)") {
        return None;
    }
    b
}

fn config() -> String {
    let mut users = String::new();
    for name in ["eddie", "victor"] {
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
editors = ["eddie"]
viewers = ["victor"]
"#
    )
}

/// Pushes a linux/`arch` image (by digest) with a config that says how it runs; returns the
/// manifest's digest, its size and the layer's digest.
fn push_platform(h: &Http, repo: &str, arch: &str, seed: u64) -> (String, usize, String) {
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","created":"2026-11-01T10:00:00Z","config":{{"Entrypoint":["/bin/app-{arch}"],"Env":["MODE=console-test"],"Labels":{{"org.example.team":"console"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
    );
    let layer = random_bytes(20_000 + seed as usize, seed);
    let c = h.push_blob(repo, config.as_bytes());
    let l = h.push_blob(repo, &layer);
    let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
    let digest = sha256(m.as_bytes());
    let r = h.push_manifest(repo, &digest, OCI_MANIFEST, m.as_bytes());
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    (digest, m.len(), l)
}

/// A two-platform index tagged `tag`; returns (index digest, [(child digest, layer digest)]).
fn push_multi_arch(h: &Http, repo: &str, tag: &str) -> (String, Vec<(String, String)>) {
    let mut children = Vec::new();
    let mut entries = Vec::new();
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let (d, size, layer) = push_platform(h, repo, arch, 40 + i as u64);
        entries.push(format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":{size},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
        ));
        children.push((d, layer));
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        entries.join(",")
    );
    let r = h.push_manifest(repo, tag, OCI_INDEX, index.as_bytes());
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    (sha256(index.as_bytes()), children)
}

/// oras-py pushes an artifact and a signature whose subject it is; prints their digests.
const ORAS_SCRIPT: &str = r#"
import json, sys
import oras.client, oras.oci

host = sys.argv[1]
target = host + "/local/signed/art"
client = oras.client.OrasClient(hostname=host, insecure=True)
r = client.push(target=target + ":v1", files=["payload.bin:application/vnd.console.payload"], quiet=True)
subject_digest = r.headers["Docker-Content-Digest"]
raw = client.session.get("http://%s/v2/local/signed/art/manifests/%s" % (host, subject_digest),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
raw.raise_for_status()
subject = oras.oci.Subject(mediaType=raw.headers["Content-Type"], digest=subject_digest,
                           size=len(raw.content))
r = client.push(target=target + ":sig", files=["signature.json:application/vnd.console.sig"],
                manifest_config="sig-config.json:application/vnd.console.signature.v1+json",
                manifest_annotations={"console.role": "signature"}, subject=subject, quiet=True)
print(json.dumps({"subject": subject_digest, "referrer": r.headers["Docker-Content-Digest"]}))
"#;

/// Pushes the oras artifact and its referrer; `None` if oras-py is not installed.
fn oras_push(s: &TestServer) -> Option<(String, String, String)> {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import oras.client"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        skip(
            SUITE,
            "python module oras (oras-py) not installed (scripts/test installs it)",
        );
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let payload = random_bytes(50_001, 9);
    std::fs::write(work.path().join("payload.bin"), &payload).unwrap();
    std::fs::write(work.path().join("signature.json"), br#"{"signed":true}"#).unwrap();
    std::fs::write(work.path().join("sig-config.json"), br#"{"kind":"sig"}"#).unwrap();
    std::fs::write(work.path().join("push.py"), ORAS_SCRIPT).unwrap();
    let out = Tool::new("python3", Egress::LoopbackOnly)
        .arg("push.py")
        .arg(s.addr.to_string())
        .dir(work.path())
        .run();
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("oras output ({e}): {out}"));
    Some((
        v["subject"].as_str().unwrap().to_string(),
        v["referrer"].as_str().unwrap().to_string(),
        sha256(&payload),
    ))
}

/// The session cookie a successful sign-in sets, from `Set-Cookie`.
fn session_cookie(r: &Resp) -> String {
    let set = r.header("set-cookie").expect("set-cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    set.split(';').next().unwrap().to_string()
}

fn form(h: &Http, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Resp {
    post_form(h, path, cookie, fields)
}

/// Posts the sign-in form.
fn sign_in(h: &Http, user: &str, password: &str) -> Resp {
    form(
        h,
        "/-/login",
        None,
        &[("user", user), ("password", password)],
    )
}

/// A page as the holder of `cookie` sees it.
fn page_as(h: &Http, path: &str, cookie: &str) -> Resp {
    h.send(
        "GET",
        path,
        &[("accept", "text/html"), ("cookie", cookie)],
        Bytes::new(),
    )
}

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn project_pages_sign_in_and_deleting_as_an_editor() {
    let Some(mut b) = browser() else { return };
    let s = TestServer::start_with(|c| test_config(&c.server.data_dir, &config()));
    let base = s.url("");
    let base = base.trim_end_matches('/');
    let host = s.addr.to_string();
    let anon = Http::for_server(&s);
    let eddie = Http::for_server(&s).with_auth(&basic_header("eddie", PASSWORD));
    let victor = Http::for_server(&s).with_auth(&basic_header("victor", PASSWORD));

    // Content: a multi-arch image and an oras artifact with a referrer in the open project
    // `local`, two tags in the private project `team`.
    let (index, children) = push_multi_arch(&anon, "local/multi", "v1");
    let oras = oras_push(&s);
    push_image(&eddie, "team/app", "v1", 1);
    let (_, v2) = push_image(&eddie, "team/app", "v2", 2);

    // Home, anonymous: the open project and the cache, not the private project.
    let dom = b.goto(&format!("{base}/"));
    b.screenshot("01-home-anonymous");
    assert!(dom.contains(r#"href="/local""#), "{dom}");
    assert!(dom.contains(r#"href="/docker.io""#), "{dom}");
    assert!(!dom.contains(r#"href="/team""#), "{dom}");

    // The repository page of the multi-arch image: tag, digest, both platforms, pull line.
    let dom = b.goto(&format!("{base}/local/multi"));
    b.screenshot("02-repository-multi-arch");
    b.screenshot_at("02-repository-multi-arch-phone", 390);
    assert!(dom.contains(">v1<"), "{dom}");
    assert!(dom.contains(&index), "{dom}");
    assert!(
        dom.contains("linux/amd64") && dom.contains("linux/arm64"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("docker pull {host}/local/multi:v1")),
        "{dom}"
    );
    assert!(!dom.contains("/-/delete"), "anonymous: no delete button");

    // The index's page lists both platforms; a child's page its layer and config.
    let dom = b.goto(&format!("{base}/local/multi@{index}"));
    b.screenshot("03-image-index");
    for (child, _) in &children {
        assert!(dom.contains(child.as_str()), "{dom}");
    }
    let dom = b.goto(&format!("{base}/local/multi@{}", children[1].0));
    b.screenshot("04-image-arm64");
    assert!(dom.contains(&children[1].1), "layer digest: {dom}");
    assert!(dom.contains("/bin/app-arm64"), "entrypoint: {dom}");
    assert!(dom.contains("MODE=console-test"), "env: {dom}");
    assert!(dom.contains("org.example.team"), "labels: {dom}");

    // The oras artifact's page: its layer and the signature that refers to it.
    if let Some((subject, referrer, payload)) = &oras {
        let dom = b.goto(&format!("{base}/local/signed/art@{subject}"));
        b.screenshot("05-image-with-referrer");
        assert!(dom.contains(payload.as_str()), "layer: {dom}");
        assert!(dom.contains(referrer.as_str()), "referrer: {dom}");
        assert!(
            dom.contains("application/vnd.console.signature.v1+json"),
            "{dom}"
        );
        assert!(dom.contains("console.role"), "{dom}");
    }

    // A private project, anonymously: the sign-in form, nothing of the repository.
    let dom = b.goto(&format!("{base}/team/app"));
    b.screenshot("06-private-anonymous-login");
    assert!(dom.contains(r#"action="/-/login""#), "{dom}");
    assert!(!dom.contains(&v2), "{dom}");
    // The same for a repository that does not exist: existence is not revealed.
    let missing = anon.send(
        "GET",
        "/team/nothing",
        &[("accept", "text/html")],
        Bytes::new(),
    );
    let present = anon.send("GET", "/team/app", &[("accept", "text/html")], Bytes::new());
    assert_eq!((missing.status, present.status), (401, 401));

    // A viewer signs in from there and lands on the page, without a delete button.
    let dom = b.sign_in("victor", PASSWORD);
    b.screenshot("07-viewer-repository");
    assert!(b.url().ends_with("/team/app"), "{}", b.url());
    assert!(
        dom.contains("Signed in as") && dom.contains("victor"),
        "{dom}"
    );
    assert!(dom.contains(&v2), "{dom}");
    assert!(
        !dom.contains("/-/delete"),
        "a viewer sees no delete button: {dom}"
    );
    assert_eq!(s.app.console.sessions.len(), 1);
    // A viewer who finds the confirmation page anyway may not use it.
    let dom = b.goto(&format!("{base}/-/delete?repo=team/app&ref=v2"));
    assert!(dom.contains("Not allowed"), "{dom}");
    // Home now shows the private project too.
    let dom = b.goto(&format!("{base}/"));
    assert!(dom.contains(r#"href="/team""#), "{dom}");

    // Sign out: the session is gone on the server, the private page asks for sign-in again.
    let dom = b.submit("document.querySelector('form[action=\"/-/logout\"]').submit()");
    assert!(dom.contains("Sign in"), "{dom}");
    assert_eq!(
        s.app.console.sessions.len(),
        0,
        "sign-out ends the session server-side"
    );
    let dom = b.goto(&format!("{base}/team/app"));
    assert!(dom.contains(r#"action="/-/login""#), "{dom}");

    // An editor signs in, deletes tag v2 through the confirmation step.
    let dom = b.sign_in("eddie", PASSWORD);
    b.screenshot("08-editor-repository");
    assert!(
        dom.contains("/-/delete?repo=team%2Fapp&amp;ref=v2"),
        "{dom}"
    );
    let dom = b.goto(&format!("{base}/-/delete?repo=team%2Fapp&ref=v2"));
    b.screenshot("09-confirm-delete");
    assert!(dom.contains("Delete tag"), "{dom}");
    let dom = b.submit("document.querySelector('form[action=\"/-/delete\"]').submit()");
    b.screenshot("10-after-delete");
    assert!(b.url().ends_with("/team/app"), "{}", b.url());
    assert!(dom.contains(">v1<") && !dom.contains(">v2<"), "{dom}");
    // Underneath: the tag is gone from the registry, v1 is not.
    assert_eq!(eddie.get("/v2/team/app/manifests/v2").status, 404);
    assert_eq!(eddie.get("/v2/team/app/manifests/v1").status, 200);

    // A forged POST (a valid session cookie but no or a wrong CSRF token) changes nothing.
    let r = form(
        &anon,
        "/-/login",
        None,
        &[
            ("user", "eddie"),
            ("password", PASSWORD),
            ("next", "/team/app"),
        ],
    );
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(r.header("location"), Some("/team/app"));
    let cookie = session_cookie(&r);
    for csrf in [None, Some("0".repeat(64))] {
        let mut fields = vec![("repo", "team/app"), ("ref", "v1")];
        if let Some(c) = &csrf {
            fields.push(("csrf", c.as_str()));
        }
        let r = form(&anon, "/-/delete", Some(&cookie), &fields);
        assert_eq!(r.status, 403, "{}", text(&r));
    }
    assert_eq!(eddie.get("/v2/team/app/manifests/v1").status, 200);
    // With the token of its own session's page, the same POST works.
    let page = page_as(&anon, "/-/delete?repo=team/app&ref=v1", &cookie);
    let page = text(&page);
    let csrf = page
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("csrf field");
    let r = form(
        &anon,
        "/-/delete",
        Some(&cookie),
        &[("repo", "team/app"), ("ref", "v1"), ("csrf", csrf)],
    );
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(eddie.get("/v2/team/app/manifests/v1").status, 404);
    // An image (by digest) goes the same way, with its confirmation page first.
    let page = page_as(&anon, &format!("/-/delete?repo=team/app&ref={v2}"), &cookie);
    assert!(text(&page).contains("Delete image"), "{}", text(&page));
    let r = form(
        &anon,
        "/-/delete",
        Some(&cookie),
        &[("repo", "team/app"), ("ref", &v2), ("csrf", csrf)],
    );
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(
        eddie.get(&format!("/v2/team/app/manifests/{v2}")).status,
        404
    );

    // Signing someone out takes their page's token too; with it, the session ends.
    assert_eq!(form(&anon, "/-/logout", Some(&cookie), &[]).status, 403);
    assert_eq!(page_as(&anon, "/team/app", &cookie).status, 200);
    let r = form(&anon, "/-/logout", Some(&cookie), &[("csrf", csrf)]);
    assert_eq!(r.status, 303);
    assert!(
        r.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    assert_eq!(page_as(&anon, "/team/app", &cookie).status, 401);

    // An access token signs in as its user.
    let (token_id, token) = s
        .app
        .auth
        .identities
        .create_token(
            &Subject::User("victor".into()),
            TokenKind::Access,
            Duration::from_secs(3600),
            "",
        )
        .unwrap();
    let r = sign_in(&anon, "oauth2accesstoken", &token);
    assert_eq!(r.status, 303, "{}", text(&r));
    let victor_cookie = session_cookie(&r);
    let page = page_as(&anon, "/team/app", &victor_cookie);
    assert_eq!(page.status, 200);
    assert!(text(&page).contains("victor"));
    // Revoking the token ends the session it opened.
    s.app.auth.identities.revoke_token(&token_id).unwrap();
    assert_eq!(page_as(&anon, "/team/app", &victor_cookie).status, 401);
    // A password session ends when the password is reset.
    let ids = &s.app.auth.identities;
    ids.set_user("walt", "walt's first password").unwrap();
    ids.set_member("team", "walt", Role::Viewer).unwrap();
    let r = sign_in(&anon, "walt", "walt's first password");
    assert_eq!(r.status, 303, "{}", text(&r));
    let password_cookie = session_cookie(&r);
    assert_eq!(page_as(&anon, "/team/app", &password_cookie).status, 200);
    ids.set_user("walt", "walt's second password").unwrap();
    assert_eq!(page_as(&anon, "/team/app", &password_cookie).status, 401);
    // A sign-in form posted from another site is refused (it would sign the victim in as
    // whoever the attacker chose).
    let r = anon.send(
        "POST",
        "/-/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "text/html"),
            ("sec-fetch-site", "cross-site"),
        ],
        Bytes::from_static(b"user=walt&password=walt%27s%20second%20password"),
    );
    assert_eq!(r.status, 403, "{}", text(&r));
    assert!(r.header("set-cookie").is_none());

    // Key files are for machines: the login form refuses them.
    let key = s
        .app
        .auth
        .identities
        .create_key("team", Role::Editor, "ci")
        .unwrap();
    let key = serde_json::to_string(&key).unwrap();
    let r = sign_in(&anon, "_json_key", &key);
    assert_eq!(r.status, 403, "{}", text(&r));
    assert!(r.header("set-cookie").is_none());
    let r = sign_in(&anon, "victor", "wrong");
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());

    // The JSON form of the same URLs.
    let r = anon.send("GET", "/local/multi", &JSON, Bytes::new());
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["name"], "local/multi");
    assert_eq!(v["tags"][0]["tag"], "v1");
    assert_eq!(v["tags"][0]["digest"], index.as_str());
    assert_eq!(v["tags"][0]["media_type"], OCI_INDEX);
    assert!(
        v["tags"][0]["pushed"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "push time: {v}"
    );
    assert_eq!(
        v["tags"][0]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let v = anon
        .send(
            "GET",
            &format!("/local/multi@{}", children[0].0),
            &JSON,
            Bytes::new(),
        )
        .json();
    assert_eq!(
        v["config"]["entrypoint"],
        serde_json::json!(["/bin/app-amd64"])
    );
    assert_eq!(v["layers"][0]["digest"], children[0].1.as_str());
    assert!(v["pushed"].is_string(), "{v}");
    assert_eq!(
        anon.send("GET", "/team/app", &JSON, Bytes::new()).status,
        401
    );
    let r = victor.send("GET", "/team/app", &JSON, Bytes::new());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["can_delete"], false);
    assert_eq!(
        eddie.send("GET", "/team/app", &JSON, Bytes::new()).json()["can_delete"],
        true
    );
    assert_eq!(
        victor
            .send("GET", "/team/nothing", &JSON, Bytes::new())
            .status,
        404
    );
    let home = anon.send("GET", "/", &JSON, Bytes::new()).json();
    assert_eq!(home["projects"], serde_json::json!(["local"]));

    // The registry API is not the console's, whatever a client asks for.
    let r = anon.send(
        "GET",
        "/v2/local/multi/manifests/v1",
        &[("accept", "text/html")],
        Bytes::new(),
    );
    assert_ne!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let r = anon.send("GET", "/v2/", &[("accept", "text/html")], Bytes::new());
    assert_eq!(r.status, 401, "the registry still challenges: {}", text(&r));
    assert_eq!(anon.get("/local/multi").status, 404, "no Accept: no page");
    let metrics = anon.get("/metrics");
    assert!(
        text(&metrics).contains(r#"route="console""#),
        "console requests are counted as such"
    );
}

#[test]
fn a_cache_page_shows_what_a_tag_pointed_at_upstream() {
    if !upstream::available() {
        return;
    }
    let Some(mut b) = browser() else { return };
    let up = Distribution::start();
    let upstream = Http::new(&up.url());
    let (_, first) = push_image(&upstream, "library/app", "latest", 3);
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c.upstreams[0].tag_ttl = HumanDuration(Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let pull = || {
        let r = h.send(
            "GET",
            "/v2/library/app/manifests/latest",
            &[("accept", OCI_MANIFEST)],
            Bytes::new(),
        );
        assert_eq!(r.status, 200, "{}", text(&r));
        r.header("docker-content-digest").unwrap().to_string()
    };
    assert_eq!(pull(), first);
    // The tag moves upstream; the next pull sees it.
    let (_, second) = push_image(&upstream, "library/app", "latest", 4);
    assert_ne!(first, second);
    assert_eq!(pull(), second);

    let base = s.url("");
    let dom = b.goto(&format!(
        "{}/docker.io/library/app",
        base.trim_end_matches('/')
    ));
    b.screenshot("11-cache-repository");
    assert!(dom.contains("Tag history"), "{dom}");
    let (at_first, at_second) = (dom.find(&first), dom.rfind(&second));
    assert!(
        at_first.is_some() && at_second.is_some() && at_first < at_second,
        "both resolutions, oldest first: {dom}"
    );
    // Named the way clients pull it, the repository leads to its page.
    b.goto(&format!("{}/library/app", base.trim_end_matches('/')));
    assert!(b.url().ends_with("/docker.io/library/app"), "{}", b.url());
    let dom = b.goto(&format!("{}/docker.io", base.trim_end_matches('/')));
    assert!(dom.contains(r#"href="/docker.io/library/app""#), "{dom}");

    let v = h
        .send("GET", "/docker.io/library/app", &JSON, Bytes::new())
        .json();
    assert_eq!(v["kind"], "cache");
    assert_eq!(v["tags"][0]["digest"], second.as_str());
    let history: Vec<(&str, &str)> = v["cache"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["tag"].as_str().unwrap(), r["digest"].as_str().unwrap()))
        .collect();
    assert_eq!(
        history,
        vec![("latest", first.as_str()), ("latest", second.as_str())]
    );
    // The inventory: pulls (recorded in memory, flushed here as the server does every
    // cache.access_flush_interval), when last pulled, and whether anything is pinned.
    assert_eq!(v["cache"]["pinned"], false);
    s.app.store.flush_access().unwrap();
    let repo: transship::oci::RepoName = "docker.io/library/app".parse().unwrap();
    s.app
        .store
        .pin(
            &repo,
            &transship::store::pins::PinTarget::Tag("latest".parse().unwrap()),
            &[],
        )
        .unwrap();
    let v = h
        .send("GET", "/docker.io/library/app", &JSON, Bytes::new())
        .json();
    assert_eq!(v["cache"]["pull_count"], 2, "{v}");
    assert!(v["cache"]["last_pulled"].is_string(), "{v}");
    assert_eq!(v["cache"]["pinned"], true);
}

/// A timing script, not a test (`--run-ignored only`): how long the repository page of a
/// repository with 1,000 tags (each on its own manifest) takes to render, as HTML and JSON.
#[test]
#[ignore = "a bench figure, run by hand"]
fn bench_repository_page_with_1000_tags() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = random_bytes(1000, 1);
    let c = h.push_blob("local/many", config);
    let l = h.push_blob("local/many", &layer);
    for i in 0..1000 {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{l}","size":{}}}],"annotations":{{"n":"{i}"}}}}"#,
            config.len(),
            layer.len()
        );
        let r = h.push_manifest(
            "local/many",
            &format!("t{i:04}"),
            OCI_MANIFEST,
            m.as_bytes(),
        );
        assert_eq!(r.status, 201);
    }
    for (what, accept) in [("html", "text/html"), ("json", "application/json")] {
        let mut times = Vec::new();
        for _ in 0..20 {
            let started = std::time::Instant::now();
            let r = h.send("GET", "/local/many", &[("accept", accept)], Bytes::new());
            times.push(started.elapsed());
            assert_eq!(r.status, 200);
            assert!(text(&r).contains("t0999"));
        }
        times.sort();
        eprintln!(
            "repository page, 1000 tags, {what}: median {:?}, min {:?}, max {:?}, {} bytes",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            h.send("GET", "/local/many", &[("accept", accept)], Bytes::new())
                .body
                .len()
        );
    }
}

#[test]
fn signing_in_over_tls_sets_a_secure_cookie() {
    use http_body_util::{BodyExt, Full};
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new("console test CA");
    let tls = ca.issue_into(dir.path());
    let s = TestServer::start_with(move |c| {
        let mut c = test_config(&c.server.data_dir, &config());
        c.server.tls = Some(tls);
        c
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([("user", "victor"), ("password", PASSWORD)])
        .finish();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1:{}/-/login", s.addr.port()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (status, cookie) = rt.block_on(async {
        let r = common::tls::client(&ca.pem, false)
            .request(req)
            .await
            .unwrap();
        let status = r.status().as_u16();
        let cookie = r
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let _ = r.into_body().collect().await;
        (status, cookie)
    });
    assert_eq!(status, 303);
    let cookie = cookie.expect("a session cookie");
    for part in ["Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(cookie.contains(part), "{cookie}");
    }
}
