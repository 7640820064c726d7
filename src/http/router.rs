//! Request paths → `Route`. Repository names may contain `manifests`, `blobs`, `uploads`,
//! `tags` and dots, so `/v2/` paths are parsed from the right: the fixed suffixes
//! (`/manifests/<ref>`, `/blobs/<digest>`, `/blobs/uploads/[<id>]`, `/tags/list`,
//! `/referrers/<digest>`) decide the route and everything before them is the name. Names,
//! references and digests are validated by the handlers, which answer 400 with the right code.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /v2/`
    Base,
    /// `GET /v2/_catalog`
    Catalog,
    /// `GET|POST /v2/token`: the token endpoint (as on gcr.io)
    Token,
    /// `/transship/v1/projects/<project>/members[/<user>]`: members, managed by owners
    Members {
        project: Cow<'a, str>,
        user: Option<Cow<'a, str>>,
    },
    /// `/transship/v1/cache/<what>`: the cache inventory and control, for registry admins
    Cache {
        what: Cow<'a, str>,
    },
    /// `GET /metrics`
    Metrics,
    /// `GET /healthz`
    Health,
    /// `GET /_transship/fill/<digest>`: another replica following a fill (cluster profile)
    InternalFill {
        digest: Cow<'a, str>,
    },
    Manifest {
        name: Cow<'a, str>,
        reference: Cow<'a, str>,
    },
    Blob {
        name: Cow<'a, str>,
        digest: Cow<'a, str>,
    },
    UploadStart {
        name: Cow<'a, str>,
    },
    Upload {
        name: Cow<'a, str>,
        id: Cow<'a, str>,
    },
    Tags {
        name: Cow<'a, str>,
    },
    Referrers {
        name: Cow<'a, str>,
        digest: Cow<'a, str>,
    },
    NotFound,
}

impl Route<'_> {
    /// A short, fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Token => "token",
            Route::Members { .. } => "members",
            Route::Cache { .. } => "cache_admin",
            Route::Metrics => "metrics",
            Route::Health => "health",
            Route::InternalFill { .. } => "internal_fill",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } => "upload_start",
            Route::Upload { .. } => "upload",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::NotFound => "not_found",
        }
    }

    /// The methods the endpoint supports, for the `Allow` header of a 405 (a mirrored
    /// repository supports only reads: its handler names them itself).
    pub fn allow(&self) -> Option<&'static str> {
        Some(match self {
            Route::Base
            | Route::Catalog
            | Route::Metrics
            | Route::Health
            | Route::InternalFill { .. }
            | Route::Tags { .. }
            | Route::Referrers { .. } => "GET, HEAD",
            Route::Token => "GET, POST",
            Route::Members { user: None, .. } => "GET",
            Route::Members { user: Some(_), .. } => "PUT, DELETE",
            Route::Cache { what } if what == "images" || what == "history" => "GET",
            Route::Cache { what } if what == "pins" => "GET, POST, DELETE",
            Route::Cache { .. } => "POST",
            Route::Manifest { .. } => "GET, HEAD, PUT, DELETE",
            Route::Blob { .. } => "GET, HEAD, DELETE",
            Route::UploadStart { .. } => "POST",
            Route::Upload { .. } => "GET, PATCH, PUT, DELETE",
            Route::NotFound => return None,
        })
    }

    /// The repository name, if the route has one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Decodes `%XX` escapes (clients sometimes escape the `:` of a digest). `None` if an escape
/// is malformed or decodes to a byte that is not printable ASCII.
fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if !(0x21..0x7f).contains(&v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

const MEMBERS_PREFIX: &str = "/transship/v1/projects/";
const CACHE_PREFIX: &str = "/transship/v1/cache/";

/// `<project>/members` or `<project>/members/<user>`; the project name may hold slashes.
fn members_route(rest: &str) -> Route<'_> {
    if let Some(project) = rest.strip_suffix("/members") {
        return Route::Members {
            project: Cow::Borrowed(project),
            user: None,
        };
    }
    match rest.rsplit_once("/members/") {
        Some((project, user)) if !user.contains('/') && !user.is_empty() => Route::Members {
            project: Cow::Borrowed(project),
            user: Some(Cow::Borrowed(user)),
        },
        _ => Route::NotFound,
    }
}

fn cut(path: &str, from: usize, to: usize) -> Cow<'_, str> {
    Cow::Borrowed(&path[from..to])
}

pub fn parse(raw_path: &str) -> Route<'_> {
    match raw_path {
        "/v2" | "/v2/" => return Route::Base,
        "/v2/_catalog" => return Route::Catalog,
        "/v2/token" => return Route::Token,
        "/metrics" => return Route::Metrics,
        "/healthz" => return Route::Health,
        _ => {}
    }
    if let Some(digest) = raw_path.strip_prefix(crate::proxy::cluster_fill::ROUTE_PREFIX) {
        return Route::InternalFill {
            digest: Cow::Borrowed(digest),
        };
    }
    if let Some(rest) = raw_path.strip_prefix(MEMBERS_PREFIX) {
        return members_route(rest);
    }
    if let Some(what) = raw_path.strip_prefix(CACHE_PREFIX) {
        return match what {
            "images" | "history" | "pins" | "evict" => Route::Cache {
                what: Cow::Borrowed(what),
            },
            _ => Route::NotFound,
        };
    }
    let Some(rest) = raw_path.strip_prefix("/v2/") else {
        return Route::NotFound;
    };
    let Some(path) = percent_decode(rest) else {
        return Route::NotFound;
    };
    match path {
        Cow::Borrowed(p) => parse_rest(p),
        Cow::Owned(p) => owned(parse_rest(&p)),
    }
}

fn owned(r: Route<'_>) -> Route<'static> {
    let o = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
    match r {
        Route::Manifest { name, reference } => Route::Manifest {
            name: o(name),
            reference: o(reference),
        },
        Route::Blob { name, digest } => Route::Blob {
            name: o(name),
            digest: o(digest),
        },
        Route::UploadStart { name } => Route::UploadStart { name: o(name) },
        Route::Upload { name, id } => Route::Upload {
            name: o(name),
            id: o(id),
        },
        Route::Tags { name } => Route::Tags { name: o(name) },
        Route::Referrers { name, digest } => Route::Referrers {
            name: o(name),
            digest: o(digest),
        },
        Route::Base => Route::Base,
        Route::Catalog => Route::Catalog,
        Route::Token => Route::Token,
        Route::Members { project, user } => Route::Members {
            project: o(project),
            user: user.map(o),
        },
        Route::Cache { what } => Route::Cache { what: o(what) },
        Route::Metrics => Route::Metrics,
        Route::Health => Route::Health,
        Route::InternalFill { digest } => Route::InternalFill { digest: o(digest) },
        Route::NotFound => Route::NotFound,
    }
}

fn parse_rest(p: &str) -> Route<'_> {
    // Split off the last two components: <name>/<kind>/<last>.
    let Some(last_slash) = p.rfind('/') else {
        return Route::NotFound;
    };
    let last = &p[last_slash + 1..];
    let head = &p[..last_slash];
    let Some(kind_slash) = head.rfind('/') else {
        return Route::NotFound;
    };
    let kind = &head[kind_slash + 1..];
    let name_end = kind_slash;
    if name_end == 0 {
        return Route::NotFound;
    }
    match (kind, last) {
        ("manifests", r) if !r.is_empty() => Route::Manifest {
            name: cut(p, 0, name_end),
            reference: cut(p, last_slash + 1, p.len()),
        },
        ("tags", "list") => Route::Tags {
            name: cut(p, 0, name_end),
        },
        ("referrers", d) if !d.is_empty() => Route::Referrers {
            name: cut(p, 0, name_end),
            digest: cut(p, last_slash + 1, p.len()),
        },
        ("blobs", "uploads") => Route::UploadStart {
            name: cut(p, 0, name_end),
        },
        ("blobs", d) if !d.is_empty() => Route::Blob {
            name: cut(p, 0, name_end),
            digest: cut(p, last_slash + 1, p.len()),
        },
        ("uploads", id) => {
            // <name>/blobs/uploads/<id> (id empty = trailing slash = start)
            let Some(blobs_slash) = head[..kind_slash].rfind('/') else {
                return Route::NotFound;
            };
            if &head[blobs_slash + 1..kind_slash] != "blobs" || blobs_slash == 0 {
                return Route::NotFound;
            }
            let name = cut(p, 0, blobs_slash);
            if id.is_empty() {
                Route::UploadStart { name }
            } else {
                Route::Upload {
                    name,
                    id: cut(p, last_slash + 1, p.len()),
                }
            }
        }
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<'a>(name: &'a str, reference: &'a str) -> Route<'a> {
        Route::Manifest {
            name: name.into(),
            reference: reference.into(),
        }
    }

    #[test]
    fn fixed_routes() {
        assert_eq!(parse("/v2/"), Route::Base);
        assert_eq!(parse("/v2"), Route::Base);
        assert_eq!(parse("/v2/_catalog"), Route::Catalog);
        assert_eq!(parse("/metrics"), Route::Metrics);
        assert_eq!(parse("/"), Route::NotFound);
        assert_eq!(parse("/v1/x"), Route::NotFound);
    }

    #[test]
    fn the_internal_fill_endpoint_is_outside_the_registry_api() {
        assert_eq!(
            parse("/_transship/fill/sha256:abc"),
            Route::InternalFill {
                digest: "sha256:abc".into()
            }
        );
        assert_eq!(parse("/_transship/fill/sha256:abc").name(), None);
        assert!(matches!(
            parse("/v2/_transship/fill/blobs/sha256:abc"),
            Route::Blob { .. }
        ));
    }

    #[test]
    fn parses_from_the_right() {
        assert_eq!(
            parse("/v2/a/manifests/b/manifests/latest"),
            m("a/manifests/b", "latest")
        );
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.20"),
            m("library/alpine", "3.20")
        );
        assert_eq!(
            parse("/v2/ghcr.io/org/app/manifests/v1"),
            m("ghcr.io/org/app", "v1")
        );
        assert_eq!(
            parse("/v2/a/blobs/uploads/blobs/sha256:abc"),
            Route::Blob {
                name: "a/blobs/uploads".into(),
                digest: "sha256:abc".into()
            }
        );
        assert_eq!(
            parse("/v2/a/b/blobs/uploads/"),
            Route::UploadStart { name: "a/b".into() }
        );
        assert_eq!(
            parse("/v2/a/b/blobs/uploads"),
            Route::UploadStart { name: "a/b".into() }
        );
        assert_eq!(
            parse("/v2/a/blobs/uploads/xyz"),
            Route::Upload {
                name: "a".into(),
                id: "xyz".into()
            }
        );
        assert_eq!(
            parse("/v2/tags/tags/list"),
            Route::Tags {
                name: "tags".into()
            }
        );
        assert_eq!(
            parse("/v2/x/referrers/sha256:1"),
            Route::Referrers {
                name: "x".into(),
                digest: "sha256:1".into()
            }
        );
    }

    #[test]
    fn rejects_incomplete_paths() {
        for p in [
            "/v2/manifests/latest",
            "/v2/a/manifests/",
            "/v2/a",
            "/v2/a/tags/lis",
            "/v2/blobs/uploads/",
            "/v2//blobs/x",
            "/v2/a/uploads/x",
        ] {
            assert_eq!(parse(p), Route::NotFound, "{p}");
        }
    }

    #[test]
    fn decodes_escapes() {
        assert_eq!(
            parse("/v2/a/blobs/sha256%3Aabc"),
            Route::Blob {
                name: "a".into(),
                digest: "sha256:abc".into()
            }
        );
        assert_eq!(parse("/v2/a/blobs/sha256%2"), Route::NotFound);
        assert_eq!(parse("/v2/a/blobs/x%00y"), Route::NotFound);
        // An escaped slash becomes a slash, and the name is then validated by the handler.
        assert_eq!(parse("/v2/a%2Fb/manifests/x"), m("a/b", "x"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "/v2/[a-z/%:0-9A-F.]{0,80}") {
            let _ = parse(&s);
        }
    }
}
