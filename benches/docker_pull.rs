//! The Docker daemon's pull through transship vs the same pull from the upstream directly, in
//! one run (issue "the real Docker daemon"): a private dockerd whose `registry-mirrors` is
//! transship, in front of a CNCF distribution registry holding `library/big:v1` (three layers
//! of 64 MiB of incompressible data, uncompressed tars; the daemon detects that itself).
//! Every round times, with the daemon's image store emptied before each pull:
//! - cold: `docker pull big:v1` through a transship started empty (every blob a cold fill);
//! - warm: the same pull again (everything cached);
//! - direct: `docker pull 127.0.0.1:PORT/library/big:v1` from distribution itself.
//!
//! Reported: the median of each, and cold/direct and warm/direct. Needs root and `dockerd`
//! (Debian `docker.io`); skipped otherwise. The daemon reaches nothing but loopback: its Docker
//! Hub fallback goes to a closed proxy port, and each cold round checks transship fetched every
//! layer from the upstream exactly once (a pull that bypassed the mirror would fail that).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

mod common;

use common::{
    Proc, distribution, free_port, push_blob, random_bytes, sha256, transship, upstream_gets,
};

const LAYER: usize = 64 << 20;
const LAYERS: u64 = 3;
const REPO: &str = "library/big";

/// A tar holding one file of `len` pseudo-random bytes.
fn layer_tar(len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    let mut header = tar::Header::new_ustar();
    header.set_size(len as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::with_capacity(len + 4096));
    builder
        .append_data(&mut header, format!("layer{seed}.bin"), data.as_slice())
        .expect("tar");
    builder.into_inner().expect("tar")
}

/// Pushes `library/big:v1` (config + layers + schema2 manifest) to the registry at `base`;
/// returns the layer digests.
fn seed(rt: &tokio::runtime::Runtime, base: &str) -> Vec<String> {
    let layers: Vec<Vec<u8>> = (1..=LAYERS).map(|i| layer_tar(LAYER, i)).collect();
    let digests: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": digests},
    })
    .to_string()
    .into_bytes();
    let layer_descriptors: Vec<_> = layers
        .iter()
        .zip(&digests)
        .map(|(l, d)| {
            serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
                "size": l.len(),
                "digest": d,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": sha256(&config),
        },
        "layers": layer_descriptors,
    })
    .to_string();
    rt.block_on(async {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        for blob in layers.into_iter().chain([config]) {
            let digest = sha256(&blob);
            push_blob(&client, base, REPO, &digest, Bytes::from(blob)).await;
        }
        let put = http::Request::put(format!("{base}/v2/{REPO}/manifests/v1"))
            .header(
                "content-type",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .body(Full::new(Bytes::from(manifest)))
            .expect("request");
        assert_eq!(client.request(put).await.expect("PUT").status(), 201);
    });
    digests
}

/// A private dockerd whose only mirror is `mirror`, everything under `dir`.
struct Daemon {
    _proc: Proc,
    dir: PathBuf,
    host: String,
}

impl Daemon {
    fn start(dir: &Path, mirror: &str) -> Self {
        std::fs::create_dir_all(dir.join("cfg")).expect("dir");
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let config = serde_json::json!({
            "storage-driver": "vfs", "iptables": false, "ip6tables": false, "bridge": "none",
            "data-root": dir.join("data"), "exec-root": dir.join("exec"),
            "pidfile": dir.join("docker.pid"), "hosts": [host], "registry-mirrors": [mirror],
        });
        std::fs::write(dir.join("daemon.json"), config.to_string()).expect("daemon.json");
        let proc = Proc::spawn(
            "dockerd",
            Command::new("dockerd")
                .arg("--config-file")
                .arg(dir.join("daemon.json"))
                // Loopback goes direct; Docker Hub (the fallback) to a closed port.
                .env("HTTP_PROXY", "http://127.0.0.1:9")
                .env("HTTPS_PROXY", "http://127.0.0.1:9")
                .env("NO_PROXY", "127.0.0.1,localhost"),
            &dir.join("dockerd.log"),
            None,
        );
        let d = Self {
            _proc: proc,
            dir: dir.to_path_buf(),
            host,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.docker(&["version"]) {
            assert!(Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    fn docker(&self, args: &[&str]) -> bool {
        Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.dir.join("cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Times `docker pull reference`, then removes the image (and its layers).
    fn timed_pull(&self, reference: &str) -> Duration {
        let started = Instant::now();
        assert!(self.docker(&["pull", reference]), "docker pull {reference}");
        let took = started.elapsed();
        assert!(self.docker(&["rmi", "-f", reference]), "docker rmi");
        took
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Stopped by `Proc` (SIGTERM); a dockerd leaves its data-root mounted over itself.
        let data = self.dir.join("data");
        if let Ok(path) = std::ffi::CString::new(data.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path; failure (nothing mounted) is harmless.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !root || !have("dockerd") || !have("docker-registry") {
        println!("docker_pull: skipped (needs root, dockerd and docker-registry)");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let rt = common::runtime();
    let up_port = free_port();
    let _upstream = distribution(&d.join("upstream"), up_port, None);
    let upstream_url = format!("http://127.0.0.1:{up_port}");
    let layers = seed(&rt, &upstream_url);
    let ts_port = free_port();
    let daemon = Daemon::start(&d.join("docker"), &format!("http://127.0.0.1:{ts_port}"));
    let up_log = d.join("upstream").join("log");
    let direct_ref = format!("127.0.0.1:{up_port}/{REPO}:v1");

    let (mut cold, mut warm, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let ts_dir = d.join("transship");
        let _ = std::fs::remove_dir_all(&ts_dir);
        let ts = transship(&ts_dir, ts_port, &upstream_url);
        let before: Vec<usize> = layers
            .iter()
            .map(|l| upstream_gets(&up_log, REPO, l))
            .collect();
        cold.push(daemon.timed_pull("big:v1"));
        warm.push(daemon.timed_pull("big:v1"));
        // distribution writes its access log asynchronously.
        std::thread::sleep(Duration::from_millis(500));
        for (layer, before) in layers.iter().zip(before) {
            assert_eq!(
                upstream_gets(&up_log, REPO, layer) - before,
                1,
                "round {round}: transship fetched layer {layer} once (the pulls went through it)"
            );
        }
        drop(ts);
        direct.push(daemon.timed_pull(&direct_ref));
        println!(
            "round {round}: cold {:.2}s  warm {:.2}s  direct {:.2}s",
            cold[round - 1].as_secs_f64(),
            warm[round - 1].as_secs_f64(),
            direct[round - 1].as_secs_f64()
        );
    }
    let (cold, warm, direct) = (median(cold), median(warm), median(direct));
    println!(
        "\ndocker pull of {LAYERS} x {} MiB layers, median of {rounds} rounds",
        LAYER >> 20
    );
    println!("{:<44} {:>8} {:>10}", "case", "time", "vs direct");
    for (name, t) in [
        ("through transship, cold (every blob filled)", cold),
        ("through transship, warm (all cached)", warm),
        ("directly from distribution", direct),
    ] {
        println!("{name:<44} {t:>7.2}s {:>9.2}x", t / direct);
    }
}
