//! systemd readiness end to end: the real binary started the way systemd starts a
//! `Type=notify` unit with `WatchdogSec` (`NOTIFY_SOCKET`, here an abstract-namespace socket
//! the test owns; `WATCHDOG_USEC`, `WATCHDOG_PID`), and what it sends: `READY=1` with a
//! `STATUS=` line once it serves, `WATCHDOG=1` keep-alives, `STOPPING=1` on SIGTERM.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The next notification, as its `KEY=VALUE` lines; panics after a minute of silence.
fn next(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let len = socket
        .recv(&mut buf)
        .expect("a notification within a minute");
    String::from_utf8(buf[..len].to_vec())
        .expect("UTF-8 notification")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn serve_notifies_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config_in(dir.path());
    let name = format!("transship-notify-test-{}", std::process::id());
    let socket =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        // Half a second: the keep-alives come every quarter second.
        .env("WATCHDOG_USEC", "500000")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn transship");
    // No WATCHDOG_PID: systemd sets it to the main PID, unknown before spawning; unset means
    // "this process".
    let ready = next(&socket);
    assert_eq!(
        ready.first().map(String::as_str),
        Some("READY=1"),
        "{ready:?}"
    );
    let status = ready
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS with READY: {ready:?}"));
    // The status names the bound address; ready means it answers already.
    let addr = status
        .strip_prefix("serving on ")
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("status {status:?}"));
    assert!(status.ends_with("0 blobs, 0 bytes stored"), "{status:?}");
    let h = Http::new(&format!("http://{addr}"));
    assert_eq!(h.get("/v2/").status, 200);

    // A pushed blob shows in the status the watchdog keep-alives carry.
    let data = random_bytes(1234, 5);
    h.push_blob("local/app", &data);
    let fed = loop {
        let msg = next(&socket);
        assert!(
            msg.iter().any(|l| l == "WATCHDOG=1"),
            "a keep-alive without WATCHDOG=1: {msg:?}"
        );
        if msg
            .iter()
            .any(|l| l.ends_with("1 blobs, 1234 bytes stored"))
        {
            break msg;
        }
    };
    assert!(
        fed[1].starts_with(&format!("STATUS=serving on {addr};")),
        "{fed:?}"
    );

    // SIGTERM: STOPPING=1 before the process exits cleanly.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let stopping = loop {
        let msg = next(&socket);
        if !msg.iter().any(|l| l == "WATCHDOG=1") {
            break msg;
        }
    };
    assert_eq!(stopping[0], "STOPPING=1", "{stopping:?}");
    assert!(child.wait().unwrap().success());
}

/// A `NOTIFY_SOCKET` transship cannot use is a warning in the log, not a failure to start.
#[test]
fn an_unusable_notify_socket_is_only_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config_in(dir.path());
    let log = dir.path().join("log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", "relative/path")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn transship");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("not notifying systemd") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("relative/path"), "{text}");
    assert!(text.contains("transship serving"), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}
