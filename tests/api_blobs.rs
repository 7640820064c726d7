//! Black-box tests of blob endpoints and uploads over real HTTP against the real server.

mod common;

use bytes::Bytes;
use common::*;

#[test]
fn base_endpoint_answers_with_api_version() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let r = h.get("/v2/");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(&r.body[..], b"{}");
    let r = h.get("/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "NOT_FOUND");
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[test]
fn monolithic_push_then_pull_with_headers() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(300_000, 1);
    let digest = h.push_blob("local/app", &data);

    let r = h.head(&format!("/v2/local/app/blobs/{digest}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert!(r.body.is_empty());

    let r = h.get(&format!("/v2/local/app/blobs/{digest}"));
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &data[..]);
    assert_eq!(r.header("etag"), Some(format!("\"{digest}\"").as_str()));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));

    // Another repository cannot see it.
    let r = h.get(&format!("/v2/local/other/blobs/{digest}"));
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");

    // Conditional GET.
    let r = h.send(
        "GET",
        &format!("/v2/local/app/blobs/{digest}"),
        &[("if-none-match", &format!("\"{digest}\""))],
        Bytes::new(),
    );
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
}

#[test]
fn range_requests_follow_the_conformance_table() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(4000, 2);
    let digest = h.push_blob("local/r", &data);
    let path = format!("/v2/local/r/blobs/{digest}");
    let get = |range: &str| h.send("GET", &path, &[("range", range)], Bytes::new());

    let r = get("bytes=500-1499");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 500-1499/4000"));
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(&r.body[..], &data[500..1500]);

    let r = get("bytes=3500-");
    assert_eq!((r.status, &r.body[..]), (206, &data[3500..]));
    let r = get("bytes=-500");
    assert_eq!((r.status, &r.body[..]), (206, &data[3500..]));
    let r = get("bytes=2000-5000");
    assert_eq!(r.header("content-range"), Some("bytes 2000-3999/4000"));
    assert_eq!(&r.body[..], &data[2000..]);

    for bad in ["bytes=500-0", "bytes=5000-10000"] {
        let r = get(bad);
        assert_eq!(r.status, 416, "{bad}");
        assert_eq!(r.header("content-range"), Some("bytes */4000"), "{bad}");
    }
    // Multi-range: the whole body.
    let r = get("bytes=0-1,5-6");
    assert_eq!((r.status, r.body.len()), (200, 4000));
}

#[test]
fn large_blob_streams_byte_exact_across_windows() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(9 * 1024 * 1024 + 17, 3);
    let digest = h.push_blob("local/big", &data);
    let r = h.get(&format!("/v2/local/big/blobs/{digest}"));
    assert_eq!(r.status, 200);
    assert!(r.body == data, "large body differs");
    let r = h.send(
        "GET",
        &format!("/v2/local/big/blobs/{digest}"),
        &[("range", "bytes=2097150-4194305")],
        Bytes::new(),
    );
    assert_eq!(&r.body[..], &data[2_097_150..4_194_306]);
}

#[test]
fn chunked_upload_with_out_of_order_chunk_stays_usable() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(30_000, 4);
    let digest = sha256(&data);
    let r = h.send(
        "POST",
        "/v2/local/chunks/blobs/uploads/",
        &[("content-length", "0")],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-0"));
    assert!(r.header("docker-upload-uuid").is_some());
    let loc = r.header("location").unwrap().to_string();

    let patch = |from: usize, to: usize| {
        h.send(
            "PATCH",
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &format!("{from}-{}", to - 1)),
            ],
            Bytes::copy_from_slice(&data[from..to]),
        )
    };
    let r = patch(0, 10_000);
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-9999"));
    let loc = r.header("location").unwrap().to_string();

    // Out of order: 416, and the session keeps its state.
    let r = patch(20_000, 30_000);
    assert_eq!(r.status, 416);
    assert_eq!(r.error_code(), "RANGE_INVALID");
    let r = h.get(&loc);
    assert_eq!(r.status, 204);
    assert_eq!(r.header("range"), Some("0-9999"));

    // Content-Length that disagrees with Content-Range.
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "10000-10009")],
        Bytes::from_static(b"short"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "SIZE_INVALID");

    assert_eq!(patch(10_000, 20_000).status, 202);
    // Final chunk on the PUT.
    let r = h.send(
        "PUT",
        &format!("{loc}?digest={digest}"),
        &[("content-range", "20000-29999")],
        Bytes::copy_from_slice(&data[20_000..]),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/local/chunks/blobs/{digest}").as_str())
    );
    assert_eq!(
        h.get(&format!("/v2/local/chunks/blobs/{digest}")).body,
        data
    );
    // The session is gone.
    assert_eq!(h.get(&loc).status, 404);
}

#[test]
fn streamed_patch_without_length_like_docker_push() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(2_000_000, 5);
    let digest = sha256(&data);
    let r = h.send("POST", "/v2/local/docker/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    let chunks: Vec<Bytes> = data.chunks(65_536).map(Bytes::copy_from_slice).collect();
    let r = h.send_streamed("PATCH", &loc, chunks);
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-1999999"));
    let r = h.send("PUT", &format!("{loc}?digest={digest}"), &[], Bytes::new());
    assert_eq!(r.status, 201);
    // Read-after-write: HEAD right after the PUT.
    let r = h.head(&format!("/v2/local/docker/blobs/{digest}"));
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some("2000000"))
    );
}

#[test]
fn single_post_monolithic_and_sha512() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(5000, 6);
    let digest = sha256(&data);
    let r = h.send(
        "POST",
        &format!("/v2/local/mono/blobs/uploads/?digest={digest}"),
        &[("content-type", "application/octet-stream")],
        data.clone(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(h.get(&format!("/v2/local/mono/blobs/{digest}")).body, data);

    let d512 = sha512(&data);
    let r = h.send(
        "POST",
        "/v2/local/mono/blobs/uploads/?digest-algorithm=sha512",
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    let loc = r.header("location").unwrap().to_string();
    let r = h.send("PUT", &format!("{loc}?digest={d512}"), &[], data.clone());
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let r = h.get(&format!("/v2/local/mono/blobs/{d512}"));
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (200, Some(d512.as_str()))
    );
    assert_eq!(r.body, data);

    // sha512 digest for a session hashed with sha256: verified by re-reading the file.
    let other = random_bytes(777, 7);
    let r = h.send("POST", "/v2/local/mono/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    let r = h.send(
        "PUT",
        &format!("{loc}?digest={}", sha512(&other)),
        &[],
        other.clone(),
    );
    assert_eq!(r.status, 201);

    let r = h.send(
        "POST",
        "/v2/local/mono/blobs/uploads/?digest-algorithm=md5",
        &[],
        Bytes::new(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
}

#[test]
fn digest_mismatch_is_rejected_and_nothing_is_stored() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(1000, 8);
    let wrong = sha256(b"something else");
    let r = h.send("POST", "/v2/local/bad/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    let r = h.send("PUT", &format!("{loc}?digest={wrong}"), &[], data.clone());
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
    let r = h.send(
        "POST",
        &format!("/v2/local/bad/blobs/uploads/?digest={wrong}"),
        &[],
        data.clone(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
    assert_eq!(h.head(&format!("/v2/local/bad/blobs/{wrong}")).status, 404);
    assert!(
        blob_files(s.data_dir()).is_empty(),
        "nothing may reach the blob store"
    );
    assert_eq!(s.app.store.usage(), (0, 0));
}

#[test]
fn upload_errors_and_cancel() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    // Unknown and malformed ids.
    for id in ["00000000-0000-4000-8000-000000000000", "%2E%2E", "x"] {
        let r = h.get(&format!("/v2/local/u/blobs/uploads/{id}"));
        assert_eq!(
            (r.status, r.error_code()),
            (404, "BLOB_UPLOAD_UNKNOWN".to_string()),
            "{id}"
        );
    }
    let r = h.send("POST", "/v2/local/u/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    // The id is bound to its repository.
    let other = loc.replace("/local/u/", "/local/v/");
    assert_eq!(h.get(&other).status, 404);
    // PUT without a digest.
    let r = h.send("PUT", &loc, &[], Bytes::new());
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
    let r = h.send(
        "PUT",
        &format!("{loc}?digest=sha256:nothex"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 400);
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "bytes=oops")],
        Bytes::from_static(b"x"),
    );
    assert_eq!(r.status, 416);
    // Cancel.
    assert_eq!(h.delete(&loc).status, 204);
    assert_eq!(h.get(&loc).status, 404);
    assert_eq!(h.delete(&loc).status, 404);
    assert_eq!(
        std::fs::read_dir(s.data_dir().join("ingest"))
            .unwrap()
            .count(),
        0,
        "cancelled bytes are removed"
    );
}

#[test]
fn cross_repository_mount() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(2048, 9);
    let digest = h.push_blob("local/src", &data);
    let r = h.send(
        "POST",
        &format!("/v2/local/dst/blobs/uploads/?mount={digest}&from=local/src"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/local/dst/blobs/{digest}").as_str())
    );
    assert_eq!(h.get(&format!("/v2/local/dst/blobs/{digest}")).body, data);
    // Not in `from`: a normal upload session.
    let missing = sha256(b"nope");
    let r = h.send(
        "POST",
        &format!("/v2/local/dst2/blobs/uploads/?mount={missing}&from=local/src"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    assert!(r.header("location").unwrap().contains("/blobs/uploads/"));
    // Without from: never mounted (no guessing across repositories).
    let r = h.send(
        "POST",
        &format!("/v2/local/dst3/blobs/uploads/?mount={digest}"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
}

#[test]
fn blob_delete_unlinks_from_the_repository() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let digest = h.push_blob("local/del", b"delete me");
    assert_eq!(
        h.delete(&format!("/v2/local/del/blobs/{digest}")).status,
        202
    );
    let r = h.get(&format!("/v2/local/del/blobs/{digest}"));
    assert_eq!(
        (r.status, r.error_code()),
        (404, "BLOB_UNKNOWN".to_string())
    );
    assert_eq!(
        h.delete(&format!("/v2/local/del/blobs/{digest}")).status,
        404
    );
    let r = h.get("/v2/local/del/blobs/sha256:short");
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
    let r = h.get(&format!("/v2/local/del/blobs/blake3:{}", "a".repeat(64)));
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
}

#[test]
fn names_methods_and_namespaces() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    for bad in [
        "/v2/local/UPPER/tags/list",
        "/v2/local/a..b/tags/list",
        "/v2/local/-a/manifests/x",
        "/v2/local%2F..%2Fx/tags/list",
    ] {
        let r = h.get(bad);
        assert_eq!(
            (r.status, r.error_code()),
            (400, "NAME_INVALID".to_string()),
            "{bad}"
        );
    }
    let long = format!("/v2/local/{}/tags/list", "a".repeat(250));
    assert_eq!(h.get(&long).error_code(), "NAME_INVALID");
    // Names containing route words work.
    let d = h.push_blob("local/manifests/blobs", b"odd name");
    assert_eq!(
        h.get(&format!("/v2/local/manifests/blobs/blobs/{d}"))
            .status,
        200
    );
    // Mirror namespaces are read-only.
    let r = h.send(
        "POST",
        "/v2/library/alpine/blobs/uploads/",
        &[],
        Bytes::new(),
    );
    assert_eq!((r.status, r.error_code()), (403, "DENIED".to_string()));
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("read-only")
    );
    // Wrong method.
    let r = h.send("PATCH", "/v2/local/app/manifests/latest", &[], Bytes::new());
    assert_eq!((r.status, r.error_code()), (405, "UNSUPPORTED".to_string()));
}

// ---- upload sessions: access, limits, timeouts, races, blocking ------------------------------

const PASSWORD: &str = "correct horse battery";

/// A token for `scope` from the token endpoint, as `user`.
fn token(h: &Http, user: &str, scope: &str) -> String {
    let scope: String = form_urlencoded::byte_serialize(scope.as_bytes()).collect();
    let r = h.send(
        "GET",
        &format!("/v2/token?service=transship&scope={scope}"),
        &[(
            "authorization",
            &transship::auth::basic_header(user, PASSWORD),
        )],
        Bytes::new(),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    format!("Bearer {}", r.json()["token"].as_str().unwrap())
}

/// Cancelling an upload is part of pushing: a `pull,push` token may cancel its own upload; a
/// pull-only token may not.
#[test]
fn a_push_token_cancels_its_upload() {
    let users: String = ["eddie", "victor"]
        .iter()
        .map(|n| {
            format!(
                "[[user]]\nname = \"{n}\"\npassword_hash = \"{}\"\n",
                transship::auth::keys::hash_password(PASSWORD)
            )
        })
        .collect();
    let extra = format!(
        "{users}\n[[project]]\nname = \"team\"\neditors = [\"eddie\"]\nviewers = [\"victor\"]\n"
    );
    let s = TestServer::start_with(|c| test_config(&c.server.data_dir, &extra));
    let h = Http::for_server(&s);
    let push = token(&h, "eddie", "repository:team/app:pull,push");
    let pull = token(&h, "victor", "repository:team/app:pull");
    let pusher = Http::for_server(&s).with_auth(&push);
    let r = pusher.send("POST", "/v2/team/app/blobs/uploads/", &[], Bytes::new());
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let loc = r.header("location").unwrap().to_string();
    let r = pusher.send("PATCH", &loc, &[], Bytes::from_static(b"some bytes"));
    assert_eq!(r.status, 202);

    // A pull-only token is challenged for push, and the session stays.
    let r = Http::for_server(&s).with_auth(&pull).delete(&loc);
    assert_eq!(r.status, 401, "{:?}", String::from_utf8_lossy(&r.body));
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("scope=\"repository:team/app:pull,push\""),
        "{challenge}"
    );
    assert_eq!(pusher.get(&loc).status, 204);

    let r = pusher.delete(&loc);
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(pusher.get(&loc).status, 404);
    assert_eq!(
        std::fs::read_dir(s.data_dir().join("ingest"))
            .unwrap()
            .count(),
        0
    );
}

/// A connection to `addr` from the loopback address `from` (127.0.0.0/8 is all local), so a
/// test can be several anonymous clients.
fn connect_from(addr: std::net::SocketAddr, from: std::net::IpAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(std::net::SocketAddr::new(from, 0)).unwrap();
        sock.connect(addr).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    // A bound on a broken server, not a timing assertion.
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    stream
}

/// A response read off a raw connection: status, head (lower-cased), body.
fn read_response(stream: &mut std::net::TcpStream) -> (u16, String, String) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (status, head, body);
            }
        }
        let n = stream
            .read(&mut chunk)
            .expect("a response before the read bound");
        assert!(n > 0, "connection closed without a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request on a fresh connection from `from`.
fn raw_request(
    s: &TestServer,
    from: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String, String) {
    use std::io::Write;
    let mut stream = connect_from(s.addr, from.parse().unwrap());
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        s.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    read_response(&mut stream)
}

fn location(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("location:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn upload_sessions_are_capped_globally_and_per_client() {
    let s = TestServer::start_with(|mut c| {
        c.uploads.max_sessions = 6;
        c.uploads.max_sessions_per_client = 4;
        c
    });
    let start = |from: &str| raw_request(&s, from, "POST", "/v2/local/cap/blobs/uploads/", b"");
    let refused = |(status, head, body): (u16, String, String), why: &str| {
        assert_eq!(status, 429, "{why}: {body}");
        assert!(head.contains("\r\nretry-after: "), "{why}: {head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS", "{why}");
    };
    let mut a = Vec::new();
    for _ in 0..4 {
        let (status, head, _) = start("127.0.0.1");
        assert_eq!(status, 202);
        a.push(location(&head));
    }
    refused(start("127.0.0.1"), "per-client cap");
    let mut b = Vec::new();
    for _ in 0..2 {
        let (status, head, _) = start("127.0.0.2");
        assert_eq!(status, 202, "another client has its own cap");
        b.push(location(&head));
    }
    refused(start("127.0.0.2"), "global cap");
    // Cancelling frees a place.
    assert_eq!(raw_request(&s, "127.0.0.1", "DELETE", &a[0], b"").0, 204);
    let (status, head, _) = start("127.0.0.1");
    assert_eq!(status, 202, "a place freed by cancel");
    a[0] = location(&head);
    refused(start("127.0.0.2"), "global cap again");
    // Completing frees a place.
    let data = b"completed upload";
    let put = format!("{}?digest={}", b[0], sha256(data));
    assert_eq!(raw_request(&s, "127.0.0.2", "PUT", &put, data).0, 201);
    assert_eq!(start("127.0.0.2").0, 202, "a place freed by completion");
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Idle sessions hold no open file: the real binary's descriptors do not grow with them.
#[test]
fn idle_upload_sessions_hold_no_open_files() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = default_config_in(dir.path());
    let server = BinaryServer::start(&config_path, &dir.path().join("transship.log"));
    let pid = server.child.id();
    let h = Http::new(&server.url(""));
    assert_eq!(h.get("/v2/").status, 200);
    let before = open_fds(pid);
    let sessions = 300;
    let mut locs = Vec::new();
    for i in 0..sessions {
        let r = h.send("POST", "/v2/local/fds/blobs/uploads/", &[], Bytes::new());
        assert_eq!(r.status, 202);
        let loc = r.header("location").unwrap().to_string();
        // Half of them with some bytes in.
        if i % 2 == 0 {
            let r = h.send("PATCH", &loc, &[], Bytes::from_static(b"partial"));
            assert_eq!(r.status, 202);
        }
        locs.push(loc);
    }
    let after = open_fds(pid);
    assert!(
        after < before + sessions / 4,
        "{sessions} idle sessions took descriptors: {before} -> {after}"
    );
    // They all still work.
    let data = b"partialrest";
    let r = h.send(
        "PUT",
        &format!("{}?digest={}", locs[0], sha256(data)),
        &[],
        Bytes::from_static(b"rest"),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
}

/// A PATCH whose client stops sending mid-body ends with a clear error after the idle
/// timeout; the session keeps its last complete chunk and the client resumes.
#[test]
fn a_stalled_patch_times_out_and_the_upload_resumes() {
    use std::io::Write;
    let s = TestServer::start_with(|mut c| {
        c.uploads.body_idle_timeout =
            transship::config::HumanDuration(std::time::Duration::from_millis(500));
        c
    });
    let h = Http::for_server(&s);
    let data = random_bytes(3000, 77);
    let r = h.send("POST", "/v2/local/stall/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "0-999")],
        Bytes::copy_from_slice(&data[..1000]),
    );
    assert_eq!(r.status, 202);

    // The next chunk: headers and part of the body, then silence (the socket stays open).
    let mut stream = connect_from(s.addr, "127.0.0.1".parse().unwrap());
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nhost: {}\r\ncontent-length: 1000\r\ncontent-range: 1000-1999\r\n\r\n",
        s.addr
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&data[1000..1300]).unwrap();
    let (status, _, body) = read_response(&mut stream);
    assert_eq!(status, 408, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UPLOAD_INVALID");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("sent nothing"),
        "{body}"
    );
    drop(stream);

    // The session holds what was complete before the stalled chunk; the client resumes.
    let r = h.get(&loc);
    assert_eq!((r.status, r.header("range")), (204, Some("0-999")));
    let r = h.send(
        "PATCH",
        &loc,
        &[("content-range", "1000-1999")],
        Bytes::copy_from_slice(&data[1000..2000]),
    );
    assert_eq!(r.status, 202);
    let r = h.send(
        "PUT",
        &format!("{loc}?digest={}", sha256(&data)),
        &[("content-range", "2000-2999")],
        Bytes::copy_from_slice(&data[2000..]),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        h.get(&format!("/v2/local/stall/blobs/{}", sha256(&data)))
            .body,
        data
    );
}

/// The reaper removes a session while holding its lock: a PATCH that arrives meanwhile waits
/// and then finds the session gone, and is never acknowledged only to lose its bytes.
#[test]
fn the_reaper_never_drops_a_session_under_a_request() {
    use std::sync::{Arc, Mutex, mpsc};
    use transship::store::uploads::UploadStep;
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let r = h.send("POST", "/v2/local/reap/blobs/uploads/", &[], Bytes::new());
    let loc = r.header("location").unwrap().to_string();
    assert_eq!(
        h.send("PATCH", &loc, &[], Bytes::from_static(b"abc"))
            .status,
        202
    );

    // While the reaper is about to remove the session, a client PATCHes it.
    let patch_status: Arc<Mutex<Option<u16>>> = Arc::default();
    let patcher: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let (base, loc2) = (s.url(""), loc.clone());
    let (ps, pt) = (patch_status.clone(), patcher.clone());
    s.app
        .store
        .set_upload_hook(Some(Arc::new(move |step: UploadStep| {
            if step != UploadStep::Reap {
                return;
            }
            let (done_tx, done_rx) = mpsc::channel();
            let (base, loc, ps) = (base.clone(), loc2.clone(), ps.clone());
            *pt.lock().unwrap() = Some(std::thread::spawn(move || {
                let r = Http::new(&base).send(
                    "PATCH",
                    &loc,
                    &[("content-range", "3-5")],
                    Bytes::from_static(b"def"),
                );
                *ps.lock().unwrap() = Some(r.status);
                let _ = done_tx.send(());
            }));
            // Give the PATCH every chance to be answered before the removal; with the lock
            // held it cannot be, and the wait ends at the bound.
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(3));
        })));
    assert_eq!(
        s.app.store.reap_uploads(std::time::Duration::ZERO).unwrap(),
        1
    );
    s.app.store.set_upload_hook(None);
    let t = patcher.lock().unwrap().take().expect("the hook ran");
    t.join().unwrap();
    let status = patch_status.lock().unwrap().expect("PATCH answered");
    assert_eq!(
        status, 404,
        "a PATCH racing the reaper must not be acknowledged for a session being removed"
    );
    assert_eq!(h.get(&loc).status, 404);
    assert_eq!(
        std::fs::read_dir(s.data_dir().join("ingest"))
            .unwrap()
            .count(),
        0,
        "no file is left behind"
    );
}

/// While two uploads' blocking work is held at `step` (on a server with two async workers),
/// small requests are still answered: the blocking work is not on the workers.
fn workers_stay_free_while_uploads_block_at(step: transship::store::uploads::UploadStep) {
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::Duration;
    let s = TestServer::start(); // 2 worker threads
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let release_rx = Arc::new(Mutex::new(release_rx));
    s.app.store.set_upload_hook(Some(Arc::new(
        move |at: transship::store::uploads::UploadStep| {
            if at == step {
                let _ = entered_tx.lock().unwrap().send(());
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(60));
            }
        },
    )));
    let uploads: Vec<_> = (0..2u64)
        .map(|i| {
            let base = s.url("");
            std::thread::spawn(move || {
                let h = Http::new(&base);
                let data = random_bytes(100_000, 900 + i);
                h.push_blob(&format!("local/busy{i}"), &data)
            })
        })
        .collect();
    for _ in 0..2 {
        entered_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("both uploads reach the held step");
    }
    // Both uploads are held. Small requests must still be served meanwhile.
    let (done_tx, done_rx) = mpsc::channel();
    let base = s.url("");
    let pinger = std::thread::spawn(move || {
        let h = Http::new(&base);
        for _ in 0..5 {
            let _ = done_tx.send(h.get("/v2/").status);
        }
    });
    let mut answered = Vec::new();
    for _ in 0..5 {
        // A bound on a stuck server, not a timing assertion.
        match done_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(status) => answered.push(status),
            Err(_) => break,
        }
    }
    for _ in 0..2 {
        let _ = release_tx.send(());
    }
    for u in uploads {
        u.join().unwrap();
    }
    pinger.join().unwrap();
    s.app.store.set_upload_hook(None);
    assert_eq!(
        answered,
        vec![200; 5],
        "small requests while uploads were held at {step:?}"
    );
}

#[test]
fn committing_uploads_never_blocks_the_async_workers() {
    workers_stay_free_while_uploads_block_at(transship::store::uploads::UploadStep::Commit);
}

#[test]
fn writing_uploads_never_blocks_the_async_workers() {
    workers_stay_free_while_uploads_block_at(transship::store::uploads::UploadStep::Write);
}

/// A manifest that arrives after the GC grace period, while its push could still be going
/// on, finds the blobs its push uploaded and mounted.
#[test]
fn a_late_manifest_finds_its_pushed_blobs_after_gc() {
    let s = TestServer::start_with(|mut c| {
        c.gc.grace_period = transship::config::HumanDuration(std::time::Duration::ZERO);
        c
    });
    let h = Http::for_server(&s);
    let layer = random_bytes(5000, 61);
    let config = br#"{"late":true}"#;
    let l = h.push_blob("local/late", &layer);
    let c = h.push_blob("local/late", config);
    // A mount is part of a push too.
    let other = h.push_blob("local/elsewhere", b"mounted layer");
    let r = h.send(
        "POST",
        &format!("/v2/local/late/blobs/uploads/?mount={other}&from=local/elsewhere"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 201);
    // With no grace period, every one of them is a GC candidate now.
    let report = s.app.store.collect_garbage().unwrap();
    assert_eq!(report.blobs_removed, 0, "{report}");
    let m = image_manifest(
        (&c, config.len()),
        &[(&l, layer.len()), (&other, b"mounted layer".len())],
    );
    let r = h.push_manifest(
        "local/late",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        m.as_bytes(),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(h.get(&format!("/v2/local/late/blobs/{l}")).body, layer);
    assert!(s.app.store.fsck(false).unwrap().is_clean());
}
