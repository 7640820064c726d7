//! Test harness: the real server on an ephemeral port with a temp data dir — in-process
//! (`TestServer`) or as the real binary (`BinaryServer`, for kill -9 and restarts) — and a
//! small HTTP client over hyper for black-box requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use transship::App;
use transship::config::Config;

pub mod engines;
pub mod images;
pub mod replicas;
pub mod tls;
pub mod upstream;
pub mod webhook;

pub const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A config for tests: the embedded default with a temp data dir and an ephemeral port, plus
/// `extra` TOML appended (sections not in the default, e.g. more `[[project]]`s).
pub fn test_config(data_dir: &Path, extra: &str) -> Config {
    Config::parse(&test_config_text(data_dir, extra), "test config").expect("valid test config")
}

/// `test_config` as TOML text (for the real binary's config file).
pub fn test_config_text(data_dir: &Path, extra: &str) -> String {
    // Upstreams point at a closed loopback port unless a test sets one: no test may ever
    // reach a real public registry.
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "url = \"https://registry-1.docker.io\"",
            "url = \"http://127.0.0.1:9\"",
        )
        .replace("listen = \"127.0.0.1:5000\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "data_dir = \"./transship-data\"",
            &format!("data_dir = {:?}", data_dir.display().to_string()),
        );
    format!("{text}\n{extra}")
}

/// The real server, in-process, on its own runtime thread.
pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(|c| c)
    }

    pub fn start_with(adjust: impl FnOnce(Config) -> Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, adjust)
    }

    /// Starts on an existing data dir (restart tests).
    pub fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(Config) -> Config) -> Self {
        let config = adjust(test_config(dir.path(), ""));
        let app = App::build(config).expect("app builds");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let app2 = app.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                transship::http::server::serve(app2, listener, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
            });
        });
        let addr = addr_rx.recv().expect("server address");
        Self {
            addr,
            app,
            dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server and returns its data dir for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.shutdown();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The real `transship` binary, started as a child process.
pub struct BinaryServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_transship")
}

/// `transship cache ARGS --json --config CONFIG` (through the running server's admin socket,
/// or on the stopped store): whether it succeeded, its JSON answer (`Null` if none), stderr.
pub fn cache_cli_run(config: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = std::process::Command::new(binary())
        .arg("cache")
        .args(args)
        .args(["--json", "--config"])
        .arg(config)
        .output()
        .expect("run transship cache");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, stderr)
}

impl BinaryServer {
    /// Starts `transship serve` with `config_path`, on an ephemeral port; waits until ready.
    /// The child is reaped by `Drop`, `kill9` or `terminate`.
    #[allow(clippy::zombie_processes)]
    pub fn start(config_path: &Path, log: &Path) -> Self {
        Self::start_on(config_path, log, "127.0.0.1:0")
    }

    /// `start`, listening on `listen` (another loopback address, or a port to keep).
    #[allow(clippy::zombie_processes)]
    pub fn start_on(config_path: &Path, log: &Path, listen: &str) -> Self {
        const MARKER: &str = "transship serving";
        let before = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(MARKER)
            .count();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(config_path)
            .args(["--listen", listen])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(out.try_clone().expect("clone")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn transship");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.matches(MARKER).count() > before {
                let line = text
                    .lines()
                    .rev()
                    .find(|l| l.contains(MARKER))
                    .unwrap_or_default();
                let addr = line
                    .split("listen=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("no listen address in {line:?}"));
                return Self {
                    child,
                    addr,
                    log: log.to_path_buf(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "transship did not start; log:\n{text}"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("transship exited ({status}) while starting; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    /// The first error code of a registry error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A blocking HTTP client (its own small runtime), so tests read top to bottom.
pub struct Http {
    rt: tokio::runtime::Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// An `Authorization` value sent with every request that does not set its own.
    auth: Option<String>,
}

impl Http {
    pub fn new(base: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            rt,
            client,
            base: base.trim_end_matches('/').to_string(),
            auth: None,
        }
    }

    /// The same client, sending `authorization` (a full header value) on every request.
    pub fn with_auth(mut self, authorization: &str) -> Self {
        self.auth = Some(authorization.to_string());
        self
    }

    pub fn for_server(s: &TestServer) -> Self {
        Self::new(&s.url(""))
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(auth) = &self.auth
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            req = req.header("authorization", auth);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        self.rt.block_on(async {
            let resp = self.client.request(req).await.expect("request sent");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            }
        })
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], Bytes::new())
    }
    pub fn head(&self, path: &str) -> Resp {
        self.send("HEAD", path, &[], Bytes::new())
    }
    pub fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path, &[], Bytes::new())
    }

    /// Sends a body with chunked transfer encoding and no Content-Length (like `docker push`).
    pub fn send_streamed(&self, method: &str, path: &str, chunks: Vec<Bytes>) -> Resp {
        use http_body_util::StreamBody;
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<
                futures_util::stream::Iter<
                    std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
                >,
            >>();
            let frames: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> = chunks
                .into_iter()
                .map(|c| Ok(hyper::body::Frame::data(c)))
                .collect();
            let req = http::Request::builder()
                .method(method)
                .uri(url)
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .expect("request");
            let resp = client.request(req).await.expect("request sent");
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            }
        })
    }

    /// Pushes a blob (POST + PUT) and returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self.send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        );
        assert_eq!(
            r.status,
            202,
            "POST upload: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let loc = r.header("location").expect("location").to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self.send(
            "PUT",
            &format!("{loc}{sep}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            Bytes::copy_from_slice(data),
        );
        assert_eq!(
            r.status,
            201,
            "PUT upload: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        digest
    }

    /// Pushes a manifest; returns its digest (from the response).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Resp {
        self.send(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            Bytes::copy_from_slice(body),
        )
    }
}

pub fn sha256(data: &[u8]) -> String {
    transship::oci::Digest::sha256_of(data).to_string()
}

pub fn sha512(data: &[u8]) -> String {
    transship::oci::Digest::of(transship::oci::Algorithm::Sha512, data).to_string()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for tests.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An OCI image manifest over `config` and `layers` (digest, size) pairs.
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, s)| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.0,
        config.1,
        layers.join(",")
    )
}

/// Posts an HTML form (`fields` urlencoded), with a console session cookie if given.
pub fn post_form(h: &Http, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Resp {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let mut headers = vec![
        ("content-type", "application/x-www-form-urlencoded"),
        ("accept", "text/html"),
    ];
    if let Some(c) = cookie {
        headers.push(("cookie", c));
    }
    h.send("POST", path, &headers, body)
}

/// Pushes a small image (config + one layer) under `repo:tag`; returns (manifest bytes, digest).
pub fn push_image(http: &Http, repo: &str, tag: &str, seed: u64) -> (String, String) {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let layer = random_bytes(1000 + seed as usize % 500, seed);
    let c = http.push_blob(repo, config.as_bytes());
    let l = http.push_blob(repo, &layer);
    let m = image_manifest((&c, config.len()), &[(&l, layer.len())]);
    let r = http.push_manifest(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        m.as_bytes(),
    );
    assert_eq!(
        r.status,
        201,
        "manifest push: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let d = r
        .header("docker-content-digest")
        .expect("digest header")
        .to_string();
    (m, d)
}

/// Files under `dir/blobs` (for "changes nothing on disk" checks).
pub fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![data_dir.join("blobs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

/// Every series on `/metrics` (name and labels, without the value).
pub fn metric_series(h: &Http) -> Vec<String> {
    let r = h.get("/metrics");
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec())
        .expect("UTF-8 metrics")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_string())
        .collect()
}

/// Writes the embedded default config with its data directory in `dir`, for the real binary;
/// returns the config file's path.
pub fn default_config_in(dir: &Path) -> PathBuf {
    let config_path = dir.join("transship.toml");
    let data_dir = dir.join("data");
    let text = transship::config::EMBEDDED_DEFAULT.replace(
        "data_dir = \"./transship-data\"",
        &format!("data_dir = {:?}", data_dir.display().to_string()),
    );
    std::fs::write(&config_path, text).expect("write config");
    config_path
}

/// What the real binary logs while starting on the embedded defaults, listening on every
/// address (`0.0.0.0`), with data in `dir`: the log up to "transship serving" (or 30 s).
pub fn startup_log_on_all_addresses(dir: &Path) -> String {
    let log = dir.join("log");
    let out = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.join("data"))
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("spawn transship");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("transship serving") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}
