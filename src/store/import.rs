//! Storage operations of bundle import: staging ingest files that GC leaves alone while an
//! import runs, committing a verified blob with its links to every repository that needs it,
//! and writing all of a bundle's manifests and tags in one synced batch once every blob they
//! reference is committed. Nothing here parses bundles or decides what to import.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::index::{
    self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_REFERRERS, CF_TAG_CHECKS,
    CF_TAG_HISTORY, CF_TAGS, key,
};
use super::{Store, StoreError, StoredManifest, unix_now};
use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, RepoName, Tag};

/// One manifest to import, already verified against its digest and parsed.
#[derive(Debug)]
pub struct ImportedManifest {
    pub repo: RepoName,
    pub digest: Digest,
    pub parsed: ParsedManifest,
    pub bytes: Bytes,
    /// A repository of the pull-through cache (tags carry `tag_checks`), not a project.
    pub cached: bool,
    /// Tags to point at it, with the time (unix seconds) each was resolved upstream, if known.
    pub tags: Vec<(Tag, Option<u64>)>,
}

/// What `import_manifests` changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct ManifestsImported {
    pub manifests_written: u64,
    pub tags_written: u64,
    /// Tags left alone because the destination resolved them more recently.
    pub tags_kept: u64,
}

/// An ingest file claimed for an import; GC leaves it alone until `release_ingest`.
pub struct ClaimedIngest {
    pub id: String,
    pub path: PathBuf,
}

impl Store {
    /// A fresh ingest file name for an import, claimed so GC does not remove it while the
    /// import runs. After a crash nobody claims it and GC removes it after the grace period.
    pub fn claim_import_ingest(&self) -> ClaimedIngest {
        let id = format!("import-{}", uuid::Uuid::new_v4());
        self.claim_ingest(&id);
        let path = self.blobs.ingest_path(&id);
        ClaimedIngest { id, path }
    }

    /// Where the store keeps a blob's bytes.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.path(digest)
    }

    /// Whether the blob's record and file are both present (so a bundle may omit it).
    pub fn holds_blob(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.has_blob_anywhere(digest)? && self.blobs.contains(digest))
    }

    /// Commits a verified, fsynced ingest file of `size` bytes (or, with `ingest = None`, a
    /// blob the store already holds, whose recorded size is used) and links it into every repository of `repos` that lacks a link, in one
    /// synced batch. Returns whether the blob's bytes were new to the store. Does nothing when
    /// the blob is stored and already linked everywhere (re-imports change nothing).
    pub fn import_blob(
        &self,
        ingest: Option<&std::path::Path>,
        digest: &Digest,
        size: u64,
        repos: &[RepoName],
    ) -> Result<bool, StoreError> {
        let _gc = self.read_gc_lock();
        let digest_key = digest.to_string();
        let recorded = self
            .global_blob_size(digest)?
            .filter(|_| self.blobs.contains(digest));
        let known = recorded.is_some();
        let size = recorded.unwrap_or(size);
        let mut unlinked = Vec::new();
        for repo in repos {
            if !known
                || !self
                    .index
                    .exists(CF_LINKS, &key(&[repo.as_str(), &digest_key]))?
            {
                unlinked.push(repo);
            }
        }
        if known {
            if let Some(path) = ingest {
                let _ = std::fs::remove_file(path);
            }
            if unlinked.is_empty() {
                // Nothing to link, but restart its GC grace period: the bundle's manifests,
                // committed next, will reference it.
                let mut batch = self.index.batch();
                batch.put(
                    super::index::CF_BLOBS,
                    digest_key.as_bytes(),
                    &index::encode_u64s(&[size, unix_now()]),
                );
                self.index.write_relaxed(batch)?;
                return Ok(false);
            }
        } else {
            let Some(path) = ingest else {
                return Err(StoreError::BlobUnknown(digest.clone()));
            };
            self.blobs.commit_ingest(path, digest)?;
        }
        let now = unix_now();
        let mut batch = self.index.batch();
        for repo in unlinked {
            self.link_blob(&mut batch, &digest_key, size, repo, now, false)?;
        }
        self.index.write_synced(batch)?;
        if !known {
            self.blob_changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stored_bytes
                .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
            self.blob_count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(!known)
    }

    /// Writes every manifest of a bundle with its reverse references and tags in one synced
    /// batch, after re-checking (under the GC lock, so nothing can be collected in between)
    /// that each referenced blob is recorded and linked in the manifest's repository and, for
    /// a project, that each child manifest exists or comes in the same batch. A cache tag the
    /// destination resolved more recently than the bundle is kept. Manifests already stored
    /// and tags already in place are not rewritten.
    pub fn import_manifests(
        &self,
        items: &[ImportedManifest],
    ) -> Result<ManifestsImported, StoreError> {
        let _gc = self.read_gc_lock();
        let mut missing = Vec::new();
        let in_batch: std::collections::HashSet<(&str, &Digest)> =
            items.iter().map(|m| (m.repo.as_str(), &m.digest)).collect();
        for m in items {
            for d in m.parsed.referenced_blobs() {
                let dk = d.digest.to_string();
                if !self.index.exists(CF_LINKS, &key(&[m.repo.as_str(), &dk]))?
                    || !self.index.exists(CF_BLOBS, dk.as_bytes())?
                {
                    missing.push(d.digest.clone());
                }
            }
            if !m.cached {
                for d in m.parsed.child_manifests() {
                    if !in_batch.contains(&(m.repo.as_str(), &d.digest))
                        && !self.index.exists(
                            CF_MANIFESTS,
                            &key(&[m.repo.as_str(), &d.digest.to_string()]),
                        )?
                    {
                        missing.push(d.digest.clone());
                    }
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(StoreError::ManifestBlobUnknown(missing));
        }

        let now = unix_now();
        let mut out = ManifestsImported::default();
        let mut batch = self.index.batch();
        let mut new_tags: Vec<(Vec<u8>, Digest)> = Vec::new();
        let mut cached_manifests = Vec::new();
        for m in items {
            let digest_key = m.digest.to_string();
            let manifest_key = key(&[m.repo.as_str(), &digest_key]);
            if !self.index.exists(CF_MANIFESTS, &manifest_key)? {
                out.manifests_written += 1;
                batch.put(
                    CF_MANIFESTS,
                    &manifest_key,
                    &super::encode_manifest(&m.parsed.media_type, &m.bytes),
                );
                for d in m.parsed.referenced_blobs() {
                    batch.put(
                        CF_BLOB_REFS,
                        &key(&[&d.digest.to_string(), m.repo.as_str(), &digest_key]),
                        b"",
                    );
                }
                if let Some(s) = &m.parsed.subject {
                    let desc = m
                        .parsed
                        .referrer_descriptor(&m.digest, m.bytes.len() as u64);
                    batch.put(
                        CF_REFERRERS,
                        &key(&[m.repo.as_str(), &s.digest.to_string(), &digest_key]),
                        desc.to_string().as_bytes(),
                    );
                }
                self.note_repo(&mut batch, &m.repo, now)?;
                // Brought in now: as recent as a pull, for eviction's order (an import is
                // pinned too unless --no-pin).
                batch.put(
                    index::CF_ACCESS,
                    &manifest_key,
                    &index::encode_u64s(&[now, 0]),
                );
                cached_manifests.push((
                    manifest_key,
                    Arc::new(StoredManifest {
                        digest: m.digest.clone(),
                        media_type: m.parsed.media_type.clone(),
                        bytes: m.bytes.clone(),
                    }),
                ));
            }
            for (tag, resolved) in &m.tags {
                let tag_key = key(&[m.repo.as_str(), tag.as_str()]);
                let current = self.index.get(CF_TAGS, &tag_key)?;
                let same = current.as_deref() == Some(digest_key.as_bytes());
                if !m.cached {
                    if !same {
                        batch.put(CF_TAGS, &tag_key, digest_key.as_bytes());
                        new_tags.push((tag_key, m.digest.clone()));
                        out.tags_written += 1;
                    }
                    continue;
                }
                let checked = self
                    .index
                    .get_with(CF_TAG_CHECKS, &tag_key, |v| {
                        index::decode_u64s::<1>(CF_TAG_CHECKS, v)
                    })?
                    .transpose()?
                    .map(|[t]| t);
                // Never in the future: a skewed clock or a crafted bundle must not keep a tag
                // "fresh" forever or win over every later resolution here.
                let resolved = resolved.unwrap_or(now).min(now);
                let newer_here = current.is_some() && checked.is_some_and(|c| c >= resolved);
                if newer_here {
                    if !same {
                        out.tags_kept += 1;
                    }
                    continue;
                }
                batch.put(CF_TAGS, &tag_key, digest_key.as_bytes());
                batch.put(CF_TAG_CHECKS, &tag_key, &index::encode_u64s(&[resolved]));
                let mut h = tag_key.clone();
                h.push(0);
                h.extend_from_slice(&resolved.saturating_mul(1_000_000).to_be_bytes());
                batch.put(CF_TAG_HISTORY, &h, digest_key.as_bytes());
                // A pinned tag keeps what it moves to, here as on a fetch.
                self.follow_tag_pin(&mut batch, &m.repo, tag, &m.digest)?;
                if !same {
                    new_tags.push((tag_key, m.digest.clone()));
                }
                out.tags_written += 1;
            }
        }
        if batch.is_empty() {
            return Ok(out);
        }
        let _stripes = self.lock_stripes(
            new_tags
                .iter()
                .map(|(k, _)| k.as_slice())
                .chain(cached_manifests.iter().map(|(k, _)| k.as_slice())),
        );
        self.index.write_synced(batch)?;
        for (k, d) in &new_tags {
            self.tags.insert(k.clone(), d.clone());
        }
        for (k, m) in &cached_manifests {
            self.manifests.insert(k.clone(), m.clone());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn index(repo: &RepoName, n: u32, resolved: Option<u64>) -> ImportedManifest {
        let bytes = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"annotations":{{"n":"{n}"}}}}"#
        ));
        ImportedManifest {
            repo: repo.clone(),
            digest: Digest::sha256_of(&bytes),
            parsed: ParsedManifest::parse(&bytes, "").unwrap(),
            bytes,
            cached: true,
            tags: vec![("v1".parse().unwrap(), resolved)],
        }
    }

    fn counts(r: ManifestsImported) -> (u64, u64, u64) {
        (r.manifests_written, r.tags_written, r.tags_kept)
    }

    #[test]
    fn cache_tags_keep_the_newest_resolution_and_reimports_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let repo: RepoName = "docker.io/library/x".parse().unwrap();
        let tag: Tag = "v1".parse().unwrap();
        let import =
            |m: &ImportedManifest| counts(store.import_manifests(std::slice::from_ref(m)).unwrap());
        let tag_now = || store.cached_tag(&repo, &tag).unwrap();
        let first = index(&repo, 1, Some(1000));
        assert_eq!(import(&first), (1, 1, 0));
        assert_eq!(tag_now(), Some((first.digest.clone(), 1000)));
        assert_eq!(import(&first), (0, 0, 0));
        // An older bundle that saw the tag elsewhere does not move it back.
        assert_eq!(import(&index(&repo, 2, Some(900))), (1, 0, 1));
        assert_eq!(tag_now(), Some((first.digest.clone(), 1000)));
        // A newer one does, and the history keeps both resolutions with their times.
        let newer = index(&repo, 3, Some(2000));
        assert_eq!(import(&newer), (1, 1, 0));
        assert_eq!(tag_now(), Some((newer.digest.clone(), 2000)));
        let history = store.tag_history(&repo, &tag).unwrap();
        assert_eq!(
            history,
            vec![
                (1000 * 1_000_000, first.digest.to_string()),
                (2000 * 1_000_000, newer.digest.to_string())
            ]
        );
    }

    #[test]
    fn a_manifest_whose_blobs_are_missing_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let repo: RepoName = "local/app".parse().unwrap();
        let config = Digest::sha256_of(b"{}");
        let bytes = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[]}}"#
        ));
        let digest = Digest::sha256_of(&bytes);
        let item = ImportedManifest {
            repo: repo.clone(),
            digest: digest.clone(),
            parsed: ParsedManifest::parse(&bytes, "").unwrap(),
            bytes,
            cached: false,
            tags: vec![("v1".parse().unwrap(), None)],
        };
        match store.import_manifests(std::slice::from_ref(&item)) {
            Err(StoreError::ManifestBlobUnknown(d)) => assert_eq!(d, vec![config.clone()]),
            other => panic!("{other:?}"),
        }
        assert!(store.manifest(&repo, &digest).unwrap().is_none());
        assert!(
            store
                .resolve_tag(&repo, &"v1".parse().unwrap())
                .unwrap()
                .is_none()
        );

        // Once the blob is committed and linked, the same import goes in.
        let ingest = store.claim_import_ingest();
        std::fs::write(&ingest.path, b"{}").unwrap();
        assert!(
            store
                .import_blob(Some(&ingest.path), &config, 2, std::slice::from_ref(&repo))
                .unwrap()
        );
        assert!(
            !store
                .import_blob(None, &config, 0, std::slice::from_ref(&repo))
                .unwrap()
        );
        assert_eq!(store.blob_size(&repo, &config).unwrap(), Some(2));
        let r = store.import_manifests(std::slice::from_ref(&item)).unwrap();
        assert_eq!(counts(r), (1, 1, 0));
        assert_eq!(
            store.resolve_tag(&repo, &"v1".parse().unwrap()).unwrap(),
            Some(digest)
        );
    }
}
