//! HTTPS: HTTP/2 (ALPN) and HTTP/1.1 over rustls with a test CA generated here, push and pull
//! over TLS, certificate reload (in-process, and SIGHUP on the real binary) where bad files
//! never replace a working certificate, clear errors for unusable files, and skopeo trusting
//! the test CA through `--cert-dir`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::{Ca, HttpsClient, client};
use common::*;
use http_body_util::{BodyExt, Full};
use transship::config::TlsConfig;

struct Got {
    status: u16,
    version: http::Version,
    headers: http::HeaderMap,
    body: Bytes,
}

fn send(
    rt: &tokio::runtime::Runtime,
    c: &HttpsClient,
    method: &str,
    url: &str,
    body: Vec<u8>,
) -> Result<Got, String> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    rt.block_on(async {
        let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Got {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body,
        })
    })
}

/// A monolithic blob push (POST, then PUT with the whole body) over HTTPS; returns the digest.
fn push_blob(
    rt: &tokio::runtime::Runtime,
    c: &HttpsClient,
    base: &str,
    repo: &str,
    data: &[u8],
) -> String {
    let digest = sha256(data);
    let r = send(
        rt,
        c,
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        vec![],
    )
    .unwrap();
    assert_eq!(r.status, 202);
    let loc = r
        .headers
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let r = send(
        rt,
        c,
        "PUT",
        &format!("{base}{loc}?digest={digest}"),
        data.to_vec(),
    )
    .unwrap();
    assert_eq!(r.status, 201);
    digest
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn tls_server(tls: TlsConfig) -> TestServer {
    TestServer::start_with(move |mut c| {
        c.server.tls = Some(tls);
        c
    })
}

#[test]
fn https_serves_http2_and_http1_and_round_trips_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("transship test CA");
    let s = tls_server(ca.issue_into(dir.path()));
    let base = format!("https://127.0.0.1:{}", s.addr.port());
    let rt = rt();

    let h2 = client(&ca.pem, true);
    let r = send(&rt, &h2, "GET", &format!("{base}/v2/"), vec![]).unwrap();
    assert_eq!(
        (r.status, r.version),
        (200, http::Version::HTTP_2),
        "ALPN selects HTTP/2"
    );
    let r = send(
        &rt,
        &client(&ca.pem, false),
        "GET",
        &format!("{base}/v2/"),
        vec![],
    )
    .unwrap();
    assert_eq!((r.status, r.version), (200, http::Version::HTTP_11));

    // A monolithic push and a pull over HTTP/2.
    let data = random_bytes(3 << 20, 61);
    let digest = push_blob(&rt, &h2, &base, "local/tls", &data);
    let r = send(
        &rt,
        &h2,
        "GET",
        &format!("{base}/v2/local/tls/blobs/{digest}"),
        vec![],
    )
    .unwrap();
    assert!(
        r.status == 200 && r.body == data,
        "blob round trip over TLS"
    );

    // Many streams at once on the one HTTP/2 connection (their small responses are written
    // together): every stream gets its own blob, whole, and the large one still streams.
    let small: Vec<(Vec<u8>, String)> = (0..4)
        .map(|i| {
            let b = random_bytes(3000 + i * 1000, 70 + i as u64);
            let d = push_blob(&rt, &h2, &base, "local/tls", &b);
            (b, d)
        })
        .collect();
    let got = rt.block_on(async {
        let gets = (0..64).map(|i| {
            let (h2, base) = (h2.clone(), base.clone());
            let d = if i % 16 == 15 {
                digest.clone()
            } else {
                small[i % 4].1.clone()
            };
            async move {
                let req = http::Request::get(format!("{base}/v2/local/tls/blobs/{d}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = h2.request(req).await.expect("response");
                assert_eq!(resp.version(), http::Version::HTTP_2);
                resp.into_body().collect().await.expect("body").to_bytes()
            }
        });
        futures_util::future::join_all(gets).await
    });
    for (i, body) in got.iter().enumerate() {
        let want: &[u8] = if i % 16 == 15 { &data } else { &small[i % 4].0 };
        assert!(body[..] == *want, "stream {i} got other bytes");
    }

    // Plain HTTP to the TLS port is refused, and the server carries on.
    let plain = Http::new(&format!("http://127.0.0.1:{}", s.addr.port()));
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plain.get("/v2/")));
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status >= 400),
        "plain HTTP must not be served on the TLS port"
    );
    assert_eq!(
        send(&rt, &h2, "GET", &format!("{base}/v2/"), vec![])
            .unwrap()
            .status,
        200
    );
}

#[test]
fn reload_takes_new_certificates_and_keeps_the_old_one_when_files_are_bad() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new("first CA"), Ca::new("second CA"));
    let files = ca1.issue_into(dir.path());
    let s = tls_server(files.clone());
    let url = format!("https://127.0.0.1:{}/v2/", s.addr.port());
    let rt = rt();
    let tls = s.app.tls.as_ref().expect("TLS configured");
    assert!(send(&rt, &client(&ca1.pem, true), "GET", &url, vec![]).is_ok());
    assert!(
        send(&rt, &client(&ca2.pem, true), "GET", &url, vec![]).is_err(),
        "not trusted yet"
    );

    // Broken files: the reload fails and the working certificate stays.
    std::fs::write(&files.cert_file, "not a certificate").unwrap();
    assert!(tls.reload().is_err());
    std::fs::write(&files.cert_file, "").unwrap();
    assert!(tls.reload().is_err());
    assert!(
        send(&rt, &client(&ca1.pem, true), "GET", &url, vec![]).is_ok(),
        "old certificate kept"
    );

    // A certificate from another CA: new connections get it.
    ca2.issue_into(dir.path());
    tls.reload().unwrap();
    assert!(send(&rt, &client(&ca2.pem, true), "GET", &url, vec![]).is_ok());
    assert!(send(&rt, &client(&ca1.pem, true), "GET", &url, vec![]).is_err());
    // The change-detecting reload sees nothing new now.
    assert!(!tls.reload_if_changed().unwrap());
}

#[test]
fn sighup_reloads_the_certificate_of_the_running_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new("first CA"), Ca::new("second CA"));
    let files = ca1.issue_into(dir.path());
    let config = dir.path().join("t.toml");
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "data_dir = \"./transship-data\"",
            &format!(
                "data_dir = {:?}",
                dir.path().join("data").display().to_string()
            ),
        )
        .replace(
            "log_format = \"text\"\n",
            &format!(
                "log_format = \"text\"\n\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                files.cert_file, files.key_file
            ),
        );
    std::fs::write(&config, text).unwrap();
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let url = format!("https://127.0.0.1:{}/v2/", server.addr.port());
    let rt = rt();
    assert!(send(&rt, &client(&ca1.pem, true), "GET", &url, vec![]).is_ok());

    ca2.issue_into(dir.path());
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&rt, &client(&ca2.pem, true), "GET", &url, vec![]).is_err() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not load the new certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
    // Close our HTTP/2 connections first: an idle client that never answers GOAWAY would
    // hold graceful shutdown for its whole timeout.
    drop(rt);
    assert!(server.terminate().success());
}

#[test]
fn unusable_certificate_files_are_clear_errors_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let files = ca.issue_into(dir.path());
    let build = |tls: TlsConfig| {
        let data = tempfile::tempdir().unwrap();
        let mut c = test_config(data.path(), "");
        c.server.tls = Some(tls);
        transship::App::build(c).err().map(|e| e.to_string())
    };
    let missing = TlsConfig {
        cert_file: dir.path().join("nope.pem"),
        key_file: files.key_file.clone(),
    };
    let e = build(missing).expect("missing certificate must fail");
    assert!(
        e.contains("cannot read TLS certificate file") && e.contains("nope.pem"),
        "{e}"
    );
    let other = tempfile::tempdir().unwrap();
    let wrong_key = TlsConfig {
        cert_file: files.cert_file.clone(),
        key_file: ca.issue_into(other.path()).key_file,
    };
    let e = build(wrong_key).expect("a key of another certificate must fail");
    assert!(e.contains("do not work together"), "{e}");
    assert!(build(files).is_none());
}

fn skopeo() -> Option<PathBuf> {
    let found = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "skopeo is required in CI");
        eprintln!("SKIP: skopeo is not installed");
    }
    found.then(|| PathBuf::from("skopeo"))
}

#[test]
fn skopeo_trusts_the_registry_through_cert_dir() {
    let Some(skopeo) = skopeo() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("skopeo CA");
    let s = tls_server(ca.issue_into(dir.path()));
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), &ca.pem).unwrap();
    // Push an image over plain Rust HTTPS, then read it with skopeo verifying the chain.
    let rt = rt();
    let c = client(&ca.pem, true);
    let base = format!("https://127.0.0.1:{}", s.addr.port());
    let push = |data: &[u8]| push_blob(&rt, &c, &base, "local/skopeo-tls", data);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = random_bytes(10_000, 62);
    let (cd, ld) = (push(config), push(&layer));
    let manifest = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    let req = http::Request::put(format!("{base}/v2/local/skopeo-tls/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(Full::new(Bytes::from(manifest.clone())))
        .unwrap();
    assert_eq!(rt.block_on(c.request(req)).unwrap().status(), 201);

    let image = format!("docker://127.0.0.1:{}/local/skopeo-tls:v1", s.addr.port());
    let out = std::process::Command::new(&skopeo)
        .args(["inspect", "--raw", "--cert-dir"])
        .arg(&certs)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo with the CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, manifest.as_bytes());
    let empty = dir.path().join("empty.d");
    std::fs::create_dir_all(&empty).unwrap();
    let out = std::process::Command::new(&skopeo)
        .args(["inspect", "--raw", "--cert-dir"])
        .arg(&empty)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "without the CA the certificate must not verify"
    );
}
