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
