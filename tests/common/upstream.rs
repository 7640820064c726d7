//! A real upstream for mirror tests: CNCF distribution (Debian `docker-registry`) on an
//! ephemeral loopback port with a temp storage dir, its access log readable so tests can
//! count exactly which requests reached it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Distribution {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

/// Whether the real upstream is installed. Without it mirror tests skip loudly — except in
/// CI, which installs it, where they fail.
pub fn available() -> bool {
    let ok = Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker-registry is required in CI (scripts/test installs it)"
        );
        eprintln!("SKIP: docker-registry (CNCF distribution) is not installed; run ./scripts/test");
    }
    ok
}

impl Distribution {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut d = Self {
            child: None,
            port,
            log: dir.path().join("registry.log"),
            dir,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let config = self.dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
                self.dir.path().join("data").display(),
                self.port
            ),
        )
        .expect("config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().expect("clone")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the registry (an outage); `restart` brings it back with the same content.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// How many requests with this method reached a path (from the access log).
    pub fn count(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} {path} HTTP/");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(&needle)
            .count()
    }

    /// Every request in the access log so far, as `"METHOD /path?query"`, in order. Waits
    /// until the log stops growing: distribution writes an access-log line just after the
    /// response, so the last one can trail the client that received it.
    pub fn requests(&self) -> Vec<String> {
        let read = || {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            text.lines()
                .filter_map(|line| {
                    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
                        .iter()
                        .find_map(|m| {
                            let start = line.find(&format!("\"{m} "))? + 1;
                            let len = line[start..].find(" HTTP/")?;
                            Some(line[start..start + len].to_string())
                        })
                })
                .collect::<Vec<_>>()
        };
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}
