//! Cluster-profile benchmark (issue 13): one SeaweedFS (`weed mini`) and one PostgreSQL on
//! loopback, in one run, two tables.
//!
//! "serving": the same 256 MiB and 4 KiB blobs pushed into
//! - transship, `local` profile (RocksDB index + blob files),
//! - transship, `cluster` profile, one replica (blobs in the bucket under `transship/`,
//!   metadata in PostgreSQL, its local read cache in data_dir),
//! - distribution 2.8 (Debian `docker-registry`) on its S3 driver, the same bucket under
//!   `distribution/` (bytes proxied through the registry, `redirect: disable`, blob
//!   descriptors cached in memory as in its shipped config),
//!
//! then: the first GET of the 256 MiB blob after the push (the cluster replica's read cache
//! cold: a fetch from the bucket; emptied first, checked), 256 MiB GET throughput with wrk at 1
//! connection (sequential GETs) and 8, and 4 KiB GET req/s at 32 connections — the cluster
//! replica's read cache warm by then — as ratios against distribution and against the local
//! profile; each server's peak RSS (VmHWM).
//!
//! "cold pulls": an upstream distribution holding a 128 MiB layer; 3 transship replicas in the
//! cluster profile mirroring it (one bucket, one database) vs 3 distribution pull-through
//! proxies (each its own config and storage); `BENCH_CLIENTS` (default 30) concurrent clients
//! spread round-robin over the three, each checked to receive the whole layer; the upstream's
//! GETs of the layer counted in its access log (target for transship: 1 for the cluster).
//!
//! `BENCH_SECONDS` sets each wrk run (default 8); `BENCH_FILTER` runs only the tables whose name
//! contains it. Run with `./scripts/bench` (installs wrk, docker-registry, PostgreSQL, weed).
//! Everything listens on 127.0.0.1; the transship instances' upstreams are loopback only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

mod common;

use common::cluster::{Engines, add_fill_counts};
use common::wrk::wrk;
use common::{
    Proc, distribution, distribution_on, free_port, push_blob, random_bytes, sha256, transship,
    transship_with, upstream_gets,
};

const LARGE: usize = 256 << 20;
const SMALL: usize = 4 << 10;
const COLD_LAYER: usize = 128 << 20;
const REPO: &str = "local/bench";
const MIRRORED: &str = "library/big";
const MIB: f64 = (1 << 20) as f64;
/// Where the local profile's and the cluster replicas' upstream points when they need none: a
/// closed loopback port, so nothing can reach a public registry.
const NO_UPSTREAM: &str = "http://127.0.0.1:9";

type PushClient = Client<HttpConnector, Full<Bytes>>;

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 8);
    let clients: usize = env_or("BENCH_CLIENTS", 30).max(1);
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let dir = tempfile::Builder::new()
        .prefix("bench-cluster-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    let rt = common::runtime();
    let engines = Engines::start(d);
    engines.s3.create_bucket("bench");
    println!(
        "SeaweedFS S3 at {}, PostgreSQL on 127.0.0.1:{}, data in {}",
        engines.s3.endpoint,
        engines.pg.port,
        d.display()
    );
    if "serving".contains(filter.as_str()) {
        serving(&rt, &engines, d, seconds);
    }
    if "cold pulls".contains(filter.as_str()) {
        cold_pulls(&rt, &engines, d, clients);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One registry of the serving table.
struct Server {
    name: &'static str,
    base: String,
    proc: Proc,
}

fn serving(rt: &tokio::runtime::Runtime, engines: &Engines, d: &Path, seconds: u64) {
    let large = Bytes::from(random_bytes(LARGE, 1));
    let small = Bytes::from(random_bytes(SMALL, 2));
    let (large_d, small_d) = (sha256(&large), sha256(&small));
    let db_url = engines.database(rt, "serving");
    let cluster_dir = d.join("cluster");
    let servers = [
        ("local", {
            let port = free_port();
            (port, transship(&d.join("local"), port, NO_UPSTREAM))
        }),
        ("cluster", {
            let port = free_port();
            let extra = engines.transship_config("bench", "transship", &db_url);
            (
                port,
                transship_with(&cluster_dir, port, NO_UPSTREAM, &extra),
            )
        }),
        ("distribution", {
            let port = free_port();
            let storage = engines.distribution_storage("bench", "distribution");
            (
                port,
                distribution_on(&d.join("distribution"), port, None, &storage),
            )
        }),
    ]
    .map(|(name, (port, proc))| Server {
        name,
        base: format!("http://127.0.0.1:{port}"),
        proc,
    });

    let client: PushClient = Client::builder(TokioExecutor::new()).build_http();
    for s in &servers {
        rt.block_on(async {
            push_blob(&client, &s.base, REPO, &large_d, large.clone()).await;
            push_blob(&client, &s.base, REPO, &small_d, small.clone()).await;
        });
    }
    drop((large, small));
    // What happened underneath: both bucket-backed registries wrote the blob to the bucket.
    let hex = large_d.trim_start_matches("sha256:");
    for key in [
        format!("transship/blobs/sha256/{}/{hex}", &hex[..2]),
        format!(
            "distribution/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ),
    ] {
        assert!(engines.holds("bench", &key), "the bucket lacks {key}");
    }

    // The first GET after the push: the cluster replica has not read the blob yet (the push
    // went to the bucket); its read cache is emptied anyway, so the figure is a bucket read.
    let read_cache = cluster_dir.join("data").join("read-cache");
    let wiped = cache_files(&read_cache)
        .iter()
        .filter(|f| std::fs::remove_file(f).is_ok())
        .count();
    println!(
        "\nfirst GET of the 256 MiB blob after its push (cluster: read cache emptied, {wiped} \
         file(s) removed; a fetch from the bucket)"
    );
    for s in &servers {
        let url = format!("{}/v2/{REPO}/blobs/{large_d}", s.base);
        let took = rt.block_on(get_all(&url, LARGE));
        println!(
            "{:<14} {:>8.2}s {:>9.0} MiB/s",
            s.name,
            took.as_secs_f64(),
            LARGE as f64 / MIB / took.as_secs_f64()
        );
    }
    let cached: u64 = cache_files(&read_cache)
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "cluster read cache after it: {:.0} MiB (warm for the table below)",
        cached as f64 / MIB
    );

    let cases: [(&str, &str, u32, bool); 3] = [
        ("256 MiB blob GET, 1 conn (MiB/s)", &large_d, 1, true),
        ("256 MiB blob GET, 8 conns (MiB/s)", &large_d, 8, true),
        ("4 KiB blob GET, 32 conns (req/s)", &small_d, 32, false),
    ];
    println!(
        "\n{:<36} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "case", "local", "cluster", "distrib.", "cl/local", "cl/dist", "local/dist"
    );
    for (label, digest, conns, throughput) in cases {
        let v: Vec<f64> = servers
            .iter()
            .map(|s| {
                let r = wrk(
                    &format!("{}/v2/{REPO}/blobs/{digest}", s.base),
                    conns,
                    seconds,
                    &[],
                );
                if throughput {
                    r.bytes_per_sec / MIB
                } else {
                    r.requests_per_sec
                }
            })
            .collect();
        println!(
            "{label:<36} {:>10.0} {:>10.0} {:>10.0} {:>9.2}x {:>9.2}x {:>9.2}x",
            v[0],
            v[1],
            v[2],
            v[1] / v[0],
            v[1] / v[2],
            v[0] / v[2]
        );
    }
    // Read before stopping: VmHWM is gone with the process.
    for s in &servers {
        println!(
            "{} peak RSS (VmHWM): {:.1} MiB",
            s.name,
            s.proc.peak_rss_mib()
        );
    }
}

/// GETs `url` and reads the whole body, checked to be `len` bytes; the time it took.
async fn get_all(url: &str, len: usize) -> Duration {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let resp = client.get(url.parse().expect("url")).await.expect("GET");
    assert_eq!(resp.status(), 200, "GET {url}");
    let mut body = resp.into_body();
    let mut got = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body").into_data() {
            got += data.len();
        }
    }
    assert_eq!(got, len, "GET {url}: short body");
    started.elapsed()
}

/// `clients` concurrent GETs spread round-robin over `urls`, each checked to receive the
/// whole layer; the wall time of them all.
fn spread_pulls(rt: &tokio::runtime::Runtime, urls: &[String], clients: usize) -> Duration {
    rt.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let url = urls[i % urls.len()].clone();
                tokio::spawn(async move { get_all(&url, COLD_LAYER).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("pull");
        }
        started.elapsed()
    })
}

fn cold_pulls(rt: &tokio::runtime::Runtime, engines: &Engines, d: &Path, clients: usize) {
    // The upstream, seeded with one 128 MiB layer.
    let up_port = free_port();
    let up_dir = d.join("upstream");
    let _upstream = distribution(&up_dir, up_port, None);
    let upstream = format!("http://127.0.0.1:{up_port}");
    let layer = Bytes::from(random_bytes(COLD_LAYER, 7));
    let digest = sha256(&layer);
    let client: PushClient = Client::builder(TokioExecutor::new()).build_http();
    rt.block_on(push_blob(&client, &upstream, MIRRORED, &digest, layer));
    let up_log = up_dir.join("log");
    let db_url = engines.database(rt, "cold");
    let extra = engines.transship_config("bench", "replicas", &db_url);

    println!(
        "\ncold pulls of one uncached 128 MiB layer, {clients} concurrent clients spread over 3 \
         caches of one upstream"
    );
    println!(
        "{:<44} {:>9} {:>14} {:>10}",
        "case", "wall", "upstream GETs", "max RSS"
    );
    let mut counts = Vec::new();
    let cases = ["transship cluster, 3 replicas", "distribution, 3 proxies"];
    for (case, name) in cases.into_iter().enumerate() {
        let procs: Vec<(u16, Proc)> = (0..3)
            .map(|i| {
                let port = free_port();
                let home = d.join(format!("cold-{case}-{i}"));
                let proc = if case == 0 {
                    transship_with(&home, port, &upstream, &extra)
                } else {
                    distribution(&home, port, Some(&upstream))
                };
                (port, proc)
            })
            .collect();
        let urls: Vec<String> = procs
            .iter()
            .map(|(port, _)| format!("http://127.0.0.1:{port}/v2/{MIRRORED}/blobs/{digest}"))
            .collect();
        // distribution writes its access log asynchronously: let earlier lines land first.
        std::thread::sleep(Duration::from_millis(500));
        let before = upstream_gets(&up_log, MIRRORED, &digest);
        let wall = spread_pulls(rt, &urls, clients);
        // Let the access log, and a cache still writing after the response, settle.
        std::thread::sleep(Duration::from_millis(500));
        let gets = upstream_gets(&up_log, MIRRORED, &digest) - before;
        let rss = procs
            .iter()
            .map(|(_, p)| p.peak_rss_mib())
            .fold(0.0, f64::max);
        println!(
            "{name:<44} {:>8.2}s {gets:>14} {rss:>6.1} MiB",
            wall.as_secs_f64()
        );
        if case == 0 {
            let mut fills = BTreeMap::new();
            for (port, _) in &procs {
                add_fill_counts(&format!("http://127.0.0.1:{port}"), &mut fills);
            }
            println!("  the replicas' cluster fills by source (/metrics): {fills:?}");
        }
        counts.push(gets);
    }
    println!(
        "upstream GETs of the layer: transship cluster {} [target 1], distribution proxies {}",
        counts[0], counts[1]
    );
}

/// The files of a read cache (it keeps them flat: `<algorithm>-<hex>`, `fetch-*.tmp`).
fn cache_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect()
}
