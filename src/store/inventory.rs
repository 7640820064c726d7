//! The census of cached content: which images the pull-through cache holds, what each costs,
//! when it was last pulled, and what is pinned or pushed. One pass of prefix scans over the
//! index (manifests, tags, blob reverse references, links, blobs, access records, pins) with no
//! lock held; eviction plans from it and re-checks before it removes anything.
//!
//! An *image* is a root manifest of a cache repository (one no index in that repository lists)
//! with the child manifests it lists. A blob is *pushed* when any repository holds it by a push
//! (an upload or a mount) or a private manifest references it: such bytes never count against
//! the cache budget and are never evicted. Every other stored blob is *cached*.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::access::Access;
use super::index::{self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_TAGS, decode_u64s};
use super::pins::PinRecord;
use super::{LINK_PUSHED, Store, StoreError, decode_manifest};
use crate::oci::RepoName;
use crate::oci::manifest::{ParsedManifest, Platform};

/// One cached image as `transship cache ls` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedImage {
    /// The upstream the repository mirrors (filled in by the caller, which knows the config).
    #[serde(default)]
    pub upstream: String,
    pub repository: String,
    pub digest: String,
    pub media_type: String,
    pub tags: Vec<String>,
    /// Child manifests of an index that are cached.
    pub children: usize,
    /// Bytes of blobs only this image references (freed by evicting it).
    pub own_bytes: u64,
    /// Bytes of cached blobs it shares with other images, or pushed blobs it references.
    pub shared_bytes: u64,
    /// Unix seconds; 0 when no pull was recorded.
    pub last_pulled: u64,
    pub pulls: u64,
    /// "no", "yes" (the whole image) or "partial" (some platforms of an index).
    pub pinned: String,
}

/// Totals of the census, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheUsage {
    /// Blobs that count against `cache.max_size`.
    pub cached_bytes: u64,
    /// Cached bytes held by pins.
    pub pinned_bytes: u64,
    /// Blobs held by pushes (never evicted, not in the budget).
    pub pushed_bytes: u64,
    pub images: u64,
}

/// A cached manifest, as the census sees it.
pub(super) struct Member {
    pub repo: String,
    pub digest: String,
    pub blobs: Vec<String>,
    /// Images it belongs to (a child listed by two indexes belongs to both).
    pub images: u32,
    pub kept: bool,
    /// Its last pull as the census read it: a later one (or a re-fetch) spares it.
    pub seen_pull: u64,
}

/// A stored blob, as the census sees it.
pub(super) struct BlobFacts {
    pub size: u64,
    pub linked_at: u64,
    /// Pushed bytes: never evicted.
    pub pushed: bool,
    /// Cached manifests referencing it.
    pub refs: u32,
    pub links: Vec<Vec<u8>>,
}

pub(super) struct Image {
    pub info: CachedImage,
    /// Index into `Census::members` of the root manifest.
    pub root: usize,
    /// Indexes into `Census::members`: the members eviction may remove.
    pub removable: Vec<usize>,
}

pub(super) struct Census {
    pub images: Vec<Image>,
    pub members: Vec<Member>,
    pub blobs: HashMap<String, BlobFacts>,
    pub usage: CacheUsage,
    /// Access records of content that is no longer cached.
    pub stale_access: Vec<Vec<u8>>,
    /// Unix time the census began: anything linked since is not its to judge.
    pub started: u64,
}

/// What one cached manifest lists.
struct Facts {
    media_type: String,
    children: Vec<(String, Option<Platform>)>,
    blobs: Vec<String>,
}

fn split2(k: &[u8]) -> Option<(String, String)> {
    let pos = k.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8_lossy(&k[..pos]).into_owned(),
        String::from_utf8_lossy(&k[pos + 1..]).into_owned(),
    ))
}

impl Store {
    /// The cached images and usage totals; `is_cache_repo` names the cache's repositories.
    pub fn cache_inventory(
        &self,
        is_cache_repo: &dyn Fn(&RepoName) -> bool,
    ) -> Result<(Vec<CachedImage>, CacheUsage), StoreError> {
        let census = self.census(is_cache_repo)?;
        Ok((
            census.images.into_iter().map(|i| i.info).collect(),
            census.usage,
        ))
    }

    pub(super) fn census(
        &self,
        is_cache_repo: &dyn Fn(&RepoName) -> bool,
    ) -> Result<Census, StoreError> {
        let started = super::unix_now();
        let mut cache_repo: HashMap<String, bool> = HashMap::new();
        let mut is_cache = |repo: &str| -> bool {
            *cache_repo
                .entry(repo.to_string())
                .or_insert_with(|| repo.parse::<RepoName>().is_ok_and(|r| is_cache_repo(&r)))
        };

        // Cached manifests, by repository.
        let mut facts: HashMap<String, HashMap<String, Facts>> = HashMap::new();
        self.index.scan(CF_MANIFESTS, b"", None, |k, v| {
            let Some((repo, digest)) = split2(k) else {
                return true;
            };
            if !is_cache(&repo) {
                return true;
            }
            let Ok((media_type, bytes)) = decode_manifest(v) else {
                return true;
            };
            let Ok(p) = ParsedManifest::parse(&bytes, &media_type) else {
                return true;
            };
            facts.entry(repo).or_default().insert(
                digest,
                Facts {
                    media_type: p.media_type.clone(),
                    children: p
                        .child_manifests()
                        .iter()
                        .map(|d| (d.digest.to_string(), d.platform.clone()))
                        .collect(),
                    blobs: p.referenced_blobs().map(|d| d.digest.to_string()).collect(),
                },
            );
            true
        })?;

        let mut tags: HashMap<(String, String), Vec<String>> = HashMap::new();
        self.index.scan(CF_TAGS, b"", None, |k, v| {
            if let Some((repo, tag)) = split2(k)
                && facts.contains_key(&repo)
            {
                let digest = String::from_utf8_lossy(v).into_owned();
                tags.entry((repo, digest)).or_default().push(tag);
            }
            true
        })?;

        // Blobs: size, push protection, links.
        let mut blobs: HashMap<String, BlobFacts> = HashMap::new();
        let mut bad = None;
        self.index.scan(CF_BLOBS, b"", None, |k, v| {
            match decode_u64s::<2>(CF_BLOBS, v) {
                Ok([size, linked_at]) => {
                    blobs.insert(
                        String::from_utf8_lossy(k).into_owned(),
                        BlobFacts {
                            size,
                            linked_at,
                            pushed: false,
                            refs: 0,
                            links: Vec::new(),
                        },
                    );
                    true
                }
                Err(e) => {
                    bad = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = bad {
            return Err(e.into());
        }
        let mut linked: HashSet<Vec<u8>> = HashSet::new();
        self.index.scan(CF_LINKS, b"", None, |k, v| {
            if let Some((repo, digest)) = split2(k)
                && let Some(b) = blobs.get_mut(&digest)
            {
                // A push's link, or any link of a private repository (links made before
                // pushes were flagged carry no flag).
                if matches!(decode_u64s::<2>(CF_LINKS, v), Ok([_, LINK_PUSHED])) || !is_cache(&repo)
                {
                    b.pushed = true;
                }
                b.links.push(k.to_vec());
                linked.insert(k.to_vec());
            }
            true
        })?;
        // A private manifest's blobs are pushed content whatever their links say.
        let mut private_refs = Vec::new();
        self.index.scan(CF_BLOB_REFS, b"", None, |k, _| {
            let mut parts = k.split(|&b| b == 0);
            if let (Some(blob), Some(repo)) = (parts.next(), parts.next()) {
                let repo = String::from_utf8_lossy(repo);
                if !facts.contains_key(repo.as_ref()) {
                    private_refs.push((
                        String::from_utf8_lossy(blob).into_owned(),
                        repo.into_owned(),
                    ));
                }
            }
            true
        })?;
        for (blob, repo) in private_refs {
            if !is_cache(&repo)
                && let Some(b) = blobs.get_mut(&blob)
            {
                b.pushed = true;
            }
        }

        let access = self.all_access()?;
        let mut pins: HashMap<(String, String), PinRecord> = HashMap::new();
        for p in self.pins()? {
            if let Some(d) = p.digest {
                pins.entry((p.repository, d))
                    .and_modify(|r| {
                        // Several reasons: the widest wins (no platform list keeps everything).
                        if r.platforms.is_empty() || p.record.platforms.is_empty() {
                            r.platforms.clear();
                        } else {
                            r.platforms.extend(p.record.platforms.iter().cloned());
                        }
                    })
                    .or_insert(p.record);
            }
        }
        // Repositories' creation times: the last pull of content cached before pulls were
        // recorded is unknown, and it counts as pulled when its repository was created.
        let mut created: HashMap<String, u64> = HashMap::new();
        self.index.scan(super::index::CF_REPOS, b"", None, |k, v| {
            let repo = String::from_utf8_lossy(k).into_owned();
            if facts.contains_key(&repo)
                && let Ok([t]) = decode_u64s::<1>(super::index::CF_REPOS, v)
            {
                created.insert(repo, t);
            }
            true
        })?;

        // Images: roots and their children.
        let mut members: Vec<Member> = Vec::new();
        let mut member_at: HashMap<(String, String), usize> = HashMap::new();
        let mut images = Vec::new();
        let mut repos: Vec<&String> = facts.keys().collect();
        repos.sort();
        for repo in repos {
            let in_repo = &facts[repo];
            let listed: HashSet<&str> = in_repo
                .values()
                .flat_map(|f| f.children.iter().map(|(d, _)| d.as_str()))
                .collect();
            let mut roots: Vec<&String> = in_repo
                .keys()
                .filter(|d| !listed.contains(d.as_str()))
                .collect();
            roots.sort();
            for root in roots {
                let f = &in_repo[root];
                let root_pin = pins.get(&(repo.clone(), root.clone()));
                let mut ids = Vec::new();
                let mut kept_any = false;
                let mut add = |digest: &str, platform: Option<&Platform>, is_root: bool| {
                    let Some(mf) = in_repo.get(digest) else {
                        return;
                    };
                    let own_pin = pins.contains_key(&(repo.clone(), digest.to_string()));
                    let kept = own_pin
                        || (!is_root && root_pin.is_some_and(|p| p.keeps(platform)))
                        || (is_root && root_pin.is_some());
                    kept_any |= kept;
                    let at = *member_at
                        .entry((repo.clone(), digest.to_string()))
                        .or_insert_with(|| {
                            members.push(Member {
                                repo: repo.clone(),
                                digest: digest.to_string(),
                                blobs: mf.blobs.clone(),
                                images: 0,
                                kept: false,
                                seen_pull: access
                                    .get(&index::key(&[repo, digest]))
                                    .map_or(0, |a| a.last_pulled),
                            });
                            members.len() - 1
                        });
                    members[at].images += 1;
                    members[at].kept |= kept;
                    ids.push(at);
                };
                add(root, None, true);
                for (child, platform) in &f.children {
                    add(child, platform.as_ref(), false);
                }
                // Pulls of its manifests here; pulls of blobs only it holds are added below.
                let mut last_pulled = 0;
                let mut pulls = 0;
                for &i in &ids {
                    let m = &members[i];
                    let a = access
                        .get(&index::key(&[&m.repo, &m.digest]))
                        .copied()
                        .unwrap_or(Access::default());
                    last_pulled = last_pulled.max(a.last_pulled);
                    pulls = pulls.max(a.pulls);
                }
                if last_pulled == 0 {
                    last_pulled = created.get(repo).copied().unwrap_or(0);
                }
                let pinned = match (root_pin, kept_any) {
                    (Some(p), _) if p.platforms.is_empty() => "yes",
                    (_, true) => "partial",
                    _ => "no",
                };
                let root_member = ids[0];
                images.push(Image {
                    root: root_member,
                    info: CachedImage {
                        upstream: String::new(),
                        repository: repo.clone(),
                        digest: root.clone(),
                        media_type: f.media_type.clone(),
                        tags: tags
                            .get(&(repo.clone(), root.clone()))
                            .cloned()
                            .unwrap_or_default(),
                        children: f
                            .children
                            .iter()
                            .filter(|(c, _)| in_repo.contains_key(c))
                            .count(),
                        own_bytes: 0,
                        shared_bytes: 0,
                        last_pulled,
                        pulls,
                        pinned: pinned.to_string(),
                    },
                    removable: ids,
                });
            }
        }
        for img in &mut images {
            img.info.tags.sort();
        }

        // Reference counts, then what each image costs.
        for m in &members {
            for b in &m.blobs {
                if let Some(f) = blobs.get_mut(b) {
                    f.refs += 1;
                }
            }
        }
        let mut usage = CacheUsage {
            images: images.len() as u64,
            ..CacheUsage::default()
        };
        let mut pinned_blobs = HashSet::new();
        for m in members.iter().filter(|m| m.kept) {
            pinned_blobs.extend(
                m.blobs
                    .iter()
                    .filter(|b| blobs.get(*b).is_some_and(|f| !f.pushed)),
            );
        }
        for f in blobs.values() {
            if f.pushed {
                usage.pushed_bytes += f.size;
            } else {
                usage.cached_bytes += f.size;
            }
        }
        usage.pinned_bytes = pinned_blobs
            .iter()
            .filter_map(|b| blobs.get(*b))
            .map(|f| f.size)
            .sum();
        for img in &mut images {
            // Per blob: how many of this image's manifests reference it, and whether all of
            // them belong to this image alone.
            let mut in_image: HashMap<&str, (u32, bool)> = HashMap::new();
            for &i in &img.removable {
                let alone = members[i].images == 1;
                for b in &members[i].blobs {
                    let e = in_image.entry(b.as_str()).or_insert((0, true));
                    e.0 += 1;
                    e.1 &= alone;
                }
            }
            let repo = img.info.repository.clone();
            for (b, (count, alone)) in in_image {
                let Some(f) = blobs.get(b) else { continue };
                // Its own: no other cached manifest and no push references it.
                if !f.pushed && alone && count == f.refs {
                    img.info.own_bytes += f.size;
                    if let Some(a) = access.get(&index::key(&[&repo, b])) {
                        img.info.last_pulled = img.info.last_pulled.max(a.last_pulled);
                    }
                } else {
                    img.info.shared_bytes += f.size;
                }
            }
            img.removable.retain(|&i| !members[i].kept);
        }

        let stale_access = access
            .into_keys()
            .filter(|k| {
                !linked.contains(k) && !member_at.contains_key(&split2(k).unwrap_or_default())
            })
            .collect();
        Ok(Census {
            images,
            members,
            blobs,
            usage,
            stale_access,
            started,
        })
    }
}
