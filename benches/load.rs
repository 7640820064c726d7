//! Side-by-side load benchmark: transship vs CNCF distribution (Debian `docker-registry`) vs
//! nginx serving the same bytes as static files with sendfile — all on loopback, in one run,
//! reported as ratios. Run with `./scripts/bench` (installs wrk, nginx, docker-registry).
//!
//! Cases (issue "storage engine" targets in brackets):
//! - large hot blob (256 MiB) GET throughput, 1 and 8 clients          [>= 0.9x nginx]
//! - small blob (4 KiB) GET req/s, 32 connections                       [>= 0.5x nginx]
//! - manifest GET by tag req/s, 64 connections                          [>= 0.5x nginx]
//! - monolithic push of 256 MiB, wall time                              [>= 2.5x distribution]
//! - small blob (4 KiB) GET req/s, 32 connections, while another client reads the 256 MiB
//!   blob cold (its file dropped from the page cache before every read, checked), as a ratio
//!   to the same run with the blob cached, and wrk's p99 latency in both: a cold read must
//!   not stall the other requests                                 [>= 0.8x the hot run]
//!   The cold run is repeated with the server's disk reads limited to 200 MB/s (`slow_disk`:
//!   a block-I/O cgroup, root only), since this machine's disk answers from the host's cache.
//! - HTTPS (issue 14), transship (rustls) vs nginx (OpenSSL, TLSv1.3 only), the same
//!   self-signed certificate, both with access logs and keep-alive, as many worker threads /
//!   processes as cores: 256 MiB GET at 1 and 8 connections (GB/s)       [>= 1.0x nginx]
//!   4 KiB blob GET and manifest GET by tag over HTTP/1.1 (wrk) and over HTTP/2 (h2load,
//!   8 connections x 8 streams)                                   [h2: >= 0.9x nginx]
//!   transship is restarted on the same data with `[server.tls]` for these cases.
//! - transship peak RSS (VmHWM) over the whole run, both processes    [<= 64 MiB]
//!
//! `BENCH_SECONDS` sets the duration of each wrk run (default 8). `BENCH_FILTER` runs only the
//! GET cases whose label contains it (the push case only if it contains "push"). wrk runs on
//! the same two cores as the servers, the same for every peer, so the ratios compare like with
//! like.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const LARGE: usize = 256 << 20;
const SMALL: usize = 4 << 10;
const REPO: &str = "local/bench";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The read rate of the slow-disk rows of the cold-read case (bytes per second): above the
/// reader's 150 MB/s, so it reads as much as in the other rows, each 2 MiB window ~10 ms.
const SLOW_DISK: u64 = 200_000_000;

mod common;
#[path = "load/https.rs"]
mod https;
#[path = "load/slow_disk.rs"]
mod slow_disk;

use common::wrk::{WrkResult, load_tool_output, wrk};
use common::{Proc, free_port, random_bytes, sha256, upload_put_url};

struct Registry {
    name: &'static str,
    base: String,
}

/// Minimal blocking client for pushing content.
struct Pusher {
    rt: tokio::runtime::Runtime,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Pusher {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            rt,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn send(
        &self,
        method: &str,
        url: &str,
        ct: Option<&str>,
        body: Bytes,
    ) -> (u16, http::HeaderMap) {
        let mut req = http::Request::builder().method(method).uri(url);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let req = req.body(Full::new(body)).expect("request");
        self.rt.block_on(async {
            let resp = self.client.request(req).await.expect("request");
            let (parts, body) = resp.into_parts();
            let _ = body.collect().await;
            (parts.status.as_u16(), parts.headers)
        })
    }

    /// POST + monolithic PUT; returns the wall time of the whole push.
    fn push_blob(&self, base: &str, data: Bytes) -> Duration {
        let digest = sha256(&data);
        let started = Instant::now();
        let (status, _) = self.send(
            "PUT",
            &self.upload_url(base, &digest),
            Some("application/octet-stream"),
            data,
        );
        assert_eq!(status, 201, "PUT upload to {base}");
        started.elapsed()
    }

    /// Starts an upload session; returns the URL to PUT the blob to.
    fn upload_url(&self, base: &str, digest: &str) -> String {
        let (status, headers) = self.send(
            "POST",
            &format!("{base}/v2/{REPO}/blobs/uploads/"),
            None,
            Bytes::new(),
        );
        assert_eq!(status, 202, "POST upload to {base}");
        let loc = headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("location");
        upload_put_url(base, loc, digest)
    }

    /// A monolithic push timed the way a user would see it: curl streaming the file (the same
    /// client for every registry, so the ratio compares servers, not clients). Returns the time
    /// of the POST plus the PUT.
    fn timed_push_with_curl(&self, base: &str, file: &Path, digest: &str) -> Duration {
        let started = Instant::now();
        let url = self.upload_url(base, digest);
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
            ])
            .arg(file)
            .arg(&url)
            .output()
            .expect("curl (run ./scripts/bench, which installs it)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "201",
            "curl push to {base}"
        );
        started.elapsed()
    }
}

/// Drops a file from the page cache.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("blob file to evict");
    // Dirty pages cannot be dropped: write them back first (a no-op once they are clean).
    f.sync_data().expect("fsync before eviction");
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise on {}", path.display());
    // On tmpfs (or with the pages held elsewhere) nothing is dropped and "cold" would be hot.
    let len = f.metadata().map_or(0, |m| m.len()) as usize;
    assert!(
        !transship::store::pagecache::file_range_resident(&f, 0, len, &mut Vec::new()),
        "{} is still wholly in the page cache after POSIX_FADV_DONTNEED (tmpfs?)",
        path.display()
    );
}

/// 4 KiB blob req/s (32 connections) while another client reads the large blob in a loop at a
/// fixed rate (the same for both runs, so the reader costs the same CPU), its file evicted
/// from the page cache before every read when `cold`. Returns wrk's figures and the large
/// reads started.
fn small_while_large(
    small_url: &str,
    large_url: &str,
    large_file: &Path,
    cold: bool,
    seconds: u64,
) -> (WrkResult, u32) {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, url, file) = (
            stop.clone(),
            large_url.to_string(),
            large_file.to_path_buf(),
        );
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if cold {
                    evict(&file);
                }
                let status = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "--limit-rate", "150M"])
                    .arg(&url)
                    .status()
                    .expect("curl");
                assert!(status.success(), "curl {url}");
                reads += 1;
            }
            reads
        })
    };
    // Let the reader get going before measuring.
    std::thread::sleep(Duration::from_millis(300));
    let r = wrk(small_url, 32, seconds, &[]);
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader");
    (r, reads)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    println!("preparing data in {}", d.display());
    let large = Bytes::from(random_bytes(LARGE, 1));
    let small = Bytes::from(random_bytes(SMALL, 2));
    let config_blob = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let (large_d, small_d, config_d) = (sha256(&large), sha256(&small), sha256(&config_blob));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{small_d}","size":{SMALL}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{large_d}","size":{LARGE}}}]}}"#,
        config_blob.len()
    );

    // transship: the release binary on its embedded defaults, data in the temp dir.
    let ts_port = free_port();
    let transship = Proc::spawn(
        "transship",
        Command::new(env!("CARGO_BIN_EXE_transship"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{ts_port}"),
                "--data-dir",
            ])
            .arg(d.join("transship-data")),
        &d.join("transship.log"),
        Some(ts_port),
    );

    // distribution 2.8.2.
    let dist_port = free_port();
    let dist_cfg = d.join("distribution.yml");
    std::fs::write(
        &dist_cfg,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{dist_port}\n",
            d.join("distribution-data").display()
        ),
    )
    .expect("distribution config");
    let distribution = Proc::spawn(
        "docker-registry",
        Command::new("docker-registry").arg("serve").arg(&dist_cfg),
        &d.join("distribution.log"),
        Some(dist_port),
    );

    // nginx serving the same bytes at the same paths, with sendfile.
    let nginx_port = free_port();
    let www = d.join("www");
    let blobs_dir = www.join("v2").join(REPO).join("blobs");
    let manifests_dir = www.join("v2").join(REPO).join("manifests");
    std::fs::create_dir_all(&blobs_dir).expect("www");
    std::fs::create_dir_all(&manifests_dir).expect("www");
    std::fs::write(blobs_dir.join(&large_d), &large).expect("large");
    std::fs::write(blobs_dir.join(&small_d), &small).expect("small");
    std::fs::write(manifests_dir.join("latest"), &manifest).expect("manifest");
    let nginx_tls_port = free_port();
    let certificate = https::self_signed(d);
    let nginx_conf = d.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log {d}/nginx-access.log;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n  default_type application/octet-stream;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  server {{\n    listen 127.0.0.1:{nginx_port};\n    {content}\n  }}\n  server {{\n    {tls}\n    {content}\n  }}\n}}\n",
            d = d.display(),
            content = format!(
                "root {};\n    location /v2/{REPO}/manifests/ {{ default_type {OCI_MANIFEST}; }}",
                www.display()
            ),
            tls = https::nginx_listen(nginx_tls_port, &certificate),
        ),
    )
    .expect("nginx config");
    let nginx = Proc::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-c")
            .arg(&nginx_conf)
            .arg("-p")
            .arg(d),
        &d.join("nginx.log"),
        Some(nginx_port),
    );

    let registries = [
        Registry {
            name: "transship",
            base: format!("http://127.0.0.1:{ts_port}"),
        },
        Registry {
            name: "distribution",
            base: format!("http://127.0.0.1:{dist_port}"),
        },
    ];

    // Pushes: 3 fresh 256 MiB blobs each, median wall time; then the content the GETs read.
    let pusher = Pusher::new();
    let time_pushes = filter.is_empty() || filter.contains("push");
    let push_files: Vec<(PathBuf, String)> = (0..if time_pushes { 3 } else { 0 })
        .map(|i| {
            let data = random_bytes(LARGE, 100 + i);
            let path = d.join(format!("push-{i}"));
            std::fs::write(&path, &data).expect("push file");
            (path, sha256(&data))
        })
        .collect();
    let mut push_times = Vec::new();
    for r in &registries {
        if time_pushes {
            let mut times: Vec<Duration> = push_files
                .iter()
                .map(|(f, dg)| pusher.timed_push_with_curl(&r.base, f, dg))
                .collect();
            times.sort();
            push_times.push(times[1]);
        }
        for blob in [&large, &small, &config_blob] {
            pusher.push_blob(&r.base, blob.clone());
        }
        let (status, _) = pusher.send(
            "PUT",
            &format!("{}/v2/{REPO}/manifests/latest", r.base),
            Some(OCI_MANIFEST),
            Bytes::from(manifest.clone()),
        );
        assert_eq!(status, 201, "manifest push to {}", r.name);
    }
    drop(pusher);

    let bases = [
        registries[0].base.clone(),
        registries[1].base.clone(),
        format!("http://127.0.0.1:{nginx_port}"),
    ];
    let accept = format!("Accept: {OCI_MANIFEST}");
    type Case<'a> = (&'a str, String, u32, Vec<&'a str>, bool);
    let cases: Vec<Case> = vec![
        (
            "large blob GET, 1 client (MiB/s)",
            format!("/v2/{REPO}/blobs/{large_d}"),
            1,
            vec![],
            true,
        ),
        (
            "large blob GET, 8 clients (MiB/s)",
            format!("/v2/{REPO}/blobs/{large_d}"),
            8,
            vec![],
            true,
        ),
        (
            "4 KiB blob GET, 32 conns (req/s)",
            format!("/v2/{REPO}/blobs/{small_d}"),
            32,
            vec![],
            false,
        ),
        (
            "manifest GET by tag, 64 conns (req/s)",
            format!("/v2/{REPO}/manifests/latest"),
            64,
            vec![accept.as_str()],
            false,
        ),
    ];
    println!(
        "\n{:<40} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "case", "transship", "distrib.", "nginx", "ts/nginx", "ts/dist"
    );
    for (label, path, conns, headers, throughput) in &cases {
        if !label.contains(filter.as_str()) {
            continue;
        }
        let vals: Vec<f64> = bases
            .iter()
            .map(|b| {
                let r = wrk(&format!("{b}{path}"), *conns, seconds, headers);
                if *throughput {
                    r.bytes_per_sec / (1024.0 * 1024.0)
                } else {
                    r.requests_per_sec
                }
            })
            .collect();
        println!(
            "{label:<40} {:>12.0} {:>12.0} {:>12.0} {:>9.2}x {:>9.2}x",
            vals[0],
            vals[1],
            vals[2],
            vals[0] / vals[2],
            vals[0] / vals[1]
        );
    }
    if time_pushes {
        let (ts, dist) = (push_times[0].as_secs_f64(), push_times[1].as_secs_f64());
        println!(
            "{:<40} {:>11.2}s {:>11.2}s {:>12} {:>10} {:>9.2}x",
            "256 MiB monolithic push (median of 3)",
            ts,
            dist,
            "-",
            "-",
            dist / ts
        );
    }

    // Small requests next to a cold large read: transship and nginx (whose sendfile also
    // reads on its worker), each as a ratio to the same run with the large blob cached; then
    // again with the server's disk reads limited, so that a cold read takes real time.
    let label = "4 KiB GET while 256 MiB read cold";
    if label.contains(filter.as_str()) {
        let hex = large_d.trim_start_matches("sha256:");
        let peers = [
            (
                "transship",
                &bases[0],
                d.join("transship-data/blobs/sha256")
                    .join(&hex[..2])
                    .join(hex),
                transship.pid(),
            ),
            ("nginx", &bases[2], blobs_dir.join(&large_d), nginx.pid()),
        ];
        let throttle = slow_disk::Throttle::new(&peers[0].2, SLOW_DISK);
        match &throttle {
            Ok(t) => println!(
                "\nslow disk: the server in a block-I/O cgroup with {}",
                t.describe()
            ),
            Err(e) => println!("\nslow-disk rows SKIPPED: {e} (needs root and a blkio/io cgroup)"),
        }
        println!(
            "{:<58} {:>10} {:>8} {:>9} {:>11}",
            "4 KiB GET, 32 conns, while a client reads 256 MiB",
            "req/s",
            "vs hot",
            "p99",
            "large reads"
        );
        for (name, base, file, pid) in &peers {
            let small_url = format!("{base}/v2/{REPO}/blobs/{small_d}");
            let large_url = format!("{base}/v2/{REPO}/blobs/{large_d}");
            let (hot, hot_reads) = small_while_large(&small_url, &large_url, file, false, seconds);
            let row = |what: &str, r: &WrkResult, reads: u32, target: &str| {
                println!(
                    "{:<58} {:>10.0} {:>7.2}x {:>7.2}ms {:>11} {target}",
                    format!("{name}: {what}"),
                    r.requests_per_sec,
                    r.requests_per_sec / hot.requests_per_sec,
                    r.p99_ms,
                    reads
                );
            };
            row("256 MiB hot", &hot, hot_reads, "");
            let (cold, cold_reads) = small_while_large(&small_url, &large_url, file, true, seconds);
            row(
                "256 MiB cold (page cache dropped)",
                &cold,
                cold_reads,
                "[target >= 0.8x]",
            );
            if let Ok(t) = &throttle {
                t.attach(*pid);
                let (slow, slow_reads) =
                    small_while_large(&small_url, &large_url, file, true, seconds);
                t.detach_all();
                row(
                    &format!("256 MiB cold, disk reads <= {} MB/s", SLOW_DISK / 1_000_000),
                    &slow,
                    slow_reads,
                    "[target >= 0.8x]",
                );
            }
        }
    }
    // Read before stopping: VmHWM is gone with the process.
    let mut ts_rss = transship.peak_rss_mib();
    drop(transship);
    println!(
        "distribution peak RSS: {:.1} MiB",
        distribution.peak_rss_mib()
    );
    drop(distribution);

    let https = Https {
        data_dir: d.join("transship-data"),
        certificate: &certificate,
        nginx: format!("https://127.0.0.1:{nginx_tls_port}"),
        large: format!("/v2/{REPO}/blobs/{large_d}"),
        small: format!("/v2/{REPO}/blobs/{small_d}"),
        manifest: format!("/v2/{REPO}/manifests/latest"),
        accept: &accept,
        seconds,
    };
    if let Some(rss) = https.run(d, &filter) {
        ts_rss = ts_rss.max(rss);
    }
    println!(
        "\ntransship peak RSS (VmHWM) over the whole run: {ts_rss:.1} MiB  [target <= 64 MiB]"
    );
    drop(nginx);
}

/// How the HTTPS cases load a server.
enum Load {
    /// wrk over HTTP/1.1, this many connections, reported in GB/s.
    Throughput(u32),
    /// wrk over HTTP/1.1, this many connections, reported in req/s.
    H1(u32),
    /// h2load: this many connections times this many concurrent streams, in req/s.
    H2(u32, u32),
}

/// The HTTPS comparison: transship with `[server.tls]` on the data the plain cases used, and
/// nginx's TLS server block on the same files.
struct Https<'a> {
    data_dir: PathBuf,
    certificate: &'a https::Certificate,
    nginx: String,
    large: String,
    small: String,
    manifest: String,
    accept: &'a str,
    seconds: u64,
}

impl Https<'_> {
    /// Runs the cases whose label contains `filter` (none: transship is not started); returns
    /// the TLS transship's peak RSS.
    fn run(&self, d: &Path, filter: &str) -> Option<f64> {
        let no_headers: &[&str] = &[];
        let accept = &[self.accept][..];
        let cases = [
            (
                "HTTPS 256 MiB GET, HTTP/1.1, 1 conn (GB/s)",
                &self.large,
                Load::Throughput(1),
                no_headers,
            ),
            (
                "HTTPS 256 MiB GET, HTTP/1.1, 8 conns (GB/s)",
                &self.large,
                Load::Throughput(8),
                no_headers,
            ),
            (
                "HTTPS 4 KiB GET, HTTP/1.1, 32 conns (req/s)",
                &self.small,
                Load::H1(32),
                no_headers,
            ),
            (
                "HTTPS manifest by tag, HTTP/1.1, 64 conns (req/s)",
                &self.manifest,
                Load::H1(64),
                accept,
            ),
            (
                "HTTPS 4 KiB GET, HTTP/2, 8 conns x 8 streams (req/s)",
                &self.small,
                Load::H2(8, 8),
                no_headers,
            ),
            (
                "HTTPS manifest by tag, HTTP/2, 8x8 streams (req/s)",
                &self.manifest,
                Load::H2(8, 8),
                accept,
            ),
        ];
        if !cases.iter().any(|c| c.0.contains(filter)) {
            return None;
        }
        let port = free_port();
        let cfg = d.join("transship-tls.toml");
        std::fs::write(
            &cfg,
            https::transship_config(port, &self.data_dir, self.certificate),
        )
        .expect("transship TLS config");
        let transship = Proc::spawn(
            "transship",
            Command::new(env!("CARGO_BIN_EXE_transship"))
                .args(["serve", "--config"])
                .arg(&cfg),
            &d.join("transship-tls.log"),
            Some(port),
        );
        let bases = [format!("https://127.0.0.1:{port}"), self.nginx.clone()];
        println!(
            "\nHTTPS, same certificate (ECDSA P-256): transship {}; nginx {}",
            https::negotiated(&format!("{}{}", bases[0], self.small)),
            https::negotiated(&format!("{}{}", bases[1], self.small))
        );
        println!(
            "{:<54} {:>12} {:>12} {:>10}",
            "case", "transship", "nginx", "ts/nginx"
        );
        for (label, path, load, headers) in &cases {
            if !label.contains(filter) {
                continue;
            }
            let vals: Vec<f64> = bases
                .iter()
                .map(|b| {
                    let url = format!("{b}{path}");
                    match load {
                        Load::Throughput(c) => {
                            wrk(&url, *c, self.seconds, headers).bytes_per_sec / 1e9
                        }
                        Load::H1(c) => wrk(&url, *c, self.seconds, headers).requests_per_sec,
                        Load::H2(c, m) => https::h2load(&url, *c, *m, self.seconds, headers),
                    }
                })
                .collect();
            let precision = if matches!(load, Load::Throughput(_)) {
                2
            } else {
                0
            };
            println!(
                "{label:<54} {:>12.precision$} {:>12.precision$} {:>9.2}x",
                vals[0],
                vals[1],
                vals[0] / vals[1]
            );
        }
        Some(transship.peak_rss_mib())
    }
}
