//! The token endpoint over HTTP (`/v2/token`) and the turning of access denials into 401
//! challenges, 403s and 429s. The GET form takes Basic credentials and `scope`, `service`,
//! `offline_token` in the query; the POST form is OAuth2 (`grant_type=password|refresh_token`,
//! form-encoded). Challenges name an absolute realm: `auth.realm`, or this server as the client
//! addressed it (`Host`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use http::{Method, StatusCode, header};

use super::body::{RequestBody, read_limited};
use super::response::{Resp, json};
use super::router::Route;
use super::{query_all, query_one};
use crate::App;
use crate::auth::scope::{self, Access};
use crate::auth::token::{Credentials, TokenFailure, TokenRequest};
use crate::auth::{Denial, Presented};
use crate::oci::{ErrorCode, RegistryError};

/// The most a token POST body may hold.
const MAX_FORM: u64 = 64 * 1024;

pub async fn serve(
    app: &Arc<App>,
    parts: &Parts,
    mut body: RequestBody,
    peer: SocketAddr,
) -> Result<Resp, RegistryError> {
    let req = match parts.method {
        Method::GET => from_query(parts)?,
        Method::POST => {
            let form = read_limited(&mut body, MAX_FORM).await.map_err(|_| {
                RegistryError::new(
                    ErrorCode::Unsupported,
                    "token request body too large or unreadable",
                )
                .with_status(400)
            })?;
            from_form(&form)?
        }
        _ => {
            return Err(RegistryError::unsupported(
                "the token endpoint takes GET or POST",
            ));
        }
    };
    let req = match (req, parts.method == Method::GET) {
        (mut r, true) => {
            r.credentials = basic_credentials(parts)?;
            r
        }
        (r, false) => r,
    };
    match app.auth.issue_token(req, peer.ip()).await {
        Ok(resp) => {
            app.metrics.tokens_issued.inc();
            let body = serde_json::to_string(&resp)
                .map_err(|e| RegistryError::internal(format!("token response: {e}")))?;
            let mut r = json(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            Ok(r)
        }
        Err(TokenFailure::BadRequest(m)) => {
            Err(RegistryError::new(ErrorCode::Unsupported, m).with_status(400))
        }
        Err(TokenFailure::Denied(d)) => Err(denial_error(app, parts, d, None)),
    }
}

fn scopes<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Vec<Access>, RegistryError> {
    scope::parse_all(values)
        .map_err(|e| RegistryError::new(ErrorCode::Unsupported, e.to_string()).with_status(400))
}

fn from_query(parts: &Parts) -> Result<TokenRequest, RegistryError> {
    let values = query_all(parts, "scope");
    Ok(TokenRequest {
        credentials: Credentials::None,
        scopes: scopes(values.iter().map(String::as_str))?,
        service: query_one(parts, "service"),
        offline: query_one(parts, "offline_token").is_some_and(|v| v == "true"),
    })
}

fn from_form(form: &[u8]) -> Result<TokenRequest, RegistryError> {
    let field = |key: &str| {
        form_urlencoded::parse(form)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    let bad = |m: &str| RegistryError::new(ErrorCode::Unsupported, m).with_status(400);
    let credentials = match field("grant_type").as_deref() {
        Some("password") => Credentials::Password {
            user: field("username").ok_or_else(|| bad("grant_type=password needs username"))?,
            password: field("password").ok_or_else(|| bad("grant_type=password needs password"))?,
        },
        Some("refresh_token") => Credentials::Refresh(
            field("refresh_token")
                .ok_or_else(|| bad("grant_type=refresh_token needs refresh_token"))?,
        ),
        _ => return Err(bad("unsupported grant_type: use password or refresh_token")),
    };
    let scope = field("scope").unwrap_or_default();
    Ok(TokenRequest {
        credentials,
        scopes: scopes([scope.as_str()])?,
        service: field("service"),
        offline: field("access_type").is_some_and(|v| v == "offline"),
    })
}

/// Basic credentials on a GET token request (anything else there is a client bug).
fn basic_credentials(parts: &Parts) -> Result<Credentials, RegistryError> {
    let Some(h) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(Credentials::None);
    };
    let malformed = |m: String| RegistryError::new(ErrorCode::Unauthorized, m).with_status(400);
    match crate::auth::parse_authorization(h) {
        Ok(Presented::Basic { user, password }) => Ok(Credentials::Password { user, password }),
        Ok(Presented::Bearer(_)) => Err(malformed(
            "the token endpoint takes Basic credentials".into(),
        )),
        Err(Denial::Malformed(m)) => Err(malformed(m)),
        Err(_) => Err(malformed("malformed credentials".into())),
    }
}

/// The scope a request on `route` needs, for its challenge.
pub fn scope_for(route: &Route<'_>, method: &Method) -> Option<String> {
    match route {
        Route::Catalog => Some("registry:catalog:*".into()),
        _ => route.name().map(|name| {
            format!(
                "repository:{name}:{}",
                super::action_for_route(route, method).scope_actions()
            )
        }),
    }
}

/// A denial as the client sees it: 401 with a Bearer challenge, 403, 400 or 429.
pub fn denial_error(
    app: &App,
    parts: &Parts,
    denial: Denial,
    scope: Option<String>,
) -> RegistryError {
    let outcome = match &denial {
        Denial::Unauthenticated { .. } => "unauthenticated",
        Denial::Forbidden(_) => "forbidden",
        Denial::Throttled { .. } | Denial::Busy { .. } => "throttled",
        Denial::Malformed(_) => "malformed",
    };
    app.metrics.auth_denials.with_label_values(&[outcome]).inc();
    match denial {
        Denial::Unauthenticated { message, error } => {
            RegistryError::new(ErrorCode::Unauthorized, message).with_header(
                "www-authenticate",
                challenge(app, parts, scope.as_deref(), error),
            )
        }
        Denial::Forbidden(message) => RegistryError::denied(message),
        Denial::Malformed(message) => RegistryError::new(ErrorCode::Unauthorized, message)
            .with_status(400)
            .with_header(
                "www-authenticate",
                challenge(app, parts, scope.as_deref(), Some("invalid_request")),
            ),
        Denial::Throttled { retry_after } => RegistryError::new(
            ErrorCode::TooManyRequests,
            format!("too many failed logins; retry in {retry_after}s"),
        )
        .with_header("retry-after", retry_after.to_string()),
        Denial::Busy { retry_after } => RegistryError::new(
            ErrorCode::TooManyRequests,
            format!("too many logins being checked; retry in {retry_after}s"),
        )
        .with_header("retry-after", retry_after.to_string()),
    }
}

/// `Bearer realm="…",service="…"[,scope="…"][,error="…"]`.
fn challenge(app: &App, parts: &Parts, scope: Option<&str>, error: Option<&str>) -> String {
    let realm = app
        .auth
        .config
        .realm
        .clone()
        .unwrap_or_else(|| default_realm(app, parts));
    let mut c = format!(
        "Bearer realm=\"{realm}\",service=\"{}\"",
        app.auth.config.service
    );
    if let Some(s) = scope {
        c.push_str(&format!(",scope=\"{s}\""));
    }
    if let Some(e) = error {
        c.push_str(&format!(",error=\"{e}\""));
    }
    c
}

/// This server's token URL as the client addressed it. The Host is used only if it looks like
/// a host name or address with an optional port, so it cannot inject into the header.
fn default_realm(app: &App, parts: &Parts) -> String {
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .unwrap_or_else(|| app.config.server.listen.to_string());
    format!("{scheme}://{host}/v2/token")
}
