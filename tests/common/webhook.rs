//! A webhook receiver for notification tests: a small hyper server on a fixed loopback port
//! that records what it gets, can be down (not listening) and can fail or refuse requests.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// One request the receiver got.
#[derive(Clone)]
pub struct Got {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub accepted: bool,
}

#[derive(Default)]
pub struct ReceiverState {
    pub got: Mutex<Vec<Got>>,
    /// Answer 500 to this many more requests.
    pub fail_next: AtomicUsize,
    /// Answer 500 to everything.
    pub fail_all: AtomicBool,
    /// Answer this status (a refusal) instead of 500 when failing; 0 for 500.
    pub fail_with: std::sync::atomic::AtomicU16,
}

/// A webhook receiver on a fixed loopback port that can be down (not listening).
pub struct Receiver {
    pub port: u16,
    pub state: Arc<ReceiverState>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    /// A receiver that is down until `up`.
    pub fn down() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        Self {
            port,
            state: Arc::default(),
            rt: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn up(&mut self) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", self.port)))
            .expect("receiver binds its port");
        let state = self.state.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(record(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self.rt = Some(rt);
    }

    /// Stops listening (a receiver that went down); `up` starts it again on the same port,
    /// keeping what it got.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Requests the receiver accepted (answered 200) at `path`.
    pub fn accepted(&self, path: &str) -> Vec<Got> {
        self.state
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.accepted && g.path == path)
            .cloned()
            .collect()
    }

    pub fn refused(&self) -> usize {
        self.state
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| !g.accepted)
            .count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn record(
    state: &ReceiverState,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let fail = state.fail_all.load(Ordering::SeqCst)
        || state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    state.got.lock().unwrap().push(Got {
        path: parts.uri.path().to_string(),
        headers: parts.headers,
        body,
        accepted: !fail,
    });
    let status = match state.fail_with.load(Ordering::SeqCst) {
        _ if !fail => 200,
        0 => 500,
        refusal => refusal,
    };
    http::Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Waits (up to a generous bound, for a liveness failure to show) until `done` holds.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
