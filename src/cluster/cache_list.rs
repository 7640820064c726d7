//! What the pull-through cache holds in the shared database, for operators: the cached images
//! with their cost, pulls and pins (`cached_images`, from eviction's census, so it shows what
//! a pass would see), and the digests a cache tag resolved to (`cache_tag_history`).

use std::collections::{HashMap, HashSet};

use super::cache_evict::{Census, ClusterEvictError};
use super::pg::{Db, PgError};
use crate::oci::{RepoName, Tag};

/// One cached image as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterImage {
    pub repository: String,
    pub digest: String,
    pub media_type: String,
    /// Tags naming its root, in byte order.
    pub tags: Vec<String>,
    /// Cached child manifests.
    pub children: usize,
    /// Bytes of cached blobs no other image references (what evicting it frees).
    pub own_bytes: u64,
    /// Bytes of blobs it shares with other images or with pushes.
    pub shared_bytes: u64,
    /// Unix seconds of its newest pull; 0 if none was recorded.
    pub last_pulled: u64,
    /// Pulls recorded of its root.
    pub pulls: u64,
    /// "no", "yes" (the whole image) or "partial" (some of its manifests).
    pub pinned: &'static str,
}

impl Db {
    /// Every cached image, in no particular order.
    pub async fn cached_images(&self) -> Result<Vec<ClusterImage>, ClusterEvictError> {
        let mut census = Census::take(self).await?;
        let images = census.images();
        let client = self.client().await?;
        // Names, media types, pulls and tags of the roots, read after the census: a listing.
        let roots: Vec<(i64, String)> = images
            .iter()
            .map(|(r, _)| {
                (
                    census.members[*r].repo_id,
                    census.members[*r].digest.clone(),
                )
            })
            .collect();
        let ids: Vec<i64> = roots.iter().map(|(r, _)| *r).collect();
        let digests: Vec<String> = roots.iter().map(|(_, d)| d.clone()).collect();
        let mut facts: HashMap<(i64, String), (String, String, i64)> = HashMap::new();
        for row in client
            .query(
                "SELECT x.repo_id, x.digest, r.name, m.media_type, COALESCE(ca.pulls, 0)
                   FROM unnest($1::bigint[], $2::text[]) AS x (repo_id, digest)
                   JOIN repositories r ON r.id = x.repo_id
                   JOIN manifests m ON m.digest = x.digest
                   LEFT JOIN cache_access ca ON ca.repo_id = x.repo_id AND ca.digest = x.digest",
                &[&ids, &digests],
            )
            .await?
        {
            facts.insert(
                (row.get(0), row.get(1)),
                (row.get(2), row.get(3), row.get(4)),
            );
        }
        let mut tags: HashMap<(i64, String), Vec<String>> = HashMap::new();
        for row in client
            .query(
                r#"SELECT t.repo_id, t.digest, t.tag FROM tags t
                     JOIN unnest($1::bigint[], $2::text[]) AS x (repo_id, digest)
                       ON x.repo_id = t.repo_id AND x.digest = t.digest
                    ORDER BY t.tag COLLATE "C""#,
                &[&ids, &digests],
            )
            .await?
        {
            tags.entry((row.get(0), row.get(1)))
                .or_default()
                .push(row.get(2));
        }
        let mut out = Vec::new();
        for ((root, set), key) in images.iter().zip(roots) {
            let Some((repository, media_type, pulls)) = facts.remove(&key) else {
                continue; // gone since the census
            };
            let (own_bytes, shared_bytes) = cost(&census, set);
            let last_pulled = set
                .iter()
                .map(|&i| census.members[i].pulled_us)
                .max()
                .unwrap_or(0);
            let r = &census.members[*root];
            let pinned = if census.pinned_whole(r.repo_id, &r.digest) {
                "yes"
            } else if set.iter().any(|&i| {
                let m = &census.members[i];
                census.pinned_at_all(m.repo_id, &m.digest)
            }) {
                "partial"
            } else {
                "no"
            };
            out.push(ClusterImage {
                repository,
                digest: r.digest.clone(),
                media_type,
                tags: tags.remove(&key).unwrap_or_default(),
                children: set.len().saturating_sub(1),
                own_bytes,
                shared_bytes,
                last_pulled: u64::try_from(last_pulled / 1_000_000).unwrap_or(0),
                pulls: u64::try_from(pulls).unwrap_or(0),
                pinned,
            });
        }
        Ok(out)
    }

    /// The digests `repo:tag` resolved to, oldest first, with when (Unix microseconds);
    /// deletions are left out.
    pub async fn cache_tag_history(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Vec<(u64, String)>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT (extract(epoch FROM h.at) * 1000000)::bigint, h.digest
                   FROM tag_history h JOIN repositories r ON r.id = h.repo_id
                  WHERE r.name = $1 AND h.tag = $2 AND h.digest IS NOT NULL ORDER BY h.id",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (u64::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1)))
            .collect())
    }
}

/// Bytes of the image's cached blobs only its own manifests reference, and of the rest it
/// references (shared with other images, or pushed).
fn cost(census: &Census, set: &[usize]) -> (u64, u64) {
    let mut within: HashMap<&str, u32> = HashMap::new();
    for &i in set {
        for b in census.members[i].blobs.iter().collect::<HashSet<_>>() {
            *within.entry(b.as_str()).or_default() += 1;
        }
    }
    let (mut own, mut shared) = (0, 0);
    for (b, n) in within {
        let Some(f) = census.blobs.get(b) else {
            continue; // not stored (yet): fetched on demand
        };
        if !f.pushed && f.refs == n {
            own += f.size;
        } else {
            shared += f.size;
        }
    }
    (own, shared)
}
