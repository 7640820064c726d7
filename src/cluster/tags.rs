//! Tags in the shared database. A move is one transaction: the tag's row is locked, changed and
//! a history row written, so concurrent writers on different replicas are serialised by
//! PostgreSQL and every replica reads the same final winner, with a history whose `previous`
//! links form one unbroken chain. A deletion is a history row without a digest. Listings are
//! in byte order (`COLLATE "C"`), as in the local profile.

use tokio_postgres::GenericClient;

use super::pg::{Db, PgError};
use super::repos::{ensure_repo_id, limit};
use crate::oci::{Digest, RepoName, Tag};

/// What `put_tag` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagMove {
    Created,
    Moved {
        previous: Digest,
    },
    /// The tag already named this digest: nothing written.
    Unchanged,
}

/// One recorded move of a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagChange {
    /// None: the tag was created.
    pub previous: Option<Digest>,
    /// None: the tag was deleted.
    pub digest: Option<Digest>,
}

/// A row that came back modified between two statements: worth one more try, not many.
const ROUNDS: usize = 8;

impl Db {
    /// Points `repo:tag` at `digest`, recording the move.
    pub async fn put_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<TagMove, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let repo_id = ensure_repo_id(&tx, repo).await?;
        let outcome = move_tag(&tx, repo_id, tag, digest).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// The digest `repo:tag` names, if any.
    pub async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id
                  WHERE r.name = $1 AND t.tag = $2",
            )
            .await?;
        let row = client
            .query_opt(&st, &[&repo.as_str(), &tag.as_str()])
            .await?;
        row.map(|r| parse_digest(r.get(0))).transpose()
    }

    /// Every recorded move of `repo:tag`, oldest first.
    pub async fn tag_history(&self, repo: &RepoName, tag: &Tag) -> Result<Vec<TagChange>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT h.previous, h.digest FROM tag_history h
                   JOIN repositories r ON r.id = h.repo_id
                  WHERE r.name = $1 AND h.tag = $2 ORDER BY h.id",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(TagChange {
                    previous: r.get::<_, Option<&str>>(0).map(parse_digest).transpose()?,
                    digest: r.get::<_, Option<&str>>(1).map(parse_digest).transpose()?,
                })
            })
            .collect()
    }

    /// Deletes `repo:tag`, recording it; false if there was no such tag. Waits for a move of
    /// the tag in progress and deletes what it wrote.
    pub async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, PgError> {
        self.delete_tag_recording(repo, tag, |_| Vec::new()).await
    }

    /// `delete_tag`, with the outbox records `events` makes of the digest the tag named
    /// inserted in the same transaction.
    pub async fn delete_tag_recording(
        &self,
        repo: &RepoName,
        tag: &Tag,
        events: impl FnOnce(&str) -> Vec<Vec<u8>>,
    ) -> Result<bool, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let st = tx
            .prepare_cached(
                "WITH gone AS (
                     DELETE FROM tags
                      WHERE repo_id = (SELECT id FROM repositories WHERE name = $1) AND tag = $2
                  RETURNING repo_id, digest)
                 INSERT INTO tag_history (repo_id, tag, digest, previous)
                 SELECT repo_id, $2, NULL, digest FROM gone RETURNING previous",
            )
            .await?;
        let Some(row) = tx.query_opt(&st, &[&repo.as_str(), &tag.as_str()]).await? else {
            return Ok(false);
        };
        super::events::insert_events(&tx, &events(row.get(0))).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Tags of `repo` in byte order after `last`, at most `n`, and whether more follow. None if
    /// the repository is unknown (and no `last` was given: a page after the end is empty, as
    /// in the local profile).
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<(Vec<String>, bool)>, PgError> {
        let client = self.client().await?;
        // One row per tag, or one row with a NULL tag for a repository without (more) tags,
        // or none for an unknown (or empty: see `HOLDS_CONTENT`) repository. One more than asked tells whether more follow.
        let st = client
            .prepare_cached(&format!(
                r#"SELECT t.tag FROM repositories r
                     LEFT JOIN LATERAL (
                          SELECT tag FROM tags
                           WHERE repo_id = r.id AND tag COLLATE "C" > $2
                           ORDER BY tag COLLATE "C" LIMIT $3) t ON true
                    WHERE r.name = $1 AND {}
                    ORDER BY t.tag COLLATE "C""#,
                super::repos::HOLDS_CONTENT
            ))
            .await?;
        // Tags are never empty: "" sorts before all of them.
        let rows = client
            .query(
                &st,
                &[
                    &repo.as_str(),
                    &last.unwrap_or(""),
                    &limit(n.saturating_add(1)),
                ],
            )
            .await?;
        if rows.is_empty() && last.is_none() {
            return Ok(None);
        }
        let mut tags: Vec<String> = rows.iter().filter_map(|r| r.get(0)).collect();
        let more = tags.len() > n;
        tags.truncate(n);
        Ok(Some((tags, more)))
    }

    /// The tags of `repo` naming `digest`, in byte order.
    pub async fn tags_of(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<String>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                r#"SELECT t.tag FROM tags t JOIN repositories r ON r.id = t.repo_id
                    WHERE r.name = $1 AND t.digest = $2 ORDER BY t.tag COLLATE "C""#,
            )
            .await?;
        Ok(client
            .query(&st, &[&repo.as_str(), &digest.to_string()])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

/// Points the tag at `digest` inside `tx` (the caller commits): inserts the row or locks and
/// updates it, and writes the history row. Callers moving several tags in one transaction
/// pass them in one order (sorted), so two such transactions cannot deadlock.
pub(super) async fn move_tag(
    tx: &deadpool_postgres::Transaction<'_>,
    repo_id: i64,
    tag: &Tag,
    digest: &Digest,
) -> Result<TagMove, PgError> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO tags (repo_id, tag, digest) VALUES ($1, $2, $3)
             ON CONFLICT (repo_id, tag) DO NOTHING RETURNING 1",
        )
        .await?;
    let lock = tx
        .prepare_cached("SELECT digest FROM tags WHERE repo_id = $1 AND tag = $2 FOR UPDATE")
        .await?;
    let update = tx
        .prepare_cached(
            "UPDATE tags SET digest = $3, updated_at = now() WHERE repo_id = $1 AND tag = $2",
        )
        .await?;
    let history = tx
        .prepare_cached(
            "INSERT INTO tag_history (repo_id, tag, digest, previous) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    let (tag, digest_text) = (tag.as_str(), digest.to_string());
    for _ in 0..ROUNDS {
        let created = tx
            .query_opt(&insert, &[&repo_id, &tag, &digest_text])
            .await?;
        let outcome = if created.is_some() {
            TagMove::Created
        } else {
            // The row exists (or just did): lock it, reading the latest committed value.
            let Some(row) = tx.query_opt(&lock, &[&repo_id, &tag]).await? else {
                continue; // deleted meanwhile: insert again
            };
            let previous = parse_digest(row.get(0))?;
            if previous == *digest {
                return Ok(TagMove::Unchanged);
            }
            tx.execute(&update, &[&repo_id, &tag, &digest_text]).await?;
            TagMove::Moved { previous }
        };
        let previous = match &outcome {
            TagMove::Moved { previous } => Some(previous.to_string()),
            _ => None,
        };
        tx.execute(&history, &[&repo_id, &tag, &digest_text, &previous])
            .await?;
        return Ok(outcome);
    }
    Err(PgError::Corrupt(format!(
        "tag {tag} of repository {repo_id} kept changing while being written"
    )))
}

/// The repository's id, creating its row if it is new.
pub async fn ensure_repo(client: &impl GenericClient, repo: &RepoName) -> Result<i64, PgError> {
    client
        .execute(
            "INSERT INTO repositories (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            &[&repo.as_str()],
        )
        .await?;
    Ok(client
        .query_one(
            "SELECT id FROM repositories WHERE name = $1",
            &[&repo.as_str()],
        )
        .await?
        .get(0))
}

pub(super) fn parse_digest(text: &str) -> Result<Digest, PgError> {
    text.parse()
        .map_err(|_| PgError::Corrupt(format!("{text:?} is not a digest")))
}
