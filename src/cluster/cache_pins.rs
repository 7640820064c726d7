//! Pins of the pull-through cache in the shared database: cached images every replica's
//! eviction keeps. Same meaning as the local profile's: a digest pin (`cache_pins`, reason
//! `@`) keeps one image (an index with all its children, or only the children of the listed
//! platforms); a tag pin (`cache_tag_pins`) keeps the digest the tag resolves to (reason
//! `:TAG`) and, while it stays, every digest the tag moves to (`follow_tag_pin`, called in the
//! move's transaction). One row per reason, so unpinning a tag never drops a pin that another
//! tag or a digest pin made.
//!
//! A pin locks the image's `repo_manifests` row `FOR KEY SHARE` while it writes: an eviction
//! removing the image holds that row `FOR UPDATE` and re-reads the pins after taking it, so the
//! pin either commits first and is seen, or waits and finds the image gone (`NotCached`). A tag
//! pin locks the tag's row only after the image's (the order a cached put and an eviction
//! take them, so none of them can deadlock another), and reads the tag again if it moved.

use super::pg::{Db, PgError};
use super::repos::repo_id;
use crate::oci::{Digest, RepoName, Tag};

/// The reason of a pin by digest.
const BY_DIGEST: &str = "@";
/// Reads of a tag to pin, at most, while it keeps moving.
const TAG_ROUNDS: usize = 8;

/// What to pin or unpin.
#[derive(Debug, Clone)]
pub enum PinOf {
    Digest(Digest),
    Tag(Tag),
}

/// One pin as listed: a digest pin (`digest`, with `via_tag` when a tag pin made it) or a tag
/// pin (`tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPin {
    pub repository: String,
    pub digest: Option<String>,
    pub tag: Option<String>,
    pub via_tag: Option<String>,
    /// `os/arch[/variant]`; empty keeps the whole image.
    pub platforms: Vec<String>,
    /// Unix seconds.
    pub pinned_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CachePinError {
    /// The image (or the tag) is not in the cache: only cached images can be pinned.
    #[error("{0} is not cached")]
    NotCached(String),
    /// The tag moved every time it was about to be pinned.
    #[error("the tags of {0} kept moving while being pinned; try again")]
    KeptMoving(String),
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl From<tokio_postgres::Error> for CachePinError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

fn via(tag: &str) -> String {
    format!(":{tag}")
}

impl Db {
    /// Pins a cached image by digest, or a cached tag and the digest it resolves to now.
    /// Returns the digest pinned.
    pub async fn pin(
        &self,
        repo: &RepoName,
        what: &PinOf,
        platforms: &[String],
    ) -> Result<Digest, CachePinError> {
        let mut client = self.client().await?;
        let (mut digest, tag) = match what {
            PinOf::Digest(d) => (d.clone(), None),
            PinOf::Tag(t) => (self.pinned_tag_target(repo, t).await?, Some(t)),
        };
        // Locks in the order a cached put and an eviction take them: the image's row (in
        // `write_pin`), then the tag's. A tag that moved meanwhile is read again.
        for _ in 0..TAG_ROUNDS {
            let tx = client.transaction().await?;
            let not_cached = || CachePinError::NotCached(format!("{repo}"));
            let id = repo_id(&tx, repo).await?.ok_or_else(not_cached)?;
            write_pin(&tx, id, repo, &digest, tag, platforms).await?;
            if let Some(t) = tag {
                // Locked: a move of the tag from here waits (and then follows this pin).
                let now = tx
                    .query_opt(
                        "SELECT digest FROM tags WHERE repo_id = $1 AND tag = $2 FOR SHARE",
                        &[&id, &t.as_str()],
                    )
                    .await?
                    .map(|r| r.get::<_, String>(0));
                if now.as_deref() != Some(digest.to_string().as_str()) {
                    drop(tx); // rolled back: the tag moved (or went) since it was read
                    digest = self.pinned_tag_target(repo, t).await?;
                    continue;
                }
            }
            tx.commit().await?;
            return Ok(digest);
        }
        Err(CachePinError::KeptMoving(format!("{repo}")))
    }

    /// The digest `repo:tag` names now (read without a lock), or `NotCached`.
    async fn pinned_tag_target(&self, repo: &RepoName, tag: &Tag) -> Result<Digest, CachePinError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id
                  WHERE r.name = $1 AND t.tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?
            .ok_or_else(|| CachePinError::NotCached(format!("{repo}:{tag}")))?;
        Ok(super::tags::parse_digest(row.get(0))?)
    }

    /// Pins exactly `digest` (with `tag` as its reason and a pin on the tag, if given), as an
    /// import or a prefetch brought it in: the tag is not resolved again.
    pub async fn pin_exact(
        &self,
        repo: &RepoName,
        digest: &Digest,
        tag: Option<&Tag>,
    ) -> Result<(), CachePinError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = repo_id(&tx, repo)
            .await?
            .ok_or_else(|| CachePinError::NotCached(format!("{repo}@{digest}")))?;
        write_pin(&tx, id, repo, digest, tag, &[]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a pin; unpinning a tag also removes the digest pins it made (and only those).
    /// Returns how many pin rows went.
    pub async fn unpin(&self, repo: &RepoName, what: &PinOf) -> Result<u64, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(id) = repo_id(&tx, repo).await? else {
            return Ok(0);
        };
        let removed = match what {
            PinOf::Digest(d) => {
                tx.execute(
                    "DELETE FROM cache_pins WHERE repo_id = $1 AND digest = $2 AND reason = $3",
                    &[&id, &d.to_string(), &BY_DIGEST],
                )
                .await?
            }
            PinOf::Tag(t) => {
                tx.execute(
                    "DELETE FROM cache_tag_pins WHERE repo_id = $1 AND tag = $2",
                    &[&id, &t.as_str()],
                )
                .await?
                    + tx.execute(
                        "DELETE FROM cache_pins WHERE repo_id = $1 AND reason = $2",
                        &[&id, &via(t.as_str())],
                    )
                    .await?
            }
        };
        tx.commit().await?;
        Ok(removed)
    }

    /// Every pin, by repository, then tag pins before digest pins.
    pub async fn pins(&self) -> Result<Vec<ClusterPin>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                r#"SELECT r.name, p.digest, p.tag, p.reason, p.platforms,
                          extract(epoch FROM p.pinned_at)::bigint
                     FROM (SELECT repo_id, NULL::text AS digest, tag, NULL::text AS reason,
                                  platforms, pinned_at FROM cache_tag_pins
                           UNION ALL
                           SELECT repo_id, digest, NULL, reason, platforms, pinned_at
                             FROM cache_pins) p
                     JOIN repositories r ON r.id = p.repo_id
                    ORDER BY r.name COLLATE "C", p.digest COLLATE "C" NULLS FIRST,
                             p.tag COLLATE "C", p.reason COLLATE "C""#,
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let reason: Option<String> = r.get(3);
                ClusterPin {
                    repository: r.get(0),
                    digest: r.get(1),
                    tag: r.get(2),
                    via_tag: reason.and_then(|s| s.strip_prefix(':').map(str::to_string)),
                    platforms: r.get(4),
                    pinned_at: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
                }
            })
            .collect())
    }

    /// Whether `tag` of `repo` is pinned.
    pub async fn is_tag_pinned(&self, repo: &RepoName, tag: &Tag) -> Result<bool, PgError> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM cache_tag_pins p JOIN repositories r ON r.id = p.repo_id
                  WHERE r.name = $1 AND p.tag = $2",
                &[&repo.as_str(), &tag.as_str()],
            )
            .await?
            .is_some())
    }
}

/// Writes the pin of `digest` (for the reason `tag`, with a pin on the tag too, or by digest)
/// inside `tx`, the image's `repo_manifests` row held `FOR KEY SHARE` (see the module header).
async fn write_pin(
    tx: &deadpool_postgres::Transaction<'_>,
    repo_id: i64,
    repo: &RepoName,
    digest: &Digest,
    tag: Option<&Tag>,
    platforms: &[String],
) -> Result<(), CachePinError> {
    let digest_text = digest.to_string();
    let cached = tx
        .query_opt(
            "SELECT 1 FROM repo_manifests WHERE repo_id = $1 AND digest = $2 AND NOT pushed
                FOR KEY SHARE",
            &[&repo_id, &digest_text],
        )
        .await?;
    if cached.is_none() {
        return Err(CachePinError::NotCached(format!("{repo}@{digest}")));
    }
    let platforms = platforms.to_vec();
    let reason = tag.map_or(BY_DIGEST.to_string(), |t| via(t.as_str()));
    tx.execute(
        "INSERT INTO cache_pins (repo_id, digest, reason, platforms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (repo_id, digest, reason) DO UPDATE
            SET platforms = excluded.platforms, pinned_at = now()",
        &[&repo_id, &digest_text, &reason, &platforms],
    )
    .await?;
    if let Some(t) = tag {
        tx.execute(
            "INSERT INTO cache_tag_pins (repo_id, tag, platforms) VALUES ($1, $2, $3)
             ON CONFLICT (repo_id, tag) DO UPDATE
                SET platforms = excluded.platforms, pinned_at = now()",
            &[&repo_id, &t.as_str(), &platforms],
        )
        .await?;
    }
    Ok(())
}

/// Inside the transaction moving `repo_id`'s `tag` to `digest`: if the tag is pinned, pins
/// `digest` too (reason `:TAG`, the tag pin's platforms). Nothing if it is not.
// Called by the cache's manifest writer when it moves a tag.
pub(super) async fn follow_tag_pin(
    tx: &deadpool_postgres::Transaction<'_>,
    repo_id: i64,
    tag: &Tag,
    digest: &Digest,
) -> Result<(), PgError> {
    tx.execute(
        "INSERT INTO cache_pins (repo_id, digest, reason, platforms)
         SELECT repo_id, $3, ':' || tag, platforms FROM cache_tag_pins
          WHERE repo_id = $1 AND tag = $2
         ON CONFLICT (repo_id, digest, reason) DO UPDATE SET platforms = excluded.platforms",
        &[&repo_id, &tag.as_str(), &digest.to_string()],
    )
    .await?;
    Ok(())
}
