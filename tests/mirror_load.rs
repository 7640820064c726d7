//! The cold-miss path under load and under a crash: 50 clients asking for the same uncached
//! 256 MiB blob at once cause exactly one upstream download and all receive the verified
//! bytes; `kill -9` in the middle of a fill never leaves anything corrupt to serve.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::upstream::{self, Distribution};
use common::*;
use http_body_util::BodyExt;
use sha2::Digest as _;

const LARGE: usize = 256 << 20;

/// GETs `url` and returns (status, body length, sha256 of the body, X-Cache), hashing as the
/// body streams so 50 concurrent 256 MiB downloads stay within bounded memory.
async fn hashed_get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
    url: String,
) -> (u16, u64, String, String) {
    let resp = client
        .get(url.parse().expect("url"))
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = resp.into_body();
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    (
        status,
        len,
        format!("sha256:{}", hex::encode(hasher.finalize())),
        cache,
    )
}

#[test]
fn fifty_concurrent_clients_cause_one_upstream_download() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let layer = random_bytes(LARGE, 50);
    let digest = Http::new(&up.url()).push_blob("library/big", &layer);
    drop(layer);
    let url = up.url();
    let s = TestServer::start_with(move |mut c| {
        c.upstreams[0].url = url;
        c
    });
    let blob_url = s.url(&format!("/v2/library/big/blobs/{digest}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let tasks: Vec<_> = (0..50)
            .map(|_| tokio::spawn(hashed_get_owned(client.clone(), blob_url.clone())))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    for (i, (status, len, got, _)) in results.iter().enumerate() {
        assert_eq!((*status, *len), (200, LARGE as u64), "client {i}");
        assert_eq!(*got, digest, "client {i} received different bytes");
    }
    let outcomes: Vec<&str> = results.iter().map(|r| r.3.as_str()).collect();
    assert!(
        outcomes.contains(&"MISS"),
        "one client started the fill: {outcomes:?}"
    );
    assert_eq!(
        up.count("GET", &format!("/v2/library/big/blobs/{digest}")),
        1,
        "exactly one upstream download"
    );
    let coalesced = outcomes.iter().filter(|o| **o == "COALESCED").count();
    eprintln!(
        "50 clients: 1 upstream GET; outcomes: {} MISS, {coalesced} COALESCED, {} HIT",
        outcomes.iter().filter(|o| **o == "MISS").count(),
        outcomes.iter().filter(|o| **o == "HIT").count()
    );
    assert!(s.app.fsck(false).unwrap().is_clean());
}

async fn hashed_get_owned(
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
    url: String,
) -> (u16, u64, String, String) {
    hashed_get(&client, url).await
}

#[test]
fn kill_dash_nine_mid_fill_never_leaves_a_corrupt_blob() {
    if !upstream::available() {
        return;
    }
    let up = Distribution::start();
    let layer = random_bytes(LARGE, 51);
    let digest = Http::new(&up.url()).push_blob("library/crashy", &layer);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.toml");
    let text = transship::config::EMBEDDED_DEFAULT
        .replace(
            "url = \"https://registry-1.docker.io\"",
            &format!("url = {:?}", up.url()),
        )
        .replace(
            "data_dir = \"./transship-data\"",
            &format!(
                "data_dir = {:?}",
                dir.path().join("data").display().to_string()
            ),
        );
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("log");
    let path = format!("/v2/library/crashy/blobs/{digest}");

    for round in 0..3 {
        let server = BinaryServer::start(&config, &log);
        // Start a pull, read a little of it, then kill the server while the fill runs.
        let mut conn = std::net::TcpStream::connect(server.addr).unwrap();
        use std::io::{Read, Write};
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let _ = conn.read(&mut buf);
        std::thread::sleep(Duration::from_millis(20 * round));
        server.kill9();
        drop(conn);

        // Nothing corrupt is served after a restart: the blob is either refetched and
        // verified, or was committed whole before the kill.
        let server = BinaryServer::start(&config, &log);
        let h = Http::new(&server.url(""));
        let r = h.get(&path);
        assert_eq!(r.status, 200, "round {round}");
        assert!(
            r.body.len() == LARGE && r.body == layer,
            "round {round}: bytes differ after a crash mid-fill"
        );
        assert!(server.terminate().success());
        let fsck = std::process::Command::new(binary())
            .args(["fsck", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        // Start the next round cold again.
        std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    }
}
