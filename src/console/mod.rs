//! The console: server-rendered pages at the registry's own names (`/PROJECT/IMAGE`,
//! `/PROJECT/IMAGE@sha256:…`, `/PROJECT`, `/`, and cache repositories such as
//! `/docker.io/library/nginx`), and the same data as JSON for `Accept: application/json`.
//! Its own endpoints live under `/-/`: the stylesheet, sign-in and sign-out, and the delete
//! confirmation and form. Callers are the registry's identities: a console session (cookie),
//! or an `Authorization` header as on the registry API. Pages show what the caller may pull
//! and answer 404 for the rest; an anonymous browser is offered the sign-in form instead.
//!
//! `negotiate` decides which requests are the console's, `session` holds sign-ins, `view`
//! builds each page's data from the store, `pages` renders it.

pub mod negotiate;
pub mod pages;
pub mod session;
pub mod shared_sessions;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, header};
use maud::Markup;
use serde::Serialize;

use crate::App;
use crate::auth::keys::Subject;
use crate::auth::{Action, Caller, Denial, Identity};
use crate::http::body::{RequestBody, ResponseBody, read_limited};
use crate::http::response::Resp;
use crate::oci::{Digest, Reference, RepoName};
use crate::store::StoreError;
pub use negotiate::{Form, wants};
use pages::Ctx;
use session::{Session, Sessions};

/// The most a console form may carry.
const MAX_FORM: u64 = 16 * 1024;

const STYLE: &str = include_str!("style.css");

/// The console's state: its sessions.
#[derive(Default)]
pub struct Console {
    pub sessions: Sessions,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("console task failed: {0}")]
    Task(String),
    #[error("too many pages are being built at once")]
    Busy,
}

/// Who is looking at a page.
struct Who {
    caller: Caller,
    /// The session cookie's value and its session, when signed in through the console.
    session: Option<(String, Session)>,
    /// The name shown in the header.
    name: Option<String>,
}

impl Who {
    fn ctx(&self) -> Ctx {
        Ctx {
            user: self.name.clone(),
            csrf: self.session.as_ref().map(|(_, s)| s.csrf.clone()),
        }
    }

    fn anonymous(&self) -> bool {
        matches!(self.caller.identity, Identity::Anonymous)
    }
}

fn subject_name(s: &Subject) -> String {
    match s {
        Subject::User(name) => name.clone(),
        Subject::Key { .. } => s.to_string(),
    }
}

/// Works out the caller: a live console session first, else the `Authorization` header (for
/// the JSON form from scripts), else anonymous.
async fn who(app: &App, parts: &Parts, peer: SocketAddr) -> Result<Who, Denial> {
    if let Some(cookie) = session::cookie_value(&parts.headers)
        && let Some(s) = live_session(app, &cookie).await
    {
        // The credential it was opened with must still hold (not reset, revoked, expired),
        // and so must the user; otherwise the session ends here.
        let holds = s
            .mark
            .as_ref()
            .is_some_and(|m| app.auth.identities.credential_holds(m, &s.sub));
        let caller = holds
            .then(|| app.auth.session_caller(&s.sub, peer.ip()))
            .flatten();
        let Some(caller) = caller else {
            close_session(app, &cookie).await;
            return who_without_session(app, parts, peer).await;
        };
        let name = match &caller.identity {
            Identity::Subject(sub) => Some(subject_name(sub)),
            _ => None,
        };
        return Ok(Who {
            caller,
            session: Some((cookie, s)),
            name,
        });
    }
    who_without_session(app, parts, peer).await
}

/// The session behind a cookie; none if the shared table cannot be read (logged: the page
/// is then served as to a signed-out browser rather than not at all).
async fn live_session(app: &App, cookie: &str) -> Option<Session> {
    shared_sessions::get(app, cookie)
        .await
        .inspect_err(|e| tracing::error!(error = %e, "console sessions unreadable"))
        .ok()
        .flatten()
}

/// Ends a session; a failure is logged (the session then lasts until it expires).
async fn close_session(app: &App, cookie: &str) {
    if let Err(e) = shared_sessions::close(app, cookie).await {
        tracing::error!(error = %e, "console session not ended");
    }
}

/// The caller from the `Authorization` header, else anonymous.
async fn who_without_session(app: &App, parts: &Parts, peer: SocketAddr) -> Result<Who, Denial> {
    let caller = app
        .auth
        .authenticate(parts.headers.get(header::AUTHORIZATION), peer.ip(), false)
        .await?;
    let name = match &caller.identity {
        Identity::Subject(s) => Some(subject_name(s)),
        Identity::Token(c) if !c.sub.is_empty() => Some(c.sub.clone()),
        _ => None,
    };
    Ok(Who {
        caller,
        session: None,
        name,
    })
}

/// Serves a console request (`wants` said it is one).
pub async fn serve(
    app: &Arc<App>,
    form: Form,
    parts: &Parts,
    body: RequestBody,
    peer: SocketAddr,
) -> Resp {
    let path = parts.uri.path();
    if path == "/-/style.css" {
        return style();
    }
    let who = match who(app, parts, peer).await {
        Ok(w) => w,
        Err(d) => {
            let anon = Who {
                caller: Caller::anonymous(peer.ip()),
                session: None,
                name: None,
            };
            return denied(form, &anon, d, path);
        }
    };
    let result = match (&parts.method, path) {
        (&Method::GET | &Method::HEAD, "/-/login") => {
            let next = safe_next(crate::http::query_one(parts, "next").as_deref());
            Ok(login_page(form, &who, StatusCode::OK, &next, None))
        }
        (&Method::POST, "/-/login") if cross_site(parts) => Ok(message(
            form,
            &who,
            StatusCode::FORBIDDEN,
            "Refused",
            "Sign in from this site's own page.",
        )),
        (&Method::POST, "/-/login") => Ok(login(app, form, &who, body, peer).await),
        (&Method::POST, "/-/logout") => Ok(logout(app, form, &who, body).await),
        (&Method::GET | &Method::HEAD, "/-/delete") => confirm_delete(app, form, &who, parts).await,
        (&Method::POST, "/-/delete") => delete(app, form, &who, body).await,
        (&Method::GET | &Method::HEAD, p) if !p.starts_with(negotiate::OWN) => {
            page(app, form, &who, parts).await
        }
        _ => Ok(message(
            form,
            &who,
            StatusCode::NOT_FOUND,
            "Not found",
            "No such page.",
        )),
    };
    result.unwrap_or_else(|e| {
        if matches!(e, ConsoleError::Busy) {
            let mut r = message(
                form,
                &who,
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                "Too many pages are being built at once; try again in a moment.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            return r;
        }
        tracing::error!(error = %e, path, "console page failed");
        message(
            form,
            &who,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Error",
            "The page could not be built; see the server log.",
        )
    })
}

fn style() -> Resp {
    let mut r = Response::new(ResponseBody::full(Bytes::from_static(STYLE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(STYLE.len()));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}

/// A response with the headers every console answer carries: no caching of personal pages,
/// no framing, no scripts.
fn respond(status: StatusCode, content_type: &'static str, body: String) -> Resp {
    let len = body.len();
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("Accept, Cookie"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// One view in the asked form.
fn render<T: Serialize>(
    form: Form,
    status: StatusCode,
    view: &T,
    html: impl FnOnce() -> Markup,
) -> Resp {
    match form {
        Form::Html => respond(status, "text/html; charset=utf-8", html().into_string()),
        Form::Json => match serde_json::to_string_pretty(view) {
            Ok(s) => respond(status, "application/json", s),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                serde_json::json!({ "error": e.to_string() }).to_string(),
            ),
        },
    }
}

fn message(form: Form, who: &Who, status: StatusCode, title: &str, text: &str) -> Resp {
    render(form, status, &serde_json::json!({ "error": text }), || {
        pages::message(&who.ctx(), title, text)
    })
}

fn redirect(to: &str, cookie: Option<String>) -> Resp {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        String::new(),
    );
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// Where to go after signing in: a path on this site only.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && n.len() <= 1024
                && n.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

fn login_page(form: Form, who: &Who, status: StatusCode, next: &str, error: Option<&str>) -> Resp {
    let json = serde_json::json!({ "error": error.unwrap_or("authentication required"), "login": "/-/login" });
    render(form, status, &json, || {
        pages::login(&who.ctx(), next, error)
    })
}

/// A refused caller: bad credentials or throttling.
fn denied(form: Form, who: &Who, d: Denial, path: &str) -> Resp {
    match d {
        Denial::Throttled { retry_after } | Denial::Busy { retry_after } => {
            let mut r = message(
                form,
                who,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts",
                &format!("Too many failed sign-ins; try again in {retry_after} s."),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            r
        }
        Denial::Forbidden(m) => message(form, who, StatusCode::FORBIDDEN, "Not allowed", &m),
        Denial::Unauthenticated { .. } | Denial::Malformed(_) => login_page(
            form,
            who,
            StatusCode::UNAUTHORIZED,
            &safe_next(Some(path)),
            Some("Invalid user name or password."),
        ),
    }
}

/// What the caller may not see: 404, or for an anonymous browser the sign-in form.
fn not_visible(form: Form, who: &Who, path: &str) -> Resp {
    if who.anonymous() {
        login_page(
            form,
            who,
            StatusCode::UNAUTHORIZED,
            &safe_next(Some(path)),
            None,
        )
    } else {
        message(
            form,
            who,
            StatusCode::NOT_FOUND,
            "Not found",
            "No such repository or image.",
        )
    }
}

async fn read_form(body: RequestBody) -> Option<Vec<(String, String)>> {
    let mut body = body;
    let bytes = read_limited(&mut body, MAX_FORM).await.ok()?;
    Some(
        form_urlencoded::parse(&bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn login(app: &App, form: Form, who: &Who, body: RequestBody, peer: SocketAddr) -> Resp {
    let Some(fields) = read_form(body).await else {
        return message(
            form,
            who,
            StatusCode::BAD_REQUEST,
            "Bad request",
            "The form could not be read.",
        );
    };
    let next = safe_next(field(&fields, "next"));
    let (user, password) = (
        field(&fields, "user").unwrap_or(""),
        field(&fields, "password").unwrap_or(""),
    );
    match app.auth.console_login(user, password, peer.ip()).await {
        Ok(subject) => {
            let mark = app.auth.identities.credential_mark(user, password);
            let cookie = match shared_sessions::open(app, &subject.token_sub(), mark).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "console session not opened");
                    return message(
                        form,
                        who,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Unavailable",
                        "Signing in is not possible right now; try again in a moment.",
                    );
                }
            };
            let secure = app.tls.is_some();
            tracing::info!(target: "audit", user = %subject, peer = %peer.ip(), "console sign-in");
            redirect(
                &next,
                Some(session::set_cookie(&cookie, secure, session::SESSION_TTL)),
            )
        }
        Err(Denial::Forbidden(m)) => login_page(form, who, StatusCode::FORBIDDEN, &next, Some(&m)),
        Err(d) => denied(form, who, d, &next),
    }
}

/// The session of a form post, if its CSRF token is the session's.
fn checked_session<'a>(who: &'a Who, fields: &[(String, String)]) -> Option<&'a (String, Session)> {
    let s = who.session.as_ref()?;
    session::csrf_matches(&s.1, field(fields, "csrf")?).then_some(s)
}

fn forged(form: Form, who: &Who) -> Resp {
    message(
        form,
        who,
        StatusCode::FORBIDDEN,
        "Refused",
        "This form was not sent from a page of your session (missing or wrong CSRF token).",
    )
}

async fn logout(app: &App, form: Form, who: &Who, body: RequestBody) -> Resp {
    let fields = read_form(body).await.unwrap_or_default();
    // A session that already ended (expired, or the server restarted): nothing to end.
    if who.session.is_none() {
        return redirect("/", Some(session::clear_cookie(app.tls.is_some())));
    }
    let Some((cookie, _)) = checked_session(who, &fields) else {
        return forged(form, who);
    };
    close_session(app, cookie).await;
    redirect("/", Some(session::clear_cookie(app.tls.is_some())))
}

/// The host clients pull from, as the browser named it.
fn host(parts: &Parts) -> String {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .filter(|h| {
            h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("HOST")
        .to_string()
}

/// Page builds running at once, at most: they share the blocking pool with the registry's
/// own store work, so a crawler (or anyone) cannot take it over.
const MAX_BUILDS: usize = 4;

static BUILDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_BUILDS);

/// Whether a POST comes from another site's page (a forged sign-in that would log the
/// victim into the attacker's account): browsers say so in `Sec-Fetch-Site`, and older ones
/// send an `Origin` naming another host.
fn cross_site(parts: &Parts) -> bool {
    let h = &parts.headers;
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    match (h.get(header::ORIGIN).and_then(|v| v.to_str().ok()), host) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_none_or(|(_, authority)| authority != host),
        (Some(_), None) => true,
        _ => false,
    }
}

/// Runs a page builder (index reads, a config blob read) on the blocking pool, if one of the
/// `MAX_BUILDS` slots is free (`Busy`, answered 503 with `Retry-After`, otherwise).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConsoleError> + Send + 'static,
) -> Result<T, ConsoleError> {
    let _slot = BUILDS.try_acquire().map_err(|_| ConsoleError::Busy)?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConsoleError::Task(e.to_string()))?
}

/// What a browsable path names.
enum Target {
    Home,
    /// A repository, or a prefix whose repositories are listed.
    Name(RepoName),
    Image(RepoName, Digest),
    Invalid,
}

fn target(path: &str) -> Target {
    let path = path.trim_matches('/');
    if path.is_empty() {
        return Target::Home;
    }
    let (name, digest) = match path.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (path, None),
    };
    let Ok(repo) = name.parse::<RepoName>() else {
        return Target::Invalid;
    };
    match digest.map(str::parse::<Digest>) {
        None => Target::Name(repo),
        Some(Ok(d)) => Target::Image(repo, d),
        Some(Err(_)) => Target::Invalid,
    }
}

async fn build(app: &App, caller: &Caller, path: &str, host: &str) -> Result<Built, ConsoleError> {
    Ok(match target(path) {
        Target::Home => Built::Home(view::home(app, caller)),
        Target::Invalid => Built::Hidden,
        Target::Image(repo, digest) => match view::visible(app, caller, &repo) {
            Some(seen) => view::image(app, caller, &repo, &digest, &seen, host)
                .await?
                .map_or(Built::Hidden, |i| Built::Image(Box::new(i))),
            None => Built::Hidden,
        },
        Target::Name(repo) => match view::visible(app, caller, &repo) {
            Some(seen)
                if view::storage_for(app, &seen.namespace)
                    .repo_exists(&repo)
                    .await? =>
            {
                Built::Repository(Box::new(
                    view::repository(app, caller, &repo, &seen, host).await?,
                ))
            }
            _ => match view::listing(app, caller, repo.as_str()).await? {
                Some(l) => Built::Listing(l),
                None => view::canonical(app, caller, &repo)?.map_or(Built::Hidden, Built::Moved),
            },
        },
    })
}

enum Built {
    Home(view::Home),
    Listing(view::Listing),
    Repository(Box<view::Repository>),
    Image(Box<view::Image>),
    /// A cache repository under a name clients pull it by: its page is elsewhere.
    Moved(String),
    Hidden,
}

async fn page(app: &Arc<App>, form: Form, who: &Who, parts: &Parts) -> Result<Resp, ConsoleError> {
    let path = parts.uri.path().to_string();
    let host = host(parts);
    let (app2, caller) = (app.clone(), who.caller.clone());
    // The builders are async (the cluster profile awaits its database) but run on the
    // blocking pool as one unit, where the local profile's index scans belong.
    let built = blocking(move || {
        let app = &*app2;
        tokio::runtime::Handle::current().block_on(build(app, &caller, &path, &host))
    })
    .await?;
    // Deleting takes a signed-in caller (a session's CSRF token, or credentials on the
    // request): an anonymous page offers no delete buttons even where anonymous push is on.
    let built = match built {
        Built::Repository(mut r) if who.anonymous() => {
            r.can_delete = false;
            Built::Repository(r)
        }
        Built::Image(mut i) if who.anonymous() => {
            i.can_delete = false;
            Built::Image(i)
        }
        other => other,
    };
    let ctx = who.ctx();
    Ok(match built {
        Built::Home(h) => render(form, StatusCode::OK, &h, || pages::home(&ctx, &h)),
        Built::Listing(l) => render(form, StatusCode::OK, &l, || pages::listing(&ctx, &l)),
        Built::Repository(r) => render(form, StatusCode::OK, &r, || pages::repository(&ctx, &r)),
        Built::Image(i) => render(form, StatusCode::OK, &i, || pages::image(&ctx, &i)),
        Built::Moved(to) => redirect(&to, None),
        Built::Hidden => not_visible(form, who, parts.uri.path()),
    })
}

/// A delete target: the repository and reference a form names, if the caller may see the
/// repository. `None` answers 404 (or the sign-in form).
fn delete_target(
    app: &App,
    who: &Who,
    repo: Option<&str>,
    reference: Option<&str>,
) -> Option<(RepoName, Reference)> {
    let repo: RepoName = repo?.parse().ok()?;
    let reference: Reference = reference?.parse().ok()?;
    view::visible(app, &who.caller, &repo)?;
    Some((repo, reference))
}

async fn confirm_delete(
    app: &App,
    form: Form,
    who: &Who,
    parts: &Parts,
) -> Result<Resp, ConsoleError> {
    let repo = crate::http::query_one(parts, "repo");
    let reference = crate::http::query_one(parts, "ref");
    let Some((repo, reference)) = delete_target(app, who, repo.as_deref(), reference.as_deref())
    else {
        return Ok(not_visible(form, who, parts.uri.path()));
    };
    let namespace = app.proxy.namespace(&repo, None);
    if who.session.is_none() || !app.auth.may(&who.caller, &repo, &namespace, Action::Delete) {
        return Ok(message(
            form,
            who,
            StatusCode::FORBIDDEN,
            "Not allowed",
            "You may not delete here.",
        ));
    }
    let (repo, reference) = (repo.to_string(), reference.to_string());
    let json = serde_json::json!({ "repository": repo, "reference": reference, "confirm": "POST /-/delete with csrf, repo, ref" });
    Ok(render(form, StatusCode::OK, &json, || {
        pages::confirm_delete(&who.ctx(), &repo, &reference)
    }))
}

async fn delete(
    app: &Arc<App>,
    form: Form,
    who: &Who,
    body: RequestBody,
) -> Result<Resp, ConsoleError> {
    let fields = read_form(body).await.unwrap_or_default();
    if checked_session(who, &fields).is_none() {
        return Ok(forged(form, who));
    }
    let Some((repo, reference)) =
        delete_target(app, who, field(&fields, "repo"), field(&fields, "ref"))
    else {
        return Ok(not_visible(form, who, "/"));
    };
    let namespace = app.proxy.namespace(&repo, None);
    if let Err(d) = app
        .auth
        .authorize(&who.caller, &repo, &namespace, Action::Delete)
    {
        return Ok(denied(form, who, d, "/"));
    }
    let deleted = match view::storage_for(app, &namespace)
        .delete_manifest(&repo, &reference)
        .await
    {
        Ok(()) => true,
        Err(StoreError::ManifestUnknown(_)) => false,
        Err(e) => return Err(e.into()),
    };
    if !deleted {
        return Ok(message(
            form,
            who,
            StatusCode::NOT_FOUND,
            "Not found",
            "Nothing to delete: it is already gone.",
        ));
    }
    tracing::info!(target: "audit", caller = %who.caller, repo = %repo, reference = %reference, "console delete");
    Ok(redirect(&format!("/{repo}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_homes_repositories_and_images() {
        assert!(matches!(target("/"), Target::Home));
        assert!(matches!(target("/p/app/"), Target::Name(r) if r.as_str() == "p/app"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(
            matches!(target(&format!("/example.com/p/app@{d}")), Target::Image(r, x) if r.as_str() == "example.com/p/app" && x.to_string() == d)
        );
        assert!(matches!(target("/p/app@sha256:zz"), Target::Invalid));
        assert!(matches!(target("/P/App"), Target::Invalid));
    }

    #[test]
    fn sign_in_only_sends_people_to_this_site() {
        assert_eq!(safe_next(Some("/p/app")), "/p/app");
        assert_eq!(safe_next(Some("//evil.example/x")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/a b")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
