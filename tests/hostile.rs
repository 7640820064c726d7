//! A hostile client against the real server: malformed names, paths, digests, references,
//! ranges, headers, upload ids, manifests and methods, over raw TCP where a well-behaved HTTP
//! client would refuse to send them. Every request must get a 4xx (a registry error body when
//! the request reached the registry), never a 5xx or a reset connection; the server keeps
//! serving; `/metrics` gains no series from a second round of different hostile input; and
//! nothing changes on disk.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use common::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// One raw HTTP/1.1 exchange on a fresh connection: `(status, head, body)`. Panics on a reset
/// connection or a response without a status line.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // A server that answers before reading everything may stop reading: that is fine, as
    // long as the answer arrives.
    let _ = conn.write_all(request);
    let mut out = Vec::new();
    if let Err(e) = conn.read_to_end(&mut out) {
        assert!(
            !out.is_empty(),
            "connection failed without a response ({e}) for {:?}",
            String::from_utf8_lossy(&request[..request.len().min(200)])
        );
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}"));
    let head = String::from_utf8_lossy(&out[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    (status, head, out[head_end + 4..].to_vec())
}

/// A request with `Connection: close` and the given extra header lines (raw bytes).
fn request(method: &[u8], target: &[u8], headers: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method);
    r.push(b' ');
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n");
    for h in headers {
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() {
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// Checks one hostile exchange: a 4xx; a registry error body when the registry answered.
fn expect_refused(addr: SocketAddr, what: &str, req: &[u8], head_only: bool) {
    let (status, head, body) = raw(addr, req);
    assert!(
        (400..500).contains(&status),
        "{what}: status {status}\n{head}\n{}",
        String::from_utf8_lossy(&body)
    );
    let from_registry = head
        .to_ascii_lowercase()
        .contains("docker-distribution-api-version");
    if from_registry && !head_only {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{what}: not a registry error ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        assert!(
            v["errors"][0]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{what}: {v}"
        );
    }
}

/// The hostile requests of one round; `i` varies names, methods and values between rounds.
fn hostile_requests(i: usize, blob: &str, session: &str) -> Vec<(String, Vec<u8>, bool)> {
    let long = "a".repeat(300 + i);
    let very_long = format!("/v2/{}/manifests/x", "a/".repeat(3000 + i));
    let mut out: Vec<(String, Vec<u8>, bool)> = Vec::new();
    let mut add = |what: &str, method: &[u8], target: &[u8], headers: &[&[u8]], body: &[u8]| {
        out.push((
            what.to_string(),
            request(method, target, headers, body),
            method == b"HEAD",
        ))
    };
    // Names and paths.
    for path in [
        format!("/v2/Local{i}/manifests/x"),
        format!("/v2/local/-x{i}/manifests/x"),
        format!("/v2/local/a..b{i}/manifests/x"),
        format!("/v2/local//x{i}/manifests/x"),
        format!("/v2/local/../etc{i}/manifests/x"),
        format!("/v2/local/%2e%2e/%2e%2e/x{i}/manifests/x"),
        format!("/v2/local/x{i}%2F..%2F..%2Fetc/manifests/x"),
        format!("/v2/local/%ff%fe{i}/manifests/x"),
        format!("/v2/local/x{i}%00/manifests/x"),
        format!("/v2/local/x{i}%zz/manifests/x"),
        format!("/v2/local/{long}/manifests/x"),
        very_long.clone(),
        format!("//v2//local/x{i}/tags/list"),
        format!("/v2/local/x{i}/blobs/uploads/../../blobs"),
        format!("/transship/v1/projects/../../x{i}/members"),
        format!("/v2/local/x{i}/unknown/kind"),
        format!("/x{i}"),
    ] {
        add(&format!("path {path}"), b"GET", path.as_bytes(), &[], b"");
    }
    add(
        "raw non-UTF-8 path",
        b"GET",
        b"/v2/local/\xff\xfe/manifests/x",
        &[],
        b"",
    );
    add(
        "space in path",
        b"GET",
        b"/v2/local/a b/manifests/x",
        &[],
        b"",
    );
    // References and digests.
    for reference in [
        format!("{}{i}", "t".repeat(200)),
        "sha256:zz".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "0".repeat(63 + 2 * (i % 2))),
        format!("md5:{i}abc"),
        "sha256:..%2F..%2Fetc".to_string(),
        format!("sha256:{}", "f".repeat(10_000 + i)),
        ":".to_string(),
    ] {
        for kind in ["manifests", "blobs"] {
            let path = format!("/v2/local/keep/{kind}/{reference}");
            for method in ["GET", "DELETE"] {
                add(
                    &format!("{method} {kind} {reference:.80}"),
                    method.as_bytes(),
                    path.as_bytes(),
                    &[],
                    b"",
                );
            }
        }
        let path = format!("/v2/local/keep/referrers/{reference}");
        add(
            &format!("referrers {reference:.80}"),
            b"GET",
            path.as_bytes(),
            &[],
            b"",
        );
    }
    // Ranges that cannot be satisfied.
    let blob_path = format!("/v2/local/keep/blobs/{blob}");
    for range in [
        format!("bytes={}-", 1_000_000 + i),
        format!("bytes={}-{}", 10 + i, 5 + i),
        format!("bytes={}-{}", 5_000_000 + i, 5_000_001 + i),
    ] {
        let h = format!("Range: {range}");
        add(
            &format!("range {range}"),
            b"GET",
            blob_path.as_bytes(),
            &[h.as_bytes()],
            b"",
        );
    }
    // Headers: huge, duplicated, non-ASCII, contradictory, on a request that is refused anyway.
    let missing = format!("/v2/local/keep/manifests/missing{i}");
    let huge_accept = format!("Accept: {}", "application/x-junk, ".repeat(5000 + i));
    add(
        "huge Accept",
        b"GET",
        missing.as_bytes(),
        &[huge_accept.as_bytes()],
        b"",
    );
    let dup: Vec<Vec<u8>> = (0..80)
        .map(|k| format!("Accept: application/vnd.x{k}.{i}+json").into_bytes())
        .collect();
    let dup_refs: Vec<&[u8]> = dup.iter().map(|v| v.as_slice()).collect();
    add(
        "duplicated Accept",
        b"GET",
        missing.as_bytes(),
        &dup_refs,
        b"",
    );
    add(
        "non-ASCII Accept",
        b"GET",
        missing.as_bytes(),
        &[b"Accept: \xff\xfe\xe9t\xe9"],
        b"",
    );
    add(
        "non-ASCII If-None-Match",
        b"GET",
        missing.as_bytes(),
        &[b"If-None-Match: \"\xff\""],
        b"",
    );
    add(
        "bad Content-Length",
        b"GET",
        missing.as_bytes(),
        &[b"Content-Length: -1"],
        b"",
    );
    add(
        "two Content-Lengths",
        b"PUT",
        format!("/v2/local/keep/manifests/t{i}").as_bytes(),
        &[b"Content-Length: 2", b"Content-Length: 3"],
        b"",
    );
    add(
        "Content-Length and chunked",
        b"PUT",
        format!("/v2/local/keep/manifests/t{i}").as_bytes(),
        // `request` adds `Content-Length: 5`; the body is a complete (empty) chunked body.
        &[b"Transfer-Encoding: chunked"],
        b"0\r\n\r\n",
    );
    add(
        "non-ASCII header name",
        b"GET",
        missing.as_bytes(),
        &[b"X-\xff: 1"],
        b"",
    );
    let huge_header = format!("X-Junk: {}", "j".repeat(100_000 + i));
    add(
        "huge header",
        b"GET",
        missing.as_bytes(),
        &[huge_header.as_bytes()],
        b"",
    );
    for auth in [
        format!("Basic %%%{i}"),
        "Basic ".to_string(),
        format!("Bearer a.b.c{i}"),
        format!("Bearer {}", "x".repeat(50_000)),
        format!("Digest {i}"),
    ] {
        let h = format!("Authorization: {auth}");
        add(
            &format!("Authorization {auth:.40}"),
            b"GET",
            missing.as_bytes(),
            &[h.as_bytes()],
            b"",
        );
    }
    add(
        "non-ASCII Authorization",
        b"GET",
        missing.as_bytes(),
        &[b"Authorization: Basic \xff\xff"],
        b"",
    );
    // Upload ids and sessions.
    let base = "/v2/local/keep/blobs/uploads";
    for id in [
        format!("..%2F..%2Fblobs{i}"),
        format!("{}{i}", "u".repeat(1000)),
        "00000000-0000-0000-0000-000000000000".to_string(),
        format!("not-a-uuid-{i}"),
        "%2e%2e".to_string(),
    ] {
        for method in ["GET", "PATCH", "PUT", "DELETE"] {
            let target = format!("{base}/{id}?digest={blob}");
            add(
                &format!("{method} upload {id:.40}"),
                method.as_bytes(),
                target.as_bytes(),
                &[],
                b"chunk",
            );
        }
    }
    let s = format!("{base}/{session}");
    add(
        "Content-Range garbage",
        b"PATCH",
        s.as_bytes(),
        &[b"Content-Range: bytes=abc"],
        b"chunk",
    );
    let far = format!("Content-Range: {}-{}", 1000 + i, 1004 + i);
    add(
        "Content-Range out of order",
        b"PATCH",
        s.as_bytes(),
        &[far.as_bytes()],
        b"chunk",
    );
    add(
        "Content-Range huge",
        b"PATCH",
        s.as_bytes(),
        &[b"Content-Range: 0-99999999999999999999999"],
        b"chunk",
    );
    add("PUT without digest", b"PUT", s.as_bytes(), &[], b"");
    let bad_digest = format!("{s}?digest=sha256:{i}zz");
    add(
        "PUT with a bad digest",
        b"PUT",
        bad_digest.as_bytes(),
        &[],
        b"",
    );
    let start = format!("{base}/?digest=sha256:{i}../x");
    add(
        "POST with a bad digest",
        b"POST",
        start.as_bytes(),
        &[],
        b"data",
    );
    let mount = format!("{base}/?mount=sha256:{i}zz&from=..");
    add("POST with a bad mount", b"POST", mount.as_bytes(), &[], b"");
    let algo = format!("{base}/?digest-algorithm=md{i}");
    add(
        "POST with a bad algorithm",
        b"POST",
        algo.as_bytes(),
        &[],
        b"",
    );
    // Manifests.
    let manifest_path = format!("/v2/local/keep/manifests/h{i}");
    let ct = format!("Content-Type: {OCI_MANIFEST}");
    let ct = ct.as_bytes();
    let nested = format!("{}{}", "[".repeat(100_000 + i), "]".repeat(100_000 + i));
    let unknown_blob = image_manifest(
        (&sha256(format!("config{i}").as_bytes()), 10),
        &[(&sha256(b"layer"), 5)],
    );
    for (what, headers, body) in [
        ("invalid JSON", vec![ct], b"{not json".to_vec()),
        ("empty", vec![ct], Vec::new()),
        ("deeply nested", vec![ct], nested.into_bytes()),
        (
            "wrong media type",
            vec![b"Content-Type: text/html".as_slice()],
            unknown_blob.clone().into_bytes(),
        ),
        ("unknown blobs", vec![ct], unknown_blob.into_bytes()),
        (
            "schema 1",
            vec![ct],
            br#"{"schemaVersion":1,"name":"x"}"#.to_vec(),
        ),
        ("not an object", vec![ct], b"\"just a string\"".to_vec()),
        ("huge", vec![ct], vec![b' '; (4 << 20) + 1 + i]),
    ] {
        add(
            &format!("manifest {what}"),
            b"PUT",
            manifest_path.as_bytes(),
            &headers,
            &body,
        );
    }
    let tags = format!("{manifest_path}?tag=Bad{i}&tag=..");
    add(
        "manifest with bad ?tag=",
        b"PUT",
        tags.as_bytes(),
        &[ct],
        b"{}",
    );
    // Paging.
    for q in [
        format!("n=-{i}"),
        "n=abc".to_string(),
        format!("n={}", "9".repeat(40)),
    ] {
        let target = format!("/v2/local/keep/tags/list?{q}");
        add(&format!("tags {q}"), b"GET", target.as_bytes(), &[], b"");
        let target = format!("/v2/_catalog?{q}");
        add(&format!("catalog {q}"), b"GET", target.as_bytes(), &[], b"");
    }
    // Methods.
    for method in [
        format!("BREW{i}"),
        format!("X{}", "M".repeat(200 + i)),
        "get".to_string(),
        "TRACE".to_string(),
        "PROPFIND".to_string(),
    ] {
        for path in [
            "/v2/",
            "/v2/local/keep/manifests/v1",
            "/metrics",
            "/healthz",
        ] {
            add(
                &format!("method {method:.20} {path}"),
                method.as_bytes(),
                path.as_bytes(),
                &[],
                b"",
            );
        }
    }
    add("CONNECT", b"CONNECT", b"/v2/", &[], b"");
    add("no method", b"", b"/v2/", &[], b"");
    add(
        "HEAD of a bad name",
        b"HEAD",
        format!("/v2/Bad{i}/manifests/x").as_bytes(),
        &[],
        b"",
    );
    // Writes outside every project (mirror namespaces are read-only).
    add(
        "push to a mirror",
        b"PUT",
        format!("/v2/library/x{i}/manifests/v1").as_bytes(),
        &[ct],
        b"{}",
    );
    add(
        "upload to a mirror",
        b"POST",
        format!("/v2/library/x{i}/blobs/uploads/").as_bytes(),
        &[],
        b"",
    );
    out
}

/// Series names with labels, from a scrape (comments left out).

#[test]
fn hostile_input_is_refused_and_changes_nothing() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (manifest, _) = push_image(&h, "local/keep", "v1", 21);
    let blob = h.push_blob("local/keep", &random_bytes(4000, 21));
    // One upload session, created by a valid POST, is the target of hostile PATCH/PUTs; the
    // test cancels it at the end.
    let r = h.send("POST", "/v2/local/keep/blobs/uploads/", &[], Bytes::new());
    assert_eq!(r.status, 202);
    let location = r.header("location").expect("location").to_string();
    let session = location.rsplit('/').next().unwrap().to_string();

    let blobs_before = blob_files(s.data_dir());
    let usage_before = s.app.store.usage();
    let catalog_before = h.get("/v2/_catalog").body;
    let tags_before = h.get("/v2/local/keep/tags/list").body;

    // Scraped once first, so the scrape's own series is there in both rounds.
    h.get("/metrics");
    let mut counts = Vec::new();
    for round in 0..2 {
        for (what, req, head_only) in hostile_requests(round, &blob, &session) {
            expect_refused(s.addr, &what, &req, head_only);
        }
        // Still serving, and serving the right bytes.
        assert_eq!(h.get("/v2/").status, 200);
        assert_eq!(
            h.get("/v2/local/keep/manifests/v1").body,
            manifest.as_bytes()
        );
        counts.push(metric_series(&h));
    }
    let new: Vec<_> = counts[1]
        .iter()
        .filter(|l| !counts[0].contains(l))
        .collect();
    assert!(
        new.is_empty(),
        "a second round of different hostile input added series: {new:#?}"
    );

    // A hostile PUT may already have ended the session; either way none is left.
    let r = h.delete(&location);
    assert!(r.status == 204 || r.status == 404, "{r:?}");
    assert_eq!(blob_files(s.data_dir()), blobs_before);
    assert_eq!(s.app.store.usage(), usage_before);
    assert_eq!(s.app.store.uploads_active(), 0);
    assert_eq!(h.get("/v2/_catalog").body, catalog_before);
    assert_eq!(h.get("/v2/local/keep/tags/list").body, tags_before);
    assert!(s.app.store.fsck(false).unwrap().is_clean());
}
