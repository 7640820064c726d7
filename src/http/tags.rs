//! Tag listing and the catalog: sorted (ASCII) pages with `n`/`last` and an RFC 5988 `Link`
//! to the next page. Both share the paging rules: `n=0` is an empty page without `Link`;
//! a missing `n` is capped at `MAX_PAGE` with a `Link` when more remain. Mirror repositories
//! answer with the same pages (`tags_response`) over the upstream's list.

use std::sync::Arc;

use http::request::Parts;
use http::{StatusCode, header};

use super::query_one;
use super::response::{Resp, json, set};
use crate::App;
use crate::auth::Caller;
use crate::oci::{ErrorCode, RegistryError, RepoName};
use crate::store::Page;

/// The largest page served, whatever `n` asks for.
pub const MAX_PAGE: usize = 10_000;

/// `(n, last)` from the query.
pub fn paging(parts: &Parts) -> Result<(usize, Option<String>), RegistryError> {
    let n = match query_one(parts, "n") {
        None => MAX_PAGE,
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| {
                RegistryError::new(
                    ErrorCode::PaginationNumberInvalid,
                    format!("invalid page size n={s:?}"),
                )
            })?
            .min(MAX_PAGE),
    };
    Ok((n, query_one(parts, "last")))
}

/// Adds the `Link` to the next page; `ns` (the client's `?ns=`) is carried over.
fn with_link(mut r: Resp, path: &str, page: &Page, n: usize, ns: Option<&str>) -> Resp {
    if page.more
        && let Some(last) = page.items.last()
    {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("last", last).append_pair("n", &n.to_string());
        if let Some(ns) = ns {
            q.append_pair("ns", ns);
        }
        let q = q.finish();
        set(&mut r, header::LINK, format!("<{path}?{q}>; rel=\"next\""));
    }
    r
}

pub async fn list(app: &Arc<App>, repo: &RepoName, parts: &Parts) -> Result<Resp, RegistryError> {
    let (n, last) = paging(parts)?;
    let page = app
        .storage
        .list_tags(repo, last.as_deref(), n)
        .await?
        .ok_or_else(|| RegistryError::name_unknown(repo))?;
    Ok(tags_response(repo, &page, n, None))
}

/// A page of `repo`'s tags with the `Link` to the next one (asked for with `n` and `ns`).
pub fn tags_response(repo: &RepoName, page: &Page, n: usize, ns: Option<&str>) -> Resp {
    let body = serde_json::json!({"name": repo.as_str(), "tags": page.items}).to_string();
    with_link(
        json(StatusCode::OK, body),
        &format!("/v2/{repo}/tags/list"),
        page,
        n,
        ns,
    )
}

pub async fn catalog(
    app: &Arc<App>,
    parts: &Parts,
    caller: &Caller,
) -> Result<Resp, RegistryError> {
    let (n, last) = paging(parts)?;
    let page = app
        .storage
        .catalog(last.as_deref(), n, |name| app.auth.may_list(caller, name))
        .await?;
    let body = serde_json::json!({"repositories": page.items}).to_string();
    Ok(with_link(
        json(StatusCode::OK, body),
        "/v2/_catalog",
        &page,
        n,
        None,
    ))
}
