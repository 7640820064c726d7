//! Consistency check: re-hashes every blob, checks every index reference, and reports. With
//! `repair`, each problem that has a safe fix is fixed and the fix is reported — never
//! silently. Corrupt blob files are moved to `quarantine/` (not deleted) so an operator can
//! look at them; index entries that point at nothing are removed.

use std::collections::HashSet;

use super::blobs::hash_file;
use super::index::{
    self, CF_BLOB_REFS, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_REFERRERS, CF_TAGS, CF_UPLOADS,
};
use super::{Store, StoreError, decode_manifest};
use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, RepoName};

#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub manifests_checked: u64,
    pub problems: Vec<String>,
    /// Expected leftovers of a crash (orphan files): harmless, reclaimed by GC or `--repair`.
    pub notes: Vec<String>,
    pub repairs: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

fn split_last(k: &[u8]) -> Option<(&str, &str)> {
    let pos = k.iter().rposition(|&b| b == 0)?;
    Some((
        std::str::from_utf8(&k[..pos]).ok()?,
        std::str::from_utf8(&k[pos + 1..]).ok()?,
    ))
}

type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn collect(store: &Store, cf: &'static str) -> Result<Records, StoreError> {
    let mut out = Vec::new();
    store.index.scan(cf, b"", None, |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        true
    })?;
    Ok(out)
}

impl Store {
    /// Checks everything, treating every repository as one whose manifests' blobs must all
    /// be present.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport, StoreError> {
        self.fsck_with(repair, &|_| false)
    }

    /// As `fsck`, where `is_cache_repo` names the pull-through cache's repositories: their
    /// blobs are fetched on demand, so a manifest's missing blob is normal there.
    pub fn fsck_with(
        &self,
        repair: bool,
        is_cache_repo: &dyn Fn(&RepoName) -> bool,
    ) -> Result<FsckReport, StoreError> {
        let mut r = FsckReport::default();
        let mut fix = self.index.batch();
        let mut good_blobs: HashSet<String> = HashSet::new();

        // Blobs: the file exists, has the recorded size and hashes to its name.
        for (k, v) in collect(self, CF_BLOBS)? {
            let name = String::from_utf8_lossy(&k).into_owned();
            let Ok(digest) = name.parse::<Digest>() else {
                r.problems
                    .push(format!("blob record with invalid digest {name:?}"));
                if repair {
                    fix.delete(CF_BLOBS, &k);
                    r.repairs.push(format!("removed blob record {name:?}"));
                }
                continue;
            };
            let size = index::decode_u64s::<2>(CF_BLOBS, &v).map(|[s, _]| s).ok();
            r.blobs_checked += 1;
            let path = self.blobs.path(&digest);
            let verdict = match hash_file(&path, digest.algorithm()) {
                Err(e) => Some(format!(
                    "blob {digest}: cannot read {}: {e}",
                    path.display()
                )),
                Ok((actual, len)) => {
                    r.bytes_checked += len;
                    if size != Some(len) {
                        Some(format!(
                            "blob {digest}: file has {len} bytes, index says {size:?}"
                        ))
                    } else if actual != digest {
                        Some(format!("blob {digest}: content hashes to {actual}"))
                    } else {
                        None
                    }
                }
            };
            match verdict {
                None => {
                    good_blobs.insert(name);
                }
                Some(problem) => {
                    r.problems.push(problem);
                    if repair {
                        fix.delete(CF_BLOBS, &k);
                        if self.blobs.quarantine(&digest)? {
                            r.repairs.push(format!(
                                "moved {} to {}",
                                path.display(),
                                self.blobs.quarantine_path(&digest).display()
                            ));
                        }
                        r.repairs.push(format!("removed blob record {digest}"));
                    }
                }
            }
        }

        // Blob files with no record (a crash between rename and index write leaves these).
        for entry in self.blobs.list()? {
            match entry {
                Ok(d) if good_blobs.contains(&d.to_string()) => {}
                Ok(d) => {
                    if self.index.exists(CF_BLOBS, d.to_string().as_bytes())? {
                        continue; // reported above as corrupt
                    }
                    r.notes.push(format!(
                        "orphan blob file {} has no index record (left by a crash; GC removes it)",
                        self.blobs.path(&d).display()
                    ));
                    if repair {
                        self.blobs.remove(&d)?;
                        r.repairs.push(format!("removed orphan blob file for {d}"));
                    }
                }
                Err(path) => r.problems.push(format!(
                    "unexpected file {} in the blob store",
                    path.display()
                )),
            }
        }

        // Links point at good blobs.
        for (k, _) in collect(self, CF_LINKS)? {
            let ok = split_last(&k).is_some_and(|(_, d)| good_blobs.contains(d));
            if !ok {
                r.problems.push(format!(
                    "repository link {:?} points at a missing or bad blob",
                    String::from_utf8_lossy(&k)
                ));
                if repair {
                    fix.delete(CF_LINKS, &k);
                    r.repairs
                        .push(format!("removed link {:?}", String::from_utf8_lossy(&k)));
                }
            }
        }

        // Manifests: bytes hash to the key and parse; their blobs are linked in the repository.
        let mut manifests: HashSet<Vec<u8>> = HashSet::new();
        for (k, v) in collect(self, CF_MANIFESTS)? {
            r.manifests_checked += 1;
            let label = String::from_utf8_lossy(&k).replace('\0', "@");
            let Some((repo, digest)) = split_last(&k) else {
                r.problems
                    .push(format!("manifest record with invalid key {label:?}"));
                continue;
            };
            let (Ok(digest), Ok(repo)) = (digest.parse::<Digest>(), repo.parse::<RepoName>())
            else {
                r.problems
                    .push(format!("manifest record with invalid key {label:?}"));
                continue;
            };
            let problem = match decode_manifest(&v) {
                Err(e) => Some(e.to_string()),
                Ok((mt, bytes)) => {
                    if Digest::of(digest.algorithm(), &bytes) != digest {
                        Some("stored bytes do not hash to the digest".to_string())
                    } else {
                        match ParsedManifest::parse(&bytes, &mt) {
                            Err(e) => Some(e.to_string()),
                            Ok(p) => {
                                for d in p.referenced_blobs().filter(|_| !is_cache_repo(&repo)) {
                                    let lk = index::key(&[repo.as_str(), &d.digest.to_string()]);
                                    if !self.index.exists(CF_LINKS, &lk)? {
                                        r.problems.push(format!("manifest {label}: references {} which {repo} does not have", d.digest));
                                    }
                                }
                                None
                            }
                        }
                    }
                }
            };
            match problem {
                None => {
                    manifests.insert(k);
                }
                Some(p) => {
                    r.problems.push(format!("manifest {label}: {p}"));
                    if repair {
                        fix.delete(CF_MANIFESTS, &k);
                        fix.delete(index::CF_PUSHED, &k);
                        r.repairs.push(format!("removed manifest record {label}"));
                    }
                }
            }
        }

        // Tags, reverse references and referrers point at existing manifests.
        for (k, v) in collect(self, CF_TAGS)? {
            let target =
                split_last(&k).map(|(repo, _)| index::key(&[repo, &String::from_utf8_lossy(&v)]));
            if !target.is_some_and(|t| manifests.contains(&t)) {
                let label = String::from_utf8_lossy(&k).replace('\0', ":");
                r.problems
                    .push(format!("tag {label} points at a missing manifest"));
                if repair {
                    fix.delete(CF_TAGS, &k);
                    r.repairs.push(format!("removed tag {label}"));
                }
            }
        }
        for (cf, what) in [
            (CF_BLOB_REFS, "reverse reference"),
            (CF_REFERRERS, "referrers entry"),
        ] {
            for (k, _) in collect(self, cf)? {
                // blob_refs: blob \0 repo \0 manifest; referrers: repo \0 subject \0 referrer.
                let parts: Vec<&[u8]> = k.split(|&b| b == 0).collect();
                let target = match (cf, parts.as_slice()) {
                    (CF_BLOB_REFS, [_, repo, m]) => Some([*repo, b"\0", *m].concat()),
                    (CF_REFERRERS, [repo, _, m]) => Some([*repo, b"\0", *m].concat()),
                    _ => None,
                };
                if !target.is_some_and(|t| manifests.contains(&t)) {
                    let label = String::from_utf8_lossy(&k).replace('\0', " ");
                    r.problems
                        .push(format!("{what} {label:?} points at a missing manifest"));
                    if repair {
                        fix.delete(cf, &k);
                        r.repairs.push(format!("removed {what} {label:?}"));
                    }
                }
            }
        }

        // Upload records whose bytes are gone.
        for (k, _) in collect(self, CF_UPLOADS)? {
            let id = String::from_utf8_lossy(&k).into_owned();
            if !self.blobs.ingest_path(&id).exists() {
                r.problems.push(format!("upload {id} has no ingest file"));
                if repair {
                    fix.delete(CF_UPLOADS, &k);
                    r.repairs.push(format!("removed upload record {id}"));
                }
            }
        }

        if repair && !fix.is_empty() {
            self.index.write_synced(fix)?;
            self.recount()?;
        }
        Ok(r)
    }
}
