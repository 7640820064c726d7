//! The command line as an operator uses it: `check-config`, `--help`, offline `gc` and
//! `fsck`, and graceful shutdown of `serve` on SIGTERM with a download in flight.

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
    for cmd in ["serve", "check-config", "gc", "fsck"] {
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
