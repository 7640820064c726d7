//! Cold-miss benchmark: transship vs CNCF distribution 2.8.2 in proxy mode, both in front of
//! the same upstream (another distribution instance on loopback holding a 256 MiB layer), in
//! one run. Each cold case starts both caches empty. Reported (issue "pull-through cache"):
//! - upstream bytes fetched for 1 and 50 concurrent clients   [transship: 1x the layer]
//! - wall time, 50 clients vs 1 client                         [<= 1.2x]
//! - time to first byte vs the upstream's own                  [within 10 ms]
//! - transship peak RSS                                        [<= 100 MiB]
//! - warm pull (everything cached) throughput, both caches.
//!
//! Run with `./scripts/bench` (installs docker-registry and wrk).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const LARGE: usize = 256 << 20;
const REPO: &str = "library/big";

mod common;

use common::{Proc, free_port, random_bytes, upload_put_url};

fn distribution(dir: &Path, port: u16, remote: Option<&str>) -> Proc {
    std::fs::create_dir_all(dir).expect("dir");
    let proxy = remote
        .map(|r| format!("proxy:\n  remoteurl: {r}\n"))
        .unwrap_or_default();
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!("version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{proxy}", dir.join("data").display()),
    )
    .expect("config");
    Proc::spawn(
        "docker-registry",
        Command::new("docker-registry").arg("serve").arg(&cfg),
        &dir.join("log"),
        Some(port),
    )
}

fn transship(dir: &Path, port: u16, upstream: &str) -> Proc {
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
    std::fs::write(&cfg, text).expect("config");
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

/// One client's pull: time to first body byte, and the byte count.
struct Pull {
    ttfb: Duration,
    bytes: u64,
}

async fn pull(client: Client<HttpConnector, Empty<Bytes>>, url: String) -> Pull {
    let started = Instant::now();
    let resp = client.get(url.parse().expect("url")).await.expect("GET");
    assert_eq!(resp.status(), 200, "GET {url}");
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            if !data.is_empty() && ttfb.is_none() {
                ttfb = Some(started.elapsed());
            }
            bytes += data.len() as u64;
        }
    }
    Pull {
        ttfb: ttfb.unwrap_or_default(),
        bytes,
    }
}

/// `n` concurrent pulls; returns (wall time, median TTFB).
fn pulls(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> (Duration, Duration) {
    rt.block_on(async {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let started = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|_| tokio::spawn(pull(client.clone(), url.to_string())))
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("pull"));
        }
        let wall = started.elapsed();
        assert!(
            results.iter().all(|p| p.bytes == LARGE as u64),
            "short body"
        );
        let mut ttfb: Vec<Duration> = results.iter().map(|p| p.ttfb).collect();
        ttfb.sort();
        (wall, ttfb[ttfb.len() / 2])
    })
}

fn upstream_gets(log: &Path, digest: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&format!("\"GET /v2/{REPO}/blobs/{digest} HTTP/"))
        .count()
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The upstream, seeded with one 256 MiB layer.
    let up_port = free_port();
    let up_dir = d.join("upstream");
    let _upstream = distribution(&up_dir, up_port, None);
    let upstream_url = format!("http://127.0.0.1:{up_port}");
    let layer = Bytes::from(random_bytes(LARGE, 7));
    let digest = transship::oci::Digest::sha256_of(&layer).to_string();
    rt.block_on(async {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let post = http::Request::post(format!("{upstream_url}/v2/{REPO}/blobs/uploads/"))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = client.request(post).await.expect("POST");
        let loc = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("location");
        let put_url = upload_put_url(&upstream_url, loc, &digest);
        let put = http::Request::put(put_url)
            .body(Full::new(layer.clone()))
            .expect("req");
        assert_eq!(client.request(put).await.expect("PUT").status(), 201);
    });
    drop(layer);
    let up_log = up_dir.join("log");
    let blob_path = format!("/v2/{REPO}/blobs/{digest}");
    let (_, upstream_ttfb) = pulls(&rt, &format!("{upstream_url}{blob_path}"), 1);

    println!("\ncold miss on an uncached 256 MiB layer (fresh caches for every row)");
    println!(
        "{:<34} {:>10} {:>12} {:>14} {:>10}",
        "case", "wall", "median TTFB", "upstream GETs", "upstream MiB"
    );
    let mut walls = Vec::new();
    let mut ts_rss = 0.0f64;
    let mut warm = Vec::new();
    for (name, clients) in [
        ("transship", 1),
        ("transship", 50),
        ("distribution proxy", 1),
        ("distribution proxy", 50),
    ] {
        let case_dir = d.join(format!("{}-{clients}", name.replace(' ', "-")));
        let port = free_port();
        // distribution writes its access log asynchronously: let earlier lines land first.
        std::thread::sleep(Duration::from_millis(500));
        let before = upstream_gets(&up_log, &digest);
        let proc = if name == "transship" {
            transship(&case_dir, port, &upstream_url)
        } else {
            distribution(&case_dir, port, Some(&upstream_url))
        };
        let url = format!("http://127.0.0.1:{port}{blob_path}");
        let (wall, ttfb) = pulls(&rt, &url, clients);
        // Let the access log, and a cache still writing after the response, settle.
        std::thread::sleep(Duration::from_millis(500));
        let gets = upstream_gets(&up_log, &digest) - before;
        println!(
            "{:<34} {:>9.2}s {:>10.1}ms {:>14} {:>12}",
            format!("{name}, {clients} client(s)"),
            wall.as_secs_f64(),
            ttfb.as_secs_f64() * 1000.0,
            gets,
            gets * (LARGE >> 20)
        );
        walls.push(wall);
        if name == "transship" {
            ts_rss = ts_rss.max(proc.peak_rss_mib());
        }
        if clients == 1 {
            let (w, _) = pulls(&rt, &url, 1);
            warm.push((name, w));
        }
    }
    println!(
        "\nupstream's own TTFB: {:.1} ms",
        upstream_ttfb.as_secs_f64() * 1000.0
    );
    println!(
        "50 clients vs 1 client, wall time: transship {:.2}x, distribution proxy {:.2}x",
        walls[1].as_secs_f64() / walls[0].as_secs_f64(),
        walls[3].as_secs_f64() / walls[2].as_secs_f64()
    );
    for (name, w) in &warm {
        println!(
            "warm pull (cached), 1 client, {name}: {:.0} MiB/s",
            (LARGE >> 20) as f64 / w.as_secs_f64()
        );
    }
    println!("transship peak RSS: {ts_rss:.1} MiB");
}
