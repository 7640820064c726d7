//! Tags in the shared database. A move is one transaction: the tag's row is locked, changed and
//! a history row written, so concurrent writers on different replicas are serialised by
//! PostgreSQL and every replica reads the same final winner, with a history whose `previous`
//! links form one unbroken chain.

use tokio_postgres::GenericClient;

use super::pg::{Db, PgError};
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
    pub previous: Option<Digest>,
    pub digest: Digest,
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
        let repo_id = ensure_repo(&*tx, repo).await?;
        let (tag, digest_text) = (tag.as_str(), digest.to_string());
        for _ in 0..ROUNDS {
            let created = tx
                .query_opt(
                    "INSERT INTO tags (repo_id, tag, digest) VALUES ($1, $2, $3)
                     ON CONFLICT (repo_id, tag) DO NOTHING RETURNING 1",
                    &[&repo_id, &tag, &digest_text],
                )
                .await?;
            let outcome = if created.is_some() {
                TagMove::Created
            } else {
                // The row exists (or just did): lock it, reading the latest committed value.
                let Some(row) = tx
                    .query_opt(
                        "SELECT digest FROM tags WHERE repo_id = $1 AND tag = $2 FOR UPDATE",
                        &[&repo_id, &tag],
                    )
                    .await?
                else {
                    continue; // deleted meanwhile: insert again
                };
                let previous = parse_digest(row.get(0))?;
                if previous == *digest {
                    tx.commit().await?;
                    return Ok(TagMove::Unchanged);
                }
                tx.execute(
                    "UPDATE tags SET digest = $3, updated_at = now() WHERE repo_id = $1 AND tag = $2",
                    &[&repo_id, &tag, &digest_text],
                )
                .await?;
                TagMove::Moved { previous }
            };
            let previous = match &outcome {
                TagMove::Moved { previous } => Some(previous.to_string()),
                _ => None,
            };
            tx.execute(
                "INSERT INTO tag_history (repo_id, tag, digest, previous) VALUES ($1, $2, $3, $4)",
                &[&repo_id, &tag, &digest_text, &previous],
            )
            .await?;
            tx.commit().await?;
            return Ok(outcome);
        }
        Err(PgError::Corrupt(format!(
            "tag {tag} of {repo} kept changing while being written"
        )))
    }

    /// The digest `repo:tag` names, if any.
    pub async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>, PgError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id
                  WHERE r.name = $1 AND t.tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
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
                    digest: parse_digest(r.get(1))?,
                })
            })
            .collect()
    }
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

fn parse_digest(text: &str) -> Result<Digest, PgError> {
    text.parse()
        .map_err(|_| PgError::Corrupt(format!("{text:?} is not a digest")))
}
