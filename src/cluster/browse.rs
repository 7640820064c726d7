//! What the console's pages read of the shared database: repositories under a prefix with
//! their creation times, a repository's tags with their digests, its manifests page by page
//! (bytes included, for the summaries) and when each was written. Listings compare and sort
//! with `COLLATE "C"`, so the pages list in byte order, as the local profile's do.

use std::collections::HashMap;

use super::pg::{Db, PgError};
use super::repos::limit;
use crate::oci::{Digest, RepoName};

/// Rows fetched per round trip when a listing filters or pages through manifests.
const BATCH: usize = 100;

/// `timestamptz` as whole seconds since the epoch, in SQL.
const EPOCH: &str = "floor(extract(epoch FROM {}))::bigint";

fn epoch(column: &str) -> String {
    EPOCH.replace("{}", column)
}

/// Seconds since the epoch as the console shows them (never negative).
fn secs(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Db {
    /// When `repo` was created (seconds since the epoch), if it exists.
    pub async fn repo_created(&self, repo: &RepoName) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {} FROM repositories WHERE name = $1",
            epoch("created_at")
        );
        let st = client.prepare_cached(&sql).await?;
        Ok(client
            .query_opt(&st, &[&repo.as_str()])
            .await?
            .map(|r| secs(r.get(0))))
    }

    /// Repositories named `under/…` that `visible` accepts, in byte order, with their
    /// creation times: at most `n`.
    pub async fn repos_under(
        &self,
        under: &str,
        n: usize,
        mut visible: impl FnMut(&str) -> bool,
    ) -> Result<Vec<(String, u64)>, PgError> {
        let client = self.client().await?;
        // Names between "under/" and "under0" ('0' follows '/') are exactly those under it.
        let sql = format!(
            r#"SELECT name, {} FROM repositories
                WHERE name COLLATE "C" > $1 AND name COLLATE "C" < $2
                ORDER BY name COLLATE "C" LIMIT $3"#,
            epoch("created_at")
        );
        let st = client.prepare_cached(&sql).await?;
        let end = format!("{under}0");
        let mut after = format!("{under}/");
        let mut out = Vec::new();
        loop {
            let rows = client.query(&st, &[&after, &end, &limit(BATCH)]).await?;
            for row in &rows {
                let name: &str = row.get(0);
                if visible(name) {
                    out.push((name.to_string(), secs(row.get(1))));
                    if out.len() == n {
                        return Ok(out);
                    }
                }
            }
            match rows.last() {
                Some(row) if rows.len() == BATCH => after = row.get(0),
                _ => return Ok(out),
            }
        }
    }

    /// The first `n` tags of `repo` in byte order, each with the digest it names.
    pub async fn tags_with_digests(
        &self,
        repo: &RepoName,
        n: usize,
    ) -> Result<Vec<(String, String)>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                r#"SELECT t.tag, t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id
                    WHERE r.name = $1 ORDER BY t.tag COLLATE "C" LIMIT $2"#,
            )
            .await?;
        Ok(client
            .query(&st, &[&repo.as_str(), &limit(n)])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Up to `n` manifests of `repo` after digest `after` in byte order: digest, media type,
    /// bytes.
    pub async fn manifests_after(
        &self,
        repo: &RepoName,
        after: &str,
        n: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                r#"SELECT m.digest, m.media_type, m.body FROM repo_manifests rm
                     JOIN repositories r ON r.id = rm.repo_id
                     JOIN manifests m ON m.digest = rm.digest
                    WHERE r.name = $1 AND rm.digest COLLATE "C" > $2
                    ORDER BY rm.digest COLLATE "C" LIMIT $3"#,
            )
            .await?;
        Ok(client
            .query(&st, &[&repo.as_str(), &after, &limit(n)])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// When each manifest of `repo` was written there (seconds since the epoch), by digest.
    pub async fn pushed_times(&self, repo: &RepoName) -> Result<HashMap<String, u64>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT rm.digest, {} FROM repo_manifests rm JOIN repositories r ON r.id = rm.repo_id
              WHERE r.name = $1",
            epoch("rm.linked_at")
        );
        let st = client.prepare_cached(&sql).await?;
        Ok(client
            .query(&st, &[&repo.as_str()])
            .await?
            .iter()
            .map(|r| (r.get(0), secs(r.get(1))))
            .collect())
    }

    /// When manifest `digest` was written to `repo`, if it is there.
    pub async fn pushed_at(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {} FROM repo_manifests rm JOIN repositories r ON r.id = rm.repo_id
              WHERE r.name = $1 AND rm.digest = $2",
            epoch("rm.linked_at")
        );
        let st = client.prepare_cached(&sql).await?;
        Ok(client
            .query_opt(&st, &[&repo.as_str(), &digest.to_string()])
            .await?
            .map(|r| secs(r.get(0))))
    }
}

/// Batch size for callers paging with `manifests_after`.
pub const MANIFEST_BATCH: usize = BATCH;
