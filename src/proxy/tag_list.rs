//! Tag lists of mirrored repositories: the upstream's own list, not just the tags cached here.
//! Every page the upstream links (`Link: <...>; rel="next"`) is fetched, within caps on pages,
//! bytes and tags; names that are not valid tags are dropped and the list is kept sorted
//! (ASCII) so clients can page through it with `n`/`last`. A list is cached per repository for
//! the upstream's `tag_ttl` (concurrent requests share one fetch), and the last list fetched is
//! kept for `stale_if_error` to answer while the upstream is down (then, failing that, the tags
//! cached here). The upstream saying the repository does not exist is `NAME_UNKNOWN`; an
//! `offline` upstream is never asked. Both caches are bounded by weight (bytes of tag names).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, header};
use moka::future::Cache as AsyncCache;
use moka::sync::Cache;

use super::Context;
use super::ask::{Miss, ask, read_body};
use super::{CacheOutcome, MirrorRoute};
use crate::config::UpstreamConfig;
use crate::oci::{ErrorCode, RegistryError, Tag};
use crate::store::Page;

/// Most upstream pages fetched for one list.
pub const MAX_PAGES: usize = 100;
/// Most bytes of upstream responses read for one list, all pages together. Unlike the page
/// and tag caps, which cut the list, a list past this budget is not served: the answer is the
/// last list fetched, else the tags cached here, else 503.
pub const MAX_LIST_BYTES: usize = 8 << 20;
/// Most tags kept of one list; beyond it the list is cut (and a warning logged).
pub const MAX_TAGS: usize = 100_000;
/// Weight (bytes of tag names, roughly) each cache holds per upstream.
const CACHE_WEIGHT: u64 = 32 << 20;

type Tags = Arc<Vec<String>>;

/// A repository's tags (sorted) and how they were found.
pub struct TagList {
    pub tags: Tags,
    pub outcome: CacheOutcome,
}

/// Per upstream: lists younger than `tag_ttl` (none when it is 0: every request asks), and the
/// last list of each repository.
pub struct TagLists {
    fresh: Vec<Option<AsyncCache<String, Tags>>>,
    last: Vec<Cache<String, Tags>>,
}

fn weight(_: &String, tags: &Tags) -> u32 {
    let bytes: usize = tags.iter().map(|t| t.len() + 24).sum();
    u32::try_from(bytes + 64).unwrap_or(u32::MAX)
}

impl TagLists {
    pub fn new(upstreams: &[UpstreamConfig]) -> Self {
        let ttl = |d: Duration| d.max(Duration::from_millis(1));
        Self {
            fresh: upstreams
                .iter()
                .map(|u| {
                    (!u.tag_ttl.0.is_zero()).then(|| {
                        AsyncCache::builder()
                            .max_capacity(CACHE_WEIGHT)
                            .weigher(weight)
                            .time_to_live(u.tag_ttl.0)
                            .build()
                    })
                })
                .collect(),
            last: upstreams
                .iter()
                .map(|u| {
                    Cache::builder()
                        .max_capacity(CACHE_WEIGHT)
                        .weigher(weight)
                        .time_to_live(ttl(u.stale_if_error.0))
                        .build()
                })
                .collect(),
        }
    }
}

/// The tags of the mirrored repository: the upstream's list, cached briefly.
pub async fn tags(cx: &Context, route: &MirrorRoute) -> Result<TagList, RegistryError> {
    if cx.proxy.config(route.upstream).offline {
        return cached_here(cx, route)
            .await?
            .map(|tags| TagList {
                tags,
                outcome: CacheOutcome::Hit,
            })
            .ok_or_else(|| RegistryError::name_unknown(&route.remote));
    }
    let lists = &cx.proxy.tag_lists;
    let key = route.local.as_str();
    let fetched = match &lists.fresh[route.upstream] {
        Some(fresh) => fresh
            .entry_by_ref(key)
            .or_try_insert_with(fetch_all(cx, route))
            .await
            .map(|entry| (entry.is_fresh(), entry.into_value())),
        None => fetch_all(cx, route)
            .await
            .map(|tags| (true, tags))
            .map_err(Arc::new),
    };
    match fetched {
        Ok((true, tags)) => {
            lists.last[route.upstream].insert(key.to_string(), tags.clone());
            Ok(TagList {
                tags,
                outcome: CacheOutcome::Miss,
            })
        }
        Ok((false, tags)) => Ok(TagList {
            tags,
            outcome: CacheOutcome::Hit,
        }),
        Err(miss) => match &*miss {
            Miss::NotFound { .. } => {
                lists.last[route.upstream].invalidate(key);
                Err(RegistryError::name_unknown(&format!(
                    "{} (not found upstream)",
                    route.remote
                )))
            }
            Miss::Unavailable(why) | Miss::Invalid(why) => stale(cx, route, why).await,
        },
    }
}

/// The upstream cannot be asked: the last list fetched, else the tags cached here, else 503.
async fn stale(cx: &Context, route: &MirrorRoute, why: &str) -> Result<TagList, RegistryError> {
    let last = cx.proxy.tag_lists.last[route.upstream].get(route.local.as_str());
    let tags = match last {
        Some(tags) => tags,
        None => cached_here(cx, route).await?.ok_or_else(|| {
            RegistryError::new(
                ErrorCode::Unavailable,
                format!(
                    "upstream {} is unavailable and no tag list is cached: {why}",
                    cx.proxy.upstream_name(route.upstream)
                ),
            )
        })?,
    };
    tracing::warn!(repo = %route.local, %why, "serving a stale tag list");
    Ok(TagList {
        tags,
        outcome: CacheOutcome::Stale,
    })
}

/// The tags of this repository in the cache (the cluster's, in the cluster profile), if it
/// holds the repository.
async fn cached_here(cx: &Context, route: &MirrorRoute) -> Result<Option<Tags>, RegistryError> {
    let page = match cx.proxy.shared_cache() {
        Some(shared) => shared.list_tags(&route.local, None, MAX_TAGS).await?,
        None => cx.store.list_tags(&route.local, None, MAX_TAGS)?,
    };
    Ok(page.map(|page| Arc::new(page.items)))
}

#[derive(serde::Deserialize)]
struct UpstreamTags {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Every page of the upstream's list, within the caps; sorted, without duplicates.
async fn fetch_all(cx: &Context, route: &MirrorRoute) -> Result<Tags, Miss> {
    let mut tags = Vec::new();
    let mut budget = MAX_LIST_BYTES;
    let mut query: Option<String> = None;
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let suffix = match &query {
            Some(q) => format!("/tags/list?{q}"),
            None => "/tags/list".to_string(),
        };
        let resp = ask(
            cx,
            route,
            Method::GET,
            &suffix,
            &[(header::ACCEPT, "application/json")],
        )
        .await?;
        let next = next_page_query(resp.headers());
        let body = read_body(resp.into_body(), budget, "a tag list").await?;
        budget -= body.len();
        let page: UpstreamTags = serde_json::from_slice(&body)
            .map_err(|e| Miss::Invalid(format!("upstream tag list is not valid JSON: {e}")))?;
        tags.extend(
            page.tags
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.parse::<Tag>().is_ok()),
        );
        // A page that links to itself would loop until the cap: stop at once.
        match next {
            Some(q) if query.as_ref() != Some(&q) && tags.len() < MAX_TAGS && budget > 0 => {
                query = Some(q);
            }
            Some(_) => break,
            None => {
                complete = true;
                break;
            }
        }
    }
    if !complete || tags.len() > MAX_TAGS {
        tracing::warn!(
            repo = %route.local,
            tags = tags.len(),
            "upstream tag list cut at {MAX_PAGES} pages, {MAX_LIST_BYTES} bytes or {MAX_TAGS} tags"
        );
    }
    tags.sort_unstable();
    tags.dedup();
    tags.truncate(MAX_TAGS);
    Ok(Arc::new(tags))
}

/// The query of the `rel="next"` link in a `Link` header (`</v2/x/tags/list?last=b&n=2>;
/// rel="next"`); only the query is kept, so the next request goes to the same upstream and
/// repository whatever host or path the link names.
pub fn next_page_query(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
            let next = params.split(';').any(|p| {
                p.trim()
                    .strip_prefix("rel=")
                    .is_some_and(|r| r.trim_matches('"').split(' ').any(|r| r == "next"))
            });
            if !next {
                return None;
            }
            let query = target.split_once('?')?.1;
            let query = query.split('#').next().unwrap_or_default();
            (!query.is_empty()).then(|| query.to_string())
        })
}

/// The page of a sorted list after `last` (exclusive), at most `n` items; `more` when items
/// remain after it.
pub fn page(tags: &[String], last: Option<&str>, n: usize) -> Page {
    let start = last.map_or(0, |l| tags.partition_point(|t| t.as_str() <= l));
    let rest = &tags[start..];
    let items: Vec<String> = rest.iter().take(n).cloned().collect();
    Page {
        more: rest.len() > items.len(),
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn link(values: &[&str]) -> Option<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::LINK, HeaderValue::from_str(v).unwrap());
        }
        next_page_query(&h)
    }

    #[test]
    fn next_links() {
        assert_eq!(
            link(&[r#"</v2/library/a/tags/list?last=b&n=2>; rel="next""#]),
            Some("last=b&n=2".into())
        );
        assert_eq!(
            link(&[r#"<https://other.example/v2/x/tags/list?n=100&last=z>; rel=next"#]),
            Some("n=100&last=z".into())
        );
        assert_eq!(
            link(&[
                r#"</v2/a/tags/list?last=a>; rel="prev", </v2/a/tags/list?last=c>; rel="next""#
            ]),
            Some("last=c".into())
        );
        assert_eq!(link(&[r#"</v2/a/tags/list?last=a>; rel="prev""#]), None);
        assert_eq!(link(&[r#"</v2/a/tags/list>; rel="next""#]), None);
        assert_eq!(link(&["garbage"]), None);
        assert_eq!(link(&[]), None);
    }

    #[test]
    fn pages() {
        let tags: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let p = page(&tags, None, 2);
        assert_eq!((p.items, p.more), (vec!["a".into(), "b".into()], true));
        let p = page(&tags, Some("b"), 2);
        assert_eq!((p.items, p.more), (vec!["c".into(), "d".into()], false));
        let p = page(&tags, Some("bb"), 10);
        assert_eq!((p.items, p.more), (vec!["c".into(), "d".into()], false));
        let p = page(&tags, Some("d"), 10);
        assert_eq!((p.items.len(), p.more), (0, false));
        let p = page(&tags, None, 0);
        assert_eq!((p.items.len(), p.more), (0, true));
        let p = page(&tags, None, 4);
        assert_eq!((p.items.len(), p.more), (4, false));
    }
}
