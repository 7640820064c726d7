//! Repository rows of the shared database: ids looked up with cached statements (and created on
//! a repository's first write), whether a repository exists, and the catalog. Listings compare
//! and sort with `COLLATE "C"`, so pages follow byte order, as the local profile's RocksDB keys
//! do, whatever collation the database was created with.

use deadpool_postgres::GenericClient;

use super::pg::{Db, PgError};
use crate::oci::RepoName;

/// Rows fetched per round trip of `catalog` at least (it filters, so a page may need several).
const CATALOG_BATCH: usize = 100;
/// And at most, however large the page asked for.
const CATALOG_BATCH_MAX: usize = 1000;

/// The repository's id, if it exists.
pub(super) async fn repo_id(
    client: &impl GenericClient,
    repo: &RepoName,
) -> Result<Option<i64>, PgError> {
    let st = client
        .prepare_cached("SELECT id FROM repositories WHERE name = $1")
        .await?;
    Ok(client
        .query_opt(&st, &[&repo.as_str()])
        .await?
        .map(|r| r.get(0)))
}

/// The repository's id, creating its row if it is new: usually one read. The insert locks
/// nothing it did not create (an upsert would lock the row exclusively, and writers inserting
/// rows that reference it would deadlock), so a row a concurrent writer created is read again.
pub(super) async fn ensure_repo_id(
    client: &impl GenericClient,
    repo: &RepoName,
) -> Result<i64, PgError> {
    if let Some(id) = repo_id(client, repo).await? {
        return Ok(id);
    }
    let st = client
        .prepare_cached(
            "INSERT INTO repositories (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .await?;
    if let Some(row) = client.query_opt(&st, &[&repo.as_str()]).await? {
        return Ok(row.get(0));
    }
    repo_id(client, repo)
        .await?
        .ok_or_else(|| PgError::Corrupt(format!("repository {repo} vanished while created")))
}

/// `usize` as a SQL `LIMIT`.
pub(super) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The condition on `repositories r` that it holds a blob, a manifest or a tag: clients see
/// such repositories only (an upload session needs the row before anything is in it).
pub(super) const HOLDS_CONTENT: &str = "(EXISTS (SELECT 1 FROM repo_blobs b WHERE b.repo_id = r.id)
      OR EXISTS (SELECT 1 FROM repo_manifests m WHERE m.repo_id = r.id)
      OR EXISTS (SELECT 1 FROM tags t WHERE t.repo_id = r.id))";

impl Db {
    /// Whether `repo` holds anything (a repository row alone, made for an upload session
    /// that never finished, is not a repository to clients, as in the local profile).
    pub async fn repo_exists(&self, repo: &RepoName) -> Result<bool, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(&format!(
                "SELECT 1 FROM repositories r WHERE r.name = $1 AND {HOLDS_CONTENT}"
            ))
            .await?;
        Ok(client.query_opt(&st, &[&repo.as_str()]).await?.is_some())
    }

    /// Repository names in byte order after `last`, the first `n` that `visible` accepts, and
    /// whether more follow. Names are read in batches until the page is full.
    pub async fn catalog(
        &self,
        last: Option<&str>,
        n: usize,
        mut visible: impl FnMut(&str) -> bool + Send,
    ) -> Result<(Vec<String>, bool), PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(&format!(
                r#"SELECT r.name FROM repositories r WHERE r.name COLLATE "C" > $1
                      AND {HOLDS_CONTENT}
                    ORDER BY r.name COLLATE "C" LIMIT $2"#
            ))
            .await?;
        let batch = (n.saturating_add(1)).clamp(CATALOG_BATCH, CATALOG_BATCH_MAX);
        // Names are never empty: "" sorts before all of them.
        let mut after = last.unwrap_or("").to_string();
        let mut items = Vec::new();
        loop {
            let rows = client.query(&st, &[&after, &limit(batch)]).await?;
            for row in &rows {
                let name: &str = row.get(0);
                if !visible(name) {
                    continue;
                }
                if items.len() == n {
                    return Ok((items, true));
                }
                items.push(name.to_string());
            }
            match rows.last() {
                Some(row) if rows.len() == batch => after = row.get(0),
                _ => return Ok((items, false)),
            }
        }
    }
}
