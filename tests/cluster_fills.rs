//! Cold fills across the replicas of a cluster, against the real engines: three transship
//! replicas (each the real server on its own runtime, its own data dir, its own database pool
//! and bucket client) share a SeaweedFS bucket and a PostgreSQL database and mirror one
//! distribution upstream. Thirty concurrent cold pulls of one 128 MiB blob spread over them
//! cause exactly one upstream GET; a replica started later fills from the bucket; the owner of
//! a fill dying mid-way (its runtime dropped at once: sockets, tasks and lease renewals gone)
//! costs at most one more upstream fetch and leaves nothing corrupt. The internal endpoint
//! answers only the replicas' key. The same death with real processes: the replica harness's
//! `transship serve` processes, the owner ended by SIGKILL.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::engines::{Postgres, SeaweedFs};
use common::replicas::Replicas;
use common::upstream::{self, Distribution};
use common::{Http, random_bytes, test_config};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Empty};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transship::App;
use transship::cluster::objects::Objects;
use transship::cluster::pg::{Db, PgOptions};
use transship::config::HumanDuration;
use transship::oci::Digest;
use transship::proxy::cluster_fill::{ClusterFill, KEY_HEADER};

const BUCKET: &str = "transship-fills";
const LARGE: usize = 128 << 20;
const REPO: &str = "library/big";

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// The engines one test shares between its replicas.
struct Cluster {
    s3: SeaweedFs,
    pg_url: String,
    _pg: Postgres,
}

impl Cluster {
    /// None (after a loud skip) where an engine or the upstream cannot run outside CI.
    fn start(name: &str) -> Option<Self> {
        if !SeaweedFs::available() || !Postgres::available() || !upstream::available() {
            return None;
        }
        let s3 = SeaweedFs::start();
        s3.create_bucket(BUCKET);
        let pg = Postgres::start();
        let rt = runtime(1);
        let pg_url = rt.block_on(pg.create_database(name));
        Some(Self {
            s3,
            pg_url,
            _pg: pg,
        })
    }
}

/// The engines, an upstream holding one `LARGE` blob, and a relay to it sending `rate` bytes
/// a second (the replicas' upstream URL).
struct Setup {
    cluster: Cluster,
    up: Distribution,
    digest: String,
    support: tokio::runtime::Runtime,
    upstream_url: String,
}

impl Setup {
    fn start(name: &str, seed: u64, rate: u64) -> Option<Self> {
        let cluster = Cluster::start(name)?;
        let (up, digest, support, upstream_url) = slow_upstream(seed, rate);
        Some(Self {
            cluster,
            up,
            digest,
            support,
            upstream_url,
        })
    }
}

/// An upstream holding one `LARGE` blob (its digest), a runtime for the test's side, and the
/// URL of a relay to the upstream sending `rate` bytes a second.
fn slow_upstream(seed: u64, rate: u64) -> (Distribution, String, tokio::runtime::Runtime, String) {
    let up = Distribution::start();
    let blob = random_bytes(LARGE, seed);
    let digest = Http::new(&up.url()).push_blob(REPO, &blob);
    drop(blob);
    let support = runtime(2);
    let target = format!("127.0.0.1:{}", up.port).parse().expect("addr");
    let relay = throttled_relay(&support, target, rate);
    (up, digest, support, format!("http://{relay}"))
}

/// `slow_upstream` mirrored as `mirror.test` by three replica processes, and the blob's path
/// there (None, after a loud skip, where the engines or the upstream cannot run).
fn replica_processes(
    seed: u64,
    rate: u64,
) -> Option<(
    Distribution,
    String,
    tokio::runtime::Runtime,
    Replicas,
    String,
)> {
    if !Replicas::available() || !upstream::available() {
        return None;
    }
    let (up, digest, support, url) = slow_upstream(seed, rate);
    let upstream = format!("[[upstream]]\nname = \"mirror.test\"\nurl = \"{url}\"\n");
    let replicas = Replicas::start_with(3, &|_| upstream.clone());
    let path = format!("/v2/mirror.test/{REPO}/blobs/{digest}");
    Some((up, digest, support, replicas, path))
}

impl Setup {
    /// Waits for the blob to be recorded as in the bucket, then checks the object there
    /// hashes to its digest and the record has its size.
    fn await_published(&self) {
        let d: Digest = self.digest.parse().expect("digest");
        let (rt, pg) = (&self.support, &self.cluster.pg_url);
        wait_until("the blob in the bucket", Duration::from_secs(60), || {
            recorded_size(rt, pg, &self.digest).is_some()
        });
        let o = objects(&self.cluster.s3);
        assert_eq!(bucket_digest(rt, &o, &d), Some(self.digest.clone()));
        assert_eq!(recorded_size(rt, pg, &self.digest), Some(LARGE as i64));
        let sql = "SELECT count(*) FROM repo_blobs WHERE digest = $1 AND NOT pushed";
        let links: Option<i64> = query_one(rt, pg, sql, &self.digest);
        assert_eq!(links, Some(1), "linked as a cache fill's");
    }
}

impl Cluster {
    /// A pool of `pool_size` connections to the shared database.
    async fn db(&self, pool_size: usize) -> Db {
        Db::open(&PgOptions {
            url: self.pg_url.clone(),
            password: None,
            pool_size,
            ca_roots: None,
        })
        .await
        .expect("open db")
    }
}

/// One replica: the real server, in this process but on its own runtime, which `kill` drops
/// at once (every task, socket and lease renewal of the replica goes, as in a `kill -9`).
struct Replica {
    addr: SocketAddr,
    app: Arc<App>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(cluster: &Cluster, upstream_url: &str, lease: Duration) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime(2);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = test_config(dir.path(), "");
        config.upstreams[0].url = upstream_url.to_string();
        config.storage.fill_lease = HumanDuration(lease);
        let app = App::build(config).expect("app builds");
        let fills = rt.block_on(async {
            let db = cluster.db(4).await;
            ClusterFill::connect(db, objects(&cluster.s3), &app.config)
                .await
                .expect("cluster fills")
        });
        // As `serve` does once bound (the listen port is 0, so the URL waits for the bind).
        assert_eq!(fills.url(), None);
        fills.bound(addr, false);
        assert_eq!(fills.url(), Some(format!("http://{addr}").as_str()));
        assert!(app.proxy.attach_cluster(Arc::new(fills)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(transship::http::server::serve(
            app.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            app,
            rt: Some(rt),
            stop: Some(stop),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Ends the replica at once: no shutdown, no lease released.
    fn kill(&mut self) {
        self.stop.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

fn objects(s3: &SeaweedFs) -> Objects {
    s3.objects(BUCKET, None)
}

/// A loopback relay to `target` that sends the answers back at most `rate` bytes a second:
/// a slow upstream, so a fill is reliably still running when the test acts on it.
fn throttled_relay(rt: &tokio::runtime::Runtime, target: SocketAddr, rate: u64) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_up, mut to_up) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_up).await;
                    let _ = to_up.shutdown().await;
                });
                let started = Instant::now();
                let mut sent = 0u64;
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from_up.read(&mut buf).await {
                    if n == 0 || to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let _ = to_client.shutdown().await;
            });
        }
    });
    addr
}

/// What a client received: status, bytes, their sha256, and whether the body ended cleanly.
#[derive(Debug)]
struct Received {
    status: u16,
    len: u64,
    digest: String,
    complete: bool,
}

/// GETs `url`, hashing the body as it streams (bounded memory); `progress` counts the bytes.
async fn hashed_get(client: Client, url: String, progress: Arc<AtomicU64>) -> Received {
    let resp = match client.get(url.parse().expect("url")).await {
        Ok(r) => r,
        Err(_) => {
            return Received {
                status: 0,
                len: 0,
                digest: String::new(),
                complete: false,
            };
        }
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    progress.fetch_add(data.len() as u64, Ordering::Relaxed);
                    hasher.update(&data);
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Received {
        status,
        len,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        complete,
    }
}

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The blob as the bucket holds it, hashed; None while it is not there.
fn bucket_digest(rt: &tokio::runtime::Runtime, o: &Objects, digest: &Digest) -> Option<String> {
    rt.block_on(async {
        let size = o.head(digest).await.expect("head")?;
        let mut hasher = sha2::Sha256::new();
        let mut stream = o.get_range(digest, 0..size).await.expect("get");
        while let Some(chunk) = stream.try_next().await.expect("read") {
            hasher.update(&chunk);
        }
        Some(format!("sha256:{}", hex::encode(hasher.finalize())))
    })
}

/// The `blobs` row of `digest`: its recorded size.
fn recorded_size(rt: &tokio::runtime::Runtime, pg_url: &str, digest: &str) -> Option<i64> {
    query_one(
        rt,
        pg_url,
        "SELECT size FROM blobs WHERE digest = $1",
        digest,
    )
}

/// Who holds the fill lease of `digest` (its internal URL), if anyone.
fn lease_owner(rt: &tokio::runtime::Runtime, pg_url: &str, digest: &str) -> Option<String> {
    query_one(
        rt,
        pg_url,
        "SELECT owner FROM fill_leases WHERE digest = $1 AND expires_at >= now()",
        digest,
    )
}

fn query_one<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    rt: &tokio::runtime::Runtime,
    pg_url: &str,
    sql: &str,
    digest: &str,
) -> Option<T> {
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.query_opt(sql, &[&digest])
            .await
            .expect("query")
            .map(|r| r.get(0))
    })
}

/// How many internal fill requests this replica answered with bytes.
fn internal_fills_served(app: &App) -> u64 {
    ["200", "206"]
        .iter()
        .map(|status| {
            app.metrics
                .requests
                .with_label_values(&["GET", "internal_fill", status])
                .get()
        })
        .sum()
}

/// Clients GETting `urls`, each started once it has received its first MiB (so its replica
/// is following the fill in flight).
fn follow_clients(
    rt: &tokio::runtime::Runtime,
    urls: impl Iterator<Item = String>,
) -> Vec<tokio::task::JoinHandle<Received>> {
    let started: Vec<_> = urls
        .map(|url| {
            let progress = Arc::new(AtomicU64::new(0));
            (
                rt.spawn(hashed_get(client(), url, progress.clone())),
                progress,
            )
        })
        .collect();
    for (_, progress) in &started {
        wait_until("a follower's first bytes", Duration::from_secs(30), || {
            progress.load(Ordering::Relaxed) >= 1 << 20
        });
    }
    started.into_iter().map(|(task, _)| task).collect()
}

/// Fills these replicas completed from `source` (their metrics).
fn fills_from(replicas: &[Replica], source: &str) -> u64 {
    replicas
        .iter()
        .map(|r| {
            r.app
                .metrics
                .cluster_fills
                .with_label_values(&[source])
                .get()
        })
        .sum()
}

/// Waits until these replicas have completed exactly the `expected` fills by source (a fill
/// is counted once committed, just after its readers got their last byte), and no others.
fn await_fills(replicas: &[Replica], expected: &[(&str, u64)]) {
    let sources = ["upstream", "replica", "bucket", "takeover"];
    let want = |source: &str| {
        expected
            .iter()
            .find(|(s, _)| *s == source)
            .map_or(0, |(_, n)| *n)
    };
    let counts = || sources.map(|s| fills_from(replicas, s));
    let total: u64 = expected.iter().map(|(_, n)| n).sum();
    wait_until("the fills to be committed", Duration::from_secs(30), || {
        counts().iter().sum::<u64>() >= total
    });
    assert_eq!(counts(), sources.map(want), "fills by source {sources:?}");
}

/// A 200 carrying exactly `blob` (an error body is shown, never megabytes of bytes).
fn assert_pulled(r: &common::Resp, blob: &[u8]) {
    let shown = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]);
    assert_eq!(r.status, 200, "{shown}");
    assert!(
        r.body.as_ref() == blob,
        "different bytes ({} bytes)",
        r.body.len()
    );
}

fn upstream_gets(up: &Distribution, digest: &str) -> usize {
    up.requests()
        .iter()
        .filter(|r| *r == &format!("GET /v2/{REPO}/blobs/{digest}"))
        .count()
}

#[test]
fn thirty_cold_pulls_over_three_replicas_fetch_once_and_a_late_replica_reads_the_bucket() {
    // About three seconds of download: the thirty requests all land while the fill runs.
    let Some(s) = Setup::start("fills_thirty", 13, 48 << 20) else {
        return;
    };
    let digest = s.digest.clone();
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&s.cluster, &s.upstream_url, Duration::from_secs(3)))
        .collect();
    let progress = Arc::new(AtomicU64::new(0));
    let results = s.support.block_on(async {
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let url = replicas[i % 3].url(&format!("/v2/{REPO}/blobs/{digest}"));
                tokio::spawn(hashed_get(client(), url, progress.clone()))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    for (i, r) in results.iter().enumerate() {
        assert!(r.complete, "client {i}: {r:?}");
        assert_eq!((r.status, r.len), (200, LARGE as u64), "client {i}");
        assert_eq!(r.digest, digest, "client {i} received different bytes");
    }
    assert_eq!(
        upstream_gets(&s.up, &digest),
        1,
        "one upstream GET for the cluster"
    );
    // The two replicas that did not fetch streamed the fill from the one that did.
    let followed: u64 = replicas.iter().map(|r| internal_fills_served(&r.app)).sum();
    assert_eq!(followed, 2, "each other replica followed the owner once");
    await_fills(&replicas, &[("upstream", 1), ("replica", 2)]);
    // The owner publishes off the clients' path: the blob appears in the bucket, verified,
    // and is recorded.
    s.await_published();
    // Every replica committed the verified blob to its own store.
    for (i, r) in replicas.iter().enumerate() {
        assert!(r.app.fsck(false).expect("fsck").is_clean(), "replica {i}");
    }
    // A replica that joins later fills from the bucket, not the upstream.
    let late = Replica::start(&s.cluster, &s.upstream_url, Duration::from_secs(3));
    let r = s.support.block_on(hashed_get(
        client(),
        late.url(&format!("/v2/{REPO}/blobs/{digest}")),
        progress.clone(),
    ));
    assert!(r.complete && r.status == 200, "{r:?}");
    assert_eq!(r.digest, digest);
    assert_eq!(
        upstream_gets(&s.up, &digest),
        1,
        "the late replica read the bucket"
    );
    await_fills(std::slice::from_ref(&late), &[("bucket", 1)]);
}

#[test]
fn the_owner_dying_mid_fill_costs_at_most_one_more_upstream_fetch() {
    // About four seconds of download: the owner is reliably killed mid-way.
    let Some(s) = Setup::start("fills_owner_dies", 14, 32 << 20) else {
        return;
    };
    let digest = s.digest.clone();
    let lease = Duration::from_secs(2);
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&s.cluster, &s.upstream_url, lease))
        .collect();
    let path = format!("/v2/{REPO}/blobs/{digest}");
    // Replica 0 misses first and so owns the fill.
    let owner_progress = Arc::new(AtomicU64::new(0));
    let owner_client = s.support.spawn(hashed_get(
        client(),
        replicas[0].url(&path),
        owner_progress.clone(),
    ));
    wait_until("the owner's first bytes", Duration::from_secs(30), || {
        owner_progress.load(Ordering::Relaxed) >= 8 << 20
    });
    let followers = follow_clients(&s.support, (1..3).map(|i| replicas[i].url(&path)));
    assert_eq!(
        lease_owner(&s.support, &s.cluster.pg_url, &digest),
        Some(format!("http://{}", replicas[0].addr)),
        "replica 0 holds the fill lease"
    );
    assert!(
        owner_progress.load(Ordering::Relaxed) < LARGE as u64,
        "the owner is still filling"
    );
    replicas[0].kill();
    // The owner's client sees its download end early (or, had it finished, whole).
    let first = s.support.block_on(owner_client).expect("client task");
    assert!(
        !first.complete || first.digest == digest,
        "a client never gets a complete body that is wrong: {first:?}"
    );
    // The followers carry on: one takes the expired lease over, the other follows it.
    for (i, task) in followers.into_iter().enumerate() {
        let r = s.support.block_on(task).expect("client task");
        assert!(r.complete, "follower {i}: {r:?}");
        assert_eq!((r.status, r.len), (200, LARGE as u64), "follower {i}");
        assert_eq!(r.digest, digest, "follower {i} received different bytes");
    }
    // The owner's client retries on another replica and gets the blob.
    let retry = s.support.block_on(hashed_get(
        client(),
        replicas[1].url(&path),
        Arc::new(AtomicU64::new(0)),
    ));
    assert!(retry.complete && retry.status == 200, "{retry:?}");
    assert_eq!(retry.digest, digest);
    // One survivor took the fill over from the upstream, the other followed it (counted once
    // committed, a moment after the clients' last byte).
    await_fills(&replicas[1..], &[("takeover", 1), ("replica", 1)]);
    let gets = upstream_gets(&s.up, &digest);
    assert!(
        (1..=2).contains(&gets),
        "{gets} upstream GETs: at most one more than a fill without a death"
    );
    // Nothing corrupt in the bucket: the blob appears there verified.
    s.await_published();
    for (i, r) in replicas.iter().enumerate().skip(1) {
        assert!(r.app.fsck(false).expect("fsck").is_clean(), "replica {i}");
    }
}

#[test]
fn the_internal_endpoint_answers_only_the_replicas_key() {
    let Some(cluster) = Cluster::start("fills_endpoint") else {
        return;
    };
    let up = Distribution::start();
    let blob = random_bytes(3 << 20, 15);
    let digest = Http::new(&up.url()).push_blob(REPO, &blob);
    let replica = Replica::start(&cluster, &up.url(), Duration::from_secs(3));
    let h = Http::new(&replica.url(""));
    let fill = format!("/_transship/fill/{digest}");
    // Nothing stored yet: even with the right key, nothing to give.
    let key = {
        let rt = runtime(1);
        let signing_key = rt.block_on(async {
            cluster
                .db(1)
                .await
                .token_signing_key()
                .await
                .expect("signing key")
        });
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &signing_key);
        hex::encode(aws_lc_rs::hmac::sign(&k, b"transship internal fill endpoint v1").as_ref())
    };
    assert_eq!(h.send("GET", &fill, &[(KEY_HEADER, &key)], "").status, 404);
    // A pull stores it on this replica.
    let pulled = h.get(&format!("/v2/{REPO}/blobs/{digest}"));
    assert_pulled(&pulled, &blob);
    assert_eq!(h.get(&fill).status, 401, "no key");
    // The key with its last digit changed.
    let (head, last) = key.split_at(key.len() - 1);
    let wrong = format!("{head}{}", if last == "0" { "1" } else { "0" });
    assert_eq!(
        h.send("GET", &fill, &[(KEY_HEADER, &wrong)], "").status,
        401,
        "a wrong key"
    );
    let ok = h.send("GET", &fill, &[(KEY_HEADER, &key)], "");
    assert_eq!((ok.status, ok.body.as_ref()), (200, blob.as_slice()));
    let part = h.send(
        "GET",
        &fill,
        &[(KEY_HEADER, &key), ("range", "bytes=1000-")],
        "",
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body.as_ref(), &blob[1000..]);
    // The local profile has no such endpoint, key or not.
    let local = common::TestServer::start();
    let lh = Http::for_server(&local);
    assert_eq!(lh.send("GET", &fill, &[(KEY_HEADER, &key)], "").status, 404);
}

/// A `blobs` record whose object is missing from the bucket (lost, or removed behind the
/// database's back) does not keep the blob from a replica: it fetches from the upstream and
/// puts the object back.
#[test]
fn a_record_without_its_object_falls_back_to_the_upstream() {
    let Some(cluster) = Cluster::start("fills_lost_object") else {
        return;
    };
    let up = Distribution::start();
    let blob = random_bytes(3 << 20, 16);
    let digest = Http::new(&up.url()).push_blob(REPO, &blob);
    let d: Digest = digest.parse().expect("digest");
    let rt = runtime(1);
    rt.block_on(async {
        let db = cluster.db(1).await;
        let repo = "elsewhere/app".parse().expect("name");
        db.link_blob(&repo, &d, blob.len() as u64, true)
            .await
            .expect("record");
    });
    let replica = Replica::start(&cluster, &up.url(), Duration::from_secs(3));
    let h = Http::new(&replica.url(""));
    let pulled = h.get(&format!("/v2/{REPO}/blobs/{digest}"));
    assert_pulled(&pulled, &blob);
    await_fills(std::slice::from_ref(&replica), &[("upstream", 1)]);
    assert_eq!(upstream_gets(&up, &digest), 1);
    wait_until(
        "the object back in the bucket",
        Duration::from_secs(30),
        || bucket_digest(&rt, &objects(&cluster.s3), &d).is_some(),
    );
    assert_eq!(bucket_digest(&rt, &objects(&cluster.s3), &d), Some(digest));
}

/// Fills that replicas `which` completed from `source`, as their `/metrics` say.
fn served_fills(replicas: &Replicas, which: std::ops::Range<usize>, source: &str) -> u64 {
    let line = format!("transship_cluster_fills_total{{source=\"{source}\"}} ");
    which
        .filter_map(|i| {
            let text = replicas.http(i).get("/metrics").body;
            String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix(&line).and_then(|v| v.parse::<u64>().ok()))
        })
        .sum()
}

/// Thirty concurrent cold pulls over three replica processes: one upstream GET.
#[test]
fn thirty_cold_pulls_over_three_replica_processes_fetch_once() {
    let Some((up, digest, support, replicas, path)) = replica_processes(18, 48 << 20) else {
        return;
    };
    let progress = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            support.spawn(hashed_get(
                client(),
                replicas.url(i % 3, &path),
                progress.clone(),
            ))
        })
        .collect();
    let results = support.block_on(futures_util::future::join_all(tasks));
    for (i, r) in results.into_iter().enumerate() {
        let r = r.expect("client task");
        assert!(r.complete, "client {i}: {r:?}");
        assert_eq!((r.status, r.len), (200, LARGE as u64), "client {i}");
        assert_eq!(r.digest, digest, "client {i} received different bytes");
    }
    assert_eq!(upstream_gets(&up, &digest), 1, "one upstream GET");
    let fills = |source| served_fills(&replicas, 0..3, source);
    wait_until("the fills to be committed", Duration::from_secs(30), || {
        fills("upstream") + fills("replica") >= 3
    });
    assert_eq!((fills("upstream"), fills("replica")), (1, 2));
    // Every replica serves its cached copy from its own store: it needs no link in the shared
    // database (removed here, once the owner has published the blob).
    let key = common::replicas::blob_key(&digest);
    wait_until("the blob in the bucket", Duration::from_secs(60), || {
        replicas.sql(&format!("SELECT 1 FROM blobs WHERE digest = '{digest}'")) == [["1"]]
    });
    assert_eq!(replicas.objects("blobs").get(&key), Some(&(LARGE as u64)));
    replicas.sql(&format!("DELETE FROM repo_blobs WHERE digest = '{digest}'"));
    for i in 0..3 {
        let r = support.block_on(hashed_get(
            client(),
            replicas.url(i, &path),
            progress.clone(),
        ));
        assert!(r.complete && r.status == 200, "replica {i}: {r:?}");
        assert_eq!(r.digest, digest, "replica {i}");
    }
    assert_eq!(upstream_gets(&up, &digest), 1, "still one upstream GET");
}

/// The owner's death with real processes (the replica harness: `transship serve` on 127.0.0.2,
/// .3, .4 in the cluster profile), ended by SIGKILL mid-fill: the survivors wait out its lease
/// (the default 15 s), one takes the fill over from where it was, the other follows it; every
/// client ends byte-exact or retries; at most two upstream GETs; a verified object.
#[test]
fn a_replica_process_killed_mid_fill_is_taken_over() {
    let Some((up, digest, support, mut replicas, path)) = replica_processes(17, 24 << 20) else {
        return;
    };
    let owner_progress = Arc::new(AtomicU64::new(0));
    let owner_client = support.spawn(hashed_get(
        client(),
        replicas.url(0, &path),
        owner_progress.clone(),
    ));
    wait_until("the owner's first bytes", Duration::from_secs(30), || {
        owner_progress.load(Ordering::Relaxed) >= 8 << 20
    });
    let owner = replicas.sql(&format!(
        "SELECT owner FROM fill_leases WHERE digest = '{digest}'"
    ));
    assert_eq!(owner, vec![vec![format!("http://{}", replicas.addr(0))]]);
    let followers = follow_clients(&support, (1..3).map(|i| replicas.url(i, &path)));
    assert!(owner_progress.load(Ordering::Relaxed) < LARGE as u64);
    replicas.kill9(0);
    let first = support.block_on(owner_client).expect("client task");
    assert!(!first.complete || first.digest == digest, "{first:?}");
    for (i, task) in followers.into_iter().enumerate() {
        let r = support.block_on(task).expect("client task");
        assert!(r.complete, "follower {i}: {r:?}");
        assert_eq!((r.status, r.len), (200, LARGE as u64), "follower {i}");
        assert_eq!(r.digest, digest, "follower {i} received different bytes");
    }
    let retry = support.block_on(hashed_get(
        client(),
        replicas.url(2, &path),
        Arc::new(AtomicU64::new(0)),
    ));
    assert!(retry.complete && retry.status == 200, "{retry:?}");
    assert_eq!(retry.digest, digest);
    let gets = upstream_gets(&up, &digest);
    assert!((1..=2).contains(&gets), "{gets} upstream GETs");
    // One survivor took over (as its /metrics say), the other followed it.
    let fills = |source| served_fills(&replicas, 1..3, source);
    assert_eq!((fills("takeover"), fills("replica")), (1, 1));
    let key = common::replicas::blob_key(&digest);
    wait_until("the blob in the bucket", Duration::from_secs(60), || {
        replicas.objects("blobs").contains_key(&key)
    });
    assert_eq!(replicas.objects("blobs").get(&key), Some(&(LARGE as u64)));
    let rows = replicas.sql(&format!("SELECT size FROM blobs WHERE digest = '{digest}'"));
    assert_eq!(rows, vec![vec![LARGE.to_string()]]);
}
