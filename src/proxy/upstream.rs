//! The HTTP client for one upstream registry: pooled HTTP/1.1 + HTTP/2 connections over rustls
//! (webpki roots plus an optional configured CA), the registry auth dance (Bearer token from
//! the realm in `WWW-Authenticate`, anonymous or with the configured credentials, cached per
//! scope until it expires; or Basic), redirects (Docker Hub sends blobs to a CDN with 307)
//! followed without sending `Authorization` to another origin, connect and header timeouts, and
//! retries with backoff for transient failures. Client credentials are never sent upstream:
//! this client only ever uses the upstream's own configured credentials.
//!
//! Everything an upstream names is treated as untrusted: token lifetimes are clamped, token
//! responses are size-capped, redirects and token realms may only lead to http(s) on public
//! addresses (or to the upstream's own kind of network, e.g. loopback for a loopback
//! upstream), and the configured credentials go to a realm only over https or at the
//! upstream's own origin. Errors name the upstream and the kind of failure; connection error
//! chains and URLs (signed query strings) go to the log, never to clients.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed until response headers arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;
const RETRIES: usize = 2;
/// Tokens are used until this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// Token lifetimes the upstream announces are clamped to this range (seconds). The lower bound
/// is the token protocol's minimum (and its default when `expires_in` is absent); a token that
/// really expires sooner is answered with 401 and simply fetched again.
const TOKEN_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=3600;
/// Largest token response read from a realm.
pub const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// Scopes whose token is cached per upstream (clients choose the repository names).
const TOKEN_CACHE_ENTRIES: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The detail (the connection error chain) is logged, not shown to clients.
    #[error("upstream {0} is unreachable")]
    Connect(String, String),
    #[error("upstream {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("upstream {0}: {1}")]
    Protocol(String, String),
    #[error("upstream {0} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects(String),
    #[error("cannot set up the client for upstream {0}: {1}")]
    Setup(String, String),
    /// A redirect or token realm pointing somewhere this client will not go.
    #[error("upstream {0} sent the request to a location that is not allowed ({1})")]
    Refused(String, &'static str),
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, val.to_string());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

type HttpsClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Empty<Bytes>>;

/// The system resolver, refusing names (other than the upstream's own) that resolve only to
/// addresses a redirect from this upstream may not lead to: `check_target` sees only the
/// URL, this sees where a name really points. Resolving the upstream's own name tells what
/// kind of network the upstream is on.
#[derive(Clone)]
struct GuardedResolver {
    gai: GaiResolver,
    own_host: Arc<str>,
    reach: Arc<Mutex<Reach>>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let own = name
            .as_str()
            .trim_end_matches('.')
            .eq_ignore_ascii_case(self.own_host.trim_end_matches('.'));
        let resolving = self.gai.call(name);
        let reach = self.reach.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await?.collect();
            let mut reach = reach.lock().unwrap_or_else(|p| p.into_inner());
            if own {
                if let Some(first) = addrs.first() {
                    *reach = Reach::of_ip(first.ip());
                }
                return Ok(addrs.into_iter());
            }
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| Reach::of_ip(a.ip()).allowed_from(*reach))
                .collect();
            if allowed.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the name resolves only to addresses this upstream may not send us to",
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

pub struct UpstreamClient {
    pub name: String,
    base: String,
    client: HttpsClient,
    /// The kind of network the upstream itself is on: redirects and realms may lead to public
    /// addresses or to this kind only. From the URL if it names an address, else learned by
    /// the resolver from the upstream's own name.
    reach: Arc<Mutex<Reach>>,
    credentials: Option<(String, String)>,
    /// Bearer tokens by scope, with when to stop using them.
    tokens: moka::sync::Cache<String, (String, Instant)>,
    /// After a 429: no manifest lookups until then (`Retry-After`).
    backoff_until: Mutex<Option<Instant>>,
}

impl UpstreamClient {
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let name = config.name.get_ref().to_string();
        let setup = |e: String| UpstreamError::Setup(name.clone(), e);
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &config.ca_file {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .map_err(|e| setup(format!("cannot read ca_file {}: {e}", ca.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| setup(format!("bad certificate in {}: {e}", ca.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| setup(format!("bad certificate in {}: {e}", ca.display())))?;
            }
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let base = config.url.trim_end_matches('/').to_string();
        let host = base
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_string))
            .unwrap_or_default();
        let reach = Arc::new(Mutex::new(Reach::of_host(&host)));
        let http = HttpConnector::new_with_resolver(GuardedResolver {
            gai: GaiResolver::new(),
            own_host: host.into(),
            reach: reach.clone(),
        });
        let https = super::web_client::https_or_http(tls, http, CONNECT_TIMEOUT);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        let credentials = config.credentials().map_err(setup)?;
        Ok(Self {
            base,
            name,
            client,
            reach,
            credentials,
            tokens: moka::sync::Cache::builder()
                .max_capacity(TOKEN_CACHE_ENTRIES)
                .time_to_live(Duration::from_secs(*TOKEN_TTL_SECS.end()))
                .build(),
            backoff_until: Mutex::default(),
        })
    }

    /// Remembers a rate limit: a 429 means "not before `Retry-After`" (seconds; 60 if absent
    /// or a date; at most an hour).
    pub fn note_status(&self, status: StatusCode, headers: &HeaderMap) {
        if status != StatusCode::TOO_MANY_REQUESTS {
            return;
        }
        let secs = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60)
            .min(3600);
        *self.backoff_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + Duration::from_secs(secs));
    }

    /// How much longer the upstream asked us to wait, if it did.
    pub fn rate_limited_for(&self) -> Option<Duration> {
        let until = (*self.backoff_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        let (u, p) = self.credentials.as_ref()?;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        HeaderValue::from_str(&format!("Basic {enc}")).ok()
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        self.tokens
            .get(scope)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(t, _)| t)
    }

    /// Whether the configured credentials may go to this token realm: over https, or at the
    /// upstream's own origin (same scheme, host and port; so never over a downgraded scheme).
    fn realm_gets_credentials(&self, realm: &Uri) -> bool {
        if realm.scheme_str() == Some("https") {
            return true;
        }
        let Ok(base) = self.base.parse::<Uri>() else {
            return false;
        };
        same_origin(&base, realm)
    }

    /// Refuses (before any connection) a URL the upstream pointed us to that is not http(s), or
    /// is on a loopback, private or link-local address while the upstream is not.
    fn check_target(&self, uri: &Uri, what: &str) -> Result<(), UpstreamError> {
        let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
        let why = match scheme.as_deref() {
            Some("http" | "https") => match uri.host().map(Reach::of_host) {
                Some(r)
                    if r.allowed_from(*self.reach.lock().unwrap_or_else(|p| p.into_inner())) =>
                {
                    return Ok(());
                }
                Some(_) => "a non-public address",
                None => "no host",
            },
            _ => "not http or https",
        };
        tracing::warn!(upstream = %self.name, url = %uri, reason = why, "refused an upstream {what}");
        Err(UpstreamError::Refused(self.name.clone(), why))
    }

    /// Sends `method path` (a path under `/v2/`), authenticating for `repository:<repo>:pull`.
    /// Follows redirects. The caller reads (or drops) the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        repo: &str,
        headers: &[(header::HeaderName, &str)],
    ) -> Result<Response<Incoming>, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let url = format!("{}{path}", self.base);
        let mut auth = self
            .cached_token(&scope)
            .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok());
        let mut tried_auth = false;
        loop {
            let resp = self
                .send_following(&method, &url, headers, auth.clone())
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED || tried_auth {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            tried_auth = true;
            auth = match challenge {
                Some(Challenge::Basic) => match self.basic_header() {
                    Some(b) => Some(b),
                    None => return Ok(resp),
                },
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    let scope = asked.unwrap_or(scope.clone());
                    let token = self.fetch_token(&realm, service.as_deref(), &scope).await?;
                    HeaderValue::from_str(&format!("Bearer {token}")).ok()
                }
                None => return Ok(resp),
            };
        }
    }

    /// Gets a token from the realm (anonymous, or with the configured credentials) and caches it.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        // Built in a block: the serializer is not Send and must not live across an await.
        let url = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
            let sep = if realm.contains('?') { '&' } else { '?' };
            format!("{realm}{sep}{}", q.finish())
        };
        let uri: Uri = url.parse().map_err(|e| {
            tracing::warn!(upstream = %self.name, realm, error = %e, "unusable token realm");
            UpstreamError::Protocol(
                self.name.clone(),
                "its token realm is not a valid URL".into(),
            )
        })?;
        self.check_target(&uri, "token realm")?;
        let credentials = if self.realm_gets_credentials(&uri) {
            self.basic_header()
        } else {
            if self.credentials.is_some() {
                tracing::warn!(upstream = %self.name, realm, "token realm is plain http on another origin: asking for an anonymous token, credentials withheld");
            }
            None
        };
        let resp = self
            .send_following(&Method::GET, &url, &[], credentials)
            .await?;
        let status = resp.status();
        let body = tokio::time::timeout(
            HEADER_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE).collect(),
        )
        .await
        .map_err(|_| UpstreamError::Timeout(self.name.clone(), HEADER_TIMEOUT))?
        .map_err(|e| {
            let why = if e.is::<http_body_util::LengthLimitError>() {
                format!("token response larger than {} KiB", MAX_TOKEN_RESPONSE >> 10)
            } else {
                tracing::warn!(upstream = %self.name, error = %error_chain(&*e), "token response failed");
                "token response broke off".to_string()
            };
            UpstreamError::Protocol(self.name.clone(), why)
        })?
        .to_bytes();
        if !status.is_success() {
            return Err(UpstreamError::Protocol(
                self.name.clone(),
                format!("token endpoint answered {status}"),
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::Protocol(
                self.name.clone(),
                format!("token response is not JSON: {e}"),
            )
        })?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty());
        let token = token
            .ok_or_else(|| {
                UpstreamError::Protocol(self.name.clone(), "token response has no token".into())
            })?
            .to_string();
        let expires_in = v.get("expires_in").and_then(|e| e.as_u64());
        if let Some(expiry) = token_use_until(Instant::now(), expires_in) {
            self.tokens
                .insert(scope.to_string(), (token.clone(), expiry));
        }
        Ok(token)
    }

    /// One logical request: retried on transient failures, redirects followed. `auth` is sent
    /// only to the host of `url`.
    async fn send_following(
        &self,
        method: &Method,
        url: &str,
        headers: &[(header::HeaderName, &str)],
        auth: Option<HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut current: Uri = url.parse().map_err(|e| {
            tracing::warn!(upstream = %self.name, url, error = %e, "invalid upstream URL");
            UpstreamError::Protocol(self.name.clone(), "invalid URL".into())
        })?;
        let origin = current.clone();
        for _ in 0..=MAX_REDIRECTS {
            // Same scheme too: a redirect from https to http never carries the credentials.
            let same = same_origin(&current, &origin);
            let resp = self
                .send_retrying(
                    method,
                    &current,
                    headers,
                    if same { auth.clone() } else { None },
                )
                .await?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let Some(location) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Ok(resp);
            };
            if scheme_of(location).is_some_and(|s| {
                !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https")
            }) {
                tracing::warn!(upstream = %self.name, location, "refused an upstream redirect: not http or https");
                return Err(UpstreamError::Refused(
                    self.name.clone(),
                    "not http or https",
                ));
            }
            current = resolve_location(&current, location).ok_or_else(|| {
                tracing::warn!(upstream = %self.name, location, "invalid upstream redirect location");
                UpstreamError::Protocol(self.name.clone(), "invalid redirect location".into())
            })?;
            self.check_target(&current, "redirect")?;
        }
        Err(UpstreamError::TooManyRedirects(self.name.clone()))
    }

    async fn send_retrying(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &[(header::HeaderName, &str)],
        auth: Option<HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut attempt = 0;
        loop {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(
                    header::USER_AGENT,
                    concat!("transship/", env!("CARGO_PKG_VERSION")),
                );
            for (k, v) in headers {
                req = req.header(k, *v);
            }
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| UpstreamError::Protocol(self.name.clone(), e.to_string()))?;
            let result = tokio::time::timeout(HEADER_TIMEOUT, self.client.request(req)).await;
            let transient = match &result {
                Err(_) => true,
                Ok(Err(_)) => true,
                Ok(Ok(r)) => matches!(
                    r.status(),
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ),
            };
            if !transient || attempt >= RETRIES {
                return match result {
                    Err(_) => Err(UpstreamError::Timeout(self.name.clone(), HEADER_TIMEOUT)),
                    Ok(Err(e)) => {
                        let chain = error_chain(&e);
                        tracing::warn!(upstream = %self.name, url = %uri, error = %chain, "upstream request failed");
                        Err(UpstreamError::Connect(self.name.clone(), chain))
                    }
                    Ok(Ok(r)) => Ok(r),
                };
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 * 4u64.pow(attempt as u32 - 1))).await;
        }
    }
}

/// When to stop using a token the realm says lives `expires_in` seconds (clamped to
/// `TOKEN_TTL_SECS`, minus a margin); `None`: do not cache it.
fn token_use_until(now: Instant, expires_in: Option<u64>) -> Option<Instant> {
    let secs = expires_in
        .unwrap_or(*TOKEN_TTL_SECS.start())
        .clamp(*TOKEN_TTL_SECS.start(), *TOKEN_TTL_SECS.end());
    let keep = Duration::from_secs(secs).checked_sub(TOKEN_MARGIN)?;
    now.checked_add(keep)
}

/// Same scheme, host and port (the port defaulted by the scheme).
fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |u: &Uri| {
        u.port_u16().or(match u.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })
    };
    a.scheme_str().map(str::to_ascii_lowercase) == b.scheme_str().map(str::to_ascii_lowercase)
        && a.host().map(str::to_ascii_lowercase) == b.host().map(str::to_ascii_lowercase)
        && port(a) == port(b)
}

/// The kind of network an address is on, as far as the host part of a URL tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Globally routable, or a DNS name other than `localhost`.
    Public,
    Loopback,
    /// RFC 1918, carrier-grade NAT, IPv6 unique local.
    Private,
    /// 169.254/16 (cloud metadata services), fe80::/10.
    LinkLocal,
    /// Unspecified, multicast, broadcast, reserved: never a destination.
    Forbidden,
}

impl Reach {
    /// Whether an upstream on `upstream`'s kind of network may send us here.
    fn allowed_from(self, upstream: Reach) -> bool {
        self == Self::Public || (self == upstream && self != Self::Forbidden)
    }

    fn of_host(host: &str) -> Self {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let lower = bare.trim_end_matches('.').to_ascii_lowercase();
        if lower == "localhost" || lower.ends_with(".localhost") {
            return Self::Loopback;
        }
        match bare.parse::<IpAddr>() {
            Ok(ip) => Self::of_ip(ip),
            // No top-level domain starts with a digit: this is a numeric form the resolver
            // would read as an address (`2130706433`, `0x7f.1`, `127.1`).
            Err(_)
                if lower
                    .rsplit('.')
                    .next()
                    .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_digit())) =>
            {
                Self::Forbidden
            }
            Err(_) => Self::Public,
        }
    }

    fn of_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                if v4.is_loopback() {
                    Self::Loopback
                } else if v4.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) {
                    Self::Private
                } else if v4.is_link_local() {
                    Self::LinkLocal
                } else if v4.is_unspecified()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || o[0] == 0
                    || o[0] >= 240
                {
                    Self::Forbidden
                } else {
                    Self::Public
                }
            }
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return Self::of_ip(IpAddr::V4(v4));
                }
                let first = v6.segments()[0];
                if v6.is_loopback() {
                    Self::Loopback
                } else if first & 0xfe00 == 0xfc00 {
                    Self::Private
                } else if first & 0xffc0 == 0xfe80 {
                    Self::LinkLocal
                } else if v6.is_unspecified() || v6.is_multicast() {
                    Self::Forbidden
                } else {
                    Self::Public
                }
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The scheme of an absolute URL (`ftp` of `ftp://...`), if it has one.
fn scheme_of(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once(':')?;
    let mut chars = scheme.chars();
    (chars.next()?.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// Resolves a `Location` (absolute, scheme-relative, or relative to `base`). Absolute URLs of
/// any scheme parse here; `check_target` decides whether to go there.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if scheme_of(location).is_some() {
        return location.parse().ok();
    }
    let scheme = base.scheme_str()?;
    if location.starts_with("//") {
        return format!("{scheme}:{location}").parse().ok();
    }
    let authority = base.authority()?;
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}").parse().ok();
    }
    let path = base.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    format!("{scheme}://{authority}{dir}{location}")
        .parse()
        .ok()
}

/// The integer part of a `ratelimit-*` header (`100;w=21600` → 100).
pub fn rate_limit_value(headers: &HeaderMap, name: &str) -> Option<i64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="http://127.0.0.1:1/t", scope="a:b,c:pull""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: None,
                scope: Some("a:b,c:pull".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None, "no realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn locations() {
        let base: Uri = "https://reg.example/v2/a/blobs/sha256:1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "https://cdn.example/x?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            resolve_location(&base, "/other").unwrap().to_string(),
            "https://reg.example/other"
        );
        assert_eq!(
            resolve_location(&base, "rel").unwrap().to_string(),
            "https://reg.example/v2/a/blobs/rel"
        );
    }

    fn client(url: &str) -> UpstreamClient {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\n[[upstream]]\nname = \"up.example\"\nurl = \"{url}\"\nusername = \"robot\"\npassword = \"pw\"\n"
        );
        let config = crate::config::Config::parse(&text, "t").unwrap();
        UpstreamClient::new(&config.upstreams[0]).unwrap()
    }

    fn allowed(c: &UpstreamClient, url: &str) -> bool {
        c.check_target(&url.parse().unwrap(), "test").is_ok()
    }

    #[test]
    fn redirect_targets_are_public_http_or_the_upstreams_own_kind() {
        let public = client("https://registry.example");
        for ok in [
            "https://cdn.example/blob?sig=1",
            "http://cdn.example/blob",
            "https://93.184.216.34/x",
            "HTTPS://[2606:4700::1]/x",
        ] {
            assert!(allowed(&public, ok), "{ok}");
        }
        for refused in [
            "http://127.0.0.1/x",
            "http://localhost:5000/x",
            "http://LOCALHOST./x",
            "http://10.0.0.1/x",
            "http://172.16.3.4/x",
            "http://192.168.1.1/x",
            "http://100.64.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://[fe80::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://0.0.0.0/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://127.1/x",
            "http://224.0.0.1/x",
            "ftp://cdn.example/x",
            "ws://cdn.example/x",
        ] {
            assert!(!allowed(&public, refused), "{refused}");
        }
        // A loopback upstream (a local test registry) may send us to loopback, not elsewhere
        // non-public.
        let local = client("http://127.0.0.1:5000");
        assert!(allowed(&local, "http://127.0.0.1:6000/cdn"));
        assert!(allowed(&local, "http://localhost:6000/cdn"));
        assert!(allowed(&local, "https://cdn.example/x"));
        assert!(!allowed(&local, "http://169.254.169.254/x"));
        assert!(!allowed(&local, "http://10.0.0.1/x"));
        let private = client("http://10.1.2.3:5000");
        assert!(allowed(&private, "http://10.9.9.9/x"));
        assert!(!allowed(&private, "http://127.0.0.1/x"));
        assert!(!allowed(&private, "http://169.254.169.254/x"));
    }

    #[tokio::test]
    async fn names_resolving_to_non_public_addresses_are_refused() {
        use tower_service::Service;
        let mut public = GuardedResolver {
            gai: GaiResolver::new(),
            own_host: "registry.example".into(),
            reach: Arc::new(Mutex::new(Reach::Public)),
        };
        let name: Name = "localhost".parse().unwrap();
        let err = public.call(name.clone()).await.expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        // The upstream's own name resolves wherever it points, and teaches its kind.
        let mut own = GuardedResolver {
            gai: GaiResolver::new(),
            own_host: "localhost".into(),
            reach: Arc::new(Mutex::new(Reach::Public)),
        };
        assert!(own.call(name.clone()).await.is_ok());
        assert_eq!(*own.reach.lock().unwrap(), Reach::Loopback);
        let mut local = GuardedResolver {
            own_host: "registry.example".into(),
            ..own
        };
        assert!(local.call(name).await.is_ok(), "a loopback upstream");
    }

    #[test]
    fn credentials_go_to_https_realms_or_the_upstreams_own_origin() {
        let https = client("https://registry.example");
        let realm = |c: &UpstreamClient, u: &str| c.realm_gets_credentials(&u.parse().unwrap());
        assert!(realm(&https, "https://auth.example/token"));
        assert!(realm(&https, "https://registry.example/token"));
        assert!(
            !realm(&https, "http://registry.example/token"),
            "downgraded scheme"
        );
        assert!(!realm(&https, "http://auth.example/token"));
        let http = client("http://127.0.0.1:5000");
        assert!(realm(&http, "http://127.0.0.1:5000/token"));
        assert!(!realm(&http, "http://127.0.0.1:5001/token"), "another port");
        assert!(!realm(&http, "http://auth.example/token"));
        assert!(realm(&http, "https://auth.example/token"));
    }

    #[test]
    fn token_lifetimes_are_clamped_without_overflow() {
        let now = Instant::now();
        let until = |e| token_use_until(now, e).map(|t| t.duration_since(now).as_secs());
        assert_eq!(until(Some(u64::MAX)), Some(3600 - 10));
        assert_eq!(until(Some(300)), Some(290));
        assert_eq!(until(Some(0)), Some(50));
        assert_eq!(until(Some(1)), Some(50));
        assert_eq!(until(None), Some(50));
    }

    #[test]
    fn the_token_cache_is_bounded() {
        let c = client("https://registry.example");
        assert_eq!(c.tokens.policy().max_capacity(), Some(TOKEN_CACHE_ENTRIES));
        assert_eq!(
            c.tokens.policy().time_to_live(),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn absolute_locations_of_any_scheme_are_recognised() {
        let base: Uri = "http://127.0.0.1:5000/v2/a/blobs/x".parse().unwrap();
        assert_eq!(scheme_of("ftp://h/x"), Some("ftp"));
        assert_eq!(scheme_of("/v2/x"), None);
        assert_eq!(scheme_of("rel/a:b"), None);
        assert_eq!(
            resolve_location(&base, "ftp://h/x").unwrap().scheme_str(),
            Some("ftp")
        );
        assert_eq!(
            resolve_location(&base, "//cdn.example/x?s=1")
                .unwrap()
                .to_string(),
            "http://cdn.example/x?s=1"
        );
    }

    #[test]
    fn error_messages_carry_no_connection_details() {
        let e = UpstreamError::Connect(
            "docker.io".into(),
            "client error (Connect): tcp connect error: Connection refused (os error 111)".into(),
        );
        assert_eq!(e.to_string(), "upstream docker.io is unreachable");
    }

    #[test]
    fn rate_limits() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from_static(" 76 ;w=21600"),
        );
        assert_eq!(rate_limit_value(&h, "ratelimit-limit"), Some(100));
        assert_eq!(rate_limit_value(&h, "ratelimit-remaining"), Some(76));
        assert_eq!(rate_limit_value(&h, "ratelimit-reset"), None);
    }
}
