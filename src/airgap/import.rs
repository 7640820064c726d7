//! `transship import`: reads a bundle once, front to back. Every blob (manifests included) is
//! hashed while it is read; one the store lacks is staged in a claimed ingest file, one it
//! holds is only hashed. Any mismatch, a truncated bundle, a reference this configuration
//! cannot serve, or content the images need that neither the bundle nor the destination holds
//! (a delta imported out of order) refuses the whole bundle, naming what is wrong, before
//! anything is committed. Then blobs are committed with their links, and last all manifests
//! and tags in one synced batch, so no image is servable before all of its blobs are. A crash
//! leaves only ingest files (GC removes them) or committed blobs no manifest references yet;
//! importing again finishes the job, and a re-import changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout;
use super::state::BundleMeta;
use super::{
    AirgapError, ImportedImage, Kind, StoreRef, kind_of_stored, pin_imported, split_reference,
};
use crate::config::Config;
use crate::oci::manifest::{Descriptor, ParsedManifest};
use crate::oci::{Digest, Digester, Reference, RepoName};
use crate::proxy::route::Router;
use crate::store::Store;
use crate::store::import::{ClaimedIngest, ImportedManifest};

/// Largest `index.json` / `transship-bundle.json` / `oci-layout` read.
const MAX_INDEX: u64 = 16 << 20;
const MAX_META: u64 = 64 << 20;
const MAX_LAYOUT: u64 = 64 << 10;
/// Largest tar extension entry (long name, PAX record) accepted; a bundle needs none.
const MAX_EXTENSION: u64 = 64 << 10;
/// Nested indexes deeper than this are refused.
const MAX_DEPTH: usize = 4;
/// Copy buffer for staging blobs.
const PIECE: usize = 256 << 10;
/// How many missing digests a refusal lists.
const LIST: usize = 50;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportOptions {
    pub file: PathBuf,
    /// Do not pin what is imported.
    #[serde(default)]
    pub no_pin: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportReport {
    pub refs: Vec<String>,
    /// Blobs whose bytes were new to the store, and their size.
    pub blobs_new: u64,
    pub bytes_new: u64,
    /// Blobs the store held already.
    pub blobs_present: u64,
    pub manifests_written: u64,
    pub tags_written: u64,
    /// Cache tags left alone because this store resolved them more recently.
    pub tags_kept: u64,
    pub pinned: bool,
    pub notes: Vec<String>,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        write!(
            f,
            "imported {} references: {} new blobs ({} bytes), {} already present, {} manifests and {} tags written, {} newer tags kept{}",
            self.refs.len(),
            self.blobs_new,
            self.bytes_new,
            self.blobs_present,
            self.manifests_written,
            self.tags_written,
            self.tags_kept,
            if self.pinned { "; pinned" } else { "" }
        )
    }
}

/// A blob the bundle carried.
enum Carried {
    /// Staged in an ingest file (the store lacked it).
    Staged { ingest: ClaimedIngest, size: u64 },
    /// Verified, but the store holds it already.
    Held { size: u64 },
}

/// The blobs read so far. Dropped, it removes the ingest files not committed and releases
/// their claims.
struct Staging<'a> {
    store: &'a Store,
    blobs: HashMap<Digest, Carried>,
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        for c in self.blobs.values() {
            if let Carried::Staged { ingest, .. } = c {
                let _ = std::fs::remove_file(&ingest.path);
                self.store.release_ingest(&ingest.id);
            }
        }
    }
}

fn refused(msg: impl Into<String>) -> AirgapError {
    AirgapError::Refused(msg.into())
}

fn damaged(e: std::io::Error) -> AirgapError {
    refused(format!("the bundle is damaged or truncated: {e}"))
}

impl Staging<'_> {
    /// Reads one blob entry, verifying it against `digest`.
    fn take(&mut self, digest: Digest, entry: &mut impl Read) -> Result<(), AirgapError> {
        let mut digester = Digester::new(digest.algorithm());
        let mut buf = vec![0u8; PIECE];
        let mut size = 0u64;
        let keep = !self.blobs.contains_key(&digest) && !self.store.holds_blob(&digest)?;
        let (mut file, ingest) = if keep {
            let ingest = self.store.claim_import_ingest();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&ingest.path);
            match file {
                Ok(f) => (Some(f), Some(ingest)),
                Err(e) => {
                    self.store.release_ingest(&ingest.id);
                    return Err(AirgapError::io(ingest.path.display())(e));
                }
            }
        } else {
            (None, None)
        };
        let result = (|| -> Result<(), AirgapError> {
            loop {
                let n = entry.read(&mut buf).map_err(damaged)?;
                if n == 0 {
                    break;
                }
                digester.update(&buf[..n]);
                size += n as u64;
                if let (Some(f), Some(i)) = (&mut file, &ingest) {
                    f.write_all(&buf[..n])
                        .map_err(AirgapError::io(i.path.display()))?;
                }
            }
            let actual = digester.finish();
            if actual != digest {
                return Err(refused(format!(
                    "blob {digest} in the bundle is damaged: its content hashes to {actual}; nothing was imported"
                )));
            }
            if let (Some(f), Some(i)) = (&file, &ingest) {
                f.sync_data().map_err(AirgapError::io(i.path.display()))?;
            }
            Ok(())
        })();
        drop(file.take());
        match (result, ingest) {
            (Err(e), Some(i)) => {
                let _ = std::fs::remove_file(&i.path);
                self.store.release_ingest(&i.id);
                Err(e)
            }
            (Err(e), None) => Err(e),
            (Ok(()), Some(ingest)) => {
                self.blobs.insert(digest, Carried::Staged { ingest, size });
                Ok(())
            }
            (Ok(()), None) => {
                self.blobs.entry(digest).or_insert(Carried::Held { size });
                Ok(())
            }
        }
    }

    fn size(&self, digest: &Digest) -> Option<u64> {
        self.blobs.get(digest).map(|c| match c {
            Carried::Staged { size, .. } | Carried::Held { size } => *size,
        })
    }

    /// The bytes of a carried blob (a manifest), read back from its file.
    fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Bytes>, AirgapError> {
        let (path, size) = match self.blobs.get(digest) {
            None => return Ok(None),
            Some(Carried::Staged { ingest, size }) => (ingest.path.clone(), *size),
            Some(Carried::Held { size }) => (self.store.blob_path(digest), *size),
        };
        if size > limit {
            return Err(refused(format!(
                "manifest {digest} is {size} bytes, over the {limit}-byte limit"
            )));
        }
        let bytes = std::fs::read(&path).map_err(AirgapError::io(path.display()))?;
        Ok(Some(Bytes::from(bytes)))
    }
}

fn read_limited(entry: &mut impl Read, limit: u64, what: &str) -> Result<Vec<u8>, AirgapError> {
    let mut v = Vec::new();
    entry.take(limit + 1).read_to_end(&mut v).map_err(damaged)?;
    if v.len() as u64 > limit {
        return Err(refused(format!("{what} is over {limit} bytes")));
    }
    Ok(v)
}

/// What the bundle's own files said.
#[derive(Default)]
struct BundleFiles {
    layout: bool,
    index: Option<Vec<u8>>,
    meta: Option<BundleMeta>,
}

fn read_bundle(path: &Path, staging: &mut Staging<'_>) -> Result<BundleFiles, AirgapError> {
    let mut archive = layout::open_bundle(path).map_err(AirgapError::io(path.display()))?;
    let mut out = BundleFiles::default();
    // Raw entries: the tar crate would read GNU long-name and PAX extension entries whole,
    // whatever size they claim. A bundle's names are short; extension entries are skipped,
    // and refused when larger than a header could need.
    for entry in archive.entries().map_err(damaged)?.raw(true) {
        let mut entry = entry.map_err(damaged)?;
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
        {
            if entry.header().size().map_err(damaged)? > MAX_EXTENSION {
                return Err(refused("the bundle has an oversized tar extension header"));
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(damaged)?
            .to_string_lossy()
            .into_owned();
        let name = name.trim_start_matches("./");
        if name == layout::OCI_LAYOUT {
            let v = read_limited(&mut entry, MAX_LAYOUT, "oci-layout")?;
            let ok = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .is_some_and(|j| j["imageLayoutVersion"].is_string());
            if !ok {
                return Err(refused("oci-layout is not an OCI image layout marker"));
            }
            out.layout = true;
        } else if name == layout::INDEX_JSON {
            out.index = Some(read_limited(&mut entry, MAX_INDEX, "index.json")?);
        } else if name == layout::BUNDLE_JSON {
            let v = read_limited(&mut entry, MAX_META, layout::BUNDLE_JSON)?;
            out.meta = Some(
                serde_json::from_slice(&v)
                    .map_err(|e| refused(format!("{} is malformed: {e}", layout::BUNDLE_JSON)))?,
            );
        } else if let Some(digest) = layout::parse_blob_path(name) {
            staging.take(digest, &mut entry)?;
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct IndexJson {
    manifests: Vec<Descriptor>,
}

/// What the bundle's references need, gathered before anything is committed.
struct Plan<'a> {
    store: &'a Store,
    staging: &'a Staging<'a>,
    limit: u64,
    manifests: Vec<ImportedManifest>,
    seen: HashMap<(RepoName, Digest), usize>,
    /// Every blob the imported images need, with the repositories that need it.
    blobs: BTreeMap<Digest, BTreeSet<RepoName>>,
    missing: BTreeSet<String>,
}

impl Plan<'_> {
    /// The manifest's bytes, from the bundle or, for one an earlier bundle carried, from the
    /// destination's own repository.
    fn load(&self, repo: &RepoName, digest: &Digest) -> Result<Option<Bytes>, AirgapError> {
        if let Some(b) = self.staging.read_small(digest, self.limit)? {
            return Ok(Some(b));
        }
        Ok(self.store.manifest(repo, digest)?.map(|m| m.bytes.clone()))
    }

    fn walk(
        &mut self,
        repo: &RepoName,
        kind: Kind,
        desc: &Descriptor,
        depth: usize,
        top: bool,
    ) -> Result<Option<usize>, AirgapError> {
        if let Some(&i) = self.seen.get(&(repo.clone(), desc.digest.clone())) {
            return Ok(Some(i));
        }
        let Some(bytes) = self.load(repo, &desc.digest)? else {
            // A cache carries the platforms that were pulled; anything else must be there.
            if top || kind == Kind::Project {
                self.missing.insert(desc.digest.to_string());
            }
            return Ok(None);
        };
        let actual = Digest::of(desc.digest.algorithm(), &bytes);
        if actual != desc.digest {
            return Err(refused(format!(
                "manifest {} hashes to {actual}",
                desc.digest
            )));
        }
        let parsed = ParsedManifest::parse(&bytes, &desc.media_type)
            .map_err(|e| refused(format!("manifest {} is not valid: {e}", desc.digest)))?;
        if parsed.is_index() {
            if depth >= MAX_DEPTH {
                return Err(refused(format!(
                    "manifest {} nests indexes deeper than {MAX_DEPTH}",
                    desc.digest
                )));
            }
            for child in parsed.child_manifests() {
                self.walk(repo, kind, child, depth + 1, false)?;
            }
        } else {
            for d in parsed.referenced_blobs() {
                if self.staging.size(&d.digest).is_some() || self.store.holds_blob(&d.digest)? {
                    self.blobs
                        .entry(d.digest.clone())
                        .or_default()
                        .insert(repo.clone());
                } else {
                    self.missing.insert(d.digest.to_string());
                }
            }
        }
        let i = self.manifests.len();
        self.manifests.push(ImportedManifest {
            repo: repo.clone(),
            digest: desc.digest.clone(),
            parsed,
            bytes,
            cached: kind == Kind::Cache,
            tags: Vec::new(),
        });
        self.seen.insert((repo.clone(), desc.digest.clone()), i);
        Ok(Some(i))
    }
}

/// One `index.json` entry: the reference it names and when it was resolved.
fn entry_ref(
    router: &Router,
    desc: &Descriptor,
) -> Result<Option<(StoreRef, Kind, Option<u64>)>, AirgapError> {
    let ann = desc.annotations.as_ref();
    let Some(name) = ann
        .and_then(|a| a.get(layout::REF_NAME))
        .and_then(|v| v.as_str())
    else {
        return Ok(None);
    };
    let (repo, reference) = split_reference(name)?;
    let repo: RepoName = repo
        .parse()
        .map_err(|e| refused(format!("{name:?}: {e}")))?;
    let Some(kind) = kind_of_stored(router, &repo) else {
        return Err(refused(format!(
            "{name}: this configuration has no project or upstream that serves {repo}"
        )));
    };
    if let Reference::Digest(d) = &reference
        && *d != desc.digest
    {
        return Err(refused(format!(
            "{name} names {d} but points at {}",
            desc.digest
        )));
    }
    let resolved = ann
        .and_then(|a| a.get(layout::RESOLVED))
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok());
    Ok(Some((StoreRef { repo, reference }, kind, resolved)))
}

/// Whether a cache tag resolved at `at` is already too old for its upstream to serve it stale:
/// then only an upstream that answers (or `offline = true`) lets clients have it by tag.
fn served_only_online(config: &Config, router: &Router, repo: &RepoName, at: u64) -> bool {
    let Ok(route) = router.resolve(repo, None) else {
        return false;
    };
    config.upstreams.get(route.upstream).is_some_and(|u| {
        !u.offline && crate::store::unix_now().saturating_sub(at) > u.stale_if_error.0.as_secs()
    })
}

fn list(missing: &BTreeSet<String>) -> String {
    let mut s: Vec<&str> = missing.iter().take(LIST).map(|d| d.as_str()).collect();
    let more = missing.len().saturating_sub(LIST);
    let tail = format!("and {more} more");
    if more > 0 {
        s.push(&tail);
    }
    s.join(", ")
}

/// Imports the bundle `opts.file` into `store`.
pub fn import(
    config: &Config,
    store: &Store,
    opts: &ImportOptions,
) -> Result<ImportReport, AirgapError> {
    let router = Router::new(config);
    let mut staging = Staging {
        store,
        blobs: HashMap::new(),
    };
    let read = read_bundle(&opts.file, &mut staging)?;
    if !read.layout {
        return Err(refused("not an OCI image layout: no oci-layout file"));
    }
    let index = read
        .index
        .ok_or_else(|| refused("not an OCI image layout: no index.json"))?;
    let index: IndexJson = serde_json::from_slice(&index)
        .map_err(|e| refused(format!("index.json is malformed: {e}")))?;

    let mut report = ImportReport::default();
    let mut plan = Plan {
        store,
        staging: &staging,
        limit: store.options().max_manifest_size,
        manifests: Vec::new(),
        seen: HashMap::new(),
        blobs: BTreeMap::new(),
        missing: BTreeSet::new(),
    };
    // What an earlier bundle carried must be here already.
    if let Some(meta) = &read.meta {
        for d in &meta.expects.blobs {
            let held = match d.parse::<Digest>() {
                Ok(d) => store.holds_blob(&d)?,
                Err(_) => false,
            };
            if !held {
                plan.missing.insert(d.clone());
            }
        }
        for m in &meta.expects.manifests {
            let here = match m.split_once('@') {
                Some((r, d)) => match (r.parse::<RepoName>(), d.parse::<Digest>()) {
                    (Ok(r), Ok(d)) => store.manifest(&r, &d)?.is_some(),
                    _ => false,
                },
                None => false,
            };
            if !here {
                plan.missing.insert(m.clone());
            }
        }
    }
    let mut images = Vec::new();
    let mut stale = Vec::new();
    for desc in &index.manifests {
        let Some((sref, kind, resolved)) = entry_ref(&router, desc)? else {
            report.notes.push(format!(
                "index.json entry {} names no reference; skipped",
                desc.digest
            ));
            continue;
        };
        if let Some(i) = plan.walk(&sref.repo, kind, desc, 0, true)?
            && let Reference::Tag(t) = &sref.reference
        {
            plan.manifests[i].tags.push((t.clone(), resolved));
            if resolved.is_some_and(|at| served_only_online(config, &router, &sref.repo, at)) {
                stale.push(sref.to_string());
            }
        }
        images.push(ImportedImage {
            repo: sref.repo.to_string(),
            digest: desc.digest.to_string(),
            tag: match &sref.reference {
                Reference::Tag(t) => Some(t.to_string()),
                Reference::Digest(_) => None,
            },
        });
        report.refs.push(sref.to_string());
    }
    if !plan.missing.is_empty() {
        return Err(refused(format!(
            "the bundle needs content that neither it nor this store holds (import the bundles it was exported after first); nothing was imported. Missing: {}",
            list(&plan.missing)
        )));
    }
    if !stale.is_empty() {
        report.notes.push(format!(
            "{} imported tags were resolved longer than stale_if_error ago and their upstream is not offline: they are served only while it answers (set offline = true on an air-gapped site): {}",
            stale.len(),
            stale.join(", ")
        ));
    }
    let Plan {
        manifests, blobs, ..
    } = plan;

    // Everything verified: commit blobs, then every manifest and tag at once.
    for (digest, repos) in &blobs {
        let repos: Vec<RepoName> = repos.iter().cloned().collect();
        let (ingest, size) = match staging.blobs.get(digest) {
            Some(Carried::Staged { ingest, size }) => (Some(ingest.path.clone()), *size),
            Some(Carried::Held { size }) => (None, *size),
            None => (None, 0),
        };
        let new = store.import_blob(ingest.as_deref(), digest, size, &repos)?;
        if new {
            report.blobs_new += 1;
            report.bytes_new += size;
        } else {
            report.blobs_present += 1;
        }
    }
    let done = store.import_manifests(&manifests)?;
    report.manifests_written = done.manifests_written;
    report.tags_written = done.tags_written;
    report.tags_kept = done.tags_kept;
    drop(staging);
    if !opts.no_pin {
        pin_imported(store, &images)?;
        report.pinned = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PAX extension entry claiming far more than any header needs is refused before it is
    /// read (the tar crate would read it whole), and nothing is stored.
    #[test]
    fn an_oversized_extension_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("crafted.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&bundle).unwrap());
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(1 << 20);
            h.set_cksum();
            b.append(&h, std::io::repeat(b'a').take(1 << 20)).unwrap();
            b.finish().unwrap();
        }
        let mut config = Config::embedded();
        config.server.data_dir = dir.path().join("data");
        let store = Store::open(&config.server.data_dir, crate::store_options(&config)).unwrap();
        let err = import(
            &config,
            &store,
            &ImportOptions {
                file: bundle,
                no_pin: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("oversized"), "{err}");
        assert_eq!(store.usage(), (0, 0));
    }
}
