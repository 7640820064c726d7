//! The pull-through cache's state in the shared database, so every replica serves the same
//! cache: the manifests it fetched (`repo_manifests` with `pushed = false`; their blobs need
//! not be stored yet, they are fetched on demand), its tags with when the upstream last
//! confirmed them (`tags.checked_at`, so one replica's check spares the others theirs), every
//! move in `tag_history`, and pulls (`cache_access`, keyed by the manifest's digest, the order
//! cluster-wide eviction follows). Pins (`cache_pins`, `cache_tag_pins`) keep a tag from being
//! forgotten and follow its moves.

use tokio_postgres::Row;

use super::cache_pins::follow_tag_pin;
use super::manifests::texts;
use super::pg::{Db, PgError};
use super::repos::ensure_repo_id;
use super::tags::{TagMove, move_tag, parse_digest};
use crate::oci::{Digest, RepoName, Tag};

/// A manifest the cache fetched from an upstream (verified against its digest), with what
/// the caller parsed out of it.
#[derive(Debug, Clone, Copy)]
pub struct CachedManifest<'a> {
    pub repo: &'a RepoName,
    pub digest: &'a Digest,
    pub media_type: &'a str,
    /// Byte-exact, as the upstream served it.
    pub body: &'a [u8],
    /// Config and layers: recorded for GC, not required to be stored.
    pub blobs: &'a [Digest],
    /// An index's manifests: likewise.
    pub children: &'a [Digest],
    /// Pointed at `digest` (and confirmed now), with a history row if it moved.
    pub tag: Option<&'a Tag>,
    /// The digest the tag named when the caller read it before asking the upstream (None:
    /// it had none). If another replica moved the tag meanwhile, its answer is at least as
    /// new as this one: the tag is left as it is (compare-and-set), never moved back.
    pub tag_seen: Option<&'a Digest>,
}

/// What `put_cached_manifest` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPut {
    /// The repository did not hold the manifest before.
    pub new_here: bool,
    /// What the tag did, if one was given and not superseded.
    pub tag: Option<TagMove>,
}

/// A cache tag as the database holds it.
#[derive(Debug, Clone)]
pub struct SharedTag {
    pub digest: Digest,
    /// Seconds since the upstream last confirmed it, by the database's clock (None: never).
    pub confirmed_ago: Option<u64>,
    /// The manifest's media type and bytes, if the repository holds it.
    pub manifest: Option<(String, Vec<u8>)>,
}

/// Pulls of one cached manifest since the last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRecord {
    pub repo: String,
    pub digest: String,
    /// Seconds since the latest pull, applied to the database's clock (replicas' clocks need
    /// not agree).
    pub age: u64,
    pub pulls: u64,
}

impl Db {
    /// Stores a fetched manifest in the cache repository and, if `tag` is given, points it
    /// there (confirmed now, pinned along if the tag is pinned), in one transaction; the
    /// manifest counts as pulled now. `events` builds the outbox records from what was done,
    /// inserted in the same transaction.
    pub async fn put_cached_manifest(
        &self,
        m: &CachedManifest<'_>,
        events: impl FnOnce(&CachedPut) -> Vec<Vec<u8>> + Send,
    ) -> Result<CachedPut, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let repo_id = ensure_repo_id(&tx, m.repo).await?;
        let digest = m.digest.to_string();
        let store = tx
            .prepare_cached(
                "WITH manifest AS (
                     INSERT INTO manifests (digest, media_type, body, subject, artifact_type)
                     VALUES ($2, $3, $4, NULL, NULL) ON CONFLICT (digest) DO NOTHING),
                 blob_refs AS (
                     INSERT INTO manifest_blobs (manifest_digest, blob_digest)
                     SELECT DISTINCT $2, unnest($5::text[]) ON CONFLICT DO NOTHING),
                 child_refs AS (
                     INSERT INTO manifest_children (manifest_digest, child_digest)
                     SELECT DISTINCT $2, unnest($6::text[]) ON CONFLICT DO NOTHING),
                 access AS (
                     INSERT INTO cache_access (repo_id, digest, last_pulled) VALUES ($1, $2, now())
                     ON CONFLICT (repo_id, digest) DO UPDATE SET last_pulled = now()),
                 held AS (
                     INSERT INTO repo_manifests (repo_id, digest, pushed) VALUES ($1, $2, false)
                     ON CONFLICT (repo_id, digest) DO UPDATE SET linked_at = now()
                     RETURNING (xmax = 0) AS inserted)
                 SELECT inserted FROM held",
            )
            .await?;
        let new_here: bool = tx
            .query_one(
                &store,
                &[
                    &repo_id,
                    &digest,
                    &m.media_type,
                    &m.body,
                    &texts(m.blobs),
                    &texts(m.children),
                ],
            )
            .await?
            .get(0);
        let moved = match m.tag {
            Some(tag) if superseded(&tx, repo_id, tag, m.digest, m.tag_seen).await? => None,
            Some(tag) => {
                let moved = move_tag(&tx, repo_id, tag, m.digest).await?;
                let confirm = tx
                    .prepare_cached(
                        "UPDATE tags SET checked_at = now() WHERE repo_id = $1 AND tag = $2",
                    )
                    .await?;
                tx.execute(&confirm, &[&repo_id, &tag.as_str()]).await?;
                follow_tag_pin(&tx, repo_id, tag, m.digest).await?;
                Some(moved)
            }
            None => None,
        };
        let put = CachedPut {
            new_here,
            tag: moved,
        };
        super::events::insert_events(&tx, &events(&put)).await?;
        tx.commit().await?;
        Ok(put)
    }

    /// The cache tag, when the upstream last confirmed it and its manifest: one round trip.
    pub async fn cached_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<SharedTag>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT t.digest,
                        floor(extract(epoch FROM now() - t.checked_at))::bigint,
                        m.media_type, m.body
                   FROM repositories r
                   JOIN tags t ON t.repo_id = r.id
                   LEFT JOIN repo_manifests rm ON rm.repo_id = t.repo_id AND rm.digest = t.digest
                   LEFT JOIN manifests m ON m.digest = rm.digest
                  WHERE r.name = $1 AND t.tag = $2",
            )
            .await?;
        client
            .query_opt(&st, &[&repo.as_str(), &tag.as_str()])
            .await?
            .map(|row| shared_tag(&row))
            .transpose()
    }

    /// Records that the upstream confirmed the tag still names `digest` (nothing if it has
    /// moved meanwhile: the move is newer news).
    pub async fn confirm_cached_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<(), PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "UPDATE tags t SET checked_at = now() FROM repositories r
                  WHERE r.id = t.repo_id AND r.name = $1 AND t.tag = $2 AND t.digest = $3",
            )
            .await?;
        client
            .execute(&st, &[&repo.as_str(), &tag.as_str(), &digest.to_string()])
            .await?;
        Ok(())
    }

    /// Forgets a cache tag the upstream no longer has, with a history row — unless it is
    /// pinned. Returns whether it is gone (false: pinned, kept).
    pub async fn forget_cached_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, PgError> {
        let client = self.client().await?;
        let forget = client
            .prepare_cached(
                "WITH gone AS (
                     DELETE FROM tags t USING repositories r
                      WHERE r.id = t.repo_id AND r.name = $1 AND t.tag = $2
                        AND NOT EXISTS (SELECT 1 FROM cache_tag_pins p
                                         WHERE p.repo_id = t.repo_id AND p.tag = t.tag)
                     RETURNING t.repo_id, t.digest)
                 INSERT INTO tag_history (repo_id, tag, digest, previous)
                 SELECT repo_id, $2, NULL, digest FROM gone",
            )
            .await?;
        if client
            .execute(&forget, &[&repo.as_str(), &tag.as_str()])
            .await?
            > 0
        {
            return Ok(true);
        }
        Ok(!self.is_tag_pinned(repo, tag).await?)
    }

    /// Adds pulls to `cache_access`, for the manifests the cache holds (other digests —
    /// blobs, or images evicted meanwhile — are skipped). One statement, rows in key order
    /// so replicas reporting at once cannot deadlock. Returns the rows written.
    pub async fn record_pulls(&self, pulls: &mut [PullRecord]) -> Result<u64, PgError> {
        if pulls.is_empty() {
            return Ok(0);
        }
        pulls.sort_by(|a, b| (&a.repo, &a.digest).cmp(&(&b.repo, &b.digest)));
        let repos: Vec<&str> = pulls.iter().map(|p| p.repo.as_str()).collect();
        let digests: Vec<&str> = pulls.iter().map(|p| p.digest.as_str()).collect();
        let ages: Vec<i64> = pulls
            .iter()
            .map(|p| i64::try_from(p.age).unwrap_or(i64::MAX))
            .collect();
        let counts: Vec<i64> = pulls
            .iter()
            .map(|p| i64::try_from(p.pulls).unwrap_or(i64::MAX))
            .collect();
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                r#"INSERT INTO cache_access (repo_id, digest, last_pulled, pulls)
                   SELECT r.id, x.digest, now() - make_interval(secs => x.age), x.pulls
                     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
                          WITH ORDINALITY AS x(name, digest, age, pulls, n)
                     JOIN repositories r ON r.name = x.name
                     JOIN repo_manifests rm ON rm.repo_id = r.id AND rm.digest = x.digest
                    ORDER BY x.n
                   ON CONFLICT (repo_id, digest) DO UPDATE
                      SET last_pulled = greatest(cache_access.last_pulled, excluded.last_pulled),
                          pulls = cache_access.pulls + excluded.pulls"#,
            )
            .await?;
        Ok(client
            .execute(&st, &[&repos, &digests, &ages, &counts])
            .await?)
    }
}

impl Db {
    /// Drops tag history (the registry's and the cache's) older than `max_age` but the newest
    /// entry of each tag (which stays however old, as locally), and beyond the newest
    /// `max_entries` of each tag: at most `limit` rows a call (call again while it returns
    /// `limit`). Returns the rows dropped.
    pub async fn prune_tag_history(
        &self,
        max_age: std::time::Duration,
        max_entries: usize,
        limit: usize,
    ) -> Result<u64, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "DELETE FROM tag_history WHERE id IN (
                     SELECT id FROM (
                         SELECT id, at, row_number() OVER (
                                    PARTITION BY repo_id, tag ORDER BY id DESC) AS newer
                           FROM tag_history) h
                      WHERE (h.at < now() - make_interval(secs => $1) AND h.newer > 1)
                         OR h.newer > $2
                      LIMIT $3)",
            )
            .await?;
        let age = max_age.as_secs_f64();
        let entries = i64::try_from(max_entries).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(client.execute(&st, &[&age, &entries, &limit]).await?)
    }
}

/// The `job_leases` row of the shared records' upkeep.
const UPKEEP_JOB: &str = "records-upkeep";
/// Rows deleted per statement of the upkeep.
const UPKEEP_BATCH: usize = 5000;

/// The shared records' upkeep, on one replica per `every`: tag history within its limits
/// (`Db::prune_tag_history`), and pull records of digests no longer cached (a pull reported
/// while its image was evicted). Returns the rows dropped, or `None` if another replica ran it.
pub async fn upkeep_records(
    db: &Db,
    owner: &str,
    max_age: std::time::Duration,
    max_entries: usize,
    every: std::time::Duration,
) -> Result<Option<u64>, PgError> {
    let lease = std::time::Duration::from_secs(600);
    super::gc::as_job(db, UPKEEP_JOB, owner, lease, every, async {
        let mut removed = 0;
        loop {
            let n = db
                .prune_tag_history(max_age, max_entries, UPKEEP_BATCH)
                .await?;
            removed += n;
            if n < UPKEEP_BATCH as u64 {
                break;
            }
        }
        let client = db.client().await?;
        loop {
            let n = client
                .execute(
                    "DELETE FROM cache_access WHERE ctid IN (
                         SELECT ca.ctid FROM cache_access ca
                          WHERE NOT EXISTS (SELECT 1 FROM repo_manifests rm
                                             WHERE rm.repo_id = ca.repo_id
                                               AND rm.digest = ca.digest)
                          LIMIT $1)",
                    &[&(UPKEEP_BATCH as i64)],
                )
                .await?;
            removed += n;
            if n < UPKEEP_BATCH as u64 {
                break;
            }
        }
        Ok::<_, PgError>(removed)
    })
    .await
}

fn shared_tag(row: &Row) -> Result<SharedTag, PgError> {
    let media_type: Option<String> = row.get(2);
    let body: Option<Vec<u8>> = row.get(3);
    Ok(SharedTag {
        digest: parse_digest(row.get(0))?,
        confirmed_ago: row
            .get::<_, Option<i64>>(1)
            .and_then(|age| u64::try_from(age).ok()),
        manifest: media_type.zip(body),
    })
}

/// Whether the tag was changed by someone else since the caller read it as naming `seen`
/// (and not to `digest`): its row is locked until the transaction ends.
async fn superseded(
    tx: &deadpool_postgres::Transaction<'_>,
    repo_id: i64,
    tag: &Tag,
    digest: &Digest,
    seen: Option<&Digest>,
) -> Result<bool, PgError> {
    let st = tx
        .prepare_cached("SELECT digest FROM tags WHERE repo_id = $1 AND tag = $2 FOR UPDATE")
        .await?;
    let now: Option<String> = tx
        .query_opt(&st, &[&repo_id, &tag.as_str()])
        .await?
        .map(|r| r.get(0));
    let (now, seen, new) = (
        now.as_deref(),
        seen.map(Digest::to_string),
        digest.to_string(),
    );
    // A tag deleted meanwhile (forgotten, evicted) is no newer answer: it is created again.
    Ok(now.is_some() && now != seen.as_deref() && now != Some(new.as_str()))
}
