//! Manifests of the private registry in the shared database: a push is one transaction that
//! checks what the manifest references, stores it byte-exact (`manifests`, shared by every
//! repository holding the same digest), records its references for GC (`manifest_blobs`,
//! `manifest_children`), puts it in the repository (`repo_manifests`), files it under its
//! subject (`referrers`) and moves its tags. Reads and deletes are one statement each.
//!
//! A referenced blob must be linked in the repository and stored (`blobs`); the check locks
//! the `blobs` rows `FOR KEY SHARE` until the push commits. GC's side of the protocol: take a
//! blob's row `FOR UPDATE` first (which waits for such a push), then, in a later statement
//! that sees what committed meanwhile, check `manifest_blobs` and only then delete the links
//! and the row; a GC holding the row first makes the push find the blob gone (`Missing`). `KEY
//! SHARE` rather than `SHARE`: it conflicts only with deletes and key changes, and pushes
//! holding it never wait on each other. The links themselves are not locked: GC locks the
//! blob before its links, and a push locking links too would take them in the other order.

use tokio_postgres::Row;

use super::pg::{Db, PgError};
use super::repos::ensure_repo_id;
use super::tags::move_tag;
use crate::oci::{Digest, RepoName, Tag};

/// A manifest to store, with what the caller parsed out of it.
#[derive(Debug, Clone, Copy)]
pub struct NewManifest<'a> {
    pub repo: &'a RepoName,
    /// The digest of `body`.
    pub digest: &'a Digest,
    pub media_type: &'a str,
    /// The manifest as pushed, stored byte-exact.
    pub body: &'a [u8],
    /// Blobs it references (config, layers): each must be linked in `repo`.
    pub blobs: &'a [Digest],
    /// Manifests it references (an index's): each must be in `repo`.
    pub children: &'a [Digest],
    pub subject: Option<&'a Digest>,
    pub artifact_type: Option<&'a str>,
    /// What the referrers API lists for it (stored when it has a `subject`).
    pub referrer_descriptor: Option<&'a serde_json::Value>,
    /// Tags pointed at it, each a move with history.
    pub tags: &'a [Tag],
    /// Pushed by a client (false: filled from an upstream).
    pub pushed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PutManifestError {
    /// Referenced blobs not linked in the repository (or not stored), or child manifests not
    /// in it. Nothing was written.
    #[error("the manifest references what the repository does not have: {}", list(.0))]
    Missing(Vec<Digest>),
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl From<tokio_postgres::Error> for PutManifestError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

fn list(digests: &[Digest]) -> String {
    digests
        .iter()
        .map(Digest::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Db {
    /// Stores a manifest in its repository, with its references, referrers entry and tags, in
    /// one transaction; `Missing` (and nothing written) if a reference is not there.
    pub async fn put_manifest(&self, m: &NewManifest<'_>) -> Result<(), PutManifestError> {
        self.put_manifest_recording(m, &[]).await
    }

    /// `put_manifest`, with the outbox records `events` inserted in the same transaction.
    pub async fn put_manifest_recording(
        &self,
        m: &NewManifest<'_>,
        events: &[Vec<u8>],
    ) -> Result<(), PutManifestError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let repo_id = ensure_repo_id(&tx, m.repo).await?;
        let digest = m.digest.to_string();
        let blobs = texts(m.blobs);
        let children = texts(m.children);

        let mut missing = Vec::new();
        if !blobs.is_empty() {
            // Locked in byte order, as a GC collecting several blobs in one transaction should.
            let linked = tx
                .prepare_cached(
                    r#"SELECT l.digest FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                        WHERE l.repo_id = $1 AND l.digest = ANY($2)
                        ORDER BY l.digest COLLATE "C"
                          FOR KEY SHARE OF b"#,
                )
                .await?;
            missing = absent(m.blobs, &tx.query(&linked, &[&repo_id, &blobs]).await?);
        }
        if !children.is_empty() {
            // A child's row locked too: deleting it from the repository waits for this push.
            let present = tx
                .prepare_cached(
                    r#"SELECT digest FROM repo_manifests WHERE repo_id = $1 AND digest = ANY($2)
                        ORDER BY digest COLLATE "C" FOR KEY SHARE"#,
                )
                .await?;
            let found = tx.query(&present, &[&repo_id, &children]).await?;
            for d in absent(m.children, &found) {
                if !missing.contains(&d) {
                    missing.push(d);
                }
            }
        }
        if !missing.is_empty() {
            return Err(PutManifestError::Missing(missing)); // rolled back on drop
        }

        // The bytes of one digest are the same bytes: an existing row is kept as it is. Every
        // insert is one statement; the foreign keys to `manifests` are checked at its end.
        let store = tx
            .prepare_cached(
                "WITH manifest AS (
                     INSERT INTO manifests (digest, media_type, body, subject, artifact_type)
                     VALUES ($2, $3, $4, $5, $6) ON CONFLICT (digest) DO NOTHING),
                 blob_refs AS (
                     INSERT INTO manifest_blobs (manifest_digest, blob_digest)
                     SELECT DISTINCT $2, unnest($7::text[]) ON CONFLICT DO NOTHING),
                 child_refs AS (
                     INSERT INTO manifest_children (manifest_digest, child_digest)
                     SELECT DISTINCT $2, unnest($8::text[]) ON CONFLICT DO NOTHING)
                 INSERT INTO repo_manifests (repo_id, digest, pushed) VALUES ($1, $2, $9)
                 ON CONFLICT (repo_id, digest)
                 DO UPDATE SET linked_at = now(), pushed = repo_manifests.pushed OR excluded.pushed",
            )
            .await?;
        tx.execute(
            &store,
            &[
                &repo_id,
                &digest,
                &m.media_type,
                &m.body,
                &m.subject.map(Digest::to_string),
                &m.artifact_type,
                &blobs,
                &children,
                &m.pushed,
            ],
        )
        .await?;
        if let (Some(subject), Some(descriptor)) = (m.subject, m.referrer_descriptor) {
            let refer = tx
                .prepare_cached(
                    "INSERT INTO referrers (repo_id, subject, digest, artifact_type, descriptor)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (repo_id, subject, digest) DO UPDATE
                        SET artifact_type = excluded.artifact_type,
                            descriptor = excluded.descriptor",
                )
                .await?;
            tx.execute(
                &refer,
                &[
                    &repo_id,
                    &subject.to_string(),
                    &digest,
                    &m.artifact_type,
                    &descriptor.to_string(),
                ],
            )
            .await?;
        }
        let mut tags: Vec<&Tag> = m.tags.iter().collect();
        tags.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        tags.dedup();
        for tag in tags {
            move_tag(&tx, repo_id, tag, m.digest).await?;
        }
        super::events::insert_events(&tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The media type and bytes of manifest `digest`, if `repo` has it.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<(String, Vec<u8>)>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT m.media_type, m.body FROM repo_manifests rm
                   JOIN repositories r ON r.id = rm.repo_id
                   JOIN manifests m ON m.digest = rm.digest
                  WHERE r.name = $1 AND rm.digest = $2",
            )
            .await?;
        Ok(client
            .query_opt(&st, &[&repo.as_str(), &digest.to_string()])
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// Removes manifest `digest` from `repo`, with every tag of `repo` naming it (history rows
    /// recording the deletions) and its referrers entries there; false if `repo` does not have
    /// it. The `manifests` row stays for GC: another repository may hold the same digest.
    pub async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool, PgError> {
        self.delete_manifest_recording(repo, digest, &[]).await
    }

    /// `delete_manifest`, with the outbox records `events` inserted in the same transaction
    /// (only if the manifest was there).
    pub async fn delete_manifest_recording(
        &self,
        repo: &RepoName,
        digest: &Digest,
        events: &[Vec<u8>],
    ) -> Result<bool, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let digest = digest.to_string();
        // First, as its own statement: a push of this manifest in progress holds its row and
        // is waited for, and the statements after it see that push's tags.
        let remove = tx
            .prepare_cached(
                "DELETE FROM repo_manifests
                  WHERE repo_id = (SELECT id FROM repositories WHERE name = $1) AND digest = $2
              RETURNING repo_id",
            )
            .await?;
        let Some(row) = tx.query_opt(&remove, &[&repo.as_str(), &digest]).await? else {
            return Ok(false);
        };
        let repo_id: i64 = row.get(0);
        // A tag being moved meanwhile is waited for and deleted only if it still names the
        // manifest.
        let untag = tx
            .prepare_cached(
                r#"WITH untagged AS (
                     DELETE FROM tags WHERE repo_id = $1 AND digest = $2 RETURNING tag),
                 history AS (
                     INSERT INTO tag_history (repo_id, tag, digest, previous)
                     SELECT $1, tag, NULL, $2 FROM untagged ORDER BY tag COLLATE "C")
                 DELETE FROM referrers WHERE repo_id = $1 AND digest = $2"#,
            )
            .await?;
        tx.execute(&untag, &[&repo_id, &digest]).await?;
        super::events::insert_events(&tx, events).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The stored descriptors of `repo`'s manifests whose subject is `subject` (with
    /// `artifact_type`, if given), in digest byte order.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                r#"SELECT f.descriptor FROM referrers f JOIN repositories r ON r.id = f.repo_id
                    WHERE r.name = $1 AND f.subject = $2
                      AND ($3::text IS NULL OR f.artifact_type = $3)
                    ORDER BY f.digest COLLATE "C""#,
            )
            .await?;
        client
            .query(&st, &[&repo.as_str(), &subject.to_string(), &artifact_type])
            .await?
            .iter()
            .map(|r| {
                let text: &str = r.get(0);
                serde_json::from_str(text).map_err(|e| {
                    PgError::Corrupt(format!("a referrer descriptor of {subject}: {e}"))
                })
            })
            .collect()
    }
}

pub(super) fn texts(digests: &[Digest]) -> Vec<String> {
    digests.iter().map(Digest::to_string).collect()
}

/// Of `wanted`, in order and once each, those not among `found`'s first column.
fn absent(wanted: &[Digest], found: &[Row]) -> Vec<Digest> {
    let found: std::collections::HashSet<&str> = found.iter().map(|r| r.get(0)).collect();
    let mut out: Vec<Digest> = Vec::new();
    for d in wanted {
        if !found.contains(d.to_string().as_str()) && !out.contains(d) {
            out.push(d.clone());
        }
    }
    out
}
