//! What each console page shows, as plain data: built from the store for one caller, then
//! rendered as HTML (`pages`) or serialised as the JSON form of the same URL. Builders only
//! read, through `Storage`'s listing APIs (`storage::browse`): one prefix scan per listed
//! section locally, a few queries in the cluster profile. A project's repositories are read
//! from `App::storage` (the shared database and bucket in the cluster profile); a cache's
//! from this process's own `Store`, where the pull-through cache keeps them in either profile.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::App;
use crate::auth::token::rfc3339;
use crate::auth::{Action, Caller};
use crate::oci::manifest::{Descriptor, ParsedManifest};
use crate::oci::{Digest, RepoName};
use crate::proxy::Namespace;
use crate::storage::Storage;
use crate::store::{StoreError, StoredManifest};

/// The most of an image config the image page reads.
const MAX_CONFIG: u64 = 1024 * 1024;
/// The most repositories a listing shows.
pub const MAX_LISTED: usize = 5_000;
/// The most tags, and manifests, a repository page shows.
pub const MAX_ROWS: usize = 10_000;

#[derive(Debug, Serialize)]
pub struct Home {
    pub projects: Vec<String>,
    /// Upstream caches, by their local name prefix (`docker.io`).
    pub caches: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub prefix: String,
    pub repositories: Vec<RepoEntry>,
    /// True if the listing stopped at `MAX_LISTED`.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct RepoEntry {
    pub name: String,
    pub created: String,
}

#[derive(Debug, Serialize)]
pub struct Repository {
    pub name: String,
    /// `project` or `cache`.
    pub kind: &'static str,
    pub created: Option<String>,
    /// The `docker pull` line for the first tag (or the repository).
    pub pull: String,
    pub tags: Vec<TagRow>,
    /// Manifests no tag points at (children of an index, referrers, untagged pushes).
    pub untagged: Vec<ManifestRow>,
    pub can_delete: bool,
    pub cache: Option<CacheInfo>,
    /// True if the repository has more tags or manifests than the page shows.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct TagRow {
    pub tag: String,
    #[serde(flatten)]
    pub manifest: ManifestRow,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManifestRow {
    pub digest: String,
    pub media_type: Option<String>,
    /// Config and layers of an image; of an index, the sum over its children stored here.
    pub size: Option<u64>,
    /// `os/architecture[/variant]` of an index's children.
    pub platforms: Vec<String>,
    pub artifact_type: Option<String>,
    /// When the manifest was last written here (pushed, or cached from upstream).
    pub pushed: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CacheInfo {
    pub upstream: String,
    pub cached_blobs: u64,
    pub cached_bytes: u64,
    /// Every resolution of every tag observed upstream, by tag, oldest first.
    pub history: Vec<HistoryRow>,
    #[serde(flatten)]
    pub inventory: Inventory,
}

#[derive(Debug, Serialize)]
pub struct HistoryRow {
    pub tag: String,
    pub at: String,
    pub digest: String,
}

/// Cache inventory figures of a repository: when it was last pulled, how many pulls were
/// counted (manifest GETs, as of the last flush of the pull record), whether anything in it
/// is pinned. The hit ratio is not recorded per repository (`None`; the metrics have it per
/// upstream).
#[derive(Debug, Default, Serialize)]
pub struct Inventory {
    pub last_pulled: Option<String>,
    pub pull_count: Option<u64>,
    pub pinned: Option<bool>,
    pub hit_ratio: Option<f64>,
}

/// The inventory of a cached repository: one prefix scan of the pull record and one of the
/// pins.
pub fn inventory(app: &App, repo: &RepoName) -> Inventory {
    let pulls = app.store.repo_pulls(repo).ok();
    Inventory {
        last_pulled: pulls
            .filter(|a| a.last_pulled > 0)
            .map(|a| crate::auth::token::rfc3339(a.last_pulled)),
        pull_count: pulls.map(|a| a.pulls),
        pinned: app.store.pins_of(repo).ok().map(|p| !p.is_empty()),
        hit_ratio: None,
    }
}

#[derive(Debug, Serialize)]
pub struct Image {
    pub repository: String,
    pub digest: String,
    pub media_type: String,
    pub manifest_size: u64,
    pub size: Option<u64>,
    pub pushed: Option<String>,
    pub tags: Vec<String>,
    pub pull: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    pub config: Option<ConfigInfo>,
    pub layers: Vec<BlobRow>,
    pub platforms: Vec<PlatformRow>,
    pub referrers: Vec<Referrer>,
    pub annotations: BTreeMap<String, String>,
    pub can_delete: bool,
    /// The manifest as stored (pretty-printed when it is JSON).
    pub manifest: String,
}

#[derive(Debug, Serialize)]
pub struct BlobRow {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct ConfigInfo {
    pub digest: String,
    pub size: u64,
    /// False when the config blob is not stored here (a cache fills blobs on demand).
    pub stored: bool,
    pub created: Option<String>,
    pub os: Option<String>,
    pub architecture: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub struct PlatformRow {
    pub platform: String,
    pub digest: String,
    pub size: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Referrer {
    pub digest: String,
    pub artifact_type: Option<String>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
    pub annotations: BTreeMap<String, String>,
}

/// The storage holding the repositories of `namespace`: the registry's for a project, this
/// process's store for a cache (the same store in the local profile).
pub fn storage_for(app: &App, namespace: &Namespace<'_>) -> Storage {
    match namespace {
        Namespace::Project(_) => app.storage.clone(),
        Namespace::Mirror(_) => Storage::Local(app.store.clone()),
    }
}

/// Where a repository lives and whether the caller may see it there.
pub struct Visible<'a> {
    pub namespace: Namespace<'a>,
    pub kind: &'static str,
    pub upstream: Option<String>,
}

/// The namespace of `repo` if `caller` may pull it and it is the canonical local name of
/// its repository (a cache repository is browsed under `<upstream>/<remote>` only).
pub fn visible<'a>(app: &'a App, caller: &Caller, repo: &RepoName) -> Option<Visible<'a>> {
    let namespace = app.proxy.namespace(repo, None);
    let (kind, upstream) = match &namespace {
        Namespace::Project(_) => ("project", None),
        Namespace::Mirror(Ok(route)) if route.local == *repo => (
            "cache",
            Some(app.proxy.upstream_name(route.upstream).to_string()),
        ),
        Namespace::Mirror(_) => return None,
    };
    app.auth
        .may(caller, repo, &namespace, Action::Pull)
        .then_some(Visible {
            namespace,
            kind,
            upstream,
        })
}

/// The canonical page of a cache repository named the way clients pull it
/// (`/library/nginx`, `/nginx` → `/docker.io/library/nginx`), if it is cached and visible.
pub fn canonical(
    app: &App,
    caller: &Caller,
    repo: &RepoName,
) -> Result<Option<String>, StoreError> {
    let Namespace::Mirror(Ok(route)) = app.proxy.namespace(repo, None) else {
        return Ok(None);
    };
    if route.local == *repo
        || visible(app, caller, &route.local).is_none()
        || !app.store.repo_exists(&route.local)?
    {
        return Ok(None);
    }
    Ok(Some(format!("/{}", route.local)))
}

pub fn home(app: &App, caller: &Caller) -> Home {
    let projects = app
        .config
        .projects
        .iter()
        .filter(|p| app.auth.may_browse_project(caller, p))
        .map(|p| p.name.get_ref().to_string())
        .collect();
    let caches = app
        .config
        .upstreams
        .iter()
        .enumerate()
        .filter(|(i, _)| app.auth.may_browse_upstream(caller, *i))
        .map(|(_, u)| u.name.get_ref().to_string())
        .collect();
    Home { projects, caches }
}

/// The repositories under `prefix` the caller may pull; `None` if there is nothing to show
/// there (neither a visible repository nor a project or cache the caller may browse).
pub async fn listing(
    app: &App,
    caller: &Caller,
    prefix: &str,
) -> Result<Option<Listing>, StoreError> {
    let mut visible = |name: &str| {
        // A token lists only what its own scopes let it pull, not all its user may.
        app.auth.may_list(caller, name)
            && (!matches!(caller.identity, crate::auth::Identity::Token(_))
                || name.parse::<RepoName>().is_ok_and(|r| {
                    let ns = app.proxy.namespace(&r, None);
                    app.auth.may(caller, &r, &ns, crate::auth::Action::Pull)
                }))
    };
    let mut found = app
        .storage
        .repos_under(prefix, MAX_LISTED + 1, &mut visible)
        .await?;
    if app.storage.is_cluster() {
        // Cache repositories are this replica's own: both lists, merged in byte order.
        found.extend(
            app.store
                .repos_under(prefix, MAX_LISTED + 1, &mut visible)?,
        );
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        found.truncate(MAX_LISTED + 1);
    }
    let mut repositories: Vec<RepoEntry> = found
        .into_iter()
        .map(|(name, created)| RepoEntry {
            name,
            created: rfc3339(created),
        })
        .collect();
    let truncated = repositories.len() > MAX_LISTED;
    repositories.truncate(MAX_LISTED);
    let home = home(app, caller);
    let declared = home
        .projects
        .iter()
        .chain(&home.caches)
        .any(|n| n == prefix);
    if repositories.is_empty() && !declared {
        return Ok(None);
    }
    Ok(Some(Listing {
        prefix: prefix.to_string(),
        repositories,
        truncated,
    }))
}

/// Summary of one manifest; `known` maps digests of this repository's manifests to them, for
/// the sizes of an index's children.
fn manifest_row(
    m: &StoredManifest,
    parsed: Option<&ParsedManifest>,
    sizes: &HashMap<String, u64>,
    pushed: Option<u64>,
) -> ManifestRow {
    let (size, platforms) = match parsed {
        Some(p) if p.is_index() => {
            let children = p.child_manifests();
            let size = children
                .iter()
                .map(|c| sizes.get(&c.digest.to_string()).copied())
                .try_fold(0u64, |a, s| s.map(|s| a.saturating_add(s)));
            let mut platforms: Vec<String> = Vec::new();
            for p in children.iter().filter_map(platform) {
                if !platforms.contains(&p) {
                    platforms.push(p);
                }
                if platforms.len() == MAX_PLATFORMS {
                    platforms.push("…".into());
                    break;
                }
            }
            (size, platforms)
        }
        Some(p) => (Some(image_size(p)), Vec::new()),
        None => (None, Vec::new()),
    };
    ManifestRow {
        digest: m.digest.to_string(),
        media_type: Some(m.media_type.clone()),
        size,
        platforms,
        artifact_type: parsed.and_then(artifact_type),
        pushed: pushed.map(rfc3339),
    }
}

/// The artifact type of an artifact; `None` for a container image (whose config type is
/// the image config's).
fn artifact_type(p: &ParsedManifest) -> Option<String> {
    const IMAGE_CONFIGS: [&str; 2] = [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ];
    p.effective_artifact_type()
        .filter(|t| !IMAGE_CONFIGS.contains(t))
        .map(bounded)
}

fn image_size(p: &ParsedManifest) -> u64 {
    // Sizes are what the manifest declares: sum without trusting them not to overflow.
    p.config
        .iter()
        .chain(&p.layers)
        .fold(0u64, |a, d| a.saturating_add(d.size))
}

/// Longest manifest-supplied string shown (platform parts, artifact types): manifests come
/// from pushers and upstreams, and a page repeats them per row.
const MAX_FIELD: usize = 128;
/// Platforms listed per manifest row.
const MAX_PLATFORMS: usize = 32;
/// Children of an index shown on its page (each one a manifest read).
const MAX_CHILDREN: usize = 256;

/// `s`, cut to `MAX_FIELD` characters.
fn bounded(s: &str) -> String {
    match s.char_indices().nth(MAX_FIELD) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

fn platform(d: &Descriptor) -> Option<String> {
    let p = d.platform.as_ref()?;
    Some(match &p.variant {
        Some(v) => format!(
            "{}/{}/{}",
            bounded(&p.os),
            bounded(&p.architecture),
            bounded(v)
        ),
        None => format!("{}/{}", bounded(&p.os), bounded(&p.architecture)),
    })
}

fn parse(m: &StoredManifest) -> Option<ParsedManifest> {
    ParsedManifest::parse(&m.bytes, &m.media_type).ok()
}

/// The `docker pull` line for `repo` at `reference` (`:tag` or `@digest`).
pub fn pull_line(host: &str, repo: &str, reference: &str) -> String {
    format!("docker pull {host}/{repo}{reference}")
}

pub async fn repository(
    app: &App,
    caller: &Caller,
    repo: &RepoName,
    seen: &Visible<'_>,
    host: &str,
) -> Result<Repository, StoreError> {
    let storage = storage_for(app, &seen.namespace);
    let pushed = storage.pushed_times(repo).await?;
    // Each manifest is summarised as it is read and its bytes dropped: a page holds rows, not
    // up to MAX_ROWS manifests of up to max_manifest_size each.
    struct Summary {
        row: ManifestRow,
        /// An image's size, or an index's children (at most MAX_CHILDREN; `None` if more).
        size: Option<u64>,
        children: Option<Vec<String>>,
    }
    let mut summaries: Vec<Summary> = Vec::new();
    let mut images: HashMap<String, u64> = HashMap::new();
    let read = storage
        .visit_manifests(repo, MAX_ROWS + 1, |m| {
            if summaries.len() == MAX_ROWS {
                return;
            }
            let parsed = parse(&m);
            let digest = m.digest.to_string();
            let children = parsed.as_ref().filter(|p| p.is_index()).map(|p| {
                p.child_manifests()
                    .iter()
                    .map(|c| c.digest.to_string())
                    .collect::<Vec<_>>()
            });
            let size = parsed.as_ref().filter(|p| !p.is_index()).map(image_size);
            if let Some(size) = size {
                images.insert(digest.clone(), size);
            }
            let row = manifest_row(
                &m,
                parsed.as_ref(),
                &HashMap::new(),
                pushed.get(&digest).copied(),
            );
            summaries.push(Summary {
                row,
                size,
                children: children.filter(|c| c.len() <= MAX_CHILDREN),
            });
        })
        .await?;
    let mut tags = storage.tags_with_digests(repo, MAX_ROWS + 1).await?;
    let truncated = read > MAX_ROWS || tags.len() > MAX_ROWS;
    tags.truncate(MAX_ROWS);
    let rows: HashMap<String, ManifestRow> = summaries
        .into_iter()
        .map(|s| {
            let mut row = s.row;
            // An index's size: its children's, when every one is an image stored here.
            row.size = s.size.or_else(|| {
                s.children.as_ref().and_then(|c| {
                    c.iter()
                        .map(|d| images.get(d).copied())
                        .try_fold(0u64, |a, s| s.map(|s| a.saturating_add(s)))
                })
            });
            (row.digest.clone(), row)
        })
        .collect();
    let tagged: std::collections::HashSet<&str> = tags.iter().map(|(_, d)| d.as_str()).collect();
    let mut untagged: Vec<ManifestRow> = rows
        .values()
        .filter(|r| !tagged.contains(r.digest.as_str()))
        .cloned()
        .collect();
    untagged.sort_by(|a, b| a.digest.cmp(&b.digest));
    let tags: Vec<TagRow> = tags
        .iter()
        .map(|(tag, digest)| TagRow {
            tag: tag.clone(),
            manifest: rows.get(digest).cloned().unwrap_or_else(|| ManifestRow {
                digest: digest.clone(),
                media_type: None,
                size: None,
                platforms: Vec::new(),
                artifact_type: None,
                pushed: None,
            }),
        })
        .collect();
    let pull = match tags.first() {
        Some(t) => pull_line(host, repo.as_str(), &format!(":{}", t.tag)),
        None => pull_line(host, repo.as_str(), ""),
    };
    let cache = match &seen.upstream {
        Some(upstream) => {
            let (cached_blobs, cached_bytes) = app.store.linked_bytes(repo)?;
            let history = app
                .store
                .tag_histories(repo)?
                .into_iter()
                .map(|r| HistoryRow {
                    tag: r.tag,
                    at: rfc3339(r.at_micros / 1_000_000),
                    digest: r.digest,
                })
                .collect();
            Some(CacheInfo {
                upstream: upstream.clone(),
                cached_blobs,
                cached_bytes,
                history,
                inventory: inventory(app, repo),
            })
        }
        None => None,
    };
    Ok(Repository {
        name: repo.to_string(),
        kind: seen.kind,
        created: storage.repo_created(repo).await?.map(rfc3339),
        pull,
        tags,
        untagged,
        can_delete: app.auth.may(caller, repo, &seen.namespace, Action::Delete),
        cache,
        truncated,
    })
}

fn annotations(
    map: Option<&serde_json::Map<String, serde_json::Value>>,
) -> BTreeMap<String, String> {
    map.into_iter()
        .flatten()
        .map(|(k, v)| {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            (k.clone(), v)
        })
        .collect()
}

/// The image page of `digest` in `repo`; `None` if the repository does not hold it.
pub async fn image(
    app: &App,
    caller: &Caller,
    repo: &RepoName,
    digest: &Digest,
    seen: &Visible<'_>,
    host: &str,
) -> Result<Option<Image>, StoreError> {
    let storage = storage_for(app, &seen.namespace);
    let Some(m) = storage.manifest(repo, digest).await? else {
        return Ok(None);
    };
    let parsed = parse(&m);
    let digest_s = digest.to_string();
    let tags = storage.tags_pointing_at(repo, digest).await?;
    let referrers = storage
        .referrers(repo, digest, None)
        .await?
        .into_iter()
        .map(|d| Referrer {
            digest: d["digest"].as_str().unwrap_or_default().to_string(),
            artifact_type: d["artifactType"].as_str().map(str::to_string),
            media_type: d["mediaType"].as_str().map(str::to_string),
            size: d["size"].as_u64(),
            annotations: annotations(d["annotations"].as_object()),
        })
        .collect();
    let mut platforms = Vec::new();
    let mut layers = Vec::new();
    let mut config = None;
    let mut size = None;
    if let Some(p) = &parsed {
        if p.is_index() {
            let mut total = Some(0u64);
            let mut seen = std::collections::HashSet::new();
            // Each distinct child once, at most MAX_CHILDREN of them: an index may list one
            // large child thousands of times.
            for child in p
                .child_manifests()
                .iter()
                .filter(|c| seen.insert(c.digest.to_string()))
                .take(MAX_CHILDREN)
            {
                let child_size = storage
                    .manifest(repo, &child.digest)
                    .await?
                    .as_deref()
                    .and_then(parse)
                    .map(|c| image_size(&c));
                total = total.zip(child_size).map(|(a, b)| a.saturating_add(b));
                platforms.push(PlatformRow {
                    platform: platform(child).unwrap_or_else(|| "-".into()),
                    digest: child.digest.to_string(),
                    size: child_size,
                });
            }
            size = total;
        } else {
            size = Some(image_size(p));
            layers = p
                .layers
                .iter()
                .map(|d| BlobRow {
                    digest: d.digest.to_string(),
                    media_type: d.media_type.clone(),
                    size: d.size,
                })
                .collect();
            if let Some(c) = &p.config {
                config = Some(config_info(&storage, repo, c).await?);
            }
        }
    }
    let manifest = serde_json::from_slice::<serde_json::Value>(&m.bytes)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(&m.bytes).into_owned());
    Ok(Some(Image {
        repository: repo.to_string(),
        digest: digest_s.clone(),
        media_type: m.media_type.clone(),
        manifest_size: m.bytes.len() as u64,
        size,
        pushed: storage.pushed_at(repo, digest).await?.map(rfc3339),
        tags,
        pull: pull_line(host, repo.as_str(), &format!("@{digest_s}")),
        artifact_type: parsed.as_ref().and_then(artifact_type),
        subject: parsed
            .as_ref()
            .and_then(|p| p.subject.as_ref().map(|s| s.digest.to_string())),
        config,
        layers,
        platforms,
        referrers,
        annotations: annotations(parsed.as_ref().and_then(|p| p.annotations.as_ref())),
        can_delete: app.auth.may(caller, repo, &seen.namespace, Action::Delete),
        manifest,
    }))
}

/// What an image config says about how the image runs, if its blob is stored here.
async fn config_info(
    storage: &Storage,
    repo: &RepoName,
    d: &Descriptor,
) -> Result<ConfigInfo, StoreError> {
    let mut info = ConfigInfo {
        digest: d.digest.to_string(),
        size: d.size,
        ..ConfigInfo::default()
    };
    let Some(bytes) = storage.small_blob(repo, &d.digest, MAX_CONFIG).await? else {
        return Ok(info);
    };
    info.stored = true;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(info);
    };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let c = &v["config"];
    info.created = text(&v["created"]);
    info.os = text(&v["os"]);
    info.architecture = text(&v["architecture"]);
    info.entrypoint = list(&c["Entrypoint"]);
    info.cmd = list(&c["Cmd"]);
    info.env = list(&c["Env"]);
    info.working_dir = text(&c["WorkingDir"]).filter(|s| !s.is_empty());
    info.user = text(&c["User"]).filter(|s| !s.is_empty());
    info.labels = annotations(c["Labels"].as_object());
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Manifest-supplied strings and platform lists are cut to their bounds on a row.
    #[test]
    fn a_row_bounds_what_the_manifest_supplies() {
        let long = "x".repeat(MAX_FIELD * 10);
        let children: Vec<String> = (0..MAX_PLATFORMS * 2)
            .map(|i| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{:064x}","size":1,"platform":{{"os":"{long}","architecture":"a{i}"}}}}"#,
                    i
                )
            })
            .collect();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            children.join(",")
        );
        let m = StoredManifest {
            digest: Digest::sha256_of(index.as_bytes()),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            bytes: Bytes::from(index),
        };
        let row = manifest_row(&m, parse(&m).as_ref(), &HashMap::new(), None);
        assert_eq!(
            row.platforms.len(),
            MAX_PLATFORMS + 1,
            "the cap and an ellipsis"
        );
        assert_eq!(row.platforms.last().map(String::as_str), Some("…"));
        assert!(
            row.platforms[0].chars().count() <= 2 * (MAX_FIELD + 1) + 1,
            "{}",
            row.platforms[0].len()
        );
    }
}
