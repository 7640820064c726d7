//! What the HTTPS cases of the load benchmark need besides wrk: one self-signed certificate
//! for 127.0.0.1 that transship (rustls) and nginx (OpenSSL) both serve, the two servers' TLS
//! settings, h2load for HTTP/2 load, and which protocol and cipher a server negotiated (so the
//! output shows both sides were compared on the same terms).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and its key, as PEM files.
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a self-signed certificate for 127.0.0.1 (ECDSA P-256) into `dir`. The load tools do
/// not verify certificates, so no CA is needed.
pub fn self_signed(dir: &Path) -> Certificate {
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("self-signed certificate");
    let out = Certificate {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
    };
    std::fs::write(&out.cert, issued.cert.pem()).expect("certificate file");
    std::fs::write(&out.key, issued.signing_key.serialize_pem()).expect("key file");
    out
}

/// A transship config file's text: listen on `port` over HTTPS with `tls`, data in `data_dir`;
/// everything else the embedded defaults.
pub fn transship_config(port: u16, data_dir: &Path, tls: &Certificate) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n\n[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        data_dir.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    )
}

/// nginx's `listen` and TLS lines for a server block: HTTP/1.1 and HTTP/2 (ALPN), TLSv1.3
/// only, OpenSSL's defaults otherwise (no kernel TLS, so no sendfile under TLS).
pub fn nginx_listen(port: u16, tls: &Certificate) -> String {
    format!(
        "listen 127.0.0.1:{port} ssl http2;\n    ssl_protocols TLSv1.3;\n    ssl_certificate {};\n    ssl_certificate_key {};",
        tls.cert.display(),
        tls.key.display()
    )
}

/// HTTP/2 requests per second from h2load: `clients` connections, `streams` concurrent
/// streams on each, `seconds` long, after a one-second warm-up. Panics if any request failed
/// or answered other than 2xx.
pub fn h2load(url: &str, clients: u32, streams: u32, seconds: u64, headers: &[&str]) -> f64 {
    let mut cmd = Command::new("h2load");
    cmd.args([
        "-t",
        &clients.min(2).to_string(),
        "-c",
        &clients.to_string(),
        "-m",
        &streams.to_string(),
        "-D",
        &seconds.to_string(),
        "--warm-up-time",
        "1",
    ]);
    let text = super::load_tool_output(cmd, headers, url, "nghttp2-client");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("h2load printed no {prefix:?} line for {url}:\n{text}"))
            .to_string()
    };
    // "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, ..."
    let requests = line("requests:");
    let status = line("status codes:");
    assert!(
        requests.contains(" 0 failed") && requests.contains(" 0 errored"),
        "h2load saw failures against {url}:\n{text}"
    );
    assert!(
        status.contains(" 0 3xx, 0 4xx, 0 5xx"),
        "h2load saw non-2xx answers from {url}:\n{text}"
    );
    // "finished in 5.00s, 40385.60 req/s, 162.74MB/s"
    let finished = line("finished in");
    finished
        .split(", ")
        .find_map(|f| f.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("h2load's rate for {url}: {finished}"))
}

/// The protocol version and cipher `url`'s server negotiates with curl (OpenSSL), e.g.
/// "TLSv1.3 / TLS_AES_256_GCM_SHA384".
pub fn negotiated(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-v", "--http1.1", "-o", "/dev/null"])
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split_once("SSL connection using ").map(|(_, v)| v.trim()))
        .unwrap_or("unknown")
        .to_string()
}
