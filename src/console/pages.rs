//! The console's HTML: one layout and one function per page, as maud templates (checked at
//! compile time, every interpolation escaped). Pages work without JavaScript; forms post to
//! `/-/…` endpoints with the session's CSRF token.

use maud::{DOCTYPE, Markup, html};

use super::view::{CacheInfo, Home, Image, Listing, ManifestRow, Repository};

/// Who is looking: shown in the header, and the CSRF token of their forms.
pub struct Ctx {
    pub user: Option<String>,
    pub csrf: Option<String>,
}

/// `1.5 MB`-style sizes (decimal units, as registries show them).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn size(n: Option<u64>) -> String {
    n.map_or_else(|| "–".to_string(), human_bytes)
}

/// `sha256:0123456789ab` for tables; the full digest stays in the link and title.
fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

fn delete_link(repo: &str, reference: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("repo", repo)
        .append_pair("ref", reference)
        .finish();
    format!("/-/delete?{q}")
}

/// Breadcrumbs for a repository path: each prefix links to its listing.
fn crumbs(path: &str) -> Markup {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    html! {
        div.crumbs {
            a href="/" { "home" }
            @for (i, p) in parts.iter().enumerate() {
                " / "
                a href={ "/" (parts[..=i].join("/")) } { (p) }
            }
        }
    }
}

fn layout(ctx: &Ctx, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · transship" }
                link rel="stylesheet" href="/-/style.css";
            }
            body {
                header {
                    a.brand href="/" { "transship" }
                    nav {
                        @if let Some(user) = &ctx.user {
                            span.who { "Signed in as " strong { (user) } }
                            form method="post" action="/-/logout" {
                                input type="hidden" name="csrf" value=(ctx.csrf.as_deref().unwrap_or(""));
                                button type="submit" { "Sign out" }
                            }
                        } @else {
                            a href="/-/login" { "Sign in" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn home(ctx: &Ctx, home: &Home) -> Markup {
    layout(
        ctx,
        "Registry",
        html! {
            h1 { "Registry" }
            h2 { "Projects" }
            @if home.projects.is_empty() {
                p.muted { "No project you may see." @if ctx.user.is_none() { " " a href="/-/login" { "Sign in" } " to see more." } }
            } @else {
                ul.plain.projects {
                    @for p in &home.projects { li { a href={ "/" (p) } { (p) } } }
                }
            }
            h2 { "Upstream caches" }
            @if home.caches.is_empty() {
                p.muted { "No cache you may see." }
            } @else {
                ul.plain.caches {
                    @for c in &home.caches { li { a href={ "/" (c) } { (c) } } }
                }
            }
        },
    )
}

pub fn listing(ctx: &Ctx, l: &Listing) -> Markup {
    layout(
        ctx,
        &l.prefix,
        html! {
            (crumbs(&l.prefix))
            h1 { (l.prefix) }
            @if l.repositories.is_empty() {
                p.muted { "No repositories yet." }
            } @else {
                div.scroll { table.repositories {
                    thead { tr { th { "Repository" } th { "Created" } } }
                    tbody {
                        @for r in &l.repositories {
                            tr { td { a href={ "/" (r.name) } { (r.name) } } td.muted.when { (r.created) } }
                        }
                    }
                } }
                @if l.truncated { p.muted { "The list stops here; more repositories exist." } }
            }
        },
    )
}

fn manifest_cells(repo: &str, m: &ManifestRow) -> Markup {
    html! {
        td.short { a href={ "/" (repo) "@" (m.digest) } title=(m.digest) { (short(&m.digest)) } }
        td.mt { code { (m.media_type.as_deref().unwrap_or("–")) } }
        td.size { (size(m.size)) }
        td.when.mt { (m.pushed.as_deref().unwrap_or("–")) }
        td {
            @for p in &m.platforms { span.tag.platform { (p) } }
            @if let Some(a) = &m.artifact_type { span.muted { (a) } }
        }
    }
}

fn cache_section(c: &CacheInfo) -> Markup {
    html! {
        h2 { "Cache" }
        dl.cache {
            dt { "Upstream" } dd { (c.upstream) }
            dt { "Cached blobs" } dd { (c.cached_blobs) " (" (human_bytes(c.cached_bytes)) ")" }
            dt { "Last pulled" } dd { (c.inventory.last_pulled.as_deref().unwrap_or("–")) }
            dt { "Pull count" } dd { (c.inventory.pull_count.map_or("–".into(), |n| n.to_string())) }
            dt { "Pinned" } dd { (c.inventory.pinned.map_or("–", |p| if p { "yes" } else { "no" })) }
            dt { "Hit ratio" } dd { (c.inventory.hit_ratio.map_or("–".into(), |r| format!("{:.0} %", r * 100.0))) }
        }
        h2 { "Tag history" }
        @if c.history.is_empty() {
            p.muted { "No tag resolved through this cache yet." }
        } @else {
            div.scroll { table.history {
                thead { tr { th { "Tag" } th { "Seen upstream" } th { "Pointed at" } } }
                tbody {
                    @for h in &c.history {
                        tr { td { span.tag { (h.tag) } } td.when { (h.at) } td.digest { (h.digest) } }
                    }
                }
            } }
        }
    }
}

pub fn repository(ctx: &Ctx, r: &Repository) -> Markup {
    layout(
        ctx,
        &r.name,
        html! {
            (crumbs(&r.name))
            h1 { (r.name) }
            p.muted {
                (if r.kind == "cache" { "Cached repository" } else { "Repository" })
                @if let Some(c) = &r.created { " · created " (c) }
            }
            code.pull { (r.pull) }
            h2 { "Tags" }
            @if r.tags.is_empty() {
                p.muted { "No tags." }
            } @else {
                div.scroll { table.tags {
                    thead { tr { th { "Tag" } th { "Digest" } th.mt { "Media type" } th { "Size" } th.mt { "Pushed" } th { "Platforms" } @if r.can_delete { th {} } } }
                    tbody {
                        @for t in &r.tags {
                            tr {
                                td { span.tag { (t.tag) } }
                                (manifest_cells(&r.name, &t.manifest))
                                @if r.can_delete {
                                    td { a.button.danger href=(delete_link(&r.name, &t.tag)) { "Delete…" } }
                                }
                            }
                        }
                    }
                } }
            }
            @if !r.untagged.is_empty() {
                h2 { "Other manifests" }
                div.scroll { table.untagged {
                    thead { tr { th { "Digest" } th.mt { "Media type" } th { "Size" } th.mt { "Pushed" } th { "Platforms / artifact" } } }
                    tbody {
                        @for m in &r.untagged { tr { (manifest_cells(&r.name, m)) } }
                    }
                } }
            }
            @if r.truncated { p.muted { "The lists stop here; the repository holds more." } }
            @if let Some(c) = &r.cache { (cache_section(c)) }
        },
    )
}

fn pairs(map: &std::collections::BTreeMap<String, String>) -> Markup {
    html! {
        @for (k, v) in map { div { code { (k) } " = " (v) } }
    }
}

pub fn image(ctx: &Ctx, i: &Image) -> Markup {
    layout(
        ctx,
        &format!("{}@{}", i.repository, short(&i.digest)),
        html! {
            (crumbs(&i.repository))
            h1 { (i.repository) "@" span.digest { (i.digest) } }
            code.pull { (i.pull) }
            dl.summary {
                dt { "Tags" } dd { @for t in &i.tags { span.tag { (t) } } @if i.tags.is_empty() { span.muted { "none" } } }
                dt { "Media type" } dd { code { (i.media_type) } }
                @if let Some(a) = &i.artifact_type { dt { "Artifact type" } dd { code { (a) } } }
                dt { "Size" } dd { (size(i.size)) " (manifest " (human_bytes(i.manifest_size)) ")" }
                @if let Some(p) = &i.pushed { dt { "Pushed" } dd { (p) } }
                @if let Some(s) = &i.subject { dt { "Subject" } dd { a.digest href={ "/" (i.repository) "@" (s) } { (s) } } }
                @if !i.annotations.is_empty() { dt { "Annotations" } dd { (pairs(&i.annotations)) } }
            }
            @if i.can_delete {
                p { a.button.danger href=(delete_link(&i.repository, &i.digest)) { "Delete image…" } }
            }
            @if !i.platforms.is_empty() {
                h2 { "Platforms" }
                div.scroll { table.platforms {
                    thead { tr { th { "Platform" } th { "Digest" } th { "Size" } } }
                    tbody {
                        @for p in &i.platforms {
                            tr { td { span.tag.platform { (p.platform) } } td.digest { a href={ "/" (i.repository) "@" (p.digest) } { (p.digest) } } td.size { (size(p.size)) } }
                        }
                    }
                } }
            }
            @if let Some(c) = &i.config {
                h2 { "Config" }
                dl.config {
                    dt { "Digest" } dd.digest { (c.digest) " (" (human_bytes(c.size)) ")" }
                    @if !c.stored { dt { "Stored" } dd.muted { "not cached here" } }
                    @if let Some(v) = &c.created { dt { "Created" } dd { (v) } }
                    @if let (Some(os), Some(arch)) = (&c.os, &c.architecture) { dt { "Platform" } dd { (os) "/" (arch) } }
                    @if !c.entrypoint.is_empty() { dt { "Entrypoint" } dd { code { (c.entrypoint.join(" ")) } } }
                    @if !c.cmd.is_empty() { dt { "Cmd" } dd { code { (c.cmd.join(" ")) } } }
                    @if let Some(w) = &c.working_dir { dt { "Working dir" } dd { code { (w) } } }
                    @if let Some(u) = &c.user { dt { "User" } dd { code { (u) } } }
                    @if !c.env.is_empty() { dt { "Env" } dd { @for e in &c.env { div { code { (e) } } } } }
                    @if !c.labels.is_empty() { dt { "Labels" } dd { (pairs(&c.labels)) } }
                }
            }
            @if !i.layers.is_empty() {
                h2 { "Layers" }
                div.scroll { table.layers {
                    thead { tr { th { "#" } th { "Digest" } th { "Media type" } th { "Size" } } }
                    tbody {
                        @for (n, l) in i.layers.iter().enumerate() {
                            tr { td { (n + 1) } td.digest { (l.digest) } td { code { (l.media_type) } } td.size { (human_bytes(l.size)) } }
                        }
                    }
                } }
            }
            h2 { "Referrers" }
            @if i.referrers.is_empty() {
                p.muted { "No signatures, SBOMs or attestations refer to this image." }
            } @else {
                div.scroll { table.referrers {
                    thead { tr { th { "Digest" } th { "Artifact type" } th { "Size" } th { "Annotations" } } }
                    tbody {
                        @for r in &i.referrers {
                            tr {
                                td.digest { a href={ "/" (i.repository) "@" (r.digest) } { (r.digest) } }
                                td { code { (r.artifact_type.as_deref().unwrap_or("–")) } }
                                td.size { (size(r.size)) }
                                td { (pairs(&r.annotations)) }
                            }
                        }
                    }
                } }
            }
            h2 { "Manifest" }
            pre.manifest { (i.manifest) }
        },
    )
}

/// The sign-in form; `next` is where to go after signing in.
pub fn login(ctx: &Ctx, next: &str, error: Option<&str>) -> Markup {
    layout(
        ctx,
        "Sign in",
        html! {
            div.card {
                h1 { "Sign in" }
                @if let Some(e) = error { p.error { (e) } }
                form method="post" action="/-/login" {
                    input type="hidden" name="next" value=(next);
                    label for="user" { "User" }
                    input #user name="user" autocomplete="username" required;
                    label for="password" { "Password or access token" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                    button type="submit" { "Sign in" }
                }
                p.muted { "Sign in with a user password, or with " code { "oauth2accesstoken" } " and an access token. Key files are for machines." }
            }
        },
    )
}

/// The confirmation step before a delete.
pub fn confirm_delete(ctx: &Ctx, repo: &str, reference: &str) -> Markup {
    let what = if reference.contains(':') {
        "image"
    } else {
        "tag"
    };
    let back = if what == "image" {
        format!("/{repo}@{reference}")
    } else {
        format!("/{repo}")
    };
    layout(
        ctx,
        "Delete",
        html! {
            div.card {
                h1 { "Delete " (what) "?" }
                p { "Delete " (what) " " code.digest { (reference) } " from " code { (repo) } "?" }
                @if what == "image" { p.muted { "Every tag pointing at this image goes with it." } }
                form method="post" action="/-/delete" {
                    input type="hidden" name="csrf" value=(ctx.csrf.as_deref().unwrap_or(""));
                    input type="hidden" name="repo" value=(repo);
                    input type="hidden" name="ref" value=(reference);
                    button.danger type="submit" { "Delete " (what) }
                    " "
                    a.button href=(back) { "Cancel" }
                }
            }
        },
    )
}

/// Not found, not allowed, refused: one message page.
pub fn message(ctx: &Ctx, title: &str, text: &str) -> Markup {
    layout(
        ctx,
        title,
        html! {
            div.card { h1 { (title) } p { (text) } p { a href="/" { "Home" } } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_digests_read_well() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1500), "1.5 kB");
        assert_eq!(human_bytes(2_500_000_000), "2.5 GB");
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
        assert_eq!(short("x"), "x");
    }

    #[test]
    fn what_the_user_controls_is_escaped() {
        let ctx = Ctx {
            user: Some("<script>alert(1)</script>".into()),
            csrf: Some("t".into()),
        };
        let page = login(&ctx, "/\"><script>", Some("<b>")).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("&lt;b&gt;"));
    }
}
