//! The command line as an operator uses it: `check-config`, `--help`, offline `gc` and
//! `fsck`, graceful shutdown of `serve` on SIGTERM with a download in flight, and the identity
//! commands (`user`, `key`, `token`, `member`) with and without a running server.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run transship");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_example_and_names_key_and_line_of_errors() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/transship.toml");
    let (code, out, err) = run(&["check-config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("listen = \"127.0.0.1:5000\"") && out.contains("[[project]]"),
        "{out}"
    );
    assert!(err.contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"127.0.0.1:5000\"\ndata_dir = \"d\"\n\n[gc]\ngrace_period = \"soon\"\n").unwrap();
    let (code, _, err) = run(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("line 6") && err.contains("duration"), "{err}");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:5000\"\ndata_dir = \"d\"\nlsiten = 1\n",
    )
    .unwrap();
    let (_, _, err) = run(&["check-config", bad.to_str().unwrap()]);
    assert!(err.contains("lsiten") && err.contains("line 4"), "{err}");
    let (code, _, err) = run(&["check-config", "/nonexistent/transship.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn help_lists_every_command() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for cmd in [
        "serve",
        "check-config",
        "gc",
        "fsck",
        "user",
        "key",
        "token",
        "member",
    ] {
        assert!(out.contains(cmd), "--help lacks {cmd}:\n{out}");
    }
    let (_, out, _) = run(&["serve", "--help"]);
    assert!(out.contains("--listen") && out.contains("--data-dir") && out.contains("--config"));
}

#[test]
fn offline_gc_and_fsck_report_and_exit_codes() {
    let s = TestServer::start();
    let h = Http::for_server(&s);
    push_image(&h, "local/cli", "v1", 7);
    let victim = h.push_blob("local/cli", &random_bytes(5000, 8));
    drop(h);
    let dir = s.stop();
    let data = dir.path().to_str().unwrap();

    let (code, out, err) = run(&["fsck", "--data-dir", data]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("checked 3 blobs") && out.contains("0 problems"),
        "{out}"
    );
    let (code, out, _) = run(&["gc", "--data-dir", data]);
    assert_eq!(code, 0);
    assert!(
        out.contains("removed 0 unreferenced blobs"),
        "grace period protects the new blob: {out}"
    );

    let hex = victim.trim_start_matches("sha256:");
    let path = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::write(&path, b"tampered").unwrap();
    let (code, out, _) = run(&["fsck", "--data-dir", data]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&victim), "{out}");
    let (code, out, _) = run(&["fsck", "--data-dir", data, "--repair"]);
    assert_eq!(code, 1, "problems found are still reported when repaired");
    assert!(out.contains("repaired: "), "{out}");
    let (code, out, _) = run(&["fsck", "--data-dir", data]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn sigterm_lets_an_in_flight_download_finish() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    let text = transship::config::EMBEDDED_DEFAULT.replace(
        "data_dir = \"./transship-data\"",
        &format!(
            "data_dir = {:?}",
            dir.path().join("data").display().to_string()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let h = Http::new(&server.url(""));
    let data = random_bytes(48 << 20, 9);
    let digest = h.push_blob("local/shutdown", &data);

    // A client that reads slowly, so the response is still streaming at SIGTERM.
    let mut conn = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        conn,
        "GET /v2/local/shutdown/blobs/{digest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let n = conn.read(&mut first).unwrap();
    assert!(n > 0);
    let pid = server.child.id() as i32;
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    // New connections are refused while the old one drains.
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    let mut response = first[..n].to_vec();
    response.extend_from_slice(&rest);
    let body_start = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        response[body_start..] == data[..],
        "the in-flight download completed byte-exact"
    );
    let status = server.terminate();
    assert!(
        status.success(),
        "clean exit after graceful shutdown: {status:?}"
    );
}

/// Runs the binary with `stdin` as standard input.
fn run_with_input(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run transship");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn identity_commands_work_offline_and_against_the_running_server() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("transship.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[[project]]\nname = \"team\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    // Offline: straight into the index.
    let (code, _, err) = run_with_input(&["user", "add", "alice", "-c", c], "alice-password\n");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_with_input(&["user", "add", "shorty", "-c", c], "short\n");
    assert_eq!(code, 2);
    assert!(err.contains("at least 8"), "{err}");
    let (code, _, err) = run(&[
        "member",
        "add",
        "--project",
        "team",
        "--user",
        "alice",
        "--role",
        "editor",
        "-c",
        c,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&[
        "member",
        "add",
        "--project",
        "nope",
        "--user",
        "alice",
        "--role",
        "editor",
        "-c",
        c,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no project nope"), "{err}");
    let key_path = dir.path().join("key.json");
    let k = key_path.to_str().unwrap();
    let (code, _, err) = run(&[
        "key",
        "create",
        "--project",
        "team",
        "--role",
        "viewer",
        "--out",
        k,
        "-c",
        c,
    ]);
    assert_eq!(code, 0, "{err}");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "key files are private");
    let key_json = std::fs::read_to_string(&key_path).unwrap();
    let key: serde_json::Value = serde_json::from_str(&key_json).unwrap();
    assert_eq!(key["project_id"], "team");
    let (code, _, err) = run(&[
        "key",
        "create",
        "--project",
        "team",
        "--role",
        "viewer",
        "--out",
        k,
        "-c",
        c,
    ]);
    assert_eq!(code, 2, "an existing key file is not overwritten");
    assert!(err.contains("exists"), "{err}");

    // Online: the same commands reach the running server through its admin socket and take
    // effect at once.
    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let http = Http::new(&server.url(""));
    let get = |auth: &str| {
        http.send(
            "GET",
            "/v2/",
            &[("authorization", auth)],
            bytes::Bytes::new(),
        )
        .status
    };
    assert_eq!(
        get(&transship::auth::basic_header("alice", "alice-password")),
        200
    );
    assert_eq!(
        get(&transship::auth::basic_header("_json_key", &key_json)),
        200
    );
    let (code, _, err) = run_with_input(&["user", "add", "bob", "-c", c], "bob-password\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        get(&transship::auth::basic_header("bob", "bob-password")),
        200
    );
    let (code, token, err) = run(&["token", "create", "--user", "bob", "--ttl", "10m", "-c", c]);
    assert_eq!(code, 0, "{err}");
    let token = token.trim();
    assert_eq!(
        get(&transship::auth::basic_header("oauth2accesstoken", token)),
        200
    );
    let (_, list, _) = run(&["token", "list", "-c", c]);
    let id = list
        .split_whitespace()
        .next()
        .expect("a token id")
        .to_string();
    assert!(!list.contains(token), "listings never show secrets");
    let (code, _, _) = run(&["token", "revoke", &id, "-c", c]);
    assert_eq!(code, 0);
    assert_eq!(
        get(&transship::auth::basic_header("oauth2accesstoken", token)),
        401
    );
    let (code, _, _) = run(&[
        "key",
        "revoke",
        key["private_key_id"].as_str().unwrap(),
        "-c",
        c,
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        get(&transship::auth::basic_header("_json_key", &key_json)),
        401
    );
    let (_, users, _) = run(&["user", "list", "-c", c]);
    assert_eq!(users, "alice\tindex\nbob\tindex\n");
    let (_, members, _) = run(&["member", "list", "--project", "team", "-c", c]);
    assert_eq!(members, "team\talice\teditor\tindex\n");
    let (code, _, _) = run(&["user", "remove", "bob", "-c", c]);
    assert_eq!(code, 0);
    assert_eq!(
        get(&transship::auth::basic_header("bob", "bob-password")),
        401
    );
    let log = std::fs::read_to_string(&server.log).unwrap();
    for secret in ["alice-password", "bob-password", token] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
    assert!(
        log.contains("audit: admin request applied"),
        "admin changes are audited"
    );
    assert!(server.terminate().success());
}

#[test]
fn an_exposed_listener_without_users_warns_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let text = startup_log_on_all_addresses(dir.path());
    assert!(
        text.contains("pushes are refused until one is created with `transship user add`"),
        "{text}"
    );
}

/// Starts `transship serve` with `args` (which must include `--listen 127.0.0.1:0`) and waits
/// for the "transship serving" line; returns the child and the address it bound. The caller
/// reaps the child with `stop`.
#[allow(clippy::zombie_processes)]
fn serve_with_args(args: &[&str], log: &std::path::Path) -> (std::process::Child, String) {
    let out = std::fs::File::create(log).unwrap();
    let mut child = Command::new(binary())
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn transship");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("transship serving")) {
            let addr = line
                .split("listen=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .expect("listen address")
                .to_string();
            return (child, addr);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("transship did not start:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: std::process::Child) {
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

#[test]
fn a_config_file_holds_only_what_differs_from_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    std::fs::write(&config, "[gc]\ninterval = \"1h\"\n").unwrap();
    let c = config.to_str().unwrap();
    let (code, out, err) = run(&["check-config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("name = \"local\"") && out.contains("name = \"docker.io\""),
        "lists not declared come from the defaults: {out}"
    );
    let data = dir.path().join("data");
    let (child, addr) = serve_with_args(
        &[
            "--config",
            c,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.path().join("log"),
    );
    let h = Http::new(&format!("http://{addr}"));
    assert_eq!(h.get("/v2/").status, 200);
    // The default project `local` (anonymous push from loopback) is there.
    let d = h.push_blob("local/partial", b"partial config");
    assert_eq!(h.get(&format!("/v2/local/partial/blobs/{d}")).status, 200);
    stop(child);
    assert!(data.join("blobs").is_dir(), "--data-dir was used");
}

#[test]
fn secrets_never_appear_in_check_config_logs_or_errors() {
    const PASSWORD: &str = "upstream-Pa55word-xyzzy";
    let hash = transship::auth::keys::hash_password("alice-password");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:5000\"\ndata_dir = {:?}\n[[project]]\nname = \"local\"\nanonymous = \"push\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n\
             username = \"me\"\npassword = \"{PASSWORD}\"\n\
             [[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let (code, out, err) = run(&["check-config", c]);
    assert_eq!(code, 0, "{err}");
    for text in [&out, &err] {
        assert!(!text.contains(PASSWORD) && !text.contains(&hash), "{text}");
    }
    assert!(out.contains("password = \"<redacted>\""), "{out}");
    assert!(out.contains("password_hash = \"<redacted>\""), "{out}");

    // Serving, with debug logs and a pull that reaches the (unreachable) upstream.
    let log = dir.path().join("log");
    let (child, addr) = serve_with_args(&["--config", c, "--listen", "127.0.0.1:0"], &log);
    let h = Http::new(&format!("http://{addr}"));
    let r = h.get("/v2/library/alpine/manifests/latest");
    assert!(r.status >= 400, "{r:?}");
    assert!(!String::from_utf8_lossy(&r.body).contains(PASSWORD));
    stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(PASSWORD) && !text.contains(&hash),
        "secret in the log:\n{text}"
    );

    // Errors about a secret do not quote it, and a URL with credentials is refused unquoted.
    for bad in [
        "[[upstream]]\nname = \"x.io\"\nurl = \"https://x.io\"\nusername = \"me\"\npassword = 918273645\n".to_string(),
        format!("[[upstream]]\nname = \"x.io\"\nurl = \"https://me:{PASSWORD}@x.io\"\n"),
    ] {
        std::fs::write(&config, &bad).unwrap();
        let (code, out, err) = run(&["check-config", c]);
        assert_eq!(code, 2, "{out}");
        assert!(
            !err.contains("918273645") && !err.contains(PASSWORD),
            "{err}"
        );
        let (code, _, err) = run(&["serve", "--config", c, "--listen", "127.0.0.1:0"]);
        assert_eq!(code, 2);
        assert!(!err.contains("918273645") && !err.contains(PASSWORD), "{err}");
    }
}
