//! The one access-log line per request. Formatted here, straight into bytes, in exactly the
//! text or JSON layout the `tracing` subscriber gives every other line, then handed to the
//! buffered access output (`log_writer`): going through `tracing`'s field visitors, `fmt`
//! machinery and a write per line cost more than the rest of a small request together.
//! `RUST_LOG` still decides whether the line is written. Without an installed output (the
//! server embedded in a test or another program) the line goes through `tracing` as before.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log_writer::{ACCESS_TARGET, access_sink};

/// What the line says about one request.
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub route: &'static str,
    pub repo: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub us: u64,
    pub peer: SocketAddr,
}

thread_local! {
    /// The line being built, reused by every request on this thread.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// `YYYY-MM-DDTHH:MM:SS` of the last second formatted on this thread.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// Writes (or, when `RUST_LOG` turns it off, skips) the access line.
pub fn emit(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
        return;
    }
    let Some(sink) = access_sink() else {
        via_tracing(line);
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    LINE.with_borrow_mut(|buf| {
        buf.clear();
        format_line(buf, line, now.as_secs(), now.subsec_micros(), sink.json());
        sink.append(buf);
    });
}

/// The line as a `tracing` event, for a process without an installed access output; the
/// reference the direct formatting is tested against.
fn via_tracing(line: &AccessLine<'_>) {
    tracing::info!(
        target: ACCESS_TARGET,
        method = %line.method,
        route = line.route,
        repo = line.repo,
        status = line.status,
        bytes = line.bytes,
        us = line.us,
        peer = %line.peer,
        "request"
    );
}

/// A field's value, by how `tracing` records it.
enum Value<'a> {
    /// Recorded with `%` (Display): written bare in text, as a JSON string.
    Shown(&'a str),
    /// A `&str` field: `Debug`-quoted in text, a JSON string.
    Str(&'a str),
    Num(u64),
    Peer(SocketAddr),
}

/// The whole line, newline included. `secs`/`micros`: the time since the Unix epoch.
fn format_line(buf: &mut Vec<u8>, line: &AccessLine<'_>, secs: u64, micros: u32, json: bool) {
    let fields = [
        ("method", Value::Shown(line.method)),
        ("route", Value::Str(line.route)),
        ("repo", Value::Str(line.repo)),
        ("status", Value::Num(u64::from(line.status))),
        ("bytes", Value::Num(line.bytes)),
        ("us", Value::Num(line.us)),
        ("peer", Value::Peer(line.peer)),
    ];
    if json {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(buf, secs, micros);
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
    } else {
        timestamp(buf, secs, micros);
        buf.extend_from_slice(b"  INFO request");
    }
    for (name, value) in fields {
        if json {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\":");
        } else {
            buf.push(b' ');
            buf.extend_from_slice(name.as_bytes());
            buf.push(b'=');
        }
        match value {
            Value::Num(n) => decimal(buf, n),
            Value::Str(s) if json => json_str(buf, s),
            Value::Str(s) => debug_str(buf, s),
            Value::Shown(s) if json => json_str(buf, s),
            Value::Shown(s) => buf.extend_from_slice(s.as_bytes()),
            Value::Peer(p) if json => {
                buf.push(b'"');
                peer(buf, p);
                buf.push(b'"');
            }
            Value::Peer(p) => peer(buf, p),
        }
    }
    buf.extend_from_slice(if json { b"}}\n" } else { b"\n" });
}

/// Characters both `Debug` and JSON write as they are.
fn is_plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// A string as `{:?}` writes it (what `tracing` does with a `&str` field).
fn debug_str(buf: &mut Vec<u8>, s: &str) {
    if is_plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let mut t = String::new();
        let _ = write!(t, "{s:?}");
        buf.extend_from_slice(t.as_bytes());
    }
}

fn json_str(buf: &mut Vec<u8>, s: &str) {
    if is_plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        buf.extend_from_slice(b"\"\"");
    }
}

fn decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn peer(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                decimal(buf, u64::from(octet));
            }
            buf.push(b':');
            decimal(buf, u64::from(a.port()));
        }
        SocketAddr::V6(a) => {
            let mut t = String::new();
            let _ = write!(t, "{a}");
            buf.extend_from_slice(t.as_bytes());
        }
    }
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` prints it:
/// `2026-11-30T20:06:41.123456Z`. The date and time of day are computed once per second.
fn timestamp(buf: &mut Vec<u8>, secs: u64, micros: u32) {
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *text = date_time(secs);
            *cached = secs;
        }
        buf.extend_from_slice(&text[..]);
    });
    buf.push(b'.');
    let mut frac = [b'0'; 6];
    let mut m = micros.min(999_999);
    for d in frac.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    buf.extend_from_slice(&frac);
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` for a time since the epoch.
fn date_time(secs: u64) -> [u8; 19] {
    let mut out = *b"0000-00-00T00:00:00";
    // `rfc3339` ends in `Z`; computed once per second, so its `format!` does not matter.
    if let Some(text) = crate::auth::token::rfc3339(secs).as_bytes().get(..19) {
        out.copy_from_slice(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn dates_match_the_calendar() {
        let cases = [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_798_761_599, "2026-12-31T23:59:59"),
            (4_107_542_400, "2100-03-01T00:00:00"),
        ];
        for (secs, want) in cases {
            assert_eq!(
                std::str::from_utf8(&date_time(secs)).unwrap(),
                want,
                "{secs}"
            );
        }
        let mut b = Vec::new();
        timestamp(&mut b, 0, 42);
        assert_eq!(b, b"1970-01-01T00:00:00.000042Z");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What the `tracing` subscriber `main` sets up writes for the same event.
    fn from_tracing(line: &AccessLine<'_>, json: bool) -> String {
        let out = Captured::default();
        let w = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_target(false)
            .with_ansi(false)
            .with_writer(move || w.clone());
        let emit = || via_tracing(line);
        if json {
            tracing::subscriber::with_default(builder.json().finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_the_ones_tracing_writes() {
        let peers = ["127.0.0.1:52838", "10.200.3.4:1", "[::1]:8080"];
        let repos = ["local/app", "-", "a\"b\\c", "caf\u{e9}/x\ty"];
        let cases = peers
            .iter()
            .flat_map(|p| repos.iter().map(move |r| (*p, *r)));
        for (peer, repo) in cases {
            let line = AccessLine {
                method: "GET",
                route: "blob",
                repo,
                status: 200,
                bytes: 4096,
                us: 123_456_789,
                peer: peer.parse().unwrap(),
            };
            let mut ours = Vec::new();
            format_line(&mut ours, &line, 1_764_533_201, 7, false);
            let ours = String::from_utf8(ours).unwrap();
            let theirs = from_tracing(&line, false);
            // The timestamps differ (theirs is now); everything after them must not.
            let tail = |s: &str| s.split_once(' ').map(|(_, t)| t.to_string()).unwrap();
            assert_eq!(tail(&ours), tail(&theirs));
            assert!(
                ours.starts_with("2025-11-30T20:06:41.000007Z  INFO"),
                "{ours}"
            );

            let mut ours = Vec::new();
            format_line(&mut ours, &line, 1_764_533_201, 7, true);
            let ours = String::from_utf8(ours).unwrap();
            let theirs = from_tracing(&line, true);
            assert!(ours.ends_with('\n') && theirs.ends_with('\n'));
            // Byte for byte after the timestamp's value (27 characters).
            let at = r#"{"timestamp":""#.len() + 27;
            assert_eq!(&ours[..at], r#"{"timestamp":"2025-11-30T20:06:41.000007Z"#);
            assert_eq!(ours[at..], theirs[at..]);
            serde_json::from_str::<serde_json::Value>(&ours).unwrap();
        }
    }
}
