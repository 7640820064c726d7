//! The console in the cluster profile, end to end on three replicas (127.0.0.2, .3, .4) over
//! one SeaweedFS bucket and one PostgreSQL database (`common::replicas`): an image pushed on
//! A is shown on B (HTML and JSON: tags, digests, sizes, config, platforms); a console
//! session opened on A works on C, is one row in the shared database (keyed by the cookie's
//! hash, never the cookie), and signing out on C ends it on every replica; a tag deleted
//! from the console on B is gone on A, in the database too.

mod common;

use bytes::Bytes;
use common::replicas::Replicas;
use common::*;
use serde_json::Value;
use transship::auth::basic_header;
use transship::auth::keys::hash_password;

const PASSWORD: &str = "one console over three replicas";

/// `[[user]]` alice (editor) and bob (viewer) of project `team`, which anonymous callers may
/// not see: the same on every replica.
fn team_config(_replica: usize) -> String {
    // One hash for every replica, as one config file deployed to each would hold (a
    // session's credential mark is the stored hash's fingerprint).
    static HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| hash_password(PASSWORD));
    let hash = &*HASH;
    format!(
        "[[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\n\
         [[user]]\nname = \"bob\"\npassword_hash = \"{hash}\"\n\n\
         [[project]]\nname = \"team\"\nanonymous = \"none\"\neditors = [\"alice\"]\nviewers = [\"bob\"]\n"
    )
}

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A console page (`accept` `text/html` or `application/json`), with a session cookie.
fn page(h: &Http, path: &str, accept: &str, cookie: Option<&str>) -> Resp {
    let mut headers = vec![("accept", accept)];
    if let Some(c) = cookie {
        headers.push(("cookie", c));
    }
    h.send("GET", path, &headers, Bytes::new())
}

fn json_page(h: &Http, path: &str) -> Value {
    let r = page(h, path, "application/json", None);
    assert_eq!(r.status, 200, "{path}: {}", text(&r));
    r.json()
}

/// Signs in through the console's form on `h`; returns the session cookie (`name=value`).
fn sign_in(h: &Http, user: &str) -> String {
    let resp = post_form(
        h,
        "/-/login",
        None,
        &[
            ("user", user),
            ("password", PASSWORD),
            ("next", "/team/app"),
        ],
    );
    assert_eq!(resp.status, 303, "{}", text(&resp));
    let set = resp.header("set-cookie").expect("set-cookie");
    set.split(';').next().expect("cookie").to_string()
}

/// A page's HTML as the holder of `cookie` sees it (which must be 200).
fn html_as(h: &Http, path: &str, cookie: &str) -> String {
    let resp = page(h, path, "text/html", Some(cookie));
    assert_eq!(resp.status, 200, "{}", text(&resp));
    text(&resp)
}

/// The console's delete form, posted on `h`.
fn console_delete(h: &Http, cookie: &str, repo: &str, reference: &str, csrf: &str) -> Resp {
    post_form(
        h,
        "/-/delete",
        Some(cookie),
        &[("repo", repo), ("ref", reference), ("csrf", csrf)],
    )
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    page.split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("csrf field")
        .to_string()
}

fn tags_in(r: &Replicas, repo: &str) -> Vec<String> {
    r.sql(&format!(
        "SELECT t.tag FROM tags t JOIN repositories r ON r.id = t.repo_id \
         WHERE r.name = '{repo}' ORDER BY t.tag"
    ))
    .into_iter()
    .map(|row| row[0].clone())
    .collect()
}

#[test]
fn pages_on_b_show_a_push_on_a_sessions_move_between_replicas_and_deletes_reach_everyone() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start_with(3, &team_config);
    let repo = "team/app";
    let alice = |i: usize| r.http(i).with_auth(&basic_header("alice", PASSWORD));

    // On A: two tagged images and an index over both (plain HTTP pushes).
    let (m1, d1) = push_image(&alice(0), repo, "v1", 1);
    let (m2, d2) = push_image(&alice(0), repo, "v2", 2);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d1}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d2}","size":{},"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#,
        m1.len(),
        m2.len()
    );
    let resp = alice(0).push_manifest(
        repo,
        "multi",
        "application/vnd.oci.image.index.v1+json",
        index.as_bytes(),
    );
    assert_eq!(resp.status, 201, "{}", text(&resp));
    let di = sha256(index.as_bytes());
    let size_of = |m: &str| -> u64 {
        let v: Value = serde_json::from_str(m).expect("manifest json");
        v["config"]["size"].as_u64().unwrap_or(0) + v["layers"][0]["size"].as_u64().unwrap_or(0)
    };

    // B: the repository's JSON shows every tag with its digest, size and push time.
    let v = json_page(&alice(1), &format!("/{repo}"));
    assert_eq!(v["name"], repo);
    assert_eq!(v["kind"], "project");
    assert!(v["created"].is_string(), "{v}");
    let tags: Vec<(String, String)> = v["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| {
            (
                t["tag"].as_str().unwrap_or_default().to_string(),
                t["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        tags,
        vec![
            ("multi".to_string(), di.clone()),
            ("v1".to_string(), d1.clone()),
            ("v2".to_string(), d2.clone())
        ]
    );
    let row = |tag: &str| {
        v["tags"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["tag"] == tag))
            .cloned()
            .expect("tag row")
    };
    assert_eq!(row("v1")["size"].as_u64(), Some(size_of(&m1)));
    assert!(row("v1")["pushed"].is_string(), "{v}");
    assert_eq!(
        row("multi")["size"].as_u64(),
        Some(size_of(&m1) + size_of(&m2)),
        "an index's size is its children's, read from the database"
    );
    assert_eq!(
        row("multi")["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    assert_eq!(v["untagged"], serde_json::json!([]));
    assert_eq!(v["can_delete"], true);

    // B: the HTML page shows the same, with the pull line naming B.
    let html = text(&page(&alice(1), &format!("/{repo}"), "text/html", None));
    for s in [
        ">v1<",
        ">v2<",
        ">multi<",
        d1.as_str(),
        d2.as_str(),
        di.as_str(),
    ] {
        assert!(html.contains(s), "{s} missing: {html}");
    }
    assert!(
        html.contains(&format!("docker pull {}/{repo}:multi", r.addr(1))),
        "{html}"
    );

    // B: an image's page reads its config blob from the bucket.
    let img = json_page(&alice(1), &format!("/{repo}@{d1}"));
    assert_eq!(img["tags"], serde_json::json!(["v1"]));
    assert_eq!(img["config"]["stored"], true, "{img}");
    assert_eq!(img["config"]["architecture"], "amd64");
    assert_eq!(img["manifest_size"].as_u64(), Some(m1.len() as u64));
    let img = json_page(&alice(1), &format!("/{repo}@{di}"));
    assert_eq!(img["platforms"].as_array().map(Vec::len), Some(2), "{img}");
    // C: the project's listing.
    let l = json_page(&alice(2), "/team");
    assert_eq!(l["repositories"][0]["name"], repo, "{l}");
    // Visibility is unchanged: anonymous browsers are asked to sign in.
    assert_eq!(
        page(&r.http(1), &format!("/{repo}"), "text/html", None).status,
        401
    );

    // Sign in on A; the session is one row in the shared database, not the cookie itself.
    let cookie = sign_in(&r.http(0), "alice");
    let value = cookie
        .split_once('=')
        .map(|(_, v)| v)
        .expect("cookie value");
    let rows = r.sql("SELECT encode(id, 'hex'), subject FROM console_sessions");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][1], "alice");
    assert_eq!(
        rows[0][0],
        sha256(value.as_bytes()).trim_start_matches("sha256:")
    );

    // C: the same cookie browses as alice, delete buttons included.
    let html = html_as(&r.http(2), &format!("/{repo}"), &cookie);
    assert!(
        html.contains("alice") && html.contains("/-/delete"),
        "{html}"
    );
    let csrf = csrf_of(&html);

    // B: the console deletes tag v1 with the session's token.
    let resp = console_delete(&r.http(1), &cookie, repo, "v1", &csrf);
    assert_eq!(resp.status, 303, "{}", text(&resp));
    assert_eq!(resp.header("location"), Some("/team/app"));
    // A: the tag is gone, for the registry API and in the database; v2 and the image stay.
    assert_eq!(
        alice(0).get(&format!("/v2/{repo}/manifests/v1")).status,
        404
    );
    assert_eq!(
        alice(0).get(&format!("/v2/{repo}/manifests/{d1}")).status,
        200
    );
    assert_eq!(tags_in(&r, repo), vec!["multi", "v2"]);
    let v = json_page(&alice(0), &format!("/{repo}"));
    assert!(!v["tags"].to_string().contains("\"v1\""), "{v}");
    // Deleting it again from C: already gone.
    let resp = console_delete(&r.http(2), &cookie, repo, "v1", &csrf);
    assert_eq!(resp.status, 404, "{}", text(&resp));
    // A forged delete (wrong token) on A changes nothing.
    let resp = console_delete(&r.http(0), &cookie, repo, "v2", &"0".repeat(64));
    assert_eq!(resp.status, 403, "{}", text(&resp));
    assert_eq!(tags_in(&r, repo), vec!["multi", "v2"]);

    // Sign out on C: the session ends on every replica and its row is gone.
    let resp = post_form(&r.http(2), "/-/logout", Some(&cookie), &[("csrf", &csrf)]);
    assert_eq!(resp.status, 303, "{}", text(&resp));
    for i in 0..3 {
        let resp = page(&r.http(i), &format!("/{repo}"), "text/html", Some(&cookie));
        assert_eq!(resp.status, 401, "replica {i} after sign-out");
    }
    assert!(r.sql("SELECT id FROM console_sessions").is_empty());
}

/// A viewer's session from B browses on A, where its role still holds: no delete button, and
/// a delete posted with the session's own token is refused.
#[test]
fn a_viewer_session_cannot_delete_on_another_replica() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start_with(2, &team_config);
    let repo = "team/app";
    let alice = r.http(0).with_auth(&basic_header("alice", PASSWORD));
    push_image(&alice, repo, "v1", 3);
    let cookie = sign_in(&r.http(1), "bob");
    let html = html_as(&r.http(0), &format!("/{repo}"), &cookie);
    assert!(
        !html.contains("/-/delete?"),
        "a viewer is offered no delete: {html}"
    );
    let resp = console_delete(&r.http(0), &cookie, repo, "v1", &csrf_of(&html));
    assert_eq!(resp.status, 403, "{}", text(&resp));
    assert_eq!(tags_in(&r, repo), vec!["v1"]);
}
