//! Read-only listings for the console: a repository's tags with their digests, its manifests,
//! the repositories under a prefix, a mirror repository's tag histories and cached bytes. Each
//! listing is exactly one RocksDB prefix scan, so a page costs one scan per section however
//! many tags it shows.

use std::sync::Arc;

use bytes::Bytes;

use std::collections::HashMap;

use super::index::{
    self, CF_BLOBS, CF_LINKS, CF_MANIFESTS, CF_PUSHED, CF_REPOS, CF_TAG_HISTORY, CF_TAGS,
};
use super::{Store, StoreError, StoredManifest, decode_manifest};
use crate::oci::{Digest, RepoName};

/// One observed resolution of a mirror tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagResolution {
    pub tag: String,
    /// Microseconds since the epoch.
    pub at_micros: u64,
    pub digest: String,
}

impl Store {
    /// When `repo` was first written (unix seconds), `None` if it is unknown.
    pub fn repo_created(&self, repo: &RepoName) -> Result<Option<u64>, StoreError> {
        let rec = self
            .index
            .get_with(CF_REPOS, repo.as_str().as_bytes(), |v| {
                index::decode_u64s::<1>(CF_REPOS, v)
            })?;
        Ok(rec.transpose()?.map(|[t]| t))
    }

    /// Repositories named `<under>/…` in ASCII order with their creation time, at most `n`
    /// (one scan of `repos`); `visible` filters before counting.
    pub fn repos_under(
        &self,
        under: &str,
        n: usize,
        mut visible: impl FnMut(&str) -> bool,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let p = format!("{under}/");
        let mut out = Vec::new();
        self.index.scan(CF_REPOS, p.as_bytes(), None, |k, v| {
            if let Ok(name) = std::str::from_utf8(k)
                && visible(name)
            {
                let created = index::decode_u64s::<1>(CF_REPOS, v).map_or(0, |[t]| t);
                out.push((name.to_string(), created));
            }
            out.len() < n
        })?;
        Ok(out)
    }

    /// The tags of `repo` with the digest each points at, in ASCII order, at most `n` (one
    /// scan of `tags`).
    pub fn tags_with_digests(
        &self,
        repo: &RepoName,
        n: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let mut out = Vec::new();
        self.index.scan(CF_TAGS, &p, None, |k, v| {
            if let (Ok(tag), Ok(digest)) =
                (std::str::from_utf8(&k[p.len()..]), std::str::from_utf8(v))
            {
                out.push((tag.to_string(), digest.to_string()));
            }
            out.len() < n
        })?;
        Ok(out)
    }

    /// The tags of `repo` pointing at `digest` (one scan of `tags`).
    pub fn tags_pointing_at(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<String>, StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let d = digest.to_string();
        let mut out = Vec::new();
        self.index.scan(CF_TAGS, &p, None, |k, v| {
            if v == d.as_bytes()
                && let Ok(tag) = std::str::from_utf8(&k[p.len()..])
            {
                out.push(tag.to_string());
            }
            true
        })?;
        Ok(out)
    }

    /// The first `n` manifests of `repo` (digest order), each handed to `f` as it is read and
    /// dropped after: a caller keeps what it needs of each, not every manifest's bytes.
    pub fn visit_manifests(
        &self,
        repo: &RepoName,
        n: usize,
        mut f: impl FnMut(StoredManifest),
    ) -> Result<usize, StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let mut seen = 0;
        self.index.scan(CF_MANIFESTS, &p, None, |k, v| {
            let digest = std::str::from_utf8(&k[p.len()..])
                .ok()
                .and_then(|d| d.parse::<Digest>().ok());
            if let (Some(digest), Ok((media_type, bytes))) = (digest, decode_manifest(v)) {
                seen += 1;
                f(StoredManifest {
                    digest,
                    media_type,
                    bytes: Bytes::from(bytes),
                });
            }
            seen < n
        })?;
        Ok(seen)
    }

    /// `visit_manifests`, collected (for small `n`).
    pub fn manifests_of(
        &self,
        repo: &RepoName,
        n: usize,
    ) -> Result<Vec<Arc<StoredManifest>>, StoreError> {
        let mut out = Vec::new();
        self.visit_manifests(repo, n, |m| out.push(Arc::new(m)))?;
        Ok(out)
    }

    /// When each manifest of `repo` was last written (pushed, or cached from upstream), unix
    /// seconds by digest (one scan of `pushed`).
    pub fn pushed_times(&self, repo: &RepoName) -> Result<HashMap<String, u64>, StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let mut out = HashMap::new();
        self.index.scan(CF_PUSHED, &p, None, |k, v| {
            if let (Ok(digest), Ok([t])) = (
                std::str::from_utf8(&k[p.len()..]),
                index::decode_u64s::<1>(CF_PUSHED, v),
            ) {
                out.insert(digest.to_string(), t);
            }
            true
        })?;
        Ok(out)
    }

    /// When the manifest `digest` of `repo` was last written.
    pub fn pushed_at(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let k = index::key(&[repo.as_str(), &digest.to_string()]);
        let rec = self
            .index
            .get_with(CF_PUSHED, &k, |v| index::decode_u64s::<1>(CF_PUSHED, v))?;
        Ok(rec.transpose()?.map(|[t]| t))
    }

    /// Every observed resolution of every tag of the mirror repository `repo`, by tag and
    /// then oldest first (one scan of `tag_history`).
    pub fn tag_histories(&self, repo: &RepoName) -> Result<Vec<TagResolution>, StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let mut out = Vec::new();
        self.index.scan(CF_TAG_HISTORY, &p, None, |k, v| {
            // key: repo \0 tag \0 µs (8 bytes BE)
            let rest = &k[p.len()..];
            if rest.len() > 9
                && let Some((tag, time)) = rest.split_at_checked(rest.len() - 9)
                && time[0] == 0
                && let (Ok(tag), Ok(t)) =
                    (std::str::from_utf8(tag), <[u8; 8]>::try_from(&time[1..]))
            {
                out.push(TagResolution {
                    tag: tag.to_string(),
                    at_micros: u64::from_be_bytes(t),
                    digest: String::from_utf8_lossy(v).into_owned(),
                });
            }
            true
        })?;
        Ok(out)
    }

    /// How many blobs `repo` may read and their total size (one scan of `links`, then a point
    /// read of each blob's record).
    pub fn linked_bytes(&self, repo: &RepoName) -> Result<(u64, u64), StoreError> {
        let p = index::prefix(&[repo.as_str()]);
        let mut digests = Vec::new();
        self.index.scan(CF_LINKS, &p, None, |k, _| {
            digests.push(k[p.len()..].to_vec());
            true
        })?;
        let (mut count, mut bytes) = (0, 0);
        for d in digests {
            if let Some(rec) = self
                .index
                .get_with(CF_BLOBS, &d, |v| index::decode_u64s::<2>(CF_BLOBS, v))?
                && let Ok([size, _]) = rec
            {
                count += 1;
                bytes += size;
            }
        }
        Ok((count, bytes))
    }

    /// The whole of a small blob `repo` may read (an image config), `None` if it is not linked
    /// there or larger than `limit`.
    pub fn small_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.blob_size(repo, digest)? {
            Some(size) if size <= limit => {}
            _ => return Ok(None),
        }
        let mut out = Vec::new();
        use std::io::Read;
        self.open_blob(digest)?.take(limit).read_to_end(&mut out)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Tag;
    use crate::store::StoreOptions;

    fn manifest(seed: u32) -> (Digest, Bytes) {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{seed}}},"layers":[]}}"#,
            Digest::sha256_of(&seed.to_be_bytes())
        );
        (Digest::sha256_of(body.as_bytes()), Bytes::from(body))
    }

    #[test]
    fn listings_see_one_repository_whole_and_nothing_of_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let repo: RepoName = "docker.io/library/app".parse().unwrap();
        // A neighbour whose name extends this one must not bleed into its listings.
        let neighbour: RepoName = "docker.io/library/app2".parse().unwrap();
        let nested: RepoName = "docker.io/library/app/sub".parse().unwrap();
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let latest: Tag = "latest".parse().unwrap();
        let (d1, m1) = manifest(1);
        let (d2, m2) = manifest(2);
        let (d3, m3) = manifest(3);
        store
            .put_cached_manifest(&repo, &d1, mt, m1, Some(&latest))
            .unwrap();
        store
            .put_cached_manifest(&repo, &d2, mt, m2, Some(&latest))
            .unwrap();
        store
            .put_cached_manifest(&repo, &d2, mt, manifest(2).1, Some(&"v2".parse().unwrap()))
            .unwrap();
        store
            .put_cached_manifest(&neighbour, &d3, mt, m3.clone(), Some(&latest))
            .unwrap();
        store
            .put_cached_manifest(&nested, &d3, mt, m3, Some(&latest))
            .unwrap();

        assert_eq!(
            store.tags_with_digests(&repo, 10).unwrap(),
            vec![
                ("latest".to_string(), d2.to_string()),
                ("v2".to_string(), d2.to_string())
            ]
        );
        let mut digests: Vec<String> = store
            .manifests_of(&repo, 10)
            .unwrap()
            .iter()
            .map(|m| m.digest.to_string())
            .collect();
        digests.sort();
        let mut want = vec![d1.to_string(), d2.to_string()];
        want.sort();
        assert_eq!(digests, want);
        let history: Vec<(String, String)> = store
            .tag_histories(&repo)
            .unwrap()
            .into_iter()
            .map(|r| (r.tag, r.digest))
            .collect();
        assert_eq!(
            history,
            vec![
                ("latest".to_string(), d1.to_string()),
                ("latest".to_string(), d2.to_string()),
                ("v2".to_string(), d2.to_string())
            ]
        );
        let under: Vec<String> = store
            .repos_under("docker.io/library", 10, |_| true)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            under,
            vec![repo.to_string(), nested.to_string(), neighbour.to_string()]
        );
        let visible = store
            .repos_under("docker.io/library", 10, |n| n.ends_with("app2"))
            .unwrap();
        assert_eq!(visible.len(), 1);
        assert_eq!(store.tags_with_digests(&repo, 1).unwrap().len(), 1);
        assert_eq!(store.manifests_of(&repo, 1).unwrap().len(), 1);
        assert_eq!(
            store.tags_pointing_at(&repo, &d2).unwrap(),
            vec!["latest", "v2"]
        );
        assert!(store.tags_pointing_at(&repo, &d1).unwrap().is_empty());
        assert!(store.repo_created(&repo).unwrap().is_some());
        let pushed = store.pushed_times(&repo).unwrap();
        assert_eq!(pushed.len(), 2, "{pushed:?}");
        assert_eq!(
            store.pushed_at(&repo, &d1).unwrap(),
            pushed.get(&d1.to_string()).copied()
        );
        assert!(store.pushed_at(&repo, &d3).unwrap().is_none());
        assert_eq!(store.linked_bytes(&repo).unwrap(), (0, 0));
    }
}
