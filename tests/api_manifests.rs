//! Black-box tests of manifests, tags, catalog, referrers and deletes.

mod common;

use bytes::Bytes;
use common::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[test]
fn manifest_round_trip_is_byte_exact() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let c = h.push_blob("local/m", b"{}");
    let l = h.push_blob("local/m", b"layer");
    // Odd whitespace and key order must survive: the digest is over these exact bytes.
    let body = format!(
        "{{\n  \"schemaVersion\": 2,\n\t\"mediaType\":\"{OCI_MANIFEST}\",   \"config\": {{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"size\":2,\"digest\":\"{c}\"}},\n\"layers\":[{{\"size\":5,\"digest\":\"{l}\",\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\"}}], \"annotations\":{{\"z\":\"\\u00e9\"}} }}\n"
    );
    let digest = sha256(body.as_bytes());
    let r = h.push_manifest("local/m", "v1", OCI_MANIFEST, body.as_bytes());
    assert_eq!(r.status, 201);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/local/m/manifests/{digest}").as_str())
    );

    for reference in ["v1", digest.as_str()] {
        let r = h.get(&format!("/v2/local/m/manifests/{reference}"));
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], body.as_bytes());
        assert_eq!(
            r.header("content-type"),
            Some(OCI_MANIFEST),
            "exact type, no parameters"
        );
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(
            r.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        let r = h.head(&format!("/v2/local/m/manifests/{reference}"));
        assert_eq!(
            (r.status, r.header("content-length")),
            (200, Some(body.len().to_string().as_str()))
        );
        assert!(r.body.is_empty());
    }
    // Manifests are content: also readable through the blobs endpoint.
    let r = h.get(&format!("/v2/local/m/blobs/{digest}"));
    assert_eq!((r.status, &r.body[..]), (200, body.as_bytes()));
    // If-None-Match.
    let r = h.send(
        "GET",
        "/v2/local/m/manifests/v1",
        &[("if-none-match", &format!("\"{digest}\""))],
        Bytes::new(),
    );
    assert_eq!(r.status, 304);
}

#[test]
fn manifest_validation_errors() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let c = h.push_blob("local/v", b"{}");
    let missing = sha256(b"never pushed");
    let m = image_manifest((&c, 2), &[(&missing, 12)]);
    let r = h.push_manifest("local/v", "t", OCI_MANIFEST, m.as_bytes());
    assert_eq!(
        (r.status, r.error_code()),
        (400, "MANIFEST_BLOB_UNKNOWN".to_string())
    );
    assert_eq!(
        r.json()["errors"][0]["detail"][0]["digest"],
        missing.as_str()
    );

    for (body, ct) in [
        ("not json".to_string(), OCI_MANIFEST),
        (
            r#"{"schemaVersion":1,"name":"x"}"#.to_string(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        (image_manifest((&c, 2), &[]), DOCKER_V2),
        (
            r#"{"schemaVersion":2,"mediaType":"application/x-unknown"}"#.to_string(),
            "application/x-unknown",
        ),
    ] {
        let r = h.push_manifest("local/v", "t", ct, body.as_bytes());
        assert_eq!(
            (r.status, r.error_code()),
            (400, "MANIFEST_INVALID".to_string()),
            "{body}"
        );
    }
    // By digest with bytes that hash elsewhere.
    let good = image_manifest((&c, 2), &[]);
    let r = h.push_manifest("local/v", &sha256(b"other"), OCI_MANIFEST, good.as_bytes());
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
    let r = h.push_manifest("local/v", "bad:tag", OCI_MANIFEST, good.as_bytes());
    assert_eq!(r.status, 400);
    let r = h.push_manifest("local/v", ".bad", OCI_MANIFEST, good.as_bytes());
    assert_eq!((r.status, r.error_code()), (400, "TAG_INVALID".to_string()));
    // Over 4 MiB: 413.
    let huge = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(4 << 20)
    );
    let r = h.push_manifest("local/v", "huge", OCI_MANIFEST, huge.as_bytes());
    assert_eq!(
        (r.status, r.error_code()),
        (413, "MANIFEST_INVALID".to_string())
    );
    // Nothing of the above was stored.
    let r = h.get("/v2/local/v/tags/list");
    assert_eq!(r.json()["tags"], serde_json::json!([]));
    // Unknown manifest.
    let r = h.get("/v2/local/v/manifests/nope");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "MANIFEST_UNKNOWN".to_string())
    );
    // A tag that cannot exist is unknown on reads (400 only where it would be written).
    for method in ["GET", "HEAD", "DELETE"] {
        let r = h.send(
            method,
            "/v2/local/v/manifests/.INVALID_MANIFEST_NAME",
            &[],
            Bytes::new(),
        );
        assert_eq!(r.status, 404, "{method}");
    }
    let r = h.get("/v2/local/v/manifests/sha256:123");
    assert_eq!(
        (r.status, r.error_code()),
        (400, "DIGEST_INVALID".to_string())
    );
}

#[test]
fn subject_and_referrers() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (_, subject) = push_image(&h, "local/ref", "base", 1);
    let empty = h.push_blob("local/ref", b"{}");
    let sig = h.push_blob("local/ref", b"signature bytes");
    let artifact = |at: &str, subj: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{at}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[{{"mediaType":"application/octet-stream","digest":"{sig}","size":15}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subj}","size":100}},"annotations":{{"org.example":"yes"}}}}"#
        )
    };
    let a1 = artifact("application/vnd.example.sig", &subject);
    let r = h.push_manifest(
        "local/ref",
        &sha256(a1.as_bytes()),
        OCI_MANIFEST,
        a1.as_bytes(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    let a2 = artifact("application/vnd.example.sbom", &subject);
    assert_eq!(
        h.push_manifest(
            "local/ref",
            &sha256(a2.as_bytes()),
            OCI_MANIFEST,
            a2.as_bytes()
        )
        .status,
        201
    );
    // A subject that does not exist is accepted.
    let ghost = sha256(b"ghost");
    let a3 = artifact("application/vnd.example.sig", &ghost);
    let r = h.push_manifest(
        "local/ref",
        &sha256(a3.as_bytes()),
        OCI_MANIFEST,
        a3.as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("oci-subject")),
        (201, Some(ghost.as_str()))
    );

    let r = h.get(&format!("/v2/local/ref/referrers/{subject}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    let v = r.json();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|d| d["annotations"]["org.example"] == "yes" && d["mediaType"] == OCI_MANIFEST)
    );

    let r = h.get(&format!(
        "/v2/local/ref/referrers/{subject}?artifactType=application/vnd.example.sbom"
    ));
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sha256(a2.as_bytes()));
    assert_eq!(list[0]["size"], a2.len());

    // No referrers: 200 and an empty list; bad digest: 400.
    let r = h.get(&format!("/v2/local/ref/referrers/{}", sha256(b"none")));
    assert_eq!(
        (r.status, r.json()["manifests"].as_array().unwrap().len()),
        (200, 0)
    );
    assert_eq!(h.get("/v2/local/ref/referrers/sha256:zz").status, 400);

    // Deleting a referrer removes it from the list.
    assert_eq!(
        h.delete(&format!(
            "/v2/local/ref/manifests/{}",
            sha256(a1.as_bytes())
        ))
        .status,
        202
    );
    let r = h.get(&format!("/v2/local/ref/referrers/{subject}"));
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
}

#[test]
fn accept_negotiation_and_platform_fallback() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (_, oci) = push_image(&h, "local/neg", "oci", 2);
    // Several Accept lines are merged.
    let r = h.send(
        "GET",
        "/v2/local/neg/manifests/oci",
        &[("accept", DOCKER_V2), ("accept", OCI_MANIFEST)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    let r = h.send(
        "GET",
        "/v2/local/neg/manifests/oci",
        &[("accept", DOCKER_V2)],
        Bytes::new(),
    );
    assert_eq!(
        (r.status, r.error_code()),
        (404, "MANIFEST_UNKNOWN".to_string())
    );
    let r = h.send(
        "GET",
        "/v2/local/neg/manifests/oci",
        &[("accept", "application/json, */*")],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);

    // A Docker manifest list, asked for by tag by a client that only reads schema2.
    let c = h.push_blob("local/neg", br#"{"architecture":"amd64"}"#);
    let l = h.push_blob("local/neg", b"amd64 layer");
    let amd64 = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_V2}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{c}","size":24}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{l}","size":11}}]}}"#
    );
    let amd64_digest = sha256(amd64.as_bytes());
    assert_eq!(
        h.push_manifest("local/neg", &amd64_digest, DOCKER_V2, amd64.as_bytes())
            .status,
        201
    );
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{oci}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},{{"mediaType":"{DOCKER_V2}","digest":"{amd64_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        amd64.len()
    );
    let r = h.push_manifest("local/neg", "multi", DOCKER_LIST, list.as_bytes());
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let r = h.send(
        "GET",
        "/v2/local/neg/manifests/multi",
        &[("accept", DOCKER_V2)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(amd64_digest.as_str())
    );
    assert_eq!(r.header("content-type"), Some(DOCKER_V2));
    assert_eq!(&r.body[..], amd64.as_bytes());
    let r = h.send(
        "GET",
        "/v2/local/neg/manifests/multi",
        &[("accept", DOCKER_LIST)],
        Bytes::new(),
    );
    assert_eq!(&r.body[..], list.as_bytes());

    // An index whose children are missing is refused.
    let orphan = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}]}}"#,
        sha256(b"x")
    );
    let r = h.push_manifest("local/neg", "orphan", OCI_INDEX, orphan.as_bytes());
    assert_eq!(
        (r.status, r.error_code()),
        (400, "MANIFEST_BLOB_UNKNOWN".to_string())
    );
}

#[test]
fn multi_tag_put() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let c = h.push_blob("local/mt", b"{}");
    let m = image_manifest((&c, 2), &[]);
    let d = sha256(m.as_bytes());
    let r = h.send(
        "PUT",
        &format!("/v2/local/mt/manifests/{d}?tag=a&tag=b&tag=c"),
        &[("content-type", OCI_MANIFEST)],
        m.clone(),
    );
    assert_eq!(r.status, 201);
    let tags: Vec<&str> = r
        .headers
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(tags, vec!["a", "b", "c"]);
    assert_eq!(
        h.get("/v2/local/mt/tags/list").json()["tags"],
        serde_json::json!(["a", "b", "c"])
    );
    let r = h.send(
        "PUT",
        &format!("/v2/local/mt/manifests/{d}?tag=.bad"),
        &[("content-type", OCI_MANIFEST)],
        m,
    );
    assert_eq!(r.error_code(), "TAG_INVALID");
}

#[test]
fn tags_list_pagination() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let c = h.push_blob("local/tags", b"{}");
    let m = image_manifest((&c, 2), &[]);
    let names = ["B", "a", "b", "c", "d", "e"];
    for t in names {
        assert_eq!(
            h.push_manifest("local/tags", t, OCI_MANIFEST, m.as_bytes())
                .status,
            201
        );
    }
    let r = h.get("/v2/local/tags/tags/list");
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "local/tags", "tags": ["B", "a", "b", "c", "d", "e"]})
    );
    assert!(r.header("link").is_none());

    let r = h.get("/v2/local/tags/tags/list?n=2");
    assert_eq!(r.json()["tags"], serde_json::json!(["B", "a"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/local/tags/tags/list?last=a&n=2>; rel=\"next\"")
    );
    let r = h.get("/v2/local/tags/tags/list?n=2&last=a");
    assert_eq!(r.json()["tags"], serde_json::json!(["b", "c"]));
    let r = h.get("/v2/local/tags/tags/list?last=c");
    assert_eq!(r.json()["tags"], serde_json::json!(["d", "e"]));
    let r = h.get("/v2/local/tags/tags/list?n=0");
    assert_eq!(
        (r.json()["tags"].clone(), r.header("link")),
        (serde_json::json!([]), None)
    );
    let r = h.get("/v2/local/tags/tags/list?n=2&last=d");
    assert_eq!(
        (r.json()["tags"].clone(), r.header("link")),
        (serde_json::json!(["e"]), None)
    );
    for bad in ["-1", "x", "1.5"] {
        let r = h.get(&format!("/v2/local/tags/tags/list?n={bad}"));
        assert_eq!(
            (r.status, r.error_code()),
            (400, "PAGINATION_NUMBER_INVALID".to_string())
        );
    }
    let r = h.get("/v2/local/unknown/tags/list");
    assert_eq!(
        (r.status, r.error_code()),
        (404, "NAME_UNKNOWN".to_string())
    );
}

#[test]
fn catalog_pagination() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    for repo in ["local/c", "local/a", "local/b/x", "local/b"] {
        h.push_blob(repo, repo.as_bytes());
    }
    let r = h.get("/v2/_catalog");
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["local/a", "local/b", "local/b/x", "local/c"])
    );
    let r = h.get("/v2/_catalog?n=2");
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["local/a", "local/b"])
    );
    assert_eq!(
        r.header("link"),
        Some("</v2/_catalog?last=local%2Fb&n=2>; rel=\"next\"")
    );
    let r = h.get("/v2/_catalog?n=2&last=local%2Fb");
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["local/b/x", "local/c"])
    );
}

#[test]
fn deletes_by_tag_and_digest() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (_, d) = push_image(&h, "local/d", "one", 3);
    let r = h.send(
        "PUT",
        &format!("/v2/local/d/manifests/{d}?tag=two"),
        &[("content-type", OCI_MANIFEST)],
        h.get("/v2/local/d/manifests/one").body,
    );
    assert_eq!(r.status, 201);
    // Untag.
    assert_eq!(h.delete("/v2/local/d/manifests/one").status, 202);
    assert_eq!(h.get("/v2/local/d/manifests/one").status, 404);
    assert_eq!(h.get("/v2/local/d/manifests/two").status, 200);
    assert_eq!(h.delete("/v2/local/d/manifests/one").status, 404);
    // Delete by digest takes every tag with it.
    assert_eq!(h.delete(&format!("/v2/local/d/manifests/{d}")).status, 202);
    assert_eq!(h.get(&format!("/v2/local/d/manifests/{d}")).status, 404);
    assert_eq!(h.get("/v2/local/d/manifests/two").status, 404);
    assert_eq!(
        h.get("/v2/local/d/tags/list").json()["tags"],
        serde_json::json!([])
    );
    let r = h.delete(&format!("/v2/local/d/manifests/{d}"));
    assert_eq!(
        (r.status, r.error_code()),
        (404, "MANIFEST_UNKNOWN".to_string())
    );
}

#[test]
fn hostile_requests_change_nothing_on_disk() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let (m, _) = push_image(&h, "local/keep", "v1", 4);
    let before = blob_files(s.data_dir());
    let usage = s.app.store.usage();
    let junk = Bytes::from(random_bytes(10_000, 99));
    let wrong = sha256(b"wrong");
    for (method, path) in [
        ("PUT", "/v2/local/keep/manifests/v1".to_string()),
        ("PUT", format!("/v2/local/keep/manifests/{wrong}")),
        (
            "POST",
            format!("/v2/local/keep/blobs/uploads/?digest={wrong}"),
        ),
        (
            "POST",
            "/v2/local/keep/blobs/uploads/?digest=sha256:../../x".to_string(),
        ),
        (
            "PUT",
            "/v2/local/keep/blobs/uploads/00000000-0000-4000-8000-000000000000?digest=x"
                .to_string(),
        ),
        (
            "PATCH",
            "/v2/local/keep/blobs/uploads/..%2F..%2Fblobs".to_string(),
        ),
        ("PUT", "/v2/library/alpine/manifests/latest".to_string()),
        ("DELETE", "/v2/local/keep/blobs/sha256:zz".to_string()),
        ("DELETE", "/v2/local/keep/manifests/sha256:zz".to_string()),
        ("GET", "/v2/local/keep/blobs/sha256%3A..%2F..".to_string()),
    ] {
        let r = h.send(
            method,
            &path,
            &[("content-type", OCI_MANIFEST)],
            junk.clone(),
        );
        assert!(
            (400..500).contains(&r.status),
            "{method} {path} -> {}",
            r.status
        );
        assert!(
            !r.error_code().is_empty(),
            "{method} {path}: registry error body expected"
        );
    }
    assert_eq!(blob_files(s.data_dir()), before);
    assert_eq!(s.app.store.usage(), usage);
    assert_eq!(h.get("/v2/local/keep/manifests/v1").body, m.as_bytes());
    assert!(s.app.store.fsck(false).unwrap().is_clean());
}

#[test]
fn metrics_endpoint_counts_requests_and_storage() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let data = random_bytes(12_345, 11);
    let d = h.push_blob("local/metrics", &data);
    h.get(&format!("/v2/local/metrics/blobs/{d}"));
    let missing = h.get("/v2/local/metrics/manifests/missing");
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(text.contains("transship_store_bytes 12345"), "{text}");
    assert!(text.contains("transship_store_blobs 1"));
    assert!(
        text.contains(r#"transship_http_requests_total{method="GET",route="blob",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(
        r#"transship_http_requests_total{method="GET",route="manifest",status="404"} 1"#
    ));
    // The blob and the 404's error body: every byte sent is counted.
    let sent = 12345 + missing.body.len();
    assert!(
        text.contains(&format!("transship_http_sent_bytes_total {sent}")),
        "{text}"
    );
    assert!(text.contains("transship_http_request_duration_seconds_bucket"));
}
