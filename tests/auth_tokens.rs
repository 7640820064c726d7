//! The token service and its hardening, black box: the `docker login` flow (no scope, refresh
//! token, OAuth2 POST grants), scope intersection, hostile tokens signed or forged by the test,
//! brute-force throttling, malformed credentials and scopes, and the push lock of an exposed
//! listener with no users. Each rejection is checked to carry the registry error JSON and to
//! have changed nothing.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use transship::auth::basic_header;
use transship::auth::jwt::{Claims, KEY_FILE};
use transship::auth::keys::{Role, hash_password};
use transship::auth::scope::Access;

const PASSWORD: &str = "correct horse battery";

fn server() -> TestServer {
    server_with(|_| {})
}

fn server_with(adjust: impl FnOnce(&mut transship::config::Config)) -> TestServer {
    let users: String = ["olivia", "victor"]
        .iter()
        .map(|n| {
            format!(
                "[[user]]\nname = \"{n}\"\npassword_hash = \"{}\"\n",
                hash_password(PASSWORD)
            )
        })
        .collect();
    let extra = format!(
        "{users}\n[[project]]\nname = \"team\"\nowners = [\"olivia\"]\nviewers = [\"victor\"]\n\
         [[project]]\nname = \"open\"\nanonymous = \"pull\"\nanonymous_from = [\"0.0.0.0/0\", \"::/0\"]\nowners = [\"olivia\"]\n"
    );
    TestServer::start_with(|c| {
        let mut c = test_config(&c.server.data_dir, &extra);
        c.auth.max_failed_logins = 3;
        c.auth.lockout = transship::config::HumanDuration(Duration::from_secs(2));
        adjust(&mut c);
        c
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The challenge parameters of a 401.
fn challenge(r: &Resp) -> (String, String) {
    let c = r.header("www-authenticate").expect("challenge").to_string();
    let param = |k: &str| {
        c.split(&format!("{k}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    (param("realm"), param("error"))
}

#[test]
fn docker_login_flow_refresh_tokens_and_oauth_post() {
    let s = server();
    let http = Http::for_server(&s);
    // 1. The ping challenges, with an absolute realm on this server.
    let r = http.get("/v2/");
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    let (realm, _) = challenge(&r);
    assert_eq!(realm, s.url("/v2/token"));
    // 2. What docker login sends: no scope, offline_token, Basic credentials.
    let r = http.send(
        "GET",
        &format!("{realm}?account=olivia&client_id=docker&offline_token=true&service=transship"),
        &[("authorization", &basic_header("olivia", PASSWORD))],
        Bytes::new(),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let v = r.json();
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"], v["token"]);
    assert_eq!(v["expires_in"], 300);
    assert_eq!(v["scope"], "");
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    let refresh = v["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    // 3. An access-less token still authenticates the ping.
    let bearer = format!("Bearer {token}");
    assert_eq!(
        http.send("GET", "/v2/", &[("authorization", &bearer)], Bytes::new())
            .status,
        200
    );
    // ...but grants nothing else.
    let r = http.send(
        "GET",
        "/v2/team/app/tags/list",
        &[("authorization", &bearer)],
        Bytes::new(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(challenge(&r).1, "insufficient_scope");
    // 4. Later pushes: OAuth2 POST with the refresh token as identity token.
    let form = format!(
        "grant_type=refresh_token&refresh_token={}&client_id=docker&service=transship&scope={}",
        enc(&refresh),
        enc("repository:team/app:pull,push")
    );
    let r = http.send(
        "POST",
        "/v2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["scope"], "repository:team/app:pull,push");
    assert_eq!(v["refresh_token"].as_str(), Some(refresh.as_str()));
    let pusher =
        Http::for_server(&s).with_auth(&format!("Bearer {}", v["access_token"].as_str().unwrap()));
    push_image(&pusher, "team/app", "v1", 1);
    // The password grant, and a viewer asking for more than they may have: a narrower token,
    // never an error.
    let form = format!(
        "grant_type=password&username=victor&password={}&client_id=x&service=transship&scope={}",
        enc(PASSWORD),
        enc("repository:team/app:pull,push,delete repository:team/other:push")
    );
    let r = http.send(
        "POST",
        "/v2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["scope"], "repository:team/app:pull");
    assert!(
        r.json().get("refresh_token").is_none(),
        "no access_type=offline, no refresh token"
    );
    // Bad grants.
    for (form, status) in [
        (
            "grant_type=refresh_token&refresh_token=tsr_0000000000000000_nope&service=transship",
            401,
        ),
        (
            "grant_type=password&username=olivia&password=wrong-password&service=transship",
            401,
        ),
        ("grant_type=client_credentials&service=transship", 400),
        ("grant_type=password&username=olivia", 400),
        (
            "grant_type=password&username=olivia&password=x&service=elsewhere",
            400,
        ),
    ] {
        let r = http.send(
            "POST",
            "/v2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        );
        assert_eq!(
            r.status,
            status,
            "{form}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.error_code().is_empty(), "{form}: error body");
    }
    // Removing the user revokes their refresh tokens.
    let app = &s.app;
    app.auth
        .identities
        .set_user("temp", "temporary-pass")
        .unwrap();
    let r = http.send(
        "GET",
        "/v2/token?offline_token=true&service=transship",
        &[("authorization", &basic_header("temp", "temporary-pass"))],
        Bytes::new(),
    );
    let refresh = r.json()["refresh_token"].as_str().unwrap().to_string();
    app.auth.identities.remove_user("temp").unwrap();
    let form = format!(
        "grant_type=refresh_token&refresh_token={}&service=transship",
        enc(&refresh)
    );
    let r = http.send(
        "POST",
        "/v2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    );
    assert_eq!(r.status, 401);
}

/// Signs `claims` with the server's own key (read from its data dir), under `header`.
fn sign(s: &TestServer, header: &Header, claims: &Claims) -> String {
    let pem = std::fs::read(s.data_dir().join(KEY_FILE)).unwrap();
    jsonwebtoken::encode(header, claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
}

fn claims(access: Vec<Access>) -> Claims {
    let t = now();
    Claims {
        iss: "transship".into(),
        sub: "olivia".into(),
        aud: "transship".into(),
        exp: t + 300,
        nbf: t - 5,
        iat: t,
        jti: "test".into(),
        access,
    }
}

#[test]
fn hostile_tokens_are_rejected_and_change_nothing() {
    let s = server();
    let http = Http::for_server(&s);
    let kid = s.app.auth.signer.kid().to_string();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.clone());
    let all = || {
        vec![Access::new(
            "repository",
            "team/app",
            &["pull", "push", "delete"],
        )]
    };
    // A genuine token works: the forgeries below differ from it in one thing each.
    let good = sign(&s, &header, &claims(all()));
    let r = http.send(
        "POST",
        "/v2/team/app/blobs/uploads/",
        &[("authorization", &format!("Bearer {good}"))],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "the control token must work");

    let other_key = {
        let dir = tempfile::tempdir().unwrap();
        transship::auth::jwt::TokenSigner::open(dir.path(), "transship", "transship").unwrap();
        std::fs::read(dir.path().join(KEY_FILE)).unwrap()
    };
    let mut forged = Vec::new();
    let mut c = claims(all());
    c.exp = now() - 3600;
    c.nbf = now() - 7200;
    forged.push(("expired", sign(&s, &header, &c)));
    let mut c = claims(all());
    c.nbf = now() + 3600;
    c.exp = now() + 7200;
    forged.push(("not yet valid", sign(&s, &header, &c)));
    let mut c = claims(all());
    c.aud = "someone-else".into();
    forged.push(("wrong audience", sign(&s, &header, &c)));
    let mut c = claims(all());
    c.iss = "evil".into();
    forged.push(("wrong issuer", sign(&s, &header, &c)));
    let mut h = header.clone();
    h.kid = Some("unknown".into());
    forged.push(("unknown kid", sign(&s, &h, &claims(all()))));
    forged.push((
        "another key under our kid",
        jsonwebtoken::encode(
            &header,
            &claims(all()),
            &EncodingKey::from_ec_pem(&other_key).unwrap(),
        )
        .unwrap(),
    ));
    // Tampered payload: a viewer's token edited to grant push.
    let parts: Vec<&str> = good.split('.').collect();
    let mut c = claims(all());
    c.sub = "mallory".into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
    forged.push((
        "tampered payload",
        format!("{}.{payload}.{}", parts[0], parts[2]),
    ));
    let none_header =
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(all())).unwrap());
    forged.push(("alg none", format!("{none_header}.{body}.")));
    // Algorithm confusion: HS256 keyed with something public.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.clone());
    forged.push((
        "HS256 with a guessable secret",
        jsonwebtoken::encode(
            &h,
            &claims(all()),
            &EncodingKey::from_secret(kid.as_bytes()),
        )
        .unwrap(),
    ));
    forged.push(("garbage", "not-a-jwt".into()));
    forged.push(("empty", String::new()));

    for (what, token) in &forged {
        for (method, path) in [
            ("GET", "/v2/team/app/tags/list"),
            ("POST", "/v2/team/app/blobs/uploads/"),
            ("GET", "/v2/"),
        ] {
            let r = http.send(
                method,
                path,
                &[("authorization", &format!("Bearer {token}"))],
                Bytes::new(),
            );
            assert_eq!(
                r.status,
                401,
                "{what}: {method} {path}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.error_code(), "UNAUTHORIZED", "{what}");
            assert_eq!(challenge(&r).1, "invalid_token", "{what}");
        }
    }

    // Valid tokens used beyond their grant: another repository, or push with a pull token.
    let pull_only = sign(
        &s,
        &header,
        &claims(vec![Access::new("repository", "team/app", &["pull"])]),
    );
    let other_repo = sign(
        &s,
        &header,
        &claims(vec![Access::new("repository", "team/a", &["pull", "push"])]),
    );
    for (what, token, path) in [
        (
            "pull token used to push",
            &pull_only,
            "/v2/team/app/blobs/uploads/",
        ),
        (
            "token for team/a used on team/b",
            &other_repo,
            "/v2/team/b/blobs/uploads/",
        ),
    ] {
        let r = http.send(
            "POST",
            path,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        );
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.error_code(), "UNAUTHORIZED");
        assert_eq!(challenge(&r).1, "insufficient_scope", "{what}");
    }
    let m = image_manifest((EMPTY_SHA256, 0), &[]);
    let r = http.send(
        "PUT",
        "/v2/team/app/manifests/forged",
        &[
            ("authorization", &format!("Bearer {pull_only}")),
            ("content-type", "application/vnd.oci.image.manifest.v1+json"),
        ],
        m,
    );
    assert_eq!(r.status, 401);
    let owner = Http::for_server(&s).with_auth(&basic_header("olivia", PASSWORD));
    assert_eq!(
        owner.get("/v2/team/app/tags/list").status,
        404,
        "no forged token wrote anything"
    );
    assert_eq!(owner.get("/v2/team/b/tags/list").status, 404);
}

#[test]
fn repeated_failed_logins_are_throttled_then_released() {
    let s = server();
    let http = Http::for_server(&s);
    let wrong = basic_header("olivia", "wrong-password");
    let right = basic_header("olivia", PASSWORD);
    push_image(&Http::for_server(&s).with_auth(&right), "open/app", "v1", 9);
    for i in 0..3 {
        let r = http.send(
            "GET",
            "/v2/team/app/tags/list",
            &[("authorization", &wrong)],
            Bytes::new(),
        );
        assert_eq!(r.status, 401, "failure {i}");
    }
    // Locked: even the right password is refused, with a clear error and Retry-After.
    for path in ["/v2/team/app/tags/list", "/v2/token?service=transship"] {
        let r = http.send("GET", path, &[("authorization", &right)], Bytes::new());
        assert_eq!(r.status, 429, "{path}");
        assert_eq!(r.error_code(), "TOOMANYREQUESTS");
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&wait), "Retry-After {wait}");
    }
    // Anonymous access, and Docker Hub credentials sent to a mirror namespace, are unaffected.
    let r = http.send("GET", "/v2/open/app/manifests/v1", &[], Bytes::new());
    assert_eq!(r.status, 200);
    let hub = basic_header("dockerhub-user", "hub-password");
    let r = http.send(
        "GET",
        "/v2/library/alpine/manifests/latest",
        &[("authorization", &hub)],
        Bytes::new(),
    );
    assert!(
        r.status != 401 && r.status != 429,
        "hub credentials on a mirror: {}",
        r.status
    );
    // The lockout ends on time and the right password works again.
    std::thread::sleep(Duration::from_millis(2100));
    let r = http.send("GET", "/v2/", &[("authorization", &right)], Bytes::new());
    assert_eq!(r.status, 200);
    // Prometheus sees it.
    let metrics = String::from_utf8_lossy(&http.get("/metrics").body).into_owned();
    let value = |outcome: &str| -> u64 {
        let prefix = format!("transship_auth_denials_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(value("unauthenticated"), 3, "{metrics}");
    assert_eq!(value("throttled"), 2, "{metrics}");
}

#[test]
fn malformed_credentials_and_scopes_get_clean_errors() {
    let s = server();
    let http = Http::for_server(&s);
    let huge = format!("Basic {}", "A".repeat(64 * 1024));
    let no_colon = format!("Basic {}", STANDARD.encode("olivia"));
    let not_utf8 = format!("Basic {}", STANDARD.encode([0xff, 0xfe, b':', b'x']));
    for auth in [
        "Basic",
        "Basic !!!not-base64!!!",
        no_colon.as_str(),
        not_utf8.as_str(),
        "Digest username=\"olivia\"",
        "Bearer",
        huge.as_str(),
    ] {
        let label: String = auth.chars().take(40).collect();
        let r = http.send(
            "POST",
            "/v2/team/app/blobs/uploads/",
            &[("authorization", auth)],
            Bytes::new(),
        );
        assert!(r.status == 400 || r.status == 401, "{label}: {}", r.status);
        assert!(!r.error_code().is_empty(), "{label}: error body");
    }
    // Scopes: names with host:port parse (and grant nothing here); broken ones are 400s.
    let owner = basic_header("olivia", PASSWORD);
    let r = http.send(
        "GET",
        &format!(
            "/v2/token?service=transship&scope={}",
            enc("repository:localhost:5000/team/app:pull")
        ),
        &[("authorization", &owner)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["scope"], "");
    for bad in [
        "repository",
        "repository:team/app",
        ":team/app:pull",
        "repository:team/app:pu ll",
    ] {
        let r = http.send(
            "GET",
            &format!("/v2/token?service=transship&scope={}", enc(bad)),
            &[("authorization", &owner)],
            Bytes::new(),
        );
        assert_eq!(r.status, 400, "{bad}");
        assert!(!r.error_code().is_empty());
    }
    let r = http.send(
        "GET",
        "/v2/token?scope=repository:team/app:pull",
        &[("authorization", "Bearer x")],
        Bytes::new(),
    );
    assert_eq!(r.status, 400, "the token endpoint takes Basic");
    // Nothing above created anything.
    assert_eq!(
        Http::for_server(&s)
            .with_auth(&owner)
            .get("/v2/_catalog")
            .json()["repositories"],
        serde_json::json!([])
    );
    // Key files (each failure counts towards the lockout, so these come last).
    let app = &s.app;
    let key = app
        .auth
        .identities
        .create_key("team", Role::Editor, "ci")
        .unwrap();
    let json = serde_json::to_string(&key).unwrap();
    let ok = http.send(
        "GET",
        "/v2/team/app/tags/list",
        &[("authorization", &basic_header("_json_key", &json))],
        Bytes::new(),
    );
    assert_eq!(ok.status, 404, "a valid key gets through to the handler");
    let truncated = basic_header("_json_key", &json[..json.len() / 2]);
    let bad_b64 = basic_header("_json_key_base64", "%%%");
    for (what, auth) in [
        ("truncated key file", truncated),
        ("bad base64 key", bad_b64),
    ] {
        let r = http.send(
            "GET",
            "/v2/team/app/tags/list",
            &[("authorization", &auth)],
            Bytes::new(),
        );
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.error_code(), "UNAUTHORIZED");
    }
    app.auth.identities.revoke_key(&key.private_key_id).unwrap();
    let r = http.send(
        "GET",
        "/v2/team/app/tags/list",
        &[("authorization", &basic_header("_json_key", &json))],
        Bytes::new(),
    );
    assert_eq!(r.status, 401, "revoked key");
}

#[test]
fn an_exposed_listener_without_users_refuses_pushes() {
    let s = TestServer::start_with(|mut c| {
        c.server.listen = "0.0.0.0:0".parse().unwrap();
        c
    });
    let http = Http::for_server(&s);
    let r = http.send("POST", "/v2/local/app/blobs/uploads/", &[], Bytes::new());
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    assert!(String::from_utf8_lossy(&r.body).contains("transship user add"));
    assert_eq!(
        http.get("/v2/").status,
        200,
        "with nobody to log in, the ping is open"
    );
    // Once a user exists, loopback clients push anonymously again (the project allows it).
    let app = &s.app;
    app.auth
        .identities
        .set_user("admin", "a-long-password")
        .unwrap();
    push_image(&http, "local/app", "v1", 1);
    assert_eq!(http.get("/v2/").status, 401, "now the ping challenges");
}

#[test]
fn owners_manage_members_over_http() {
    let s = server();
    let owner = Http::for_server(&s).with_auth(&basic_header("olivia", PASSWORD));
    let victor = Http::for_server(&s).with_auth(&basic_header("victor", PASSWORD));
    let members = "/transship/v1/projects/team/members";
    let set = |http: &Http, user: &str, body: &str| {
        http.send(
            "PUT",
            &format!("{members}/{user}"),
            &[("content-type", "application/json")],
            body.to_string(),
        )
    };
    // A viewer may not push, nor promote themselves.
    let r = victor.send("POST", "/v2/team/app/blobs/uploads/", &[], Bytes::new());
    assert_eq!(r.status, 403);
    let r = set(&victor, "victor", r#"{"role":"owner"}"#);
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    let r = Http::for_server(&s).get(members);
    assert_eq!(r.status, 401);
    // The owner makes them an editor: now they push.
    let r = set(&owner, "victor", r#"{"role":"editor"}"#);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    push_image(&victor, "team/app", "v1", 1);
    let list = owner.get(members).json();
    let roles: Vec<(String, String, String)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
                m["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(roles.contains(&("olivia".into(), "owner".into(), "config".into())));
    assert!(roles.contains(&("victor".into(), "editor".into(), "index".into())));
    // Bad input changes nothing.
    assert_eq!(set(&owner, "victor", r#"{"role":"god"}"#).status, 400);
    assert_eq!(set(&owner, "victor", "not json").status, 400);
    assert_eq!(set(&owner, "nobody", r#"{"role":"viewer"}"#).status, 404);
    assert_eq!(
        owner.delete(&format!("{members}/olivia")).status,
        404,
        "config roles are read-only"
    );
    assert_eq!(
        owner.get("/transship/v1/projects/elsewhere/members").status,
        403,
        "owning one project says nothing about another"
    );
    // Removing the stored role leaves the config one (viewer): pushes stop.
    assert_eq!(owner.delete(&format!("{members}/victor")).status, 204);
    let r = victor.send("POST", "/v2/team/app/blobs/uploads/", &[], Bytes::new());
    assert_eq!(r.status, 403);
    assert_eq!(victor.get("/v2/team/app/manifests/v1").status, 200);
}

/// A token from `/v2/token` for `scope`, asked with `authorization` (if any) and `extra`
/// headers; returns (granted scope, token).
fn token_for(
    http: &Http,
    authorization: Option<&str>,
    scope: &str,
    extra: &[(&str, &str)],
) -> (String, String) {
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(a) = authorization {
        headers.push(("authorization", a));
    }
    let r = http.send(
        "GET",
        &format!("/v2/token?service=transship&scope={}", enc(scope)),
        &headers,
        Bytes::new(),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    (
        v["scope"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// Victor's roles in `team` as the owner sees them: (role, source) pairs.
fn roles_of_victor(s: &TestServer) -> Vec<(String, String)> {
    let owner = Http::for_server(s).with_auth(&basic_header("olivia", PASSWORD));
    let list = owner.get("/transship/v1/projects/team/members").json();
    list["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["user"] == "victor")
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["source"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn managing_members_with_a_token_needs_the_project_admin_scope() {
    let s = server();
    let http = Http::for_server(&s);
    let olivia = basic_header("olivia", PASSWORD);
    let members = "/transship/v1/projects/team/members";
    let promote = |token: &str| {
        http.send(
            "PUT",
            &format!("{members}/victor"),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/json"),
            ],
            r#"{"role":"owner"}"#,
        )
    };
    let before = roles_of_victor(&s);
    assert_eq!(before, [("viewer".to_string(), "config".to_string())]);

    // The owner's pull token, and a token with no access at all (docker login's): refused,
    // with a challenge naming the scope that would do.
    let (scope, pull) = token_for(&http, Some(&olivia), "repository:team/app:pull", &[]);
    assert_eq!(scope, "repository:team/app:pull");
    let (_, login) = token_for(&http, Some(&olivia), "", &[]);
    for token in [&pull, &login] {
        let r = promote(token);
        assert_eq!(r.status, 401, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error_code(), "UNAUTHORIZED");
        let c = r.header("www-authenticate").unwrap();
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        assert!(c.contains("scope=\"project:team:admin\""), "{c}");
        let r = http.send(
            "GET",
            members,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        );
        assert_eq!(r.status, 401);
    }
    assert_eq!(roles_of_victor(&s), before, "nothing changed");

    // Only owners get the admin scope, only for projects they own.
    let victor = basic_header("victor", PASSWORD);
    let (scope, victors) = token_for(&http, Some(&victor), "project:team:admin", &[]);
    assert_eq!(scope, "", "a viewer is not granted project admin");
    assert_eq!(promote(&victors).status, 401);
    let (scope, _) = token_for(&http, None, "project:team:admin", &[]);
    assert_eq!(scope, "", "nor is an anonymous caller");
    let (scope, _) = token_for(
        &http,
        Some(&olivia),
        "project:team:admin project:elsewhere:admin project:open:*",
        &[],
    );
    assert_eq!(scope, "project:team:admin project:open:admin");
    let (_, open_admin) = token_for(&http, Some(&olivia), "project:open:admin", &[]);
    assert_eq!(
        promote(&open_admin).status,
        401,
        "admin of one project is not admin of another"
    );
    assert_eq!(roles_of_victor(&s), before, "nothing changed");

    // The owner's admin token works.
    let (scope, admin) = token_for(&http, Some(&olivia), "project:team:admin", &[]);
    assert_eq!(scope, "project:team:admin");
    let r = promote(&admin);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(roles_of_victor(&s).contains(&("owner".to_string(), "index".to_string())));
    let r = http.send(
        "DELETE",
        &format!("{members}/victor"),
        &[("authorization", &format!("Bearer {admin}"))],
        Bytes::new(),
    );
    assert_eq!(r.status, 204);
    assert_eq!(roles_of_victor(&s), before);

    // Credentials presented directly need no scope: a password, an access token.
    let app = &s.app;
    let (_, access) = app
        .auth
        .identities
        .create_token(
            &transship::auth::keys::Subject::User("olivia".into()),
            transship::auth::keys::TokenKind::Access,
            Duration::from_secs(600),
            "",
        )
        .unwrap();
    for auth in [olivia.clone(), basic_header("oauth2accesstoken", &access)] {
        let r = http.send("GET", members, &[("authorization", &auth)], Bytes::new());
        assert_eq!(r.status, 200);
    }
}

#[test]
fn anonymous_rights_follow_the_client_behind_a_trusted_proxy() {
    let s = server_with(|c| c.server.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]);
    let http = Http::for_server(&s);
    let upload = "/v2/local/app/blobs/uploads/";
    let post = |headers: &[(&str, &str)]| http.send("POST", upload, headers, Bytes::new()).status;
    let public = ("x-forwarded-for", "203.0.113.7");
    // The proxy's own host is loopback: anonymous push to `local` as configured.
    assert_eq!(post(&[]), 202);
    // A client the proxy names from the internet is not, however it dresses up its header.
    assert_eq!(post(&[public]), 401);
    assert_eq!(post(&[("x-forwarded-for", "127.0.0.1, 203.0.113.7")]), 401);
    assert_eq!(post(&[("x-forwarded-for", "203.0.113.7, 127.0.0.1")]), 401);
    assert_eq!(post(&[("x-forwarded-for", "unknown")]), 401);
    // Its token request gets no push...
    let (scope, _) = token_for(&http, None, "repository:local/app:pull,push", &[public]);
    assert_eq!(scope, "");
    // ...and a push token minted on loopback does not carry loopback's rights to it.
    let (scope, token) = token_for(&http, None, "repository:local/app:pull,push", &[]);
    assert_eq!(scope, "repository:local/app:pull,push");
    let bearer = format!("Bearer {token}");
    let refused_from_outside = |bearer: &str| {
        let r = http.send(
            "POST",
            upload,
            &[("authorization", bearer), public],
            Bytes::new(),
        );
        assert_eq!(r.status, 401, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(challenge(&r).1, "insufficient_scope");
    };
    refused_from_outside(&bearer);
    assert_eq!(
        post(&[("authorization", &bearer)]),
        202,
        "from loopback it works"
    );
    // A named user without a role in `local` gets the same push on loopback, from the
    // network, not from a role: the token carries none of it elsewhere either.
    let olivia = basic_header("olivia", PASSWORD);
    let (scope, token) = token_for(&http, Some(&olivia), "repository:local/app:pull,push", &[]);
    assert_eq!(scope, "repository:local/app:pull,push");
    refused_from_outside(&format!("Bearer {token}"));
    // Her own project's rights come from her role and go wherever she goes.
    let (_, token) = token_for(&http, Some(&olivia), "repository:team/app:pull,push", &[]);
    let r = http.send(
        "POST",
        "/v2/team/app/blobs/uploads/",
        &[("authorization", &format!("Bearer {token}")), public],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    // Nothing was pushed to `local` from outside: only the uploads started from loopback exist.
    assert_eq!(s.app.store.uploads_active(), 3);

    // Login throttling counts the forwarded client, not the proxy.
    let wrong = basic_header("olivia", "wrong-password");
    let right = basic_header("olivia", PASSWORD);
    let ping = |auth: &str, from: &str| {
        http.send(
            "GET",
            "/v2/",
            &[("authorization", auth), ("x-forwarded-for", from)],
            Bytes::new(),
        )
        .status
    };
    for _ in 0..3 {
        assert_eq!(ping(&wrong, "198.51.100.1"), 401);
    }
    assert_eq!(
        ping(&right, "198.51.100.1"),
        429,
        "the guessing client is refused"
    );
    assert_eq!(ping(&right, "198.51.100.2"), 200, "other clients are not");
}

#[test]
fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let s = server_with(|c| c.server.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()]);
    let http = Http::for_server(&s);
    let r = http.send(
        "POST",
        "/v2/local/app/blobs/uploads/",
        &[("x-forwarded-for", "203.0.113.7")],
        Bytes::new(),
    );
    assert_eq!(
        r.status, 202,
        "the TCP peer (loopback) counts, not the header"
    );
    let wrong = basic_header("olivia", "wrong-password");
    for from in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let r = http.send(
            "GET",
            "/v2/",
            &[("authorization", &wrong), ("x-forwarded-for", from)],
            Bytes::new(),
        );
        assert_eq!(r.status, 401);
    }
    let r = http.send(
        "GET",
        "/v2/",
        &[
            ("authorization", &basic_header("olivia", PASSWORD)),
            ("x-forwarded-for", "198.51.100.9"),
        ],
        Bytes::new(),
    );
    assert_eq!(
        r.status, 429,
        "a spoofed header does not escape the lockout"
    );
}

#[test]
fn a_valid_login_between_guesses_does_not_reset_the_throttle() {
    let s = server();
    let http = Http::for_server(&s);
    let guess = basic_header("olivia", "wrong-password");
    let own = basic_header("victor", PASSWORD);
    let ping = |auth: &str| {
        http.send("GET", "/v2/", &[("authorization", auth)], Bytes::new())
            .status
    };
    // The attacker's own valid credential between guesses used to clear the count.
    for i in 0..2 {
        assert_eq!(ping(&guess), 401, "guess {i}");
        assert_eq!(ping(&own), 200, "own login {i}");
    }
    assert_eq!(ping(&guess), 401, "guess 2");
    assert_eq!(ping(&guess), 429, "the address is refused after 3 failures");
    assert_eq!(ping(&own), 429, "with any credentials");
}

#[test]
fn parallel_guesses_get_no_more_checks_than_the_throttle_allows() {
    let s = server();
    let base = s.url("");
    // 24 guesses at once from one address: each is checked against the throttle again when
    // its password check may start, so only the first few are ever checked.
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..24)
            .map(|i| {
                let base = base.clone();
                scope.spawn(move || {
                    let guess = basic_header("olivia", &format!("wrong-password-{i}"));
                    Http::new(&base)
                        .send("GET", "/v2/", &[("authorization", &guess)], Bytes::new())
                        .status
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|&&st| st == 401).count();
    let refused = statuses.iter().filter(|&&st| st == 429).count();
    assert_eq!(checked + refused, 24, "{statuses:?}");
    // max_failed_logins (3) plus at most the password checks already running (4).
    assert!(
        checked <= 3 + 4,
        "{checked} guesses were checked: {statuses:?}"
    );
}

#[test]
fn guesses_for_one_user_from_many_addresses_lock_that_user() {
    let s = server_with(|c| c.server.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]);
    let http = Http::for_server(&s);
    let login = |user: &str, password: &str, from: &str| {
        http.send(
            "GET",
            "/v2/",
            &[
                ("authorization", &basic_header(user, password)),
                ("x-forwarded-for", from),
            ],
            Bytes::new(),
        )
        .status
    };
    // max_failed_logins = 3: each address stays below it, the user does not.
    let per_user = 3 * transship::auth::throttle::USER_FACTOR;
    for i in 0..per_user {
        let from = format!("198.51.100.{}", i / 2 + 1);
        assert_eq!(login("olivia", "wrong-password", &from), 401, "guess {i}");
    }
    assert_eq!(
        login("olivia", PASSWORD, "203.0.113.50"),
        429,
        "olivia is locked from everywhere"
    );
    assert_eq!(
        login("victor", PASSWORD, "203.0.113.50"),
        200,
        "victor is not"
    );
    // Made-up user names count only against the address.
    for i in 0..per_user {
        let from = format!("192.0.2.{}", i / 2 + 1);
        assert_eq!(login("nobody", "x", &from), 401);
    }
    assert_eq!(login("victor", PASSWORD, "192.0.2.1"), 200);
}

#[test]
fn refresh_tokens_are_bounded_per_identity() {
    use transship::auth::keys::{MAX_REFRESH_TOKENS, TokenKind};
    let s = server();
    let http = Http::for_server(&s);
    let olivia = basic_header("olivia", PASSWORD);
    let victor = basic_header("victor", PASSWORD);
    let login = |auth: &str| {
        let r = http.send(
            "GET",
            "/v2/token?service=transship&offline_token=true",
            &[("authorization", auth)],
            Bytes::new(),
        );
        assert_eq!(r.status, 200);
        r.json()["refresh_token"].as_str().unwrap().to_string()
    };
    let victors = login(&victor);
    let extra = 3;
    let refresh: Vec<String> = (0..MAX_REFRESH_TOKENS + extra)
        .map(|_| login(&olivia))
        .collect();
    let kept = |sub: &str| {
        s.app
            .auth
            .identities
            .tokens()
            .iter()
            .filter(|t| t.kind == TokenKind::Refresh && t.subject == sub)
            .count()
    };
    assert_eq!(kept("olivia"), MAX_REFRESH_TOKENS);
    assert_eq!(
        kept("victor"),
        1,
        "another identity's logins leave its tokens alone"
    );
    let exchange = |token: &str| {
        let form = format!(
            "grant_type=refresh_token&refresh_token={}&service=transship",
            enc(token)
        );
        http.send(
            "POST",
            "/v2/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            form,
        )
        .status
    };
    for old in &refresh[..extra] {
        assert_eq!(exchange(old), 401, "the oldest were revoked");
    }
    for fresh in &refresh[extra..] {
        assert_eq!(exchange(fresh), 200);
    }
    assert_eq!(exchange(&victors), 200);
}

#[test]
fn the_catalog_follows_the_pull_policy_of_each_cached_repository() {
    let extra = format!(
        "[[user]]\nname = \"olivia\"\npassword_hash = \"{}\"\n\
         [[project]]\nname = \"gone\"\nanonymous = \"push\"\n\
         [[upstream]]\nname = \"private.example\"\nurl = \"http://127.0.0.1:9\"\npull = \"authenticated\"\n",
        hash_password(PASSWORD)
    );
    let s = TestServer::start_with(|c| test_config(&c.server.data_dir, &extra));
    let anonymous = Http::for_server(&s);
    push_image(&anonymous, "gone/app", "v1", 1);
    let manifest = image_manifest((EMPTY_SHA256, 0), &[]);
    let digest: transship::oci::Digest = sha256(manifest.as_bytes()).parse().unwrap();
    for repo in ["docker.io/library/busybox", "private.example/org/app"] {
        s.app
            .store
            .put_cached_manifest(
                &repo.parse().unwrap(),
                &digest,
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from(manifest.clone()),
                None,
            )
            .unwrap();
    }
    let list = |http: &Http| -> Vec<String> {
        let r = http.get("/v2/_catalog");
        assert_eq!(r.status, 200);
        r.json()["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        list(&anonymous),
        ["docker.io/library/busybox", "gone/app"],
        "an authenticated upstream's cache is not listed to anonymous callers"
    );
    let owner = |s: &TestServer| Http::for_server(s).with_auth(&basic_header("olivia", PASSWORD));
    assert!(list(&owner(&s)).contains(&"private.example/org/app".to_string()));

    // The project and the private upstream leave the config: what they left behind in the
    // index is listed to nobody, and certainly not as part of the open mirror.
    let dir = s.stop();
    let extra = format!(
        "[[user]]\nname = \"olivia\"\npassword_hash = \"{}\"\n",
        hash_password(PASSWORD)
    );
    let s = TestServer::start_in(dir, |c| test_config(&c.server.data_dir, &extra));
    assert_eq!(list(&Http::for_server(&s)), ["docker.io/library/busybox"]);
    assert_eq!(list(&owner(&s)), ["docker.io/library/busybox"]);
}

#[test]
fn anonymous_push_beyond_loopback_warns_about_proxies_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded default: project `local` takes anonymous pushes (from loopback).
    let text = startup_log_on_all_addresses(dir.path());
    let warning = text
        .lines()
        .find(|l| l.contains("anonymous push is on"))
        .unwrap_or_else(|| panic!("no warning in {text}"));
    assert!(
        warning.contains("local") && warning.contains("server.trusted_proxies"),
        "{warning}"
    );
}
