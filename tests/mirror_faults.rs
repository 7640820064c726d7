//! The pull-through cache against a fault-injecting upstream: `Injector`, a small hyper server
//! in this file that answers each path the way a test scripts it (`Behavior`) and records every
//! request that reaches it (method, path, query, `Authorization`, `Range`), so tests assert
//! exactly what transship sent upstream. Covered:
//! - Bearer token dance: one token per scope, reused; configured credentials go to the token
//!   realm only; anonymous tokens carry none; a Basic challenge uses the configured account;
//!   the client's own `Authorization` header never reaches the upstream.
//! - A redirect to another host (a CDN that refuses any `Authorization`): followed without the
//!   token, the blob arrives intact and is cached. An endless redirect loop ends in a clean
//!   503 after a bounded number of requests.
//! - Blob bodies cut off mid-way: resumed with `Range: bytes=N-` (once and repeatedly), given up
//!   after three resumes, and failed (never silently short) when the upstream ignores Range;
//!   nothing is cached from a failed fill and a later request fetches again. Resumes of a
//!   body from a CDN go through the registry's redirect again. A client that hangs up does
//!   not stop the fill.
//! - Blobs that do not match their digest (a flipped byte, a wrong `Docker-Content-Digest`): no
//!   client gets a complete body, nothing is committed, the mismatch is counted, correct bytes
//!   are cached afterwards. Coalesced readers share one upstream GET and one outcome.
//! - 429 (with rate-limit headers) and 5xx on manifests: a cached tag is served STALE, else a
//!   clean 503 UNAVAILABLE; 429/500 are not retried, a transient 503 is.
//! - Manifests that are not what was asked for: an HTML error page with 200, a wrong digest, a
//!   body over the 4,393,216-byte limit (and one exactly at it, accepted).
//! - 401 insufficient_scope after the token dance: 404 to the client, no `WWW-Authenticate`
//!   relayed.
//! - Token responses with `expires_in` of 2^64-1, 0, negative or fractional neither panic nor
//!   hang anything; an oversized token response is a clean 503.
//! - A fill in flight reaches only routes whose upstream has the blob in their repository (a
//!   private upstream's fill is never served to an anonymous route); confirmed routes join.
//! - Chunked upstream bodies (no `Content-Length`, with or without one on HEAD) are filled and
//!   verified; corrupt or dropped ones are never complete. `max_concurrent_fills` queues.
//! - Redirects to other schemes and non-public addresses are refused; credentials never go
//!   to a plain-http realm elsewhere; client-facing errors carry no connection details or
//!   signed URLs.
//! - The bar: an upstream that lies in every way at once never poisons the cache nor hangs a
//!   later request, and cached content keeps being served.

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use transship::config::{HumanDuration, UpstreamConfig};
use transship::proxy::fill::FillState;
use transship::proxy::tail::Piece;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The only token the injector accepts.
const TOKEN: &str = "injected-token-7f3a";
/// What clients send to transship (`user:pass`); it must never reach the upstream.
const CLIENT_BASIC: &str = "Basic dXNlcjpwYXNz";
/// transship's limit for upstream manifests.
const MAX_MANIFEST: usize = 4 * 1048 * 1048;
const UPSTREAM: &str = "docker.io";

type Body = UnsyncBoxBody<Bytes, io::Error>;

// ---------------------------------------------------------------------------------------------
// The fault injector
// ---------------------------------------------------------------------------------------------

/// One request as it reached the injector.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    authorization: Option<String>,
    range: Option<String>,
}

/// How `/v2/` requests are authenticated.
#[derive(Debug, Clone, Default)]
enum Auth {
    #[default]
    Open,
    /// `Bearer` tokens from `/token`, which wants these Basic credentials if given. Repositories
    /// in `deny` answer 401 `insufficient_scope` even with a valid token.
    Bearer {
        credentials: Option<(String, String)>,
        deny: Vec<String>,
    },
    /// A `Basic` challenge; only these credentials pass.
    Basic { user: String, pass: String },
}

/// A gate a response body waits at until the test opens it.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }
    fn open(&self) {
        self.0.close();
    }
    async fn wait(&self) {
        let _ = self.0.acquire().await;
    }
}

/// How the injector answers one path.
#[derive(Clone)]
enum Behavior {
    /// 200 with `body` (HEAD: headers only); `Range: bytes=N-` gets 206 with the rest.
    Serve {
        body: Bytes,
        content_type: &'static str,
        digest: Option<String>,
    },
    /// Announces the whole (remaining) body but sends at most `cut` bytes per response, then
    /// drops the connection. A Range request gets 206 from its offset if `ranges`, else 200
    /// from byte 0 (an upstream that ignores Range).
    Truncate {
        body: Bytes,
        cut: usize,
        ranges: bool,
    },
    /// 200; sends the first `at` bytes, then the rest once `gate` opens.
    Held { body: Bytes, at: usize, gate: Gate },
    /// This status, headers and body.
    Status {
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: &'static str,
    },
    /// 307 to this location.
    Redirect(String),
    /// 200 without `Content-Length` (a chunked body, HEAD without a length either); with `cut`,
    /// the connection drops after that many bytes. Range is ignored.
    Chunked { body: Bytes, cut: Option<usize> },
    /// HEAD and GET answered differently.
    ByMethod {
        head: Box<Behavior>,
        get: Box<Behavior>,
    },
    /// One behavior per request, in order; the last one repeats.
    Sequence(Vec<Behavior>),
}

impl Behavior {
    fn blob(body: impl Into<Bytes>) -> Self {
        Self::Serve {
            body: body.into(),
            content_type: "application/octet-stream",
            digest: None,
        }
    }

    /// An OCI manifest, announced with its true digest.
    fn manifest(body: impl Into<Bytes>) -> Self {
        let body = body.into();
        Self::Serve {
            digest: Some(sha256(&body)),
            body,
            content_type: OCI_MANIFEST,
        }
    }

    fn status(status: u16) -> Self {
        Self::Status {
            status,
            headers: vec![("content-type", "application/json")],
            body: r#"{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}"#,
        }
    }

    /// The behavior for the next request (advances a `Sequence`).
    fn take(&mut self) -> Behavior {
        match self {
            Self::Sequence(v) if v.len() > 1 => v.remove(0),
            Self::Sequence(v) => v[0].clone(),
            other => other.clone(),
        }
    }
}

#[derive(Default)]
struct State {
    base: String,
    auth: Auth,
    /// Where challenges send clients for a token (default: this injector's `/token`).
    realm: Option<String>,
    /// The token endpoint's `expires_in` (JSON text; default 300).
    token_expires_in: Option<String>,
    /// Bytes of padding in token responses.
    token_padding: usize,
    refuse_authorization: bool,
    routes: HashMap<String, Behavior>,
    seen: Vec<Seen>,
}

/// The fault-injecting upstream: its own thread and runtime on 127.0.0.1:0, stopped on drop.
struct Injector {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Injector {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind injector");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("injector address");
        let state = Arc::new(Mutex::new(State {
            base: format!("http://{addr}"),
            ..State::default()
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("injector runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            if let Ok((tcp, _)) = accepted {
                                tokio::spawn(connection(tcp, st.clone()));
                            }
                        }
                    }
                }
            });
            // Dropping the runtime drops every open connection.
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, path: &str, behavior: Behavior) {
        self.lock().routes.insert(path.to_string(), behavior);
    }

    fn set_auth(&self, auth: Auth) {
        self.lock().auth = auth;
    }

    fn set_realm(&self, realm: &str) {
        self.lock().realm = Some(realm.to_string());
    }

    /// Token responses say `"expires_in": <json>` and carry `padding` extra bytes.
    fn set_token(&self, expires_in: &str, padding: usize) {
        let mut st = self.lock();
        st.token_expires_in = Some(expires_in.to_string());
        st.token_padding = padding;
    }

    /// Answer 403 to any request that carries `Authorization` (like a CDN with signed URLs).
    fn refuse_authorization(&self) {
        self.lock().refuse_authorization = true;
    }

    /// An image's manifest by tag and by digest, and its blobs, under `repo`.
    fn serve_image(&self, repo: &str, tag: &str, img: &Image) {
        self.set(
            &manifest_path(repo, tag),
            Behavior::manifest(img.manifest.clone()),
        );
        self.set(
            &manifest_path(repo, &img.digest),
            Behavior::manifest(img.manifest.clone()),
        );
        self.set(
            &blob_path(repo, &img.config_digest),
            Behavior::blob(img.config.clone()),
        );
        self.set(
            &blob_path(repo, &img.layer_digest),
            Behavior::blob(img.layer.clone()),
        );
    }

    fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Requests for `path`, in order.
    fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.requests(path)
            .iter()
            .filter(|s| s.method == method)
            .count()
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection's socket, announcing every completed flush: hyper flushes only once its
/// write buffer is empty, so a body that waits for the next flush knows its bytes are out.
struct FlushSignal {
    inner: tokio::net::TcpStream,
    flushed: watch::Sender<u64>,
}

impl AsyncRead for FlushSignal {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlushSignal {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        this.flushed.send_modify(|n| *n += 1);
        Poll::Ready(result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn connection(tcp: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let (tx, rx) = watch::channel(0u64);
    let io = TokioIo::new(FlushSignal {
        inner: tcp,
        flushed: tx,
    });
    let service = hyper::service::service_fn(move |req| handle(state.clone(), req, rx.clone()));
    // Errors are the point of some behaviors (a dropped body); the connection just ends.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
    flushed: watch::Receiver<u64>,
) -> Result<Response<Body>, Infallible> {
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let seen = Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or_default().to_string(),
        authorization: header(header::AUTHORIZATION),
        range: header(header::RANGE),
    };
    let (auth, refuse_authorization, behavior, realm, expires_in, padding) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.seen.push(seen.clone());
        let behavior = st.routes.get_mut(&seen.path).map(Behavior::take);
        (
            st.auth.clone(),
            st.refuse_authorization,
            behavior,
            st.realm.clone().unwrap_or(format!("{}/token", st.base)),
            st.token_expires_in.clone().unwrap_or("300".into()),
            st.token_padding,
        )
    };
    if refuse_authorization && seen.authorization.is_some() {
        return Ok(full(403, &[], "Authorization is not accepted here"));
    }
    if seen.path == "/token" {
        return Ok(token(&auth, &seen, &expires_in, padding));
    }
    if let Some(denied) = challenge(&auth, &seen, &realm) {
        return Ok(denied);
    }
    let head = seen.method == "HEAD";
    Ok(match behavior {
        Some(b) => respond(b, head, seen.range.as_deref(), flushed),
        None => full(
            404,
            &[("content-type", "application/json")],
            r#"{"errors":[{"code":"NOT_FOUND","message":"not scripted"}]}"#,
        ),
    })
}

fn basic(user: &str, pass: &str) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {enc}")
}

/// The repository of a `/v2/<repo>/(manifests|blobs)/...` path.
fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let end = rest
        .rfind("/manifests/")
        .or_else(|| rest.rfind("/blobs/"))?;
    Some(&rest[..end])
}

/// The 401 a `/v2/` request gets, if it is not authorized.
fn challenge(auth: &Auth, seen: &Seen, realm: &str) -> Option<Response<Body>> {
    let repo = repo_of(&seen.path)?;
    let unauthorized = |challenge: String| {
        let mut r = full(
            401,
            &[("content-type", "application/json")],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            challenge.parse().expect("challenge header"),
        );
        r
    };
    match auth {
        Auth::Open => None,
        Auth::Basic { user, pass } => (seen.authorization.as_deref()
            != Some(basic(user, pass).as_str()))
        .then(|| unauthorized(r#"Basic realm="injector""#.to_string())),
        Auth::Bearer { deny, .. } => {
            let valid = seen.authorization.as_deref() == Some(format!("Bearer {TOKEN}").as_str());
            if valid && !deny.iter().any(|d| d == repo) {
                return None;
            }
            let mut c =
                format!(r#"Bearer realm="{realm}",service="test",scope="repository:{repo}:pull""#);
            if valid {
                c.push_str(r#",error="insufficient_scope""#);
            }
            Some(unauthorized(c))
        }
    }
}

/// The token endpoint.
fn token(auth: &Auth, seen: &Seen, expires_in: &str, padding: usize) -> Response<Body> {
    let Auth::Bearer { credentials, .. } = auth else {
        return full(404, &[], "no token endpoint");
    };
    if let Some((user, pass)) = credentials
        && seen.authorization.as_deref() != Some(basic(user, pass).as_str())
    {
        return full(401, &[], r#"{"details":"incorrect username or password"}"#);
    }
    full(
        200,
        &[("content-type", "application/json")],
        format!(
            r#"{{"token":"{TOKEN}","expires_in":{expires_in},"pad":"{}"}}"#,
            "x".repeat(padding)
        ),
    )
}

fn full(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    for (k, v) in headers {
        r.headers_mut().append(
            header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    r
}

/// What a streamed body does next.
enum Step {
    Data(Bytes),
    /// Wait until everything sent so far is out on the socket.
    AwaitFlush,
    AwaitGate(Gate),
    /// Fail the body: hyper drops the connection.
    Abort,
}

fn stepped(steps: Vec<Step>, flushed: watch::Receiver<u64>) -> Body {
    let stream = futures_util::stream::unfold(
        (VecDeque::from(steps), flushed),
        |(mut steps, mut flushed)| async move {
            loop {
                let item = match steps.pop_front()? {
                    Step::Data(b) => Ok(Frame::data(b)),
                    Step::Abort => Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "injected: connection dropped mid-body",
                    )),
                    Step::AwaitFlush => {
                        // Polled only after the previous chunk was queued: the next flush is
                        // the one that writes it.
                        flushed.borrow_and_update();
                        let _ = flushed.changed().await;
                        continue;
                    }
                    Step::AwaitGate(g) => {
                        g.wait().await;
                        continue;
                    }
                };
                return Some((item, (steps, flushed)));
            }
        },
    );
    StreamBody::new(stream).boxed_unsync()
}

/// The offset of a `bytes=N-` range.
fn range_start(range: Option<&str>) -> Option<usize> {
    range?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

/// A response whose body is `body[start..]` (206 if `start > 0`), produced by `steps`.
fn streamed(
    body: &Bytes,
    start: usize,
    extra: &[(&str, &str)],
    steps: Vec<Step>,
    flushed: watch::Receiver<u64>,
) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(stepped(steps, flushed));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, (len - start).into());
    if start > 0 {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        r.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1)
                .parse()
                .expect("content-range"),
        );
    }
    for (k, v) in extra {
        r.headers_mut().insert(
            header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    r
}

fn respond(
    behavior: Behavior,
    head: bool,
    range: Option<&str>,
    flushed: watch::Receiver<u64>,
) -> Response<Body> {
    match behavior {
        Behavior::Serve {
            body,
            content_type,
            digest,
        } => {
            let start = range_start(range).filter(|&s| s < body.len()).unwrap_or(0);
            let mut extra = vec![("content-type", content_type)];
            if let Some(d) = &digest {
                extra.push(("docker-content-digest", d.as_str()));
            }
            let steps = if head {
                vec![]
            } else {
                vec![Step::Data(body.slice(start..))]
            };
            streamed(&body, start, &extra, steps, flushed)
        }
        Behavior::Truncate { body, cut, ranges } => {
            let start = if ranges {
                range_start(range).filter(|&s| s < body.len()).unwrap_or(0)
            } else {
                0
            };
            let end = (start + cut).min(body.len());
            let mut steps = vec![Step::Data(body.slice(start..end))];
            if end < body.len() {
                steps.extend([Step::AwaitFlush, Step::Abort]);
            }
            let extra = [("content-type", "application/octet-stream")];
            streamed(&body, start, &extra, steps, flushed)
        }
        Behavior::Held { body, at, gate } => {
            let steps = vec![
                Step::Data(body.slice(..at)),
                Step::AwaitGate(gate),
                Step::Data(body.slice(at..)),
            ];
            let extra = [("content-type", "application/octet-stream")];
            streamed(&body, 0, &extra, steps, flushed)
        }
        Behavior::Status {
            status,
            headers,
            body,
        } => full(status, &headers, body),
        Behavior::Redirect(location) => full(307, &[("location", location.as_str())], ""),
        Behavior::Chunked { body, cut } => {
            let steps = match (head, cut) {
                (true, _) => vec![],
                (false, None) => {
                    let half = body.len() / 2;
                    vec![
                        Step::Data(body.slice(..half)),
                        Step::AwaitFlush,
                        Step::Data(body.slice(half..)),
                    ]
                }
                (false, Some(cut)) => vec![
                    Step::Data(body.slice(..cut.min(body.len()))),
                    Step::AwaitFlush,
                    Step::Abort,
                ],
            };
            let mut r = Response::new(stepped(steps, flushed));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/octet-stream".parse().expect("content-type"),
            );
            r
        }
        Behavior::ByMethod { head: h, get } => {
            respond(if head { *h } else { *get }, head, range, flushed)
        }
        Behavior::Sequence(_) => unreachable!("Behavior::take resolves sequences"),
    }
}

// ---------------------------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------------------------

/// An image: config and one layer, and its OCI manifest.
struct Image {
    manifest: Bytes,
    digest: String,
    config: Bytes,
    config_digest: String,
    layer: Bytes,
    layer_digest: String,
}

fn image(seed: u64, layer_len: usize) -> Image {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#
    ));
    let layer = Bytes::from(random_bytes(layer_len, seed));
    let (config_digest, layer_digest) = (sha256(&config), sha256(&layer));
    let manifest = image_manifest(
        (&config_digest, config.len()),
        &[(&layer_digest, layer.len())],
    );
    Image {
        digest: sha256(manifest.as_bytes()),
        manifest: Bytes::from(manifest),
        config,
        config_digest,
        layer,
        layer_digest,
    }
}

/// A valid OCI manifest of exactly `len` bytes (padded with an annotation).
fn padded_manifest(len: usize) -> Bytes {
    let base = image_manifest((&sha256(b"{}"), 2), &[]);
    let head = format!(r#"{},"annotations":{{"pad":""#, &base[..base.len() - 1]);
    let tail = r#""}}"#;
    let pad = len - head.len() - tail.len();
    let m = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(m.len(), len);
    Bytes::from(m)
}

fn manifest_path(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// transship mirroring `up` as the default upstream (docker.io), tag_ttl 1h unless adjusted.
fn mirror(up: &Injector, adjust: impl FnOnce(&mut UpstreamConfig)) -> TestServer {
    let url = up.url();
    TestServer::start_with(move |mut c| {
        let u = &mut c.upstreams[0];
        u.url = url;
        u.tag_ttl = HumanDuration(Duration::from_secs(3600));
        adjust(u);
        c
    })
}

fn tag_ttl_zero(u: &mut UpstreamConfig) {
    u.tag_ttl = HumanDuration(Duration::ZERO);
}

fn get_manifest(h: &Http, repo: &str, reference: &str) -> Resp {
    h.send(
        "GET",
        &manifest_path(repo, reference),
        &[("accept", OCI_MANIFEST)],
        Bytes::new(),
    )
}

/// A GET whose body may break off: headers, and the body or why reading it failed. Status 0:
/// the connection closed before any response headers.
struct Pulled {
    status: u16,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Pulled {
    fn x_cache(&self) -> Option<&str> {
        self.headers.get("x-cache").and_then(|v| v.to_str().ok())
    }
}

fn pull(url: &str) -> Pulled {
    pull_signalling(url, None)
}

/// Longest a test waits for a whole response: a hang fails the test instead of blocking it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// `pull`, telling `headers` when the response headers have arrived.
fn pull_signalling(url: &str, headers: Option<std::sync::mpsc::Sender<()>>) -> Pulled {
    request("GET", url, &[], headers)
}

/// One request with a deadline (`CLIENT_TIMEOUT`): panics if it hangs.
fn request(
    method: &str,
    url: &str,
    with: &[(&str, &str)],
    headers: Option<std::sync::mpsc::Sender<()>>,
) -> Pulled {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exchange = async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in with {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::default()).expect("request");
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Pulled {
                    status: 0,
                    headers: HeaderMap::new(),
                    body: Err(format!("no response headers: {e:?}")),
                };
            }
        };
        if let Some(tx) = headers {
            let _ = tx.send(());
        }
        let (parts, body) = resp.into_parts();
        Pulled {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| format!("{e:?}")),
        }
    };
    rt.block_on(async {
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {url} hung for {CLIENT_TIMEOUT:?}"))
    })
}

/// A GET that hangs up as soon as the response headers arrive; returns the status.
fn hang_up_after_headers(url: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::get(url).body(Full::default()).expect("request");
        let resp = client.request(req).await.expect("response headers");
        resp.status().as_u16()
    })
}

/// A failed fill reached the client as a failure, never as a complete 200: the stream broke
/// off (mid-body of a 200 or a Range's 206, or before any headers if the fill failed just as
/// the response started), or, when the fill failed before the response started, a 503
/// registry error.
fn assert_broken(p: &Pulled, what: &str) {
    match &p.body {
        Err(_) => assert!(
            matches!(p.status, 0 | 200 | 206),
            "{what}: status {}",
            p.status
        ),
        Ok(b) => assert!(
            p.status == 503 && String::from_utf8_lossy(b).contains("UNAVAILABLE"),
            "{what}: the client received a complete response of {} bytes with status {}",
            b.len(),
            p.status
        ),
    }
}

fn assert_unavailable(r: &Resp, what: &str) {
    assert_eq!(
        (r.status, r.error_code()),
        (503, "UNAVAILABLE".to_string()),
        "{what}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
}

fn repo_name(repo: &str) -> transship::oci::RepoName {
    format!("{UPSTREAM}/{repo}").parse().expect("repo name")
}

/// The size of a blob cached for `repo`, if any.
fn cached_blob(s: &TestServer, repo: &str, digest: &str) -> Option<u64> {
    s.app
        .store
        .blob_size(&repo_name(repo), &digest.parse().expect("digest"))
        .expect("blob_size")
}

fn cached_tag(s: &TestServer, repo: &str, tag: &str) -> Option<String> {
    s.app
        .store
        .cached_tag(&repo_name(repo), &tag.parse().expect("tag"))
        .expect("cached_tag")
        .map(|(d, _)| d.to_string())
}

fn cached_manifest(s: &TestServer, repo: &str, digest: &str) -> bool {
    s.app
        .store
        .manifest(&repo_name(repo), &digest.parse().expect("digest"))
        .expect("manifest")
        .is_some()
}

/// Nothing of `digest` is on disk: no committed blob file, no fill spool left behind.
fn assert_nothing_stored(s: &TestServer, repo: &str, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let files = blob_files(s.data_dir());
    assert!(
        !files
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == hex)),
        "{digest} was committed: {files:?}"
    );
    assert_eq!(cached_blob(s, repo, digest), None, "{digest} is indexed");
    let spools: Vec<_> = std::fs::read_dir(s.data_dir().join("ingest"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("fill-"))
        .collect();
    assert!(spools.is_empty(), "fill spools left behind: {spools:?}");
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until no fill is in flight (a failed fill leaves the table just after its readers
/// learn of the failure).
fn wait_fills_done(s: &TestServer) {
    wait_until("no fill is in flight", || {
        s.app.proxy.fills.in_flight() == 0
    });
}

/// The value of one series (`name{labels}`) on `/metrics`.
fn metric(h: &Http, series: &str) -> Option<f64> {
    let text = String::from_utf8(h.get("/metrics").body.to_vec()).expect("metrics text");
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

const MISMATCHES: &str = r#"transship_upstream_digest_mismatches_total{upstream="docker.io"}"#;

fn query_pairs(q: &str) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[test]
fn bearer_token_is_fetched_once_per_scope_and_credentials_go_only_to_the_realm() {
    let up = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: Some(("robot".into(), "s3cret".into())),
        deny: vec![],
    });
    let x = image(1, 20_000);
    let y = image(2, 10_000);
    up.serve_image("library/x", "v1", &x);
    up.serve_image("library/y", "v1", &y);
    let s = mirror(&up, |u| {
        u.username = Some("robot".into());
        u.password = Some("s3cret".into());
    });
    let h = Http::for_server(&s);
    let client = [("authorization", CLIENT_BASIC), ("accept", OCI_MANIFEST)];

    let r = h.send(
        "GET",
        &manifest_path("library/x", "v1"),
        &client,
        Bytes::new(),
    );
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert_eq!(r.body, x.manifest);
    for (digest, body) in [(&x.config_digest, &x.config), (&x.layer_digest, &x.layer)] {
        let r = h.send(
            "GET",
            &blob_path("library/x", digest),
            &client,
            Bytes::new(),
        );
        assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
        assert_eq!(&r.body, body);
    }

    let tokens = up.requests("/token");
    assert_eq!(
        tokens.len(),
        1,
        "one token for the scope, reused for HEAD, GET and both blobs: {:#?}",
        up.seen()
    );
    assert_eq!(
        tokens[0].authorization.as_deref(),
        Some(basic("robot", "s3cret").as_str()),
        "the configured account authenticates at the realm"
    );
    let q = query_pairs(&tokens[0].query);
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("repository:library/x:pull")
    );
    assert_eq!(q.get("service").map(String::as_str), Some("test"));

    // Another repository is another scope: one more token.
    let r = h.send(
        "GET",
        &manifest_path("library/y", "v1"),
        &client,
        Bytes::new(),
    );
    assert_eq!((r.status, &r.body), (200, &y.manifest));
    let tokens = up.requests("/token");
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        query_pairs(&tokens[1].query)
            .get("scope")
            .map(String::as_str),
        Some("repository:library/y:pull")
    );

    let bearer = format!("Bearer {TOKEN}");
    let seen = up.seen();
    for req in seen.iter().filter(|r| r.path != "/token") {
        assert!(
            req.authorization.is_none() || req.authorization.as_deref() == Some(&bearer),
            "only the token may go to /v2/: {req:?}"
        );
    }
    assert!(
        !seen
            .iter()
            .any(|r| r.authorization.as_deref() == Some(CLIENT_BASIC)),
        "the client's Authorization reached the upstream: {seen:#?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|r| r.path.starts_with("/v2/") && r.authorization.is_none())
            .count(),
        2,
        "one challenge per scope, then the cached token: {seen:#?}"
    );
}

#[test]
fn anonymous_tokens_are_requested_without_credentials() {
    let up = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    let x = image(3, 5_000);
    up.serve_image("library/x", "v1", &x);
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);
    let client = [("authorization", CLIENT_BASIC), ("accept", OCI_MANIFEST)];
    for _ in 0..2 {
        let r = h.send(
            "GET",
            &blob_path("library/x", &x.layer_digest),
            &client,
            Bytes::new(),
        );
        assert_eq!((r.status, &r.body), (200, &x.layer));
    }
    let r = h.send(
        "GET",
        &manifest_path("library/x", "v1"),
        &client,
        Bytes::new(),
    );
    assert_eq!((r.status, &r.body), (200, &x.manifest));
    let tokens = up.requests("/token");
    assert_eq!(tokens.len(), 1, "{:#?}", up.seen());
    assert_eq!(tokens[0].authorization, None, "anonymous token request");
    let bearer = format!("Bearer {TOKEN}");
    for req in up.seen().iter().filter(|r| r.path != "/token") {
        assert!(
            req.authorization.is_none() || req.authorization.as_deref() == Some(&bearer),
            "{req:?}"
        );
    }
}

#[test]
fn basic_challenge_is_answered_with_the_configured_account_only() {
    let up = Injector::start();
    up.set_auth(Auth::Basic {
        user: "robot".into(),
        pass: "s3cret".into(),
    });
    let x = image(4, 5_000);
    up.serve_image("library/x", "v1", &x);
    let s = mirror(&up, |u| {
        u.username = Some("robot".into());
        u.password = Some("s3cret".into());
    });
    let h = Http::for_server(&s);
    let client = [("authorization", CLIENT_BASIC), ("accept", OCI_MANIFEST)];
    let r = h.send(
        "GET",
        &manifest_path("library/x", "v1"),
        &client,
        Bytes::new(),
    );
    assert_eq!((r.status, &r.body), (200, &x.manifest));
    let r = h.send(
        "GET",
        &blob_path("library/x", &x.layer_digest),
        &client,
        Bytes::new(),
    );
    assert_eq!((r.status, &r.body), (200, &x.layer));
    let account = basic("robot", "s3cret");
    let seen = up.seen();
    assert!(
        seen.iter()
            .any(|r| r.authorization.as_deref() == Some(&account))
    );
    for req in &seen {
        assert!(
            req.authorization.is_none() || req.authorization.as_deref() == Some(&account),
            "{req:?}"
        );
    }
    assert!(up.requests("/token").is_empty());
}

#[test]
fn insufficient_scope_for_a_missing_repository_is_a_404_without_the_challenge() {
    let up = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec!["library/ghost".into()],
    });
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    let r = get_manifest(&h, "library/ghost", "v1");
    assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        ["MANIFEST_UNKNOWN", "NAME_UNKNOWN"].contains(&r.error_code().as_str()),
        "{}",
        r.error_code()
    );
    assert_eq!(
        r.header("www-authenticate"),
        None,
        "the upstream's challenge is relayed"
    );
    let d = sha256(b"ghost layer");
    let r = h.get(&blob_path("library/ghost", &d));
    assert_eq!(
        (r.status, r.error_code()),
        (404, "BLOB_UNKNOWN".to_string())
    );
    assert_eq!(r.header("www-authenticate"), None);
    let r = h.head(&blob_path("library/ghost", &d));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("www-authenticate"), None);

    // The token dance happened, and ended: one try without and one with the token.
    let heads = up.requests(&manifest_path("library/ghost", "v1"));
    assert_eq!(heads.len(), 2, "{heads:#?}");
    assert_eq!(heads[0].authorization, None);
    assert_eq!(
        heads[1].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(up.requests("/token").len() <= 3, "{:#?}", up.seen());
    assert!(blob_files(s.data_dir()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------------------------

#[test]
fn redirect_to_another_host_drops_the_token_and_the_blob_is_cached() {
    let up = Injector::start();
    let cdn = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    cdn.refuse_authorization();
    let blob = Bytes::from(random_bytes(150_000, 5));
    let d = sha256(&blob);
    let hex = d.trim_start_matches("sha256:");
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Redirect(format!("{}/cdn/{hex}?sig=s1&expires=9", cdn.url())),
    );
    cdn.set(&format!("/cdn/{hex}"), Behavior::blob(blob.clone()));
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    let r = h.send(
        "GET",
        &path,
        &[("authorization", CLIENT_BASIC)],
        Bytes::new(),
    );
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("MISS")),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.body == blob, "the blob arrived altered");
    assert_eq!(
        up.requests(&path)
            .last()
            .and_then(|r| r.authorization.clone()),
        Some(format!("Bearer {TOKEN}")),
        "the registry itself got the token"
    );
    let at_cdn = cdn.seen();
    assert_eq!(at_cdn.len(), 1, "{at_cdn:#?}");
    assert_eq!(at_cdn[0].authorization, None, "the token leaked to the CDN");
    assert_eq!(at_cdn[0].query, "sig=s1&expires=9");

    wait_fills_done(&s);
    let before = (up.seen().len(), cdn.seen().len());
    let r = h.get(&path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == blob);
    assert_eq!((up.seen().len(), cdn.seen().len()), before);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

#[test]
fn dropped_cdn_body_is_resumed_through_the_registry_redirect() {
    let up = Injector::start();
    let cdn = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    cdn.refuse_authorization();
    let blob = Bytes::from(random_bytes(250_000, 18));
    let d = sha256(&blob);
    let hex = d.trim_start_matches("sha256:");
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Redirect(format!("{}/cdn/{hex}?sig=s2", cdn.url())),
    );
    let at_cdn = format!("/cdn/{hex}");
    cdn.set(
        &at_cdn,
        Behavior::Truncate {
            body: blob.clone(),
            cut: 100_000,
            ranges: true,
        },
    );
    let s = mirror(&up, |_| {});

    let p = pull(&s.url(&path));
    assert_eq!((p.status, p.x_cache()), (200, Some("MISS")));
    assert!(p.body.is_ok_and(|b| b == blob));
    let cdn_seen = cdn.requests(&at_cdn);
    let ranges: Vec<Option<String>> = cdn_seen.iter().map(|r| r.range.clone()).collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=100000-".to_string()),
            Some("bytes=200000-".to_string())
        ],
        "the Range of a resume follows the redirect"
    );
    assert!(cdn_seen.iter().all(|r| r.authorization.is_none()));
    let bearer = format!("Bearer {TOKEN}");
    let at_registry = up.requests(&path);
    assert_eq!(
        at_registry
            .iter()
            .filter(|r| r.authorization.as_deref() == Some(&bearer))
            .count(),
        3,
        "each resume asks the registry again, with the cached token: {at_registry:#?}"
    );
    assert_eq!(up.requests("/token").len(), 1);
    wait_fills_done(&s);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

#[test]
fn endless_redirects_end_in_a_clean_error() {
    let up = Injector::start();
    let d = sha256(b"never served");
    let blob = blob_path("library/x", &d);
    let tag = manifest_path("library/x", "loop");
    up.set(&blob, Behavior::Redirect(format!("{}{blob}", up.url())));
    up.set(&tag, Behavior::Redirect(tag.clone()));
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    assert_unavailable(&h.get(&blob), "blob behind a redirect loop");
    assert_eq!(
        up.count("GET", &blob),
        6,
        "the first request and 5 redirects"
    );
    assert_unavailable(
        &get_manifest(&h, "library/x", "loop"),
        "tag behind a redirect loop",
    );
    assert_eq!(up.count("HEAD", &tag), 6);
    assert_eq!(up.count("GET", &tag), 0);
    assert_nothing_stored(&s, "library/x", &d);
}

// ---------------------------------------------------------------------------------------------
// Broken blob bodies
// ---------------------------------------------------------------------------------------------

#[test]
fn dropped_body_is_resumed_with_range_requests() {
    let up = Injector::start();
    let blob = Bytes::from(random_bytes(300_000, 6));
    let d = sha256(&blob);
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Truncate {
            body: blob.clone(),
            cut: 120_000,
            ranges: true,
        },
    );
    let s = mirror(&up, |_| {});

    let p = pull(&s.url(&path));
    assert_eq!((p.status, p.x_cache()), (200, Some("MISS")));
    assert!(
        p.body.as_ref().is_ok_and(|b| *b == blob),
        "body: {:?}",
        p.body.as_ref().map(|b| b.len())
    );
    let ranges: Vec<Option<String>> = up.requests(&path).into_iter().map(|r| r.range).collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=120000-".to_string()),
            Some("bytes=240000-".to_string())
        ]
    );

    wait_fills_done(&s);
    let h = Http::for_server(&s);
    let r = h.get(&path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == blob);
    assert_eq!(up.requests(&path).len(), 3);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

#[test]
fn dropped_body_gives_up_after_three_resumes_and_caches_nothing() {
    let up = Injector::start();
    let blob = Bytes::from(random_bytes(500_000, 7));
    let d = sha256(&blob);
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Truncate {
            body: blob.clone(),
            cut: 100_000,
            ranges: true,
        },
    );
    let s = mirror(&up, |_| {});

    let p = pull(&s.url(&path));
    assert_broken(&p, "a fill that gave up");
    let ranges: Vec<Option<String>> = up.requests(&path).into_iter().map(|r| r.range).collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some("bytes=100000-".to_string()),
            Some("bytes=200000-".to_string()),
            Some("bytes=300000-".to_string()),
        ]
    );
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);

    // A healthy upstream later: the next request fetches again.
    up.set(&path, Behavior::blob(blob.clone()));
    let p = pull(&s.url(&path));
    assert_eq!((p.status, p.x_cache()), (200, Some("MISS")));
    assert!(p.body.is_ok_and(|b| b == blob));
    assert_eq!(up.requests(&path).len(), 5);
}

#[test]
fn upstream_without_range_support_fails_the_stream_and_caches_nothing() {
    let up = Injector::start();
    let blob = Bytes::from(random_bytes(200_000, 8));
    let d = sha256(&blob);
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Truncate {
            body: blob.clone(),
            cut: 80_000,
            ranges: false,
        },
    );
    let s = mirror(&up, |_| {});

    let p = pull(&s.url(&path));
    assert_broken(&p, "an upstream that answered the resume with 200");
    let ranges: Vec<Option<String>> = up.requests(&path).into_iter().map(|r| r.range).collect();
    assert_eq!(ranges, vec![None, Some("bytes=80000-".to_string())]);
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);

    up.set(&path, Behavior::blob(blob.clone()));
    let p = pull(&s.url(&path));
    assert_eq!((p.status, p.x_cache()), (200, Some("MISS")));
    assert!(p.body.is_ok_and(|b| b == blob));
    assert_eq!(up.requests(&path).len(), 3, "a later request fetched again");
    wait_fills_done(&s);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

// ---------------------------------------------------------------------------------------------
// Blobs that fail verification
// ---------------------------------------------------------------------------------------------

#[test]
fn flipped_byte_is_never_delivered_complete_nor_cached() {
    let up = Injector::start();
    let good = Bytes::from(random_bytes(200_000, 9));
    let d = sha256(&good);
    let mut bad = good.to_vec();
    bad[123_456] ^= 0x01;
    let path = blob_path("library/x", &d);
    up.set(&path, Behavior::blob(bad));
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    let p = pull(&s.url(&path));
    assert_broken(&p, "a blob with a flipped byte");
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);
    assert_eq!(metric(&h, MISMATCHES), Some(1.0));

    // The upstream is fixed: the next pull is byte-exact and cached.
    up.set(&path, Behavior::blob(good.clone()));
    let p = pull(&s.url(&path));
    assert_eq!((p.status, p.x_cache()), (200, Some("MISS")));
    assert!(p.body.is_ok_and(|b| b == good));
    wait_fills_done(&s);
    let r = h.get(&path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == good);
    assert_eq!(up.requests(&path).len(), 2);
    assert_eq!(metric(&h, MISMATCHES), Some(1.0));
}

#[test]
fn blob_announced_with_another_digest_is_refused_before_streaming() {
    let up = Injector::start();
    let body = Bytes::from(random_bytes(50_000, 10));
    let d = sha256(&body);
    let path = blob_path("library/x", &d);
    up.set(
        &path,
        Behavior::Serve {
            body: body.clone(),
            content_type: "application/octet-stream",
            digest: Some(sha256(b"something else")),
        },
    );
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);
    assert_unavailable(&h.get(&path), "a blob announced under another digest");
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);
    assert_eq!(metric(&h, MISMATCHES), Some(1.0));
}

/// Two clients GET `path` while the upstream holds the body at its gate: the first starts the
/// fill, the second joins it; once both have their response headers, the gate opens.
fn two_readers(s: &TestServer, path: &str, gate: &Gate) -> [Pulled; 2] {
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = |tx: std::sync::mpsc::Sender<()>| {
        let url = s.url(path);
        std::thread::spawn(move || pull_signalling(&url, Some(tx)))
    };
    let first = reader(tx.clone());
    wait_until("the first reader's fill is in flight", || {
        s.app.proxy.fills.in_flight() == 1
    });
    let second = reader(tx);
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("both readers get response headers while the upstream holds the body");
    }
    gate.open();
    [
        first.join().expect("first reader"),
        second.join().expect("second reader"),
    ]
}

/// A mirror whose upstream serves `body` as `library/x`'s blob `digest`, holding it after
/// `at` bytes until the returned gate opens: (upstream, server, blob path, gate).
fn held(body: Bytes, digest: &str, at: usize) -> (Injector, TestServer, String, Gate) {
    let up = Injector::start();
    let path = blob_path("library/x", digest);
    let gate = Gate::new();
    up.set(
        &path,
        Behavior::Held {
            body,
            at,
            gate: gate.clone(),
        },
    );
    let s = mirror(&up, |_| {});
    (up, s, path, gate)
}

/// `held` with `len` random bytes under their own digest: (upstream, server, blob, digest,
/// blob path, gate).
fn held_blob(
    len: usize,
    seed: u64,
    at: usize,
) -> (Injector, TestServer, Bytes, String, String, Gate) {
    let blob = Bytes::from(random_bytes(len, seed));
    let d = sha256(&blob);
    let (up, s, path, gate) = held(blob.clone(), &d, at);
    (up, s, blob, d, path, gate)
}

#[test]
fn coalesced_readers_share_one_upstream_download() {
    let (up, s, blob, d, path, gate) = held_blob(200_000, 11, 50_000);

    let [a, b] = two_readers(&s, &path, &gate);
    assert_eq!((a.status, a.x_cache()), (200, Some("MISS")));
    assert_eq!((b.status, b.x_cache()), (200, Some("COALESCED")));
    assert!(a.body.is_ok_and(|x| x == blob));
    assert!(b.body.is_ok_and(|x| x == blob));
    assert_eq!(up.requests(&path).len(), 1);
    wait_fills_done(&s);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

/// Starts a reader of `path` (digest `d`) on a thread and waits until its fill has received
/// the `held_at` bytes the upstream sends before its gate.
fn first_reader_until(
    s: &TestServer,
    path: &str,
    d: &str,
    held_at: usize,
) -> (std::thread::JoinHandle<Pulled>, transship::oci::Digest) {
    let digest: transship::oci::Digest = d.parse().expect("digest");
    let url = s.url(path);
    let first = std::thread::spawn(move || pull(&url));
    wait_until("the fill received everything before the gate", || {
        s.app.proxy.fills.in_flight_for(&digest).is_some_and(|f| {
            matches!(*f.subscribe().borrow(),
                FillState::Streaming { received, .. } if received == held_at as u64)
        })
    });
    (first, digest)
}

/// Readers take recent bytes from the fill's memory and older ones from its spool: a reader
/// that joins once the first megabytes have left memory (the fill keeps a few MiB), one that
/// joins inside what memory still holds, and the one that started the fill all receive the
/// exact bytes, each from its own offset, across the switch from spool to memory.
#[test]
fn late_readers_read_what_left_memory_from_the_spool() {
    const HELD_AT: usize = 12 << 20;
    let (up, s, blob, d, path, gate) = held_blob(24 << 20, 23, HELD_AT);
    let (first, digest) = first_reader_until(&s, &path, &d, HELD_AT);
    // The oldest bytes leave memory for the spool as the disk catches up; the newest stay.
    let fill = s.app.proxy.fills.in_flight_for(&digest).expect("fill");
    wait_until("the oldest bytes left memory", || {
        matches!(fill.tail_piece(1_000, 2_000), Piece::Spool { .. })
    });
    let newest = (HELD_AT - 1_000) as u64;
    assert!(matches!(
        fill.tail_piece(newest, newest + 10),
        Piece::Memory(_)
    ));
    drop(fill);
    let (tx, rx) = std::sync::mpsc::channel();
    let late = |from: usize| {
        let (url, tx) = (s.url(&path), tx.clone());
        std::thread::spawn(move || {
            request(
                "GET",
                &url,
                &[("range", format!("bytes={from}-").as_str())],
                Some(tx),
            )
        })
    };
    let (early_offset, recent_offset) = (1_000, HELD_AT - 1_000_000);
    let (early, recent) = (late(early_offset), late(recent_offset));
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("late readers get response headers while the upstream holds the body");
    }
    gate.open();
    let first = first.join().expect("first reader");
    assert_eq!((first.status, first.x_cache()), (200, Some("MISS")));
    assert!(first.body.is_ok_and(|b| b == blob), "the first reader");
    for (reader, from) in [(early, early_offset), (recent, recent_offset)] {
        let got = reader.join().expect("late reader");
        assert_eq!(got.status, 206, "Range from {from}");
        assert!(
            got.body.is_ok_and(|b| b == blob.slice(from..)),
            "the reader from byte {from} got other bytes"
        );
    }
    assert_eq!(up.requests(&path).len(), 1, "one upstream download");
    wait_fills_done(&s);
    assert_eq!(cached_blob(&s, "library/x", &d), Some(blob.len() as u64));
}

/// A corrupt blob larger than what the fill keeps in memory: a reader that joined late (reading
/// the spool) and the first reader both see their streams break, and nothing is stored.
#[test]
fn late_readers_of_a_large_corrupt_blob_fail_too() {
    const HELD_AT: usize = 12 << 20;
    let good = random_bytes(24 << 20, 29);
    let d = sha256(&good);
    let mut bad = good;
    bad[(20 << 20) + 7] ^= 0x01;
    let (_up, s, path, gate) = held(Bytes::from(bad), &d, HELD_AT);
    let (first, _) = first_reader_until(&s, &path, &d, HELD_AT);
    let (tx, rx) = std::sync::mpsc::channel();
    let url = s.url(&path);
    let late =
        std::thread::spawn(move || request("GET", &url, &[("range", "bytes=1000-")], Some(tx)));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the late reader gets response headers while the upstream holds the body");
    gate.open();
    assert_broken(&first.join().expect("first reader"), "the first reader");
    assert_broken(&late.join().expect("late reader"), "the late reader");
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);
}

#[test]
fn coalesced_readers_of_a_corrupt_blob_all_fail() {
    let good = random_bytes(200_000, 12);
    let d = sha256(&good);
    let mut bad = good.clone();
    bad[199_000] ^= 0x80;
    let (up, s, path, gate) = held(Bytes::from(bad), &d, 50_000);

    let [a, b] = two_readers(&s, &path, &gate);
    assert_eq!(
        (a.status, b.status),
        (200, 200),
        "both responses started before verification"
    );
    assert_broken(&a, "the reader that started the fill");
    assert_broken(&b, "the reader that joined the fill");
    assert_eq!(up.requests(&path).len(), 1);
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &d);
    assert_eq!(metric(&Http::for_server(&s), MISMATCHES), Some(1.0));
}

#[test]
fn fill_continues_when_the_client_hangs_up() {
    let up = Injector::start();
    let blob = Bytes::from(random_bytes(200_000, 19));
    let d = sha256(&blob);
    let path = blob_path("library/x", &d);
    let gate = Gate::new();
    up.set(
        &path,
        Behavior::Held {
            body: blob.clone(),
            at: 10_000,
            gate: gate.clone(),
        },
    );
    let s = mirror(&up, |_| {});

    assert_eq!(hang_up_after_headers(&s.url(&path)), 200);
    gate.open();
    wait_until("the abandoned fill is committed", || {
        cached_blob(&s, "library/x", &d).is_some()
    });
    wait_fills_done(&s);
    let r = Http::for_server(&s).get(&path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    assert!(r.body == blob);
    assert_eq!(up.requests(&path).len(), 1);
}

#[test]
fn a_manifest_lookup_whose_client_hung_up_finishes_and_leaves_the_table() {
    let up = Injector::start();
    let manifest = padded_manifest(20_000);
    let d = sha256(&manifest);
    let path = manifest_path("library/x", &d);
    let gate = Gate::new();
    up.set(
        &path,
        Behavior::Held {
            body: manifest,
            at: 100,
            gate: gate.clone(),
        },
    );
    let s = mirror(&up, |_| {});
    {
        // A client asks, and hangs up while the upstream is still answering.
        use std::io::Write;
        let mut tcp = std::net::TcpStream::connect(s.addr).expect("connect");
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}\r\n\r\n"
        )
        .expect("send");
        wait_until("the lookup reached the upstream", || {
            up.requests(&path).len() == 1
        });
        assert_eq!(s.app.proxy.manifest_misses.in_flight(), 1);
    }
    gate.open();
    wait_until("the abandoned lookup left the table", || {
        s.app.proxy.manifest_misses.in_flight() == 0
    });
    // The next request is answered (from what the lookup left, or a fresh one), not stuck.
    let r = get_manifest(&Http::for_server(&s), "library/x", &d);
    assert!(
        r.status == 200 || r.status == 404 || r.status == 503,
        "{}",
        r.status
    );
}

// ---------------------------------------------------------------------------------------------
// Rate limits and server errors
// ---------------------------------------------------------------------------------------------

fn rate_limited() -> Behavior {
    Behavior::Status {
        status: 429,
        headers: vec![
            ("content-type", "application/json"),
            ("retry-after", "30"),
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "0;w=21600"),
        ],
        body: r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
    }
}

/// A cached tag (tag_ttl 0, so every request revalidates) while `failure` answers: served
/// STALE; an uncached tag and an uncached blob: 503. After a 429 (`rate_limit`), transship
/// honours Retry-After: the uncached tag is not even asked for. Returns the server.
fn outage(up: &Injector, failure: Behavior, rate_limit: bool) -> TestServer {
    let img = image(13, 2_000);
    up.serve_image("library/x", "v1", &img);
    let s = mirror(up, tag_ttl_zero);
    let h = Http::for_server(&s);
    let r = get_manifest(&h, "library/x", "v1");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));

    let uncached = sha256(b"uncached layer");
    for path in [
        manifest_path("library/x", "v1"),
        manifest_path("library/x", "v2"),
        blob_path("library/x", &uncached),
    ] {
        up.set(&path, failure.clone());
    }
    let r = get_manifest(&h, "library/x", "v1");
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("STALE")),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.body, img.manifest);
    assert_eq!(r.header("docker-content-digest"), Some(img.digest.as_str()));
    assert_unavailable(&get_manifest(&h, "library/x", "v2"), "uncached tag");
    assert_unavailable(&h.get(&blob_path("library/x", &uncached)), "uncached blob");
    assert_eq!(
        (
            up.count("HEAD", &manifest_path("library/x", "v2")),
            up.count("GET", &manifest_path("library/x", "v2")),
            up.count("GET", &blob_path("library/x", &uncached)),
        ),
        (usize::from(!rate_limit), 0, 1),
        "not retried, and not asked at all while rate limited"
    );
    assert_nothing_stored(&s, "library/x", &uncached);
    assert_eq!(cached_tag(&s, "library/x", "v2"), None);
    s
}

#[test]
fn rate_limit_serves_stale_tags_or_503_and_exports_the_limits() {
    let up = Injector::start();
    let s = outage(&up, rate_limited(), true);
    let h = Http::for_server(&s);
    assert_eq!(
        metric(
            &h,
            r#"transship_upstream_ratelimit_remaining{upstream="docker.io"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &h,
            r#"transship_upstream_ratelimit_limit{upstream="docker.io"}"#
        ),
        Some(100.0)
    );
}

#[test]
fn server_errors_serve_stale_tags_or_503() {
    let up = Injector::start();
    let s = outage(&up, Behavior::status(500), false);
    let h = Http::for_server(&s);
    assert!(
        metric(
            &h,
            r#"transship_upstream_errors_total{status="500",upstream="docker.io"}"#
        )
        .is_some_and(|n| n >= 3.0)
    );
}

#[test]
fn transient_503s_are_retried() {
    let up = Injector::start();
    let img = image(14, 30_000);
    up.serve_image("library/x", "v1", &img);
    let tag = manifest_path("library/x", "v1");
    let layer = blob_path("library/x", &img.layer_digest);
    up.set(
        &tag,
        Behavior::Sequence(vec![
            Behavior::status(503),
            Behavior::manifest(img.manifest.clone()),
        ]),
    );
    up.set(
        &layer,
        Behavior::Sequence(vec![
            Behavior::status(503),
            Behavior::blob(img.layer.clone()),
        ]),
    );
    let persistent = manifest_path("library/x", "down");
    up.set(&persistent, Behavior::status(503));
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    let r = get_manifest(&h, "library/x", "v1");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert_eq!(r.body, img.manifest);
    assert_eq!(up.count("HEAD", &tag), 2);
    let r = h.get(&layer);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert!(r.body == img.layer);
    assert_eq!(up.count("GET", &layer), 2);

    assert_unavailable(&get_manifest(&h, "library/x", "down"), "a persistent 503");
    assert_eq!(up.count("HEAD", &persistent), 3, "1 try + 2 retries");
}

// ---------------------------------------------------------------------------------------------
// Manifests that are not what was asked for
// ---------------------------------------------------------------------------------------------

#[test]
fn html_error_page_is_never_taken_for_a_manifest() {
    let up = Injector::start();
    let html = Behavior::Serve {
        body: Bytes::from_static(
            b"<!DOCTYPE html><html><body><h1>Service Unavailable</h1></body></html>",
        ),
        content_type: "text/html; charset=utf-8",
        digest: None,
    };
    let tag = manifest_path("library/x", "v1");
    up.set(&tag, html.clone());
    let s = mirror(&up, tag_ttl_zero);
    let h = Http::for_server(&s);

    let r = get_manifest(&h, "library/x", "v1");
    assert!(
        (500..600).contains(&r.status),
        "{} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.error_code(), "UNAVAILABLE");
    assert_eq!(cached_tag(&s, "library/x", "v1"), None);
    let r = get_manifest(&h, "library/x", "v1");
    assert_eq!(r.status, 503);
    assert_eq!(
        up.count("GET", &tag),
        2,
        "nothing was cached, not even a 404"
    );

    // A cached tag whose upstream turns into an HTML page is served stale.
    let img = image(15, 1_000);
    up.serve_image("library/x", "v2", &img);
    assert_eq!(
        get_manifest(&h, "library/x", "v2").header("x-cache"),
        Some("MISS")
    );
    up.set(&manifest_path("library/x", "v2"), html);
    let r = get_manifest(&h, "library/x", "v2");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("STALE")));
    assert_eq!(r.body, img.manifest);
    assert_eq!(cached_tag(&s, "library/x", "v2"), Some(img.digest.clone()));
}

#[test]
fn manifest_with_a_wrong_digest_is_rejected_and_not_cached() {
    let up = Injector::start();
    let img = image(16, 1_000);
    let other = image(17, 1_000);
    // By tag: HEAD carries no digest, the GET announces another one.
    let tag = manifest_path("library/x", "v1");
    up.set(
        &tag,
        Behavior::ByMethod {
            head: Box::new(Behavior::Serve {
                body: img.manifest.clone(),
                content_type: OCI_MANIFEST,
                digest: None,
            }),
            get: Box::new(Behavior::Serve {
                body: img.manifest.clone(),
                content_type: OCI_MANIFEST,
                digest: Some(other.digest.clone()),
            }),
        },
    );
    // By digest: the bytes of another manifest.
    up.set(
        &manifest_path("library/x", &other.digest),
        Behavior::Serve {
            body: img.manifest.clone(),
            content_type: OCI_MANIFEST,
            digest: Some(other.digest.clone()),
        },
    );
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    assert_unavailable(
        &get_manifest(&h, "library/x", "v1"),
        "a manifest announced under another digest",
    );
    assert_eq!(up.count("GET", &tag), 1);
    assert_eq!(metric(&h, MISMATCHES), Some(1.0));
    assert_unavailable(
        &get_manifest(&h, "library/x", &other.digest),
        "the wrong manifest for a digest",
    );
    assert_eq!(metric(&h, MISMATCHES), Some(2.0));
    assert_eq!(cached_tag(&s, "library/x", "v1"), None);
    assert!(!cached_manifest(&s, "library/x", &img.digest));
    assert!(!cached_manifest(&s, "library/x", &other.digest));

    // Once the upstream is right, the same tag is fetched (nothing bad was remembered).
    up.serve_image("library/x", "v1", &img);
    let r = get_manifest(&h, "library/x", "v1");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    assert_eq!(r.body, img.manifest);
}

#[test]
fn manifest_over_the_size_limit_is_rejected_and_one_at_it_is_not() {
    let up = Injector::start();
    let at = padded_manifest(MAX_MANIFEST);
    let over = padded_manifest(MAX_MANIFEST + 1);
    let (at_digest, over_digest) = (sha256(&at), sha256(&over));
    for (tag, m, d) in [("at", &at, &at_digest), ("over", &over, &over_digest)] {
        up.set(
            &manifest_path("library/x", tag),
            Behavior::manifest(m.clone()),
        );
        up.set(
            &manifest_path("library/x", d),
            Behavior::manifest(m.clone()),
        );
    }
    let s = mirror(&up, |_| {});
    let h = Http::for_server(&s);

    assert_unavailable(
        &get_manifest(&h, "library/x", "over"),
        "a manifest one byte over the limit",
    );
    assert_eq!(
        up.count("GET", &manifest_path("library/x", &over_digest)),
        1
    );
    assert!(!cached_manifest(&s, "library/x", &over_digest));
    assert_eq!(cached_tag(&s, "library/x", "over"), None);

    let r = get_manifest(&h, "library/x", "at");
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("MISS")),
        "{:?}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    assert!(r.body == at);
    assert!(cached_manifest(&s, "library/x", &at_digest));
}

// ---------------------------------------------------------------------------------------------
// Upstream data that must neither panic nor hang anything
// ---------------------------------------------------------------------------------------------

/// A Pulled that is a complete 200 with exactly `body`.
fn assert_pulled(p: &Pulled, body: &[u8], what: &str) {
    assert_eq!(
        p.status,
        200,
        "{what}: {:?}",
        p.body.as_ref().map(|b| b.len())
    );
    assert!(
        p.body.as_ref().is_ok_and(|b| b == body),
        "{what}: body {:?}",
        p.body.as_ref().map(|b| b.len())
    );
}

/// The registry error message of a complete error response.
fn error_message(p: &Pulled) -> String {
    let body = p.body.clone().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn token_lifetimes_of_2_pow_64_and_zero_neither_panic_nor_hang() {
    for expires_in in ["18446744073709551615", "0", "-5", "1e300"] {
        let up = Injector::start();
        up.set_auth(Auth::Bearer {
            credentials: None,
            deny: vec![],
        });
        up.set_token(expires_in, 0);
        let x = image(40, 30_000);
        up.serve_image("library/x", "v1", &x);
        let s = mirror(&up, |_| {});
        let url = |p: &str| s.url(p);

        // The token is fetched inside the fill task: a panic there used to leave the fill in
        // the table forever, and every later request for the digest hung.
        let layer = blob_path("library/x", &x.layer_digest);
        assert_pulled(&pull(&url(&layer)), &x.layer, expires_in);
        let config = blob_path("library/x", &x.config_digest);
        assert_pulled(&pull(&url(&config)), &x.config, expires_in);
        let tag = manifest_path("library/x", "v1");
        let m = request("GET", &url(&tag), &[("accept", OCI_MANIFEST)], None);
        assert_pulled(&m, &x.manifest, expires_in);
        wait_fills_done(&s);
        let hit = pull(&url(&layer));
        assert_pulled(&hit, &x.layer, expires_in);
        assert_eq!(hit.x_cache(), Some("HIT"));
        let tokens = up.requests("/token").len();
        assert!(
            (1..=3).contains(&tokens),
            "{expires_in}: {tokens} token requests"
        );
    }
}

#[test]
fn an_oversized_token_response_is_a_clean_503() {
    let up = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    up.set_token("300", 100 << 10);
    let x = image(41, 5_000);
    up.serve_image("library/x", "v1", &x);
    let s = mirror(&up, |_| {});
    let p = pull(&s.url(&blob_path("library/x", &x.layer_digest)));
    assert_eq!(p.status, 503, "{:?}", p.body.as_ref().map(|b| b.len()));
    assert!(
        error_message(&p).contains("64 KiB"),
        "{}",
        error_message(&p)
    );
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &x.layer_digest);

    // A sane token endpoint later: the same request succeeds.
    up.set_token("300", 0);
    assert_pulled(
        &pull(&s.url(&blob_path("library/x", &x.layer_digest))),
        &x.layer,
        "after the token endpoint recovered",
    );
}

// ---------------------------------------------------------------------------------------------
// Fills: entitlement, bodies without a length, download slots
// ---------------------------------------------------------------------------------------------

#[test]
fn a_fill_in_flight_is_served_only_to_routes_whose_upstream_has_the_blob() {
    const PASSWORD: &str = "fill isolation";
    let public = Injector::start();
    let private = Injector::start();
    let secret = Bytes::from(random_bytes(200_000, 42));
    let d = sha256(&secret);
    let gate = Gate::new();
    private.set(
        &blob_path("team/secret", &d),
        Behavior::Held {
            body: secret.clone(),
            at: 50_000,
            gate: gate.clone(),
        },
    );
    let (public_url, private_url) = (public.url(), private.url());
    let s = TestServer::start_with(move |c| {
        let extra = format!(
            "[[user]]\nname = \"alice\"\npassword_hash = \"{}\"\n\
             [[upstream]]\nname = \"private.example\"\nurl = \"{private_url}\"\npull = \"authenticated\"\n",
            transship::auth::keys::hash_password(PASSWORD)
        );
        let mut c = test_config(&c.server.data_dir, &extra);
        c.upstreams[0].url = public_url;
        c
    });
    let alice = transship::auth::basic_header("alice", PASSWORD);

    // Alice's pull starts the fill; the private upstream holds the body at its gate.
    let (tx, rx) = std::sync::mpsc::channel();
    let owner = {
        let (url, alice) = (
            s.url(&blob_path("private.example/team/secret", &d)),
            alice.clone(),
        );
        std::thread::spawn(move || request("GET", &url, &[("authorization", &alice)], Some(tx)))
    };
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the owner's response started");

    // Anonymous, on the default upstream, which does not have the blob: never the bytes.
    let anon = pull(&s.url(&blob_path("library/anything", &d)));
    assert_eq!(
        anon.status,
        404,
        "an anonymous client joined a private fill: {:?}",
        anon.body.as_ref().map(|b| b.len())
    );
    assert!(!anon.body.as_ref().is_ok_and(|b| b.len() == secret.len()));
    let head = request(
        "HEAD",
        &s.url(&blob_path("library/anything", &d)),
        &[],
        None,
    );
    assert_eq!(head.status, 404, "HEAD learned of a private fill");
    // Authenticated, same upstream, a repository the upstream does not serve it from.
    let other = request(
        "GET",
        &s.url(&blob_path("private.example/team/other", &d)),
        &[("authorization", &alice)],
        None,
    );
    assert_eq!(other.status, 404);
    assert!(private.count("HEAD", &blob_path("team/other", &d)) >= 1);

    // A repository whose upstream confirms the blob joins the fill.
    let shared = blob_path("library/shared", &d);
    public.set(&shared, Behavior::blob(secret.clone()));
    let (tx, rx) = std::sync::mpsc::channel();
    let joiner = {
        let url = s.url(&shared);
        std::thread::spawn(move || pull_signalling(&url, Some(tx)))
    };
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the confirmed reader's response started");
    gate.open();
    let owner = owner.join().expect("owner");
    assert_pulled(&owner, &secret, "the owner");
    let joined = joiner.join().expect("joiner");
    assert_pulled(&joined, &secret, "a confirmed route");
    assert_eq!(joined.x_cache(), Some("COALESCED"));
    assert_eq!(
        public.count("GET", &shared),
        0,
        "joined, not downloaded again"
    );
    assert_eq!(public.count("HEAD", &shared), 1);

    // After the fill, the anonymous route still gets nothing.
    wait_fills_done(&s);
    let anon = pull(&s.url(&blob_path("library/anything", &d)));
    assert_eq!(anon.status, 404);
}

#[test]
fn blob_bodies_without_content_length_are_filled_and_verified() {
    let up = Injector::start();
    let s = mirror(&up, |_| {});

    // GET is chunked, HEAD tells the length: readers stream while it fills.
    let a = Bytes::from(random_bytes(300_000, 43));
    let da = sha256(&a);
    up.set(
        &blob_path("library/x", &da),
        Behavior::ByMethod {
            head: Box::new(Behavior::blob(a.clone())),
            get: Box::new(Behavior::Chunked {
                body: a.clone(),
                cut: None,
            }),
        },
    );
    let p = pull(&s.url(&blob_path("library/x", &da)));
    assert_pulled(&p, &a, "chunked GET, HEAD with a length");
    assert_eq!(p.x_cache(), Some("MISS"));

    // No length anywhere: known once verified.
    let b = Bytes::from(random_bytes(300_000, 44));
    let db = sha256(&b);
    up.set(
        &blob_path("library/x", &db),
        Behavior::Chunked {
            body: b.clone(),
            cut: None,
        },
    );
    let p = pull(&s.url(&blob_path("library/x", &db)));
    assert_pulled(&p, &b, "chunked GET, no length at all");
    assert_eq!(
        p.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some(b.len().to_string().as_str())
    );

    // A flipped byte, and a connection that drops half-way: never complete, nothing cached.
    let c = random_bytes(300_000, 45);
    let dc = sha256(&c);
    let mut bad = c.clone();
    bad[250_000] ^= 0x04;
    up.set(
        &blob_path("library/x", &dc),
        Behavior::Chunked {
            body: Bytes::from(bad),
            cut: None,
        },
    );
    assert_broken(
        &pull(&s.url(&blob_path("library/x", &dc))),
        "chunked with a flipped byte",
    );
    let e = Bytes::from(random_bytes(300_000, 46));
    let de = sha256(&e);
    up.set(
        &blob_path("library/x", &de),
        Behavior::Chunked {
            body: e.clone(),
            cut: Some(150_000),
        },
    );
    assert_broken(
        &pull(&s.url(&blob_path("library/x", &de))),
        "chunked, dropped half-way",
    );
    wait_fills_done(&s);
    assert_nothing_stored(&s, "library/x", &dc);
    assert_nothing_stored(&s, "library/x", &de);
    assert_eq!(cached_blob(&s, "library/x", &da), Some(a.len() as u64));
    assert_eq!(cached_blob(&s, "library/x", &db), Some(b.len() as u64));
    let r = pull(&s.url(&blob_path("library/x", &db)));
    assert_pulled(&r, &b, "cached");
    assert_eq!(r.x_cache(), Some("HIT"));
}

#[test]
fn fills_beyond_max_concurrent_fills_wait_their_turn() {
    let up = Injector::start();
    let a = Bytes::from(random_bytes(100_000, 47));
    let b = Bytes::from(random_bytes(100_000, 48));
    let (da, db) = (sha256(&a), sha256(&b));
    let gate = Gate::new();
    up.set(
        &blob_path("library/x", &da),
        Behavior::Held {
            body: a.clone(),
            at: 10_000,
            gate: gate.clone(),
        },
    );
    up.set(&blob_path("library/x", &db), Behavior::blob(b.clone()));
    let s = mirror(&up, |u| u.max_concurrent_fills = 1);

    let (tx, rx) = std::sync::mpsc::channel();
    let first = {
        let url = s.url(&blob_path("library/x", &da));
        std::thread::spawn(move || pull_signalling(&url, Some(tx)))
    };
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the first fill started");
    let second = {
        let url = s.url(&blob_path("library/x", &db));
        std::thread::spawn(move || pull(&url))
    };
    let digest: transship::oci::Digest = db.parse().expect("digest");
    wait_until("the second fill waits for a slot", || {
        s.app
            .proxy
            .fills
            .in_flight_for(&digest)
            .is_some_and(|f| matches!(*f.subscribe().borrow(), FillState::Queued))
    });
    assert_eq!(
        up.count("GET", &blob_path("library/x", &db)),
        0,
        "a second download started beside the first"
    );
    gate.open();
    assert_pulled(&first.join().expect("first"), &a, "the first fill");
    let second = second.join().expect("second");
    assert_pulled(&second, &b, "the queued fill");
    assert_eq!(second.x_cache(), Some("MISS"));
}

// ---------------------------------------------------------------------------------------------
// Where the upstream may send us, and what clients see of failures
// ---------------------------------------------------------------------------------------------

#[test]
fn redirects_to_other_schemes_and_non_public_addresses_are_refused() {
    // Refused before any connection is made: these addresses are never contacted (the policy
    // itself is unit-tested in proxy::upstream).
    let up = Injector::start();
    let s = mirror(&up, |_| {});
    for (seed, location) in [
        (
            50,
            "http://169.254.169.254/latest/meta-data/?X-Amz-Signature=s3cr3t",
        ),
        (51, "http://10.0.0.1:9/blob?X-Amz-Signature=s3cr3t"),
        (52, "http://[fe80::1]:9/blob?X-Amz-Signature=s3cr3t"),
        (53, "http://2130706433:9/blob?X-Amz-Signature=s3cr3t"),
        (54, "ftp://127.0.0.1:9/blob?X-Amz-Signature=s3cr3t"),
        (55, "file:///etc/passwd?X-Amz-Signature=s3cr3t"),
    ] {
        let body = random_bytes(1_000, seed);
        let d = sha256(&body);
        let path = blob_path("library/x", &d);
        up.set(&path, Behavior::Redirect(location.to_string()));
        let p = pull(&s.url(&path));
        assert_eq!(p.status, 503, "{location}: {:?}", p.body);
        let msg = error_message(&p);
        assert!(msg.contains("not allowed"), "{location}: {msg}");
        for leak in [
            "s3cr3t",
            "169.254",
            "10.0.0.1",
            "fe80",
            "2130706433",
            "passwd",
        ] {
            assert!(!msg.contains(leak), "{location}: {msg}");
        }
        wait_fills_done(&s);
        assert_nothing_stored(&s, "library/x", &d);
    }
}

#[test]
fn credentials_never_go_to_a_plain_http_realm_on_another_origin() {
    let up = Injector::start();
    let realm = Injector::start();
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    up.set_realm(&format!("{}/token", realm.url()));
    realm.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    let x = image(56, 5_000);
    up.serve_image("library/x", "v1", &x);
    let s = mirror(&up, |u| {
        u.username = Some("robot".into());
        u.password = Some("s3cret".into());
    });
    let p = pull(&s.url(&blob_path("library/x", &x.layer_digest)));
    assert_pulled(&p, &x.layer, "with an anonymous token");
    let asked = realm.requests("/token");
    assert_eq!(asked.len(), 1, "{:#?}", realm.seen());
    assert_eq!(
        asked[0].authorization, None,
        "the upstream's credentials went to a plain-http realm elsewhere"
    );
    assert!(
        up.seen()
            .iter()
            .all(|r| r.authorization.as_deref() != Some(basic("robot", "s3cret").as_str()))
    );
}

#[test]
fn errors_shown_to_clients_carry_no_connection_details_or_signed_urls() {
    // The test config points the default upstream at a closed loopback port.
    let s = TestServer::start();
    let d = sha256(b"unreachable");
    let p = pull(&s.url(&blob_path("library/x", &d)));
    let m = request(
        "GET",
        &s.url(&manifest_path("library/x", "v1")),
        &[("accept", OCI_MANIFEST)],
        None,
    );
    // A redirect to a closed port, with a signed URL.
    let up = Injector::start();
    let s2 = mirror(&up, |_| {});
    let d2 = sha256(b"redirected");
    let path = blob_path("library/x", &d2);
    up.set(
        &path,
        Behavior::Redirect("http://127.0.0.1:9/blob?X-Amz-Signature=s3cr3t".into()),
    );
    let r = pull(&s2.url(&path));
    for (what, p) in [("blob", &p), ("manifest", &m), ("redirected blob", &r)] {
        assert_eq!(p.status, 503, "{what}");
        let msg = error_message(p);
        assert!(
            msg.contains(UPSTREAM) && msg.contains("unreachable"),
            "{what}: {msg}"
        );
        for leak in [
            "os error",
            "refused",
            "tcp",
            "connect error",
            "127.0.0.1",
            "s3cr3t",
            "Signature",
        ] {
            assert!(!msg.contains(leak), "{what}: {leak:?} in {msg:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bar: an upstream that lies
// ---------------------------------------------------------------------------------------------

#[test]
fn a_lying_upstream_never_poisons_the_cache_or_hangs_a_later_request() {
    let up = Injector::start();
    let img = image(60, 40_000);
    up.serve_image("library/x", "v1", &img);
    let s = mirror(&up, tag_ttl_zero);
    let tag = manifest_path("library/x", "v1");
    let get_tag = || request("GET", &s.url(&tag), &[("accept", OCI_MANIFEST)], None);
    assert_pulled(&get_tag(), &img.manifest, "the first pull");
    for (d, body) in [
        (&img.config_digest, &img.config),
        (&img.layer_digest, &img.layer),
    ] {
        assert_pulled(
            &pull(&s.url(&blob_path("library/x", d))),
            body,
            "first pull",
        );
    }
    wait_fills_done(&s);

    // Now every new blob is a lie of some kind.
    let lies: Vec<(&str, Bytes, Behavior)> = {
        let good = |seed| Bytes::from(random_bytes(200_000, seed));
        let flipped = good(61);
        let mut bad = flipped.to_vec();
        bad[100_000] ^= 0x10;
        let html = good(62);
        let dropping = good(63);
        let failing = good(64);
        vec![
            ("a flipped byte", flipped, Behavior::blob(bad)),
            (
                "text/html with 200",
                html,
                Behavior::Serve {
                    body: Bytes::from_static(b"<!DOCTYPE html><html><body>Oops</body></html>"),
                    content_type: "text/html; charset=utf-8",
                    digest: None,
                },
            ),
            (
                "a connection that always drops half-way",
                dropping.clone(),
                Behavior::Truncate {
                    body: dropping,
                    cut: 15_000,
                    ranges: true,
                },
            ),
            ("500", failing, Behavior::status(500)),
        ]
    };
    for (_, body, lie) in &lies {
        up.set(&blob_path("library/x", &sha256(body)), lie.clone());
    }
    // ... and the registry answers 500 for everything it used to serve, with a token whose
    // lifetime overflows any clock.
    up.set(&tag, Behavior::status(500));
    up.set(
        &blob_path("library/x", &img.layer_digest),
        Behavior::status(500),
    );
    up.set_auth(Auth::Bearer {
        credentials: None,
        deny: vec![],
    });
    up.set_token("18446744073709551615", 0);

    for round in 0..2 {
        for (what, body, _) in &lies {
            let d = sha256(body);
            assert_broken(
                &pull(&s.url(&blob_path("library/x", &d))),
                &format!("{what} (round {round})"),
            );
        }
        wait_fills_done(&s);
        for (what, body, _) in &lies {
            let d = sha256(body);
            assert_nothing_stored(&s, "library/x", &d);
            let _ = what;
        }
        // Cached content keeps being served.
        let t = get_tag();
        assert_pulled(&t, &img.manifest, "the cached tag");
        assert_eq!(t.x_cache(), Some("STALE"));
        for (d, body) in [
            (&img.config_digest, &img.config),
            (&img.layer_digest, &img.layer),
        ] {
            let p = pull(&s.url(&blob_path("library/x", d)));
            assert_pulled(&p, body, "a cached blob");
            assert_eq!(p.x_cache(), Some("HIT"));
        }
    }

    // The upstream tells the truth again: every blob arrives byte-exact and is cached.
    for (what, body, _) in &lies {
        let d = sha256(body);
        up.set(&blob_path("library/x", &d), Behavior::blob(body.clone()));
        assert_pulled(&pull(&s.url(&blob_path("library/x", &d))), body, what);
    }
    wait_fills_done(&s);
    for (_, body, _) in &lies {
        assert_eq!(
            cached_blob(&s, "library/x", &sha256(body)),
            Some(body.len() as u64)
        );
    }
}
