//! Several transship replicas in the cluster profile: the real binary, n processes on
//! 127.0.0.2, .3, .4, … (ephemeral ports), each with its own data_dir, all on ONE SeaweedFS
//! bucket and ONE PostgreSQL database started for the group (`engines`). Every test gets its
//! own engines, bucket and database (nextest runs each test in a process of its own, so
//! nothing is shared between tests). Helpers reach underneath for assertions: the bucket's
//! objects (an S3 listing of our own), rows through `psql`, each replica's log and read cache.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures_util::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};

use super::engines::{Postgres, SeaweedFs, uuid_like};
use super::images::programs_installed;
use super::{BinaryServer, Http, test_config_text};

/// Extra TOML for replica `i` (users, projects, …), appended to its config.
pub type ExtraConfig<'a> = &'a dyn Fn(usize) -> String;

/// The S3 region the replicas are configured with (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";

/// One group of replicas and the engines they share; everything is stopped on drop (the
/// replicas first, by PID).
pub struct Replicas {
    servers: Vec<Option<BinaryServer>>,
    addrs: Vec<SocketAddr>,
    pub s3: SeaweedFs,
    pub pg: Postgres,
    pub bucket: String,
    pub database: String,
    /// A connection string for `database` (the server trusts loopback: no password).
    pub db_url: String,
    /// Configs, logs, the S3 secret file and every replica's data_dir.
    pub dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    listing: AmazonS3,
}

impl Replicas {
    /// Whether both engines can run here (a loud skip locally, a failure in CI otherwise).
    pub fn available() -> bool {
        SeaweedFs::available() && Postgres::available() && programs_installed("cluster", &["psql"])
    }

    /// Starts the engines, a bucket and a database, then `n` replicas on the default config.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &|_| String::new())
    }

    /// `start`, with `extra(i)` appended to replica `i`'s config.
    pub fn start_with(n: usize, extra: ExtraConfig) -> Self {
        Self::start_edited(n, extra, &|text| text)
    }

    /// `start_with`, each config then passed through `edit` (to change a key of a table the
    /// default config already has).
    pub fn start_edited(n: usize, extra: ExtraConfig, edit: &dyn Fn(String) -> String) -> Self {
        assert!(n <= 250, "{n} replicas");
        let s3 = SeaweedFs::start();
        let pg = Postgres::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let name = format!("ts-{}", uuid_like());
        s3.create_bucket(&name);
        let db_url = rt.block_on(pg.create_database(&name));
        let dir = tempfile::Builder::new()
            .prefix("replicas-")
            .tempdir()
            .expect("tempdir");
        let secret = dir.path().join("s3-secret");
        std::fs::write(&secret, &s3.secret_access_key).expect("write the S3 secret");
        let listing = AmazonS3Builder::new()
            .with_endpoint(&s3.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&name)
            .with_region(REGION)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id(&s3.access_key_id)
            .with_secret_access_key(&s3.secret_access_key)
            .build()
            .expect("S3 client for listings");
        let cluster = format!(
            "[storage.s3]\nendpoint = {:?}\nbucket = {name:?}\nregion = {REGION:?}\npath_style = true\n\
             access_key_id = {:?}\nsecret_access_key_file = {:?}\n\n\
             [storage.postgres]\nurl = {db_url:?}\npool_size = 8\n",
            s3.endpoint,
            s3.access_key_id,
            secret.display().to_string(),
        );
        for i in 0..n {
            let home = dir.path().join(format!("replica-{i}"));
            std::fs::create_dir(&home).expect("replica dir");
            let text = edit(test_config_text(
                &home.join("data"),
                &format!("{cluster}\n{}", extra(i)),
            ));
            std::fs::write(home.join("transship.toml"), text).expect("write config");
        }
        let mut group = Self {
            servers: Vec::new(),
            addrs: Vec::new(),
            s3,
            pg,
            bucket: name.clone(),
            database: name,
            db_url,
            dir,
            rt,
            listing,
        };
        for i in 0..n {
            let server = group.spawn(i, &format!("{}:0", host(i)));
            group.addrs.push(server.addr);
            group.servers.push(Some(server));
        }
        group
    }

    fn home(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{i}"))
    }

    fn spawn(&self, i: usize, listen: &str) -> BinaryServer {
        let home = self.home(i);
        BinaryServer::start_on(&home.join("transship.toml"), &home.join("log"), listen)
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// `127.0.0.x:port` of replica `i` (kept across restarts).
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// `http://127.0.0.x:port` + `path`.
    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.addrs[i])
    }

    /// A blocking client for replica `i`.
    pub fn http(&self, i: usize) -> Http {
        Http::new(&self.url(i, ""))
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.home(i).join("data")
    }

    /// The replica's local read cache (blob bytes it has served or filled).
    pub fn read_cache(&self, i: usize) -> PathBuf {
        self.data_dir(i).join("read-cache")
    }

    /// Everything replica `i` logged (across restarts).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.home(i).join("log")).unwrap_or_default()
    }

    /// The PID of replica `i` (None while it is down).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].as_ref().map(|s| s.child.id())
    }

    /// SIGKILL of replica `i` (by its PID): no shutdown, no flush.
    pub fn kill9(&mut self, i: usize) {
        if let Some(server) = self.servers[i].take() {
            server.kill9();
        }
    }

    /// Starts replica `i` again (after `kill9`, or after SIGKILL now) on the same address and
    /// port, with the same config and data_dir.
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        let server = self.spawn(i, &self.addrs[i].to_string());
        assert_eq!(
            server.addr, self.addrs[i],
            "replica {i} came back elsewhere"
        );
        self.servers[i] = Some(server);
    }

    /// Removes every file of replica `i`'s read cache while it runs (directories stay, as
    /// after an operator's `find read-cache -type f -delete`); returns how many went.
    pub fn wipe_read_cache(&self, i: usize) -> usize {
        let files = files_under(&self.read_cache(i));
        for f in &files {
            std::fs::remove_file(f)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", f.display()));
        }
        files.len()
    }

    /// The files of replica `i`'s read cache.
    pub fn read_cache_files(&self, i: usize) -> Vec<PathBuf> {
        files_under(&self.read_cache(i))
    }

    /// The objects under `prefix` in the bucket (an S3 LIST): key → size.
    pub fn objects(&self, prefix: &str) -> BTreeMap<String, u64> {
        let prefix = object_store::path::Path::from(prefix);
        self.rt.block_on(async {
            self.listing
                .list(Some(&prefix))
                .map_ok(|meta| (meta.location.to_string(), meta.size))
                .try_collect()
                .await
                .expect("S3 listing")
        })
    }

    /// The multipart uploads left open in the bucket.
    pub fn multipart_uploads(&self) -> Vec<String> {
        self.s3.multipart_uploads(&self.bucket)
    }

    /// Runs `query` with `psql` on the group's database; returns the rows, each as its
    /// columns' text (NULL as an empty string).
    pub fn sql(&self, query: &str) -> Vec<Vec<String>> {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-F",
                "\u{1f}",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg("-d")
            .arg(&self.db_url)
            .arg("-c")
            .arg(query)
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {query:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('\u{1f}').map(str::to_string).collect())
            .collect()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // The replicas go before the engines they use (fields drop after this).
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
    }
}

/// The loopback address of replica `i`: 127.0.0.2, .3, .4, …
pub fn host(i: usize) -> String {
    format!("127.0.0.{}", i + 2)
}

/// The object key of a blob in the bucket (no prefix configured).
pub fn blob_key(digest: &str) -> String {
    let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
    format!("blobs/{algorithm}/{}/{hex}", &hex[..2])
}

/// Every regular file under `dir` (none if it does not exist), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}
