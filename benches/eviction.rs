//! Eviction while serving: a store holding `BENCH_IMAGES` (default 10,000) small cached
//! images, the real server on loopback answering cached manifest GETs by tag from 8
//! connections, and one eviction pass that removes every unpinned image. Reports the pass's
//! time, the process's peak RSS during it, and the manifest GET latency (p50/p99) and rate
//! during the pass beside the same figures without it, in one run, as ratios.
//!
//! Run with `cargo bench --bench eviction` (`./scripts/bench` runs it too).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use transship::App;
use transship::config::Config;
use transship::oci::{Digest, RepoName, Tag};
use transship::store::evict::Budget;
use transship::store::pins::PinTarget;

mod common;

use common::random_bytes;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONNECTIONS: usize = 8;

/// `(kB)` from a `/proc/self/status` line.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn seed(app: &App, images: usize) {
    let store = &app.store;
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = Digest::sha256_of(&config);
    let threads = 8;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (config, config_digest) = (config.clone(), config_digest.clone());
            s.spawn(move || {
                for i in (t..images).step_by(threads) {
                    let repo: RepoName = format!("docker.io/bench/img{i}").parse().expect("name");
                    let layer = random_bytes(1024, i as u64 + 1);
                    let layer_digest = Digest::sha256_of(&layer);
                    for (bytes, digest) in [(&config, &config_digest), (&layer, &layer_digest)] {
                        let id = format!("fill-bench-{i}-{digest}").replace(':', "-");
                        let path = store.ingest_path_for_fill(&id);
                        std::fs::write(&path, bytes).expect("ingest");
                        store
                            .commit_blob(&path, digest, bytes.len() as u64, &repo, None)
                            .expect("commit");
                    }
                    let manifest = format!(
                        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":1024}}]}}"#,
                        config.len()
                    );
                    let bytes = Bytes::from(manifest);
                    let digest = Digest::sha256_of(&bytes);
                    let tag: Tag = "v1".parse().expect("tag");
                    store
                        .put_cached_manifest(&repo, &digest, OCI_MANIFEST, bytes, Some(&tag))
                        .expect("manifest");
                }
            });
        }
    });
}

/// GETs `url` from `CONNECTIONS` clients until `stop`; returns when each request started and
/// how long it took.
async fn load(url: String, stop: Arc<AtomicBool>) -> Vec<(Instant, Duration)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(&url)
                    .header("accept", OCI_MANIFEST)
                    .body(Empty::new())
                    .expect("request");
                let started = Instant::now();
                let resp = client.request(req).await.expect("GET");
                assert_eq!(resp.status(), 200, "the pinned image must always be served");
                let _ = resp.into_body().collect().await;
                times.push((started, started.elapsed()));
            }
            times
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// The requests that started within `[from, from + wall)`.
fn figures(times: Vec<(Instant, Duration)>, from: Instant, wall: Duration) -> Figures {
    let mut times: Vec<Duration> = times
        .into_iter()
        .filter(|(t, _)| *t >= from && *t < from + wall)
        .map(|(_, d)| d)
        .collect();
    times.sort();
    Figures {
        rate: times.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
    }
}

fn main() {
    let images: usize = std::env::var("BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "data_dir = \"./transship-data\"",
            &format!("data_dir = {:?}", dir.path().display().to_string()),
        )
        .replace(
            "url = \"https://registry-1.docker.io\"",
            "url = \"http://127.0.0.1:9\"",
        );
    let mut config = Config::parse(&text, "bench config").expect("config");
    // Served from the cache only: no upstream is asked during the run.
    config.upstreams[0].offline = true;
    let app = App::build(config).expect("app");

    let started = Instant::now();
    seed(&app, images);
    println!(
        "seeded {images} cached images ({} blobs) in {:.1}s",
        images + 1,
        started.elapsed().as_secs_f64()
    );
    let kept: RepoName = "docker.io/bench/img0".parse().expect("name");
    app.store
        .pin(&kept, &PinTarget::Tag("v1".parse().expect("tag")), &[])
        .expect("pin");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(transship::http::server::serve(
        app.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let url = format!("http://{addr}/v2/bench/img0/manifests/v1");

    // Without eviction.
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = {
        let handle = rt.spawn(load(url.clone(), stop.clone()));
        let from = Instant::now() + Duration::from_millis(500);
        std::thread::sleep(Duration::from_millis(5500));
        stop.store(true, Ordering::Relaxed);
        figures(
            rt.block_on(handle).expect("load"),
            from,
            Duration::from_secs(5),
        )
    };

    // During one pass that evicts every unpinned image.
    let stop = Arc::new(AtomicBool::new(false));
    let handle = rt.spawn(load(url.clone(), stop.clone()));
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = status_kib("VmRSS:");
    let budget = Budget {
        max_size: Some(1),
        evict_to: 0,
        min_free_disk: 0,
    };
    let pass_started = Instant::now();
    let a = app.clone();
    let report = std::thread::spawn(move || {
        a.store
            .enforce_budget(&budget, &|r| a.is_cache_repo(r), &|| false)
            .expect("eviction")
    })
    .join()
    .expect("eviction thread");
    let pass = pass_started.elapsed();
    let peak = status_kib("VmHWM:");
    stop.store(true, Ordering::Relaxed);
    let busy_times = rt.block_on(handle).expect("load");
    let during = figures(busy_times, pass_started, pass);
    let _ = stop_server.send(());
    let _ = rt.block_on(server);

    println!(
        "eviction pass: {} images, {} blobs, {} bytes freed in {:.2}s; process RSS {} MiB before, peak {} MiB during",
        report.images_evicted,
        report.blobs_removed,
        report.bytes_freed,
        pass.as_secs_f64(),
        rss_before / 1024,
        peak / 1024
    );
    println!(
        "cached manifest GET, {CONNECTIONS} conns: quiet {:.0} req/s p50 {:?} p99 {:?}; during eviction {:.0} req/s p50 {:?} p99 {:?}",
        quiet.rate, quiet.p50, quiet.p99, during.rate, during.p50, during.p99
    );
    println!(
        "ratios (during / quiet): req/s {:.2}x, p99 {:.2}x",
        during.rate / quiet.rate,
        during.p99.as_secs_f64() / quiet.p99.as_secs_f64().max(1e-9)
    );
}
