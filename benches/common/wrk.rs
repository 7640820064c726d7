//! wrk, the HTTP/1.1 load generator the benchmarks drive: one run against a URL, its
//! requests and bytes per second and its p99 latency parsed from the report.

use std::process::Command;

#[derive(Debug, Default, Clone, Copy)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    /// The 99th percentile of request latency, in milliseconds.
    pub p99_ms: f64,
}

fn parse_size(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    n * match unit {
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    }
}

pub fn wrk(url: &str, connections: u32, seconds: u64, headers: &[&str]) -> WrkResult {
    let threads = connections.min(2);
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        &threads.to_string(),
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--timeout",
        "30s",
        "--latency",
    ]);
    let text = load_tool_output(cmd, headers, url, "wrk");
    let field = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_string)
    };
    let non2xx = text.lines().any(|l| l.contains("Non-2xx"));
    assert!(!non2xx, "wrk saw errors against {url}:\n{text}");
    WrkResult {
        requests_per_sec: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        bytes_per_sec: field("Transfer/sec:")
            .map(|v| parse_size(&v))
            .unwrap_or(0.0),
        p99_ms: field("99%").map_or(f64::NAN, |v| parse_ms(&v)),
    }
}

/// Runs a load generator (`cmd`, its options set) with `headers` against `url`; its output.
pub fn load_tool_output(mut cmd: Command, headers: &[&str], url: &str, package: &str) -> String {
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run ./scripts/bench, which installs {package})"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A wrk latency ("635.91us", "1.20ms", "2.00s") in milliseconds.
fn parse_ms(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    n * match unit {
        "us" => 0.001,
        "s" => 1000.0,
        "m" => 60_000.0,
        _ => 1.0,
    }
}
