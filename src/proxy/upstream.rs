//! The HTTP client for one upstream registry: pooled HTTP/1.1 + HTTP/2 connections over rustls
//! (webpki roots plus an optional configured CA), the registry auth dance (Bearer token from
//! the realm in `WWW-Authenticate`, anonymous or with the configured credentials, cached per
//! scope until it expires; or Basic), redirects (Docker Hub sends blobs to a CDN with 307)
//! followed without sending `Authorization` to another host, connect and header timeouts, and
//! retries with backoff for transient failures. Client credentials are never sent upstream:
//! this client only ever uses the upstream's own configured credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed until response headers arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;
const RETRIES: usize = 2;
/// Tokens are used until this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0} is unreachable: {1}")]
    Connect(String, String),
    #[error("upstream {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("upstream {0}: {1}")]
    Protocol(String, String),
    #[error("upstream {0} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects(String),
    #[error("cannot set up the client for upstream {0}: {1}")]
    Setup(String, String),
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

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub struct UpstreamClient {
    pub name: String,
    base: String,
    client: HttpsClient,
    credentials: Option<(String, String)>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
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
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        let credentials = config.credentials().map_err(setup)?;
        Ok(Self {
            base: config.url.trim_end_matches('/').to_string(),
            name,
            client,
            credentials,
            tokens: Mutex::default(),
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
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(scope)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(t, _)| t.clone())
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
        let resp = self
            .send_following(&Method::GET, &url, &[], self.basic_header())
            .await?;
        let status = resp.status();
        let body = tokio::time::timeout(HEADER_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| UpstreamError::Timeout(self.name.clone(), HEADER_TIMEOUT))?
            .map_err(|e| {
                UpstreamError::Protocol(self.name.clone(), format!("token response: {e}"))
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
        let ttl = Duration::from_secs(
            v.get("expires_in")
                .and_then(|e| e.as_u64())
                .unwrap_or(60)
                .max(1),
        );
        let expiry = Instant::now() + ttl.saturating_sub(TOKEN_MARGIN).max(Duration::from_secs(1));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.to_string(), (token.clone(), expiry));
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
            UpstreamError::Protocol(self.name.clone(), format!("bad URL {url}: {e}"))
        })?;
        let origin = current.authority().cloned();
        for _ in 0..=MAX_REDIRECTS {
            let same_host = current.authority() == origin.as_ref();
            let resp = self
                .send_retrying(
                    method,
                    &current,
                    headers,
                    if same_host { auth.clone() } else { None },
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
            current = resolve_location(&current, location).ok_or_else(|| {
                UpstreamError::Protocol(
                    self.name.clone(),
                    format!("bad redirect location {location:?}"),
                )
            })?;
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
                    Ok(Err(e)) => Err(UpstreamError::Connect(self.name.clone(), error_chain(&e))),
                    Ok(Ok(r)) => Ok(r),
                };
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 * 4u64.pow(attempt as u32 - 1))).await;
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

/// Resolves a `Location` (absolute, or relative to `base`).
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    let scheme = base.scheme_str()?;
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
