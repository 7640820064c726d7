//! Cold-miss benchmark: transship vs CNCF distribution 2.8.2 in proxy mode, both in front of
//! the same upstream (another distribution instance on loopback holding a 256 MiB layer), in
//! one run. Each cold case starts both caches empty. Two tables:
//! - "loopback": the caches reach the upstream directly;
//! - "WAN": the caches reach it through `shaper` (in this directory), a TCP proxy in the
//!   benchmark that limits the link to 100 MB/s per direction (shared by all connections) and
//!   holds the first byte of every response 20 ms.
//!
//! Reported for 1 and 50 concurrent cold clients (issues "pull-through cache" and 14):
//! - wall time, and 50 clients vs 1 client                     [transship, WAN: <= 1.2x]
//! - time to first byte, median and max
//! - upstream GETs of the layer (the upstream's access log) and bytes fetched (loopback: GETs
//!   times the layer; WAN: the shaper's count)                  [transship: 1 fetch]
//! - one client on loopback, transship vs distribution          [<= 1.0x distribution]
//! - transship peak RSS (VmHWM) over every transship it ran     [<= 64 MiB]
//! - the same pulls warm (everything cached): what delivering the bytes alone costs here.
//!
//! `BENCH_CLIENTS` sets the concurrent client count (default 50); `BENCH_FILTER` runs only the
//! tables whose name contains it ("loopback", "WAN"). Run with `./scripts/bench` (installs
//! docker-registry and wrk).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const LARGE: usize = 256 << 20;
const REPO: &str = "library/big";

/// The WAN link's bandwidth per direction (bytes per second) and added latency per response.
const WAN_RATE: u64 = 100_000_000;
const WAN_LATENCY: Duration = Duration::from_millis(20);

mod common;
#[path = "cold_miss/shaper.rs"]
mod shaper;

use common::{distribution, free_port, push_blob, random_bytes, transship, upstream_gets};
use shaper::Shaper;

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

/// What `n` concurrent pulls saw.
struct Pulls {
    wall: Duration,
    ttfb_median: Duration,
    ttfb_max: Duration,
}

/// `n` concurrent pulls of `url`, each checked to receive the whole layer.
fn pulls(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> Pulls {
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
        Pulls {
            wall,
            ttfb_median: ttfb[ttfb.len() / 2],
            ttfb_max: ttfb[ttfb.len() - 1],
        }
    })
}

fn main() {
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
        .max(1);
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let rt = common::runtime();

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
        push_blob(&client, &upstream_url, REPO, &digest, layer.clone()).await;
    });
    drop(layer);
    let up_log = up_dir.join("log");
    let blob_path = format!("/v2/{REPO}/blobs/{digest}");
    let upstream_ttfb = pulls(&rt, &format!("{upstream_url}{blob_path}"), 1).ttfb_median;
    println!(
        "upstream's own TTFB on loopback: {:.1} ms",
        upstream_ttfb.as_secs_f64() * 1000.0
    );
    let mut bench = Bench {
        rt: &rt,
        dir: d,
        up_log: &up_log,
        blob_path: &blob_path,
        digest: &digest,
        clients,
        ts_rss: 0.0,
    };

    if "loopback".contains(filter.as_str()) {
        let rows = bench.table("loopback", &upstream_url, None);
        summarise("loopback", &rows);
    }
    if "WAN".contains(filter.as_str()) {
        let up_addr = std::net::SocketAddr::from(([127, 0, 0, 1], up_port));
        let shaper = Shaper::start(up_addr, WAN_RATE, WAN_LATENCY);
        let wan_url = format!("http://127.0.0.1:{}", shaper.port);
        let direct = pulls(&rt, &format!("{wan_url}{blob_path}"), 1);
        println!(
            "\nWAN link: the shaper allows {} MB/s per direction (all connections together) and \
             holds every response's first byte {} ms; the upstream alone through it: {:.2}s, TTFB \
             {:.1} ms",
            WAN_RATE / 1_000_000,
            WAN_LATENCY.as_millis(),
            direct.wall.as_secs_f64(),
            direct.ttfb_median.as_secs_f64() * 1000.0
        );
        let title = format!(
            "WAN ({} MB/s, +{} ms)",
            WAN_RATE / 1_000_000,
            WAN_LATENCY.as_millis()
        );
        let rows = bench.table(&title, &wan_url, Some(&shaper));
        summarise(&title, &rows);
    }
    println!(
        "\ntransship peak RSS (VmHWM, highest of its processes over the cold pulls): {:.1} MiB  \
         [target <= 64 MiB]",
        bench.ts_rss
    );
}

/// One row of a cold-miss table.
struct Row {
    name: &'static str,
    clients: usize,
    pulls: Pulls,
    /// Upstream GETs of the layer (the upstream's access log).
    gets: usize,
    /// The same pull again once the layer is cached (transship's rows, and distribution's
    /// 1-client row on loopback): what delivering the bytes alone costs; and the peak RSS
    /// after it.
    warm: Option<(Duration, f64)>,
}

/// What every table shares: the client runtime, the upstream and the layer.
struct Bench<'a> {
    rt: &'a tokio::runtime::Runtime,
    dir: &'a Path,
    up_log: &'a Path,
    blob_path: &'a str,
    digest: &'a str,
    clients: usize,
    /// The highest peak RSS of any transship started so far.
    ts_rss: f64,
}

impl Bench<'_> {
    /// transship and distribution's proxy, 1 then `clients` cold clients each, every row with
    /// a fresh, empty cache whose upstream is `upstream` (through `shaper` if given).
    fn table(&mut self, title: &str, upstream: &str, shaper: Option<&Shaper>) -> Vec<Row> {
        println!("\ncold miss on an uncached 256 MiB layer, {title} (fresh caches for every row)");
        println!(
            "{:<34} {:>9} {:>11} {:>11} {:>14} {:>13} {:>15} {:>10}",
            "case",
            "wall",
            "TTFB med.",
            "TTFB max",
            "upstream GETs",
            "upstream MiB",
            "upstream conns",
            "peak RSS"
        );
        let mut rows = Vec::new();
        for (name, clients) in [
            ("transship", 1),
            ("transship", self.clients),
            ("distribution proxy", 1),
            ("distribution proxy", self.clients),
        ] {
            let case_dir = self.dir.join("case");
            let port = free_port();
            // distribution writes its access log asynchronously: let earlier lines land first.
            std::thread::sleep(Duration::from_millis(500));
            let gets_before = upstream_gets(self.up_log, REPO, self.digest);
            let bytes_before = shaper.map(Shaper::upstream_bytes);
            let conns_before = shaper.map(Shaper::connections);
            let proc = if name == "transship" {
                transship(&case_dir, port, upstream)
            } else {
                distribution(&case_dir, port, Some(upstream))
            };
            let url = format!("http://127.0.0.1:{port}{}", self.blob_path);
            let p = pulls(self.rt, &url, clients);
            // Let the access log, and a cache still writing after the response, settle.
            std::thread::sleep(Duration::from_millis(500));
            let gets = upstream_gets(self.up_log, REPO, self.digest) - gets_before;
            // Through the shaper: what actually crossed the link; else GETs times the layer.
            let fetched_mib = match (shaper, bytes_before) {
                (Some(s), Some(b)) => (s.upstream_bytes() - b) as f64 / f64::from(1 << 20),
                _ => (gets * (LARGE >> 20)) as f64,
            };
            // Connections to the upstream: counted by the shaper only.
            let conns = shaper
                .zip(conns_before)
                .map_or("-".to_string(), |(s, c)| (s.connections() - c).to_string());
            // Read before stopping: VmHWM is gone with the process.
            let rss = proc.peak_rss_mib();
            println!(
                "{:<34} {:>8.2}s {:>9.1}ms {:>9.1}ms {:>14} {:>13.0} {conns:>15} {rss:>6.1} MiB",
                format!("{name}, {clients} client(s)"),
                p.wall.as_secs_f64(),
                p.ttfb_median.as_secs_f64() * 1000.0,
                p.ttfb_max.as_secs_f64() * 1000.0,
                gets,
                fetched_mib
            );
            if name == "transship" {
                self.ts_rss = self.ts_rss.max(rss);
            }
            // After the warm pull VmHWM also counts the mapped windows of the cached file that
            // many clients held at once (page cache, not the process's own memory).
            let warm = (name == "transship" || (clients == 1 && shaper.is_none()))
                .then(|| (pulls(self.rt, &url, clients).wall, proc.peak_rss_mib()));
            drop(proc);
            std::fs::remove_dir_all(&case_dir).expect("remove the case's cache");
            rows.push(Row {
                name,
                clients,
                pulls: p,
                gets,
                warm,
            });
        }
        rows
    }
}

/// The ratios of one table: many clients vs one, transship vs distribution with one client,
/// and whether transship fetched the layer exactly once per row.
fn summarise(title: &str, rows: &[Row]) {
    let wall = |i: usize| rows[i].pulls.wall.as_secs_f64();
    let n = rows[1].clients;
    println!(
        "{title}: {n} clients vs 1, wall time: transship {:.2}x [target <= 1.2x], \
         distribution proxy {:.2}x",
        wall(1) / wall(0),
        wall(3) / wall(2)
    );
    println!(
        "{title}: 1 client, transship vs distribution proxy, wall time: {:.2}x [target <= 1.0x]",
        wall(0) / wall(2)
    );
    println!(
        "{title}: transship upstream GETs of the layer: {} (1 client), {} ({n} clients) \
         [target: 1 each]",
        rows[0].gets, rows[1].gets
    );
    for r in rows {
        let Some((warm, rss)) = r.warm else { continue };
        println!(
            "{title}: warm pull (cached), {}, {} client(s): {:.2}s ({:.0} MiB/s in all); \
             the cold pull took {:.2}x that; peak RSS then {rss:.1} MiB",
            r.name,
            r.clients,
            warm.as_secs_f64(),
            (r.clients * (LARGE >> 20)) as f64 / warm.as_secs_f64(),
            r.pulls.wall.as_secs_f64() / warm.as_secs_f64()
        );
    }
}
