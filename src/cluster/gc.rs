//! Cluster-wide garbage collection: one replica at a time (a `job_leases` row), safe while
//! every replica keeps pushing.
//!
//! What goes, each only once older than the grace period (the window in which a push has
//! uploaded layers but not yet its manifest):
//! - `manifests` rows no repository holds any more (a delete removes the repository's row, not
//!   the bytes another repository may share), with their reference rows;
//! - blobs no manifest held by a repository references, and that no push linked within the
//!   window (a push's link counts for the longer of the grace period and how long an idle
//!   push may wait, as in the local profile): their rows, their links, then their objects;
//! - objects under the blob prefix with no `blobs` row (a replica died between writing the
//!   object and recording it, or a delete of the object failed).
//!
//! Each blob's rows are removed in their own transaction that first locks its `blobs` row
//! `FOR UPDATE`: a manifest push holds the rows of the blobs it references `FOR KEY SHARE` until
//! it commits, and a new link's foreign key takes a share lock too, so the lock waits for them;
//! the reference check then runs as a new statement, whose snapshot (READ COMMITTED) sees what
//! they committed. The object goes afterwards, in a second transaction holding the digest's
//! fence (`blob_fence`, a transaction-level advisory lock that an upload's `finish` also takes
//! around "is the blob stored? write its object, insert its rows") and only if no row came
//! back meanwhile. So a finish either sees the rows GC is about to remove and waits, or finds
//! them gone and writes the object again; and a crash between the two steps leaves an
//! unrecorded object (removed by a later run), never a row without its bytes.
//!
//! A run that succeeds keeps the job's lease for the rest of the interval, so replicas with
//! their own timers do not run it again and again; a failed run releases it.

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::fill_lease::millis;
use super::objects::{Objects, ObjectsError};
use super::pg::{Db, PgError};
use crate::oci::Digest;

/// Candidate blobs read per query.
const BATCH: i64 = 256;
/// The job's name in `job_leases`.
const JOB: &str = "gc";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterGcReport {
    pub manifests_removed: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub orphan_objects_removed: u64,
}

impl std::fmt::Display for ClusterGcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "removed {} unreferenced manifests, {} unreferenced blobs ({} bytes), {} unrecorded objects",
            self.manifests_removed,
            self.blobs_removed,
            self.bytes_freed,
            self.orphan_objects_removed
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterGcError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Objects(#[from] ObjectsError),
}

impl From<tokio_postgres::Error> for ClusterGcError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

/// Whether this replica may run a cluster job now, and for how long.
#[derive(Debug)]
pub struct JobLease {
    pub(super) lease_id: String,
}

impl Db {
    /// Takes the job `job` for `ttl` unless another replica holds it unexpired.
    pub async fn acquire_job(
        &self,
        job: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<JobLease>, PgError> {
        let lease_id = uuid::Uuid::new_v4().to_string();
        let won = self
            .client()
            .await?
            .execute(
                "INSERT INTO job_leases (job, owner, lease_id, expires_at)
                 VALUES ($1, $2, $3::text::uuid, now() + $4::bigint * interval '1 millisecond')
                 ON CONFLICT (job) DO UPDATE
                    SET owner = EXCLUDED.owner, lease_id = EXCLUDED.lease_id,
                        expires_at = EXCLUDED.expires_at
                    WHERE job_leases.expires_at < now()",
                &[&job, &owner, &lease_id, &millis(ttl)],
            )
            .await?;
        Ok((won == 1).then_some(JobLease { lease_id }))
    }

    /// Keeps a job lease for `keep` from now (the job is done until then).
    pub async fn keep_job(
        &self,
        job: &str,
        lease: JobLease,
        keep: Duration,
    ) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "UPDATE job_leases SET expires_at = now() + $3::bigint * interval '1 millisecond'
                  WHERE job = $1 AND lease_id = $2::text::uuid",
                &[&job, &lease.lease_id, &millis(keep)],
            )
            .await?;
        Ok(())
    }

    /// Ends a job lease (a lease taken over meanwhile is left alone).
    pub async fn release_job(&self, job: &str, lease: JobLease) -> Result<(), PgError> {
        self.drop_job_lease(job, &lease).await
    }
}

/// How long what may still be used is kept.
#[derive(Debug, Clone, Copy)]
pub struct GcWindows {
    /// Anything younger than this stays (`gc.grace_period`).
    pub grace: Duration,
    /// A blob linked by a push stays this long after the link (or `grace`, if longer): the
    /// registry waits this long on an idle push (`uploads.abandon_after`).
    pub push: Duration,
}

/// The digest's fence between GC and an upload's `finish` (see the module header): a
/// transaction-level advisory lock, released when `tx` ends.
pub(super) async fn blob_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    digest: &Digest,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7411))",
        &[&digest.to_string()],
    )
    .await?;
    Ok(())
}

/// One GC run, if no other replica ran one within `every`; `None` when another holds the
/// job. `lease` must outlast the run (a run taking longer could overlap with another's, which
/// stays safe — each removal re-checks under its locks — but does the work twice).
pub async fn collect_garbage(
    db: &Db,
    objects: &Objects,
    owner: &str,
    windows: GcWindows,
    lease: Duration,
    every: Duration,
) -> Result<Option<ClusterGcReport>, ClusterGcError> {
    as_job(db, JOB, owner, lease, every, run(db, objects, windows)).await
}

/// Runs `work` as the cluster job `job` if this replica takes its lease (`None` if another
/// holds it): kept for `every` after a success, so replicas with their own timers do not run
/// it again at once, released after a failure.
pub(super) async fn as_job<T, E: From<PgError>>(
    db: &Db,
    job: &str,
    owner: &str,
    lease: Duration,
    every: Duration,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Option<T>, E> {
    let Some(held) = db.acquire_job(job, owner, lease).await? else {
        return Ok(None);
    };
    let result = work.await;
    let ended = match &result {
        Ok(_) => db.keep_job(job, held, every).await,
        Err(_) => db.release_job(job, held).await,
    };
    if let Err(e) = ended {
        tracing::warn!(error = %e, job, "cannot update a job lease; it expires by itself");
    }
    result.map(Some)
}

async fn run(
    db: &Db,
    objects: &Objects,
    windows: GcWindows,
) -> Result<ClusterGcReport, ClusterGcError> {
    let mut report = ClusterGcReport::default();
    let grace_ms = millis(windows.grace);
    let push_window_ms = millis(windows.grace.max(windows.push));
    report.manifests_removed = remove_unheld_manifests(db, grace_ms).await?;
    let mut after = String::new();
    loop {
        // Primary-key order (GC needs no byte order), so each batch is an index range.
        let rows = db
            .client()
            .await?
            .query(
                "SELECT digest FROM blobs
                  WHERE digest > $1 AND created_at < now() - $2::bigint * interval '1 millisecond'
                  ORDER BY digest LIMIT $3",
                &[&after, &grace_ms, &BATCH],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        for row in &rows {
            let digest: String = row.get(0);
            let Ok(parsed) = digest.parse::<Digest>() else {
                tracing::warn!(%digest, "a blob row that is not a digest; left alone");
                continue;
            };
            let keep = Keep::Recent {
                grace_ms,
                push_window_ms,
            };
            if let Some(size) = remove_blob(db, objects, &parsed, keep).await? {
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
    }
    report.orphan_objects_removed = remove_unrecorded_objects(db, objects, windows.grace).await?;
    Ok(report)
}

/// What, besides a manifest a repository holds, keeps a blob from `remove_blob`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Keep {
    /// GC: a link made within its window (a push's, or a fill's within the grace period).
    Recent { grace_ms: i64, push_window_ms: i64 },
    /// Eviction: any link left (the evicted repositories' links are gone already; another
    /// repository's, pushed or not, is not eviction's to judge).
    Linked,
}

/// Removes one blob if, under its row lock, nothing references it: its rows (the row lock,
/// then the reference check as a new statement, then links and row), then its object under
/// the digest's fence unless a row came back meanwhile. Its size if the rows went.
pub(super) async fn remove_blob(
    db: &Db,
    objects: &Objects,
    digest: &Digest,
    keep: Keep,
) -> Result<Option<u64>, ClusterGcError> {
    let size = remove_rows_if_unreferenced(db, &digest.to_string(), keep).await?;
    if size.is_some() {
        // Rows first, then the object (unless a push or a fill brought the rows back).
        delete_object_if_unrecorded(db, objects, digest).await?;
    }
    Ok(size)
}

/// Removes one blob's rows if, under its row lock, nothing references it; its size if so.
async fn remove_rows_if_unreferenced(
    db: &Db,
    digest: &str,
    keep: Keep,
) -> Result<Option<u64>, ClusterGcError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT size FROM blobs WHERE digest = $1 FOR UPDATE",
            &[&digest],
        )
        .await?
    else {
        return Ok(None);
    };
    let size: i64 = row.get(0);
    // A new statement: its snapshot sees whatever the lock waited for.
    const HELD: &str = "SELECT EXISTS (SELECT 1 FROM manifest_blobs mb
                              JOIN repo_manifests rm ON rm.digest = mb.manifest_digest
                             WHERE mb.blob_digest = $1)";
    let recent;
    let (sql, params): (String, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = match &keep {
        Keep::Recent {
            grace_ms,
            push_window_ms,
        } => {
            recent = [*grace_ms, *push_window_ms];
            (
                format!(
                    "{HELD} OR EXISTS (SELECT 1 FROM repo_blobs rb
                             WHERE rb.digest = $1
                               AND rb.linked_at >= now() - (CASE WHEN rb.pushed THEN $3::bigint ELSE $2::bigint END)
                                                           * interval '1 millisecond')"
                ),
                vec![&digest, &recent[0], &recent[1]],
            )
        }
        Keep::Linked => (
            format!("{HELD} OR EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = $1)"),
            vec![&digest],
        ),
    };
    let kept: bool = tx.query_one(&sql, &params).await?.get(0);
    if kept {
        return Ok(None);
    }
    tx.execute("DELETE FROM repo_blobs WHERE digest = $1", &[&digest])
        .await?;
    tx.execute("DELETE FROM blobs WHERE digest = $1", &[&digest])
        .await?;
    tx.commit().await?;
    Ok(Some(u64::try_from(size).unwrap_or(0)))
}

/// Removes `manifests` rows no repository holds, a batch at a time: rows a concurrent push is
/// re-linking (holding them `FOR KEY SHARE`) are skipped, and the absence of a holder is
/// checked again by the delete itself.
async fn remove_unheld_manifests(db: &Db, grace_ms: i64) -> Result<u64, ClusterGcError> {
    let mut removed = 0;
    loop {
        let n = db
            .client()
            .await?
            .execute(
                "DELETE FROM manifests WHERE digest IN (
                    SELECT m.digest FROM manifests m
                     WHERE m.created_at < now() - $1::bigint * interval '1 millisecond'
                       AND NOT EXISTS (SELECT 1 FROM repo_manifests rm WHERE rm.digest = m.digest)
                     LIMIT $2 FOR UPDATE SKIP LOCKED)
                   AND NOT EXISTS (SELECT 1 FROM repo_manifests rm WHERE rm.digest = manifests.digest)",
                &[&grace_ms, &BATCH],
            )
            .await?;
        removed += n;
        if n < BATCH as u64 {
            return Ok(removed);
        }
    }
}

/// Deletes the blob's object unless a `blobs` row names it, under the digest's fence.
async fn delete_object_if_unrecorded(
    db: &Db,
    objects: &Objects,
    digest: &Digest,
) -> Result<bool, ClusterGcError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    blob_fence(&tx, digest).await?;
    let recorded = tx
        .query_opt(
            "SELECT 1 FROM blobs WHERE digest = $1",
            &[&digest.to_string()],
        )
        .await?
        .is_some();
    if recorded {
        return Ok(false);
    }
    objects.delete(digest).await?;
    tx.commit().await?;
    Ok(true)
}

/// Deletes blob objects older than the grace period that have no `blobs` row.
async fn remove_unrecorded_objects(
    db: &Db,
    objects: &Objects,
    grace: Duration,
) -> Result<u64, ClusterGcError> {
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut removed = 0;
    let mut listing = objects.list().chunks(BATCH as usize);
    while let Some(page) = listing.next().await {
        let old: Vec<Digest> = page
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|o| o.last_modified < cutoff)
            .map(|o| o.digest)
            .collect();
        if old.is_empty() {
            continue;
        }
        // One lookup per page; each candidate is checked again under its fence.
        let names: Vec<String> = old.iter().map(|d| d.to_string()).collect();
        let recorded: std::collections::HashSet<String> = db
            .client()
            .await?
            .query("SELECT digest FROM blobs WHERE digest = ANY($1)", &[&names])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for digest in old.iter().filter(|d| !recorded.contains(&d.to_string())) {
            if delete_object_if_unrecorded(db, objects, digest).await? {
                removed += 1;
            }
        }
    }
    Ok(removed)
}
