//! Blobs and their links in the shared database: `blobs` holds one row per verified object in
//! the bucket, `repo_blobs` says which repository may read it. A link's foreign key on `blobs`
//! means a blob row cannot go while a repository links it; GC removes links first.

use deadpool_postgres::GenericClient;

use super::pg::{Db, PgError};
use super::repos::ensure_repo_id;
use crate::oci::{Digest, RepoName};

/// The upsert of one link (`$1` repo id, `$2` digest, `$3` pushed): a link made again restarts
/// its `linked_at` (GC's grace period); once made by a push it stays marked `pushed`, so GC
/// keeps the blob for a manifest that push may still send.
macro_rules! upsert_link {
    ($source:literal) => {
        concat!(
            "INSERT INTO repo_blobs (repo_id, digest, pushed) ",
            $source,
            " ON CONFLICT (repo_id, digest)
              DO UPDATE SET linked_at = now(), pushed = repo_blobs.pushed OR excluded.pushed"
        )
    };
}

/// `Db::link_blob` on `client` (a transaction, for a caller holding the digest's fence).
pub(super) async fn link_on(
    client: &impl GenericClient,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
    pushed: bool,
) -> Result<(), PgError> {
    let repo_id = ensure_repo_id(client, repo).await?;
    // One statement: the link's foreign key is checked at its end, so it sees the blob row the
    // first part inserted.
    let st = client
        .prepare_cached(concat!(
            "WITH blob AS (INSERT INTO blobs (digest, size) VALUES ($2, $4)
                           ON CONFLICT (digest) DO NOTHING) ",
            upsert_link!("VALUES ($1, $2, $3)")
        ))
        .await?;
    client
        .execute(
            &st,
            &[&repo_id, &digest.to_string(), &pushed, &sql_size(size)?],
        )
        .await?;
    Ok(())
}

/// `bigint` to a size.
pub(super) fn size_of(value: i64) -> Result<u64, PgError> {
    u64::try_from(value).map_err(|_| PgError::Corrupt(format!("negative blob size {value}")))
}

fn sql_size(size: u64) -> Result<i64, PgError> {
    i64::try_from(size).map_err(|_| PgError::Corrupt(format!("blob size {size} out of range")))
}

impl Db {
    /// The size of `digest` if `repo` links it.
    pub async fn blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, PgError> {
        linked_size(&self.client().await?, repo, digest).await
    }

    /// The size of `digest` if its object is stored, whoever links it.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached("SELECT size FROM blobs WHERE digest = $1")
            .await?;
        client
            .query_opt(&st, &[&digest.to_string()])
            .await?
            .map(|r| size_of(r.get(0)))
            .transpose()
    }

    /// Records a verified object (if new) and links it to `repo` (created if new). `pushed`:
    /// the link is a push's (an upload), not a cache fill's.
    pub async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        pushed: bool,
    ) -> Result<(), PgError> {
        link_on(&self.client().await?, repo, digest, size, pushed).await
    }

    /// Links into `repo` a blob `from` links (a cross-repository mount, marked `pushed`); its
    /// size, or None if `from` has no such link (the client then uploads the blob).
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        if linked_size(&client, from, digest).await?.is_none() {
            return Ok(None);
        }
        let repo_id = ensure_repo_id(&client, repo).await?;
        // Checked again and linked in one statement, the source blob row locked against a GC
        // deleting it in between: a link vanished meanwhile is None, not a foreign key error.
        let st = client
            .prepare_cached(concat!(
                "WITH source AS (
                     SELECT b.digest, b.size FROM repo_blobs l
                       JOIN repositories r ON r.id = l.repo_id
                       JOIN blobs b ON b.digest = l.digest
                      WHERE r.name = $2 AND l.digest = $3
                        FOR KEY SHARE OF b),
                 link AS (",
                upsert_link!("SELECT $1, digest, true FROM source"),
                ") SELECT size FROM source"
            ))
            .await?;
        client
            .query_opt(&st, &[&repo_id, &from.as_str(), &digest.to_string()])
            .await?
            .map(|r| size_of(r.get(0)))
            .transpose()
    }

    /// Removes `repo`'s link to `digest`; false if there was none. The object goes when GC
    /// finds nothing else uses it.
    pub async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "DELETE FROM repo_blobs l USING repositories r
                  WHERE r.id = l.repo_id AND r.name = $1 AND l.digest = $2",
            )
            .await?;
        Ok(client
            .execute(&st, &[&repo.as_str(), &digest.to_string()])
            .await?
            > 0)
    }
}

async fn linked_size(
    client: &impl GenericClient,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<u64>, PgError> {
    let st = client
        .prepare_cached(
            "SELECT b.size FROM repo_blobs l
               JOIN repositories r ON r.id = l.repo_id
               JOIN blobs b ON b.digest = l.digest
              WHERE r.name = $1 AND l.digest = $2",
        )
        .await?;
    client
        .query_opt(&st, &[&repo.as_str(), &digest.to_string()])
        .await?
        .map(|r| size_of(r.get(0)))
        .transpose()
}
