//! What the benchmarks share: free ports, deterministic data, and server processes that are
//! stopped cleanly (SIGTERM, so nginx stops its workers; SIGKILL after two seconds) with their
//! peak RSS readable.
#![allow(dead_code)]

pub mod cluster;
pub mod wrk;

// The cluster profile's engines (SeaweedFS, PostgreSQL) are the tests' own module, compiled
// here too; `images` gives it the few process helpers it takes from the tests' fixtures.
#[path = "../../tests/common/engines.rs"]
pub mod engines;
mod images {
    pub use super::{on_path, skip, stop_child_with};
}

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Deterministic pseudo-random bytes (xorshift): incompressible test data.
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

pub fn sha256(data: &[u8]) -> String {
    transship::oci::Digest::sha256_of(data).to_string()
}

/// The URL that completes an upload: the session `location` (absolute, or relative to
/// `base`) with `digest` added to its query.
pub fn upload_put_url(base: &str, location: &str, digest: &str) -> String {
    let loc = if location.starts_with("http") {
        location.to_string()
    } else {
        format!("{base}{location}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

/// A server process, logging to a file, stopped when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `cmd` and, if `port` is given, waits until it accepts connections.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path, port: Option<u16>) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdout(Stdio::from(out.try_clone().expect("clone")))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name}: {e} (run ./scripts/bench, which installs it)")
            });
        let proc = Self { child };
        if let Some(port) = port {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{name} did not start on port {port}"
                );
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        proc
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop_child_with(&mut self.child, libc::SIGTERM, Duration::from_secs(2));
    }
}

/// Stops a process the benchmark started, by its PID: `signal` (its clean shutdown), then
/// SIGKILL if it has not exited within `grace` (a no-op on one that has).
pub fn stop_child_with(child: &mut Child, signal: libc::c_int, grace: Duration) {
    // SAFETY: signalling a child this benchmark started (and has not reaped yet).
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The runtime the benchmarks' clients run on: two workers, the same in every benchmark.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A benchmark cannot skip what it compares: a missing program is fatal.
pub fn skip(_suite: &str, why: &str) -> bool {
    panic!("{why} (run ./scripts/bench, which installs it)");
}

/// CNCF distribution on `port` with its data under `dir`; a pull-through proxy of `remote` if
/// given. Its access log goes to `dir/log`.
pub fn distribution(dir: &Path, port: u16, remote: Option<&str>) -> Proc {
    let storage = format!(
        "  filesystem:\n    rootdirectory: {}\n",
        dir.join("data").display()
    );
    distribution_on(dir, port, remote, &storage)
}

/// `distribution` on the storage driver `storage` (YAML lines under `storage:`, indented).
pub fn distribution_on(dir: &Path, port: u16, remote: Option<&str>, storage: &str) -> Proc {
    std::fs::create_dir_all(dir).expect("dir");
    let proxy = remote
        .map(|r| format!("proxy:\n  remoteurl: {r}\n"))
        .unwrap_or_default();
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!("version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n{storage}  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{proxy}"),
    )
    .expect("config");
    Proc::spawn(
        "docker-registry",
        // Its S3 driver cannot apply a CA bundle to its own transport and panics at start if
        // the environment names one (the store here is plain HTTP anyway).
        Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .env_remove("AWS_CA_BUNDLE"),
        &dir.join("log"),
        Some(port),
    )
}

/// transship (the release binary) on `port` with its data under `dir`, mirroring `upstream` as
/// docker.io, on its embedded defaults otherwise.
pub fn transship(dir: &Path, port: u16, upstream: &str) -> Proc {
    transship_with(dir, port, upstream, "")
}

/// `transship` with `extra` TOML appended to its config (e.g. the cluster profile's tables).
pub fn transship_with(dir: &Path, port: u16, upstream: &str, extra: &str) -> Proc {
    std::fs::create_dir_all(dir).expect("dir");
    let cfg = dir.join("transship.toml");
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "url = \"https://registry-1.docker.io\"",
            &format!("url = {upstream:?}"),
        )
        .replace(
            "listen = \"127.0.0.1:5000\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "data_dir = \"./transship-data\"",
            &format!("data_dir = {:?}", dir.join("data").display().to_string()),
        );
    std::fs::write(&cfg, format!("{text}\n{extra}")).expect("config");
    Proc::spawn(
        "transship",
        Command::new(env!("CARGO_BIN_EXE_transship"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn"),
        &dir.join("log"),
        Some(port),
    )
}

/// How many GETs of `repo`'s blob `digest` distribution's access log at `log` shows.
pub fn upstream_gets(log: &Path, repo: &str, digest: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&format!("\"GET /v2/{repo}/blobs/{digest} HTTP/"))
        .count()
}

/// Pushes `blob` (named `digest`) to `repo` at `base` in one piece: POST, then PUT of the body.
pub async fn push_blob(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: &str,
    repo: &str,
    digest: &str,
    blob: bytes::Bytes,
) {
    let post = http::Request::post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .body(http_body_util::Full::default())
        .expect("request");
    let resp = client.request(post).await.expect("POST upload");
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("upload location")
        .to_string();
    let put = http::Request::put(upload_put_url(base, &location, digest))
        .body(http_body_util::Full::new(blob))
        .expect("request");
    assert_eq!(client.request(put).await.expect("PUT").status(), 201);
}
