//! `transship export`: plans which manifests and blobs the named images need (for a cache
//! index, only the platforms the cache holds, optionally filtered by `--platform`; a project
//! index whole), leaves out what the `--since` chain already carried, and streams the rest
//! from the store into a bundle, re-hashing every blob on the way so a damaged store blob is
//! never exported. Memory holds the plan (manifests, digests), never a blob.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::layout::{self, BundleWriter};
use super::state::{self, BundleMeta, BundleState, Contents};
use super::{AirgapError, Kind, StoreRef, kind_of_stored, resolve_name, split_reference};
use crate::config::Config;
use crate::oci::manifest::{ParsedManifest, Platform};
use crate::oci::{Digest, Digester, Reference, RepoName};
use crate::proxy::route::Router;
use crate::store::{Store, StoredManifest, unix_now};

/// Nested indexes deeper than this are not followed.
const MAX_DEPTH: usize = 4;
/// Page size when listing every repository and tag for `--all`.
const PAGE: usize = 10_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportOptions {
    /// The bundle to write: `.tar`, or `.tar.zst` for zstd.
    pub out: PathBuf,
    /// `NAME[:TAG|@DIGEST]`, resolved like a pull.
    #[serde(default)]
    pub images: Vec<String>,
    /// Every tag in the store.
    #[serde(default)]
    pub all: bool,
    /// Every pinned tag and digest of the cache.
    #[serde(default)]
    pub pinned: bool,
    /// `os/arch[/variant]`: for cache indexes, only these platforms.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// A previous export's state file: write only what its chain did not carry.
    #[serde(default)]
    pub since: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub state: PathBuf,
    pub refs: Vec<String>,
    pub manifests: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub bundle_bytes: u64,
    /// Manifests and blobs left to earlier bundles (a delta).
    pub expected: u64,
    pub notes: Vec<String>,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        write!(
            f,
            "exported {} references: {} manifests and {} blobs ({} bytes); {} left to earlier bundles; wrote {} ({} bytes) and {}",
            self.refs.len(),
            self.manifests,
            self.blobs,
            self.blob_bytes,
            self.expected,
            self.out.display(),
            self.bundle_bytes,
            self.state.display()
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PlatformFilter {
    os: String,
    arch: String,
    variant: Option<String>,
}

impl PlatformFilter {
    fn parse(s: &str) -> Result<Self, AirgapError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(AirgapError::Usage(format!(
                "--platform {s:?}: expected os/arch[/variant]"
            ))),
        }
    }

    fn matches(&self, p: Option<&Platform>) -> bool {
        p.is_some_and(|p| {
            p.os == self.os
                && p.architecture == self.arch
                && self
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant.as_ref() == Some(v))
        })
    }
}

/// What one reference needs; merged into the plan only when complete.
#[derive(Default)]
struct Collected {
    manifests: Vec<(RepoName, Arc<StoredManifest>)>,
    blobs: Vec<(Digest, u64)>,
    notes: Vec<String>,
}

impl Collected {
    fn merge(&mut self, other: Collected) {
        self.manifests.extend(other.manifests);
        self.blobs.extend(other.blobs);
        self.notes.extend(other.notes);
    }
}

#[derive(Default)]
struct Plan {
    entries: Vec<Value>,
    refs: Vec<String>,
    manifests: BTreeMap<Digest, (BTreeSet<RepoName>, Arc<StoredManifest>)>,
    blobs: BTreeMap<Digest, u64>,
    notes: Vec<String>,
}

struct Walker<'a> {
    store: &'a Store,
    platforms: &'a [PlatformFilter],
}

impl Walker<'_> {
    /// Collects `m` and what it needs. Returns the digests that are missing (then nothing of
    /// it may be exported); empty means complete.
    fn walk(
        &self,
        repo: &RepoName,
        kind: Kind,
        m: Arc<StoredManifest>,
        depth: usize,
        out: &mut Collected,
    ) -> Result<Vec<Digest>, AirgapError> {
        let parsed = ParsedManifest::parse(&m.bytes, &m.media_type).map_err(|e| {
            AirgapError::Refused(format!(
                "stored manifest {repo}@{} does not parse: {e}",
                m.digest
            ))
        })?;
        let mut mine = Collected::default();
        if parsed.is_index() {
            if depth >= MAX_DEPTH {
                return Ok(vec![m.digest.clone()]);
            }
            let mut missing = Vec::new();
            let mut included = 0;
            for child in parsed.child_manifests() {
                if kind == Kind::Cache
                    && !self.platforms.is_empty()
                    && !self
                        .platforms
                        .iter()
                        .any(|f| f.matches(child.platform.as_ref()))
                {
                    continue;
                }
                let Some(cm) = self.store.manifest(repo, &child.digest)? else {
                    // A cache holds the platforms clients pulled; a project holds them all.
                    if kind == Kind::Project {
                        missing.push(child.digest.clone());
                    }
                    continue;
                };
                let mut sub = Collected::default();
                let gaps = self.walk(repo, kind, cm, depth + 1, &mut sub)?;
                if gaps.is_empty() {
                    included += 1;
                    mine.merge(sub);
                } else if kind == Kind::Project {
                    missing.extend(gaps);
                } else {
                    mine.notes.push(format!(
                        "{repo}@{}: left out, {} of its blobs were never pulled into the cache",
                        child.digest,
                        gaps.len()
                    ));
                }
            }
            if !missing.is_empty() {
                return Ok(missing);
            }
            // An index none of whose (wanted) platforms can go is not worth carrying.
            if included == 0 && !parsed.child_manifests().is_empty() {
                return Ok(parsed
                    .child_manifests()
                    .iter()
                    .map(|c| c.digest.clone())
                    .collect());
            }
        } else {
            let mut missing = Vec::new();
            for d in parsed.referenced_blobs() {
                match self.store.blob_size(repo, &d.digest)? {
                    Some(size) => mine.blobs.push((d.digest.clone(), size)),
                    None => missing.push(d.digest.clone()),
                }
            }
            if !missing.is_empty() {
                return Ok(missing);
            }
        }
        mine.manifests.push((repo.clone(), m));
        out.merge(mine);
        Ok(Vec::new())
    }
}

impl Plan {
    fn add(
        &mut self,
        walker: &Walker<'_>,
        sref: &StoreRef,
        kind: Kind,
        strict: bool,
    ) -> Result<(), AirgapError> {
        let mut refuse = |why: String| -> Result<(), AirgapError> {
            if strict {
                Err(AirgapError::Refused(why))
            } else {
                self.notes.push(why);
                Ok(())
            }
        };
        let store = walker.store;
        let Some(digest) = store.resolve(&sref.repo, &sref.reference)? else {
            return refuse(format!("{sref} is not in the store"));
        };
        let Some(m) = store.manifest(&sref.repo, &digest)? else {
            return refuse(format!("{sref} is not in the store"));
        };
        let resolved = match (&sref.reference, kind) {
            (Reference::Tag(t), Kind::Cache) => store.cached_tag(&sref.repo, t)?.map(|(_, at)| at),
            _ => None,
        };
        let mut got = Collected::default();
        let missing = walker.walk(&sref.repo, kind, m.clone(), 0, &mut got)?;
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().take(5).map(|d| d.to_string()).collect();
            return refuse(format!(
                "{sref} cannot be exported: {} manifests or blobs it needs are not in the store ({}{}); pull it through transship first{}",
                missing.len(),
                list.join(", "),
                if missing.len() > 5 { ", ..." } else { "" },
                if walker.platforms.is_empty() {
                    ""
                } else {
                    ", or ask for platforms it has"
                }
            ));
        }
        let mut annotations = serde_json::Map::new();
        annotations.insert(layout::REF_NAME.into(), Value::String(sref.to_string()));
        if let Some(at) = resolved {
            annotations.insert(layout::RESOLVED.into(), Value::String(at.to_string()));
        }
        self.entries.push(json!({
            "mediaType": m.media_type,
            "digest": digest.to_string(),
            "size": m.bytes.len(),
            "annotations": annotations,
        }));
        self.refs.push(sref.to_string());
        for (repo, m) in got.manifests {
            self.manifests
                .entry(m.digest.clone())
                .or_insert_with(|| (BTreeSet::new(), m))
                .0
                .insert(repo);
        }
        self.blobs.extend(got.blobs);
        self.notes.extend(got.notes);
        Ok(())
    }
}

/// Every tag of every repository this configuration serves.
fn every_tag(store: &Store, router: &Router) -> Result<Vec<(StoreRef, Kind)>, AirgapError> {
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = store.catalog(last.as_deref(), PAGE, |_| true)?;
        for name in &page.items {
            let Ok(repo) = name.parse::<RepoName>() else {
                continue;
            };
            let Some(kind) = kind_of_stored(router, &repo) else {
                continue;
            };
            let mut after: Option<String> = None;
            while let Some(tags) = store.list_tags(&repo, after.as_deref(), PAGE)? {
                for t in &tags.items {
                    if let Ok(tag) = t.parse() {
                        out.push((
                            StoreRef {
                                repo: repo.clone(),
                                reference: Reference::Tag(tag),
                            },
                            kind,
                        ));
                    }
                }
                if !tags.more {
                    break;
                }
                after = tags.items.last().cloned();
            }
        }
        if !page.more {
            break;
        }
        last = page.items.last().cloned();
    }
    Ok(out)
}

/// Reads a store blob while hashing and counting it.
struct Verified<R> {
    inner: R,
    digester: Digester,
    read: u64,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digester.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Writes the bundle `opts.out` and its state file.
/// What the cache's pins name: each pinned tag, and each pinned digest (those a tag pin made
/// while the tag moved too, so older images it kept travel with it).
fn pinned_refs(store: &Store, router: &Router) -> Result<Vec<(StoreRef, Kind)>, AirgapError> {
    let mut out: Vec<(StoreRef, Kind)> = Vec::new();
    for pin in store.pins()? {
        let Ok(repo) = pin.repository.parse::<RepoName>() else {
            continue;
        };
        let Some(kind) = kind_of_stored(router, &repo) else {
            continue;
        };
        let reference = match (&pin.tag, &pin.digest) {
            (Some(t), _) => t.parse().ok().map(Reference::Tag),
            (None, Some(d)) => d.parse().ok().map(Reference::Digest),
            (None, None) => None,
        };
        let Some(reference) = reference else { continue };
        let sref = StoreRef { repo, reference };
        if !out.iter().any(|(r, _)| r.to_string() == sref.to_string()) {
            out.push((sref, kind));
        }
    }
    Ok(out)
}

pub fn export(
    config: &Config,
    store: &Store,
    opts: &ExportOptions,
) -> Result<ExportReport, AirgapError> {
    let router = Router::new(config);
    let platforms = opts
        .platforms
        .iter()
        .map(|p| PlatformFilter::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let sources =
        usize::from(opts.all) + usize::from(opts.pinned) + usize::from(!opts.images.is_empty());
    if sources != 1 {
        return Err(AirgapError::Usage(
            "name the images to export, or pass --all or --pinned (one of the three)".into(),
        ));
    }
    let carried = match &opts.since {
        Some(p) => BundleState::load(p)?.carried(),
        None => Contents::default(),
    };
    let refs = if opts.all {
        every_tag(store, &router)?
    } else if opts.pinned {
        pinned_refs(store, &router)?
    } else {
        opts.images
            .iter()
            .map(|s| {
                let (name, reference) = split_reference(s)?;
                let (repo, kind) = resolve_name(&router, &name)?;
                Ok((StoreRef { repo, reference }, kind))
            })
            .collect::<Result<Vec<_>, AirgapError>>()?
    };
    let walker = Walker {
        store,
        platforms: &platforms,
    };
    let mut plan = Plan::default();
    for (sref, kind) in &refs {
        plan.add(&walker, sref, *kind, !opts.all && !opts.pinned)?;
    }
    if plan.refs.is_empty() {
        return Err(AirgapError::Refused("nothing to export".into()));
    }

    // A delta leaves out what the earlier bundles carried.
    let mut contains = Contents::default();
    let mut expects = Contents::default();
    let mut manifests_out = Vec::new();
    for (digest, (repos, m)) in &plan.manifests {
        let mut write = false;
        for repo in repos {
            let k = format!("{repo}@{digest}");
            if carried.manifests.contains(&k) {
                expects.manifests.insert(k);
            } else {
                write = true;
                contains.manifests.insert(k);
            }
        }
        if write {
            manifests_out.push(m.clone());
        }
    }
    let mut blobs_out = Vec::new();
    for (digest, size) in &plan.blobs {
        let k = digest.to_string();
        if carried.blobs.contains(&k) {
            expects.blobs.insert(k);
        } else {
            contains.blobs.insert(k);
            blobs_out.push((digest.clone(), *size));
        }
    }

    let created = unix_now();
    let index = json!({"schemaVersion": 2, "mediaType": crate::oci::media::OCI_INDEX, "manifests": plan.entries});
    let meta = BundleMeta {
        format: state::FORMAT,
        created,
        expects: expects.clone(),
    };
    let out = &opts.out;
    let io = |what: &str| AirgapError::io(format!("{} ({what})", out.display()));
    let mut w = BundleWriter::create(out).map_err(io("creating"))?;
    w.add_bytes(layout::OCI_LAYOUT, layout::LAYOUT_VERSION)
        .map_err(io("writing"))?;
    w.add_bytes(layout::INDEX_JSON, index.to_string().as_bytes())
        .map_err(io("writing"))?;
    let meta = serde_json::to_vec(&meta).map_err(|e| AirgapError::Refused(e.to_string()))?;
    w.add_bytes(layout::BUNDLE_JSON, &meta)
        .map_err(io("writing"))?;
    for m in &manifests_out {
        w.add_bytes(&layout::blob_path(&m.digest), &m.bytes)
            .map_err(io("writing"))?;
    }
    let mut blob_bytes = 0;
    for (digest, size) in &blobs_out {
        let file = store.open_blob(digest)?;
        let mut reader = Verified {
            inner: file,
            digester: Digester::new(digest.algorithm()),
            read: 0,
        };
        w.add_reader(&layout::blob_path(digest), *size, &mut reader)
            .map_err(io("writing"))?;
        let actual = reader.digester.finish();
        if reader.read != *size || actual != *digest {
            return Err(AirgapError::Refused(format!(
                "stored blob {digest} is damaged ({} bytes hashing to {actual}); run `transship fsck`",
                reader.read
            )));
        }
        blob_bytes += size;
    }
    let bundle_bytes = w.finish().map_err(io("finishing"))?;

    let state_file = state::state_path(out);
    let state = BundleState {
        format: state::FORMAT,
        bundle: out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        created,
        refs: plan.refs.clone(),
        contains,
        predecessors: carried,
    };
    state.save(&state_file)?;
    Ok(ExportReport {
        out: out.clone(),
        state: state_file,
        refs: plan.refs,
        manifests: manifests_out.len() as u64,
        blobs: blobs_out.len() as u64,
        blob_bytes,
        bundle_bytes,
        expected: expects.len() as u64,
        notes: plan.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_filters() {
        let f = PlatformFilter::parse("linux/arm64").unwrap();
        let p = |os: &str, arch: &str, v: Option<&str>| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: v.map(Into::into),
        };
        assert!(f.matches(Some(&p("linux", "arm64", Some("v8")))));
        assert!(!f.matches(Some(&p("linux", "amd64", None))));
        assert!(!f.matches(None));
        let v = PlatformFilter::parse("linux/arm/v7").unwrap();
        assert!(v.matches(Some(&p("linux", "arm", Some("v7")))));
        assert!(!v.matches(Some(&p("linux", "arm", Some("v6")))));
        for bad in ["linux", "", "/amd64", "a/b/c/d"] {
            assert!(PlatformFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
