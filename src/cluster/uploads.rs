//! Push upload sessions any replica can continue: the state of an upload (its multipart upload
//! id, the parts done with their ETags, the offset, the hash of the parts' bytes and the bytes
//! past the last full part) lives in PostgreSQL, so the next PATCH may land on another replica
//! than the last.
//!
//! - **One appender at a time.** A request takes the session with a lease (`holder`, a fresh
//!   token per request, until `held_until`); another request meanwhile gets `InUse`. The lease
//!   is extended as parts are recorded and while the request waits for bytes, and released at
//!   the end, on error and (from a spawned task) when the request is dropped. A replica that
//!   dies holding one blocks its session for one lease at most. Every write is fenced by the
//!   token: a request that lost its lease (taken over after expiry, or cancelled) fails with
//!   `Lost` instead of writing.
//! - **Parts.** Bytes are cut into S3 parts of the replica's `part_size` (S3 refuses smaller
//!   parts but the last); part `i` is number `i + 1`, so a part re-sent after a failure
//!   replaces the unrecorded one. After each part, one transaction records it, the new offset
//!   (at the part boundary) and the hash state: a request that fails or is dropped mid-way
//!   leaves the session at the last recorded offset, which the client learns and resumes from.
//!   A part (or the completion) is only sent with at least half the lease left and must end
//!   within three quarters of it, so no request writes to the multipart upload once another
//!   could have taken the session over: the next holder reuses the part numbers, and not every
//!   store refuses a part whose ETag differs from the one named at completion (SeaweedFS does
//!   not). A replica paused for longer than that between sending a part and the store
//!   storing it is the case this does not cover.
//! - **The tail** (bytes past the last full part when a request ends) is kept in the session
//!   row, in the same transaction as the offset, so state and bytes never disagree.
//! - **The hash** of the parts' bytes is persisted (`hash_state`), since S3 cannot read the
//!   parts of an unfinished upload back.
//! - **Finish** verifies the digest over the parts' hash plus the tail before anything is
//!   assembled. A mismatch aborts the upload and removes the session (as distribution does),
//!   so wrong bytes are never visible. A match: a blob smaller than one part is one PUT to its
//!   key; otherwise the tail goes up as the last part, the upload is completed at
//!   `PREFIX/uploads/<session>` (the digest was unknown when it started), copied to the
//!   blob's key inside the store and removed. Then the blob and the repository's link are
//!   recorded and the session removed in one transaction. A blob already stored is not
//!   uploaded again.
//! - **Cancel** takes the session whoever holds it; **reap** takes sessions untouched for a
//!   while whose lease is free. Both abort the multipart upload and delete the assembly object
//!   before the row goes, so a failure leaves the row to try again.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use object_store::path::Path;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;

use super::fill_lease::millis;
use super::hash_state::{self, HashStateError};
use super::objects::{Objects, ObjectsError};
use super::pg::{Db, PgError};
use super::tags::ensure_repo;
use crate::oci::{Algorithm, Digest, Digester, RepoName};

/// S3's most parts per multipart upload.
const MAX_PARTS: usize = 10_000;
/// Sessions `reap` takes per round.
const REAP_BATCH: i64 = 64;

/// How this replica takes part in uploads.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// This replica's name, recorded with each lease it holds (for whoever inspects the table).
    pub replica: String,
    /// How long a request holds a session without extending its lease: a replica that dies
    /// mid-request blocks that session this long.
    pub lease: Duration,
    /// Sessions that may exist at once in the whole cluster, and per client.
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
}

/// A session's id: a UUID, as in the upload URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(uuid::Uuid);

impl SessionId {
    /// The id a client sent, if transship could have issued it (the canonical form only).
    pub fn parse(text: &str) -> Option<Self> {
        uuid::Uuid::parse_str(text)
            .ok()
            .filter(|u| u.to_string() == text)
            .map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadsError {
    /// Unknown here: never started, finished, cancelled, reaped, or of another repository.
    #[error("upload session unknown")]
    NotFound,
    #[error("another request is writing to this upload session")]
    InUse,
    #[error("the upload session has {offset} bytes, not {expected}")]
    OffsetMismatch { expected: u64, offset: u64 },
    #[error("the upload session was taken over or cancelled during this request")]
    Lost,
    #[error("the uploaded bytes are {actual}, not {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the upload session hashes {}; {digest} uses another algorithm", session.as_str())]
    AlgorithmMismatch { session: Algorithm, digest: Digest },
    #[error("a write to the bucket took longer than the upload session's lease allows")]
    Slow,
    #[error(
        "too many upload sessions: at most {max_sessions} in the cluster and {per_client} per client; finish or cancel some"
    )]
    TooMany {
        max_sessions: usize,
        per_client: usize,
    },
    #[error("the upload has more than {MAX_PARTS} parts, the most S3 takes")]
    TooLarge,
    #[error("reading the upload's bytes failed: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    HashState(#[from] HashStateError),
}

impl From<tokio_postgres::Error> for UploadsError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

fn corrupt(what: String) -> UploadsError {
    UploadsError::Pg(PgError::Corrupt(what))
}

/// Upload sessions on the shared bucket and database.
#[derive(Clone)]
pub struct Uploads {
    db: Db,
    objects: Objects,
    options: UploadOptions,
}

/// A session taken by one request, as read when it was taken.
struct Held {
    db: Db,
    id: SessionId,
    token: String,
    repo_id: i64,
    key: Path,
    upload_id: Option<String>,
    algorithm: Algorithm,
    /// Hash of the bytes in the recorded parts.
    hash: Digester,
    parts: usize,
    part_bytes: u64,
    /// Bytes past the last recorded part (the stored tail, then what this request adds).
    pending: Pending,
    assembled: bool,
    /// When the lease was last extended, taken before asking: it lasts at least one lease
    /// from then.
    confirmed: Instant,
    /// The lease is still ours to release.
    armed: bool,
}

impl Held {
    fn offset(&self) -> u64 {
        self.part_bytes + self.pending.len() as u64
    }

    /// Gives the lease back now (errors are logged: it expires anyway).
    async fn release(&mut self) {
        self.armed = false;
        if let Err(e) = release(&self.db, self.id, &self.token).await {
            tracing::warn!(session = %self.id, error = %e, "cannot release an upload session; it is free again when its lease expires");
        }
    }
}

impl Drop for Held {
    /// A request dropped mid-way (client gone, shutdown) releases its lease from a task.
    fn drop(&mut self) {
        if self.armed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (db, id, token) = (self.db.clone(), self.id, std::mem::take(&mut self.token));
            runtime.spawn(async move {
                if let Err(e) = release(&db, id, &token).await {
                    tracing::warn!(session = %id, error = %e, "cannot release a dropped upload session; it is free again when its lease expires");
                }
            });
        }
    }
}

async fn release(db: &Db, id: SessionId, token: &str) -> Result<(), UploadsError> {
    db.client()
        .await?
        .execute(
            "UPDATE upload_sessions SET holder = NULL, held_until = NULL
              WHERE id = $1::text::uuid AND holder = $2",
            &[&id.to_string(), &token],
        )
        .await?;
    Ok(())
}

impl Uploads {
    pub fn new(db: Db, objects: Objects, options: UploadOptions) -> Self {
        Self {
            db,
            objects,
            options,
        }
    }

    fn lease_ms(&self) -> i64 {
        millis(self.options.lease)
    }

    fn token(&self) -> String {
        format!("{}/{}", self.options.replica, uuid::Uuid::new_v4())
    }

    /// Starts a session in `repo` hashing with `algorithm`; `client` is who asked (recorded).
    /// Nothing is created in the bucket until the first full part.
    pub async fn start(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        client: Option<&str>,
    ) -> Result<SessionId, UploadsError> {
        let id = SessionId(uuid::Uuid::new_v4());
        let db = self.db.client().await?;
        let repo_id = ensure_repo(&**db, repo).await?;
        let client = client.unwrap_or("");
        // The caps are checked in the insert itself: concurrent starts can overshoot a cap
        // only by the few that count before either commits.
        let inserted = db
            .execute(
                "INSERT INTO upload_sessions (id, repo_id, client, object_key, hash_algorithm)
                 SELECT $1::text::uuid, $2, $3, $4, $5
                  WHERE (SELECT count(*) FROM upload_sessions) < $6
                    AND (SELECT count(*) FROM upload_sessions WHERE client = $3) < $7",
                &[
                    &id.to_string(),
                    &repo_id,
                    &client,
                    &self.objects.upload_key(&id.to_string()).as_ref(),
                    &algorithm.as_str(),
                    &(self.options.max_sessions as i64),
                    &(self.options.max_sessions_per_client as i64),
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(UploadsError::TooMany {
                max_sessions: self.options.max_sessions,
                per_client: self.options.max_sessions_per_client,
            });
        }
        Ok(id)
    }

    /// Bytes the session holds (what a client resumes from).
    pub async fn offset(&self, repo: &RepoName, id: SessionId) -> Result<u64, UploadsError> {
        let row = self
            .db
            .client()
            .await?
            .query_opt(
                "SELECT s.byte_offset FROM upload_sessions s JOIN repositories r ON r.id = s.repo_id
                  WHERE s.id = $1::text::uuid AND r.name = $2",
                &[&id.to_string(), &repo.as_str()],
            )
            .await?
            .ok_or(UploadsError::NotFound)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// Takes the session for one request, unless another holds it.
    async fn take(&self, repo: &RepoName, id: SessionId) -> Result<Held, UploadsError> {
        let token = self.token();
        let asked = Instant::now();
        let db = self.db.client().await?;
        let row = db
            .query_opt(
                "UPDATE upload_sessions s
                    SET holder = $3, held_until = now() + $4::bigint * interval '1 millisecond',
                        touched_at = now()
                   FROM repositories r
                  WHERE s.id = $1::text::uuid AND r.id = s.repo_id AND r.name = $2
                    AND (s.holder IS NULL OR s.held_until < now())
              RETURNING s.repo_id, s.object_key, s.s3_upload_id, s.byte_offset, s.hash_algorithm,
                        s.hash_state, s.tail, s.assembled,
                        (SELECT count(*) FROM upload_parts p WHERE p.session_id = s.id),
                        (SELECT coalesce(sum(p.size), 0)::bigint FROM upload_parts p
                          WHERE p.session_id = s.id)",
                &[&id.to_string(), &repo.as_str(), &token, &self.lease_ms()],
            )
            .await?;
        // Never a second connection while holding one: concurrent requests would exhaust the
        // pool waiting for each other.
        drop(db);
        let Some(row) = row else {
            return match self.offset(repo, id).await {
                Ok(_) => Err(UploadsError::InUse),
                Err(e) => Err(e),
            };
        };
        // From here the lease is ours: `held` releases it however this ends.
        let mut held = Held {
            db: self.db.clone(),
            id,
            token,
            repo_id: row.get(0),
            key: Path::from(row.get::<_, &str>(1)),
            upload_id: row.get(2),
            algorithm: Algorithm::Sha256,
            hash: Digester::new(Algorithm::Sha256),
            parts: 0,
            part_bytes: 0,
            pending: Pending::default(),
            assembled: row.get(7),
            confirmed: asked,
            armed: true,
        };
        let algorithm: &str = row.get(4);
        held.algorithm = Algorithm::parse(algorithm)
            .ok_or_else(|| corrupt(format!("upload {id} hashes with {algorithm:?}")))?;
        held.hash = match row.get::<_, Option<&[u8]>>(5) {
            Some(state) => hash_state::load(held.algorithm, state)?,
            None => Digester::new(held.algorithm),
        };
        let tail: Vec<u8> = row.get(6);
        held.pending.push(Bytes::from(tail));
        let (offset, parts, part_bytes): (i64, i64, i64) = (row.get(3), row.get(8), row.get(9));
        held.parts = usize::try_from(parts).unwrap_or(usize::MAX);
        held.part_bytes = u64::try_from(part_bytes).unwrap_or(u64::MAX);
        if i64::try_from(held.offset()).ok() != Some(offset) {
            return Err(corrupt(format!(
                "upload {id} records {offset} bytes but holds {part_bytes} in parts and {} in its tail",
                held.pending.len()
            )));
        }
        Ok(held)
    }

    /// Extends the lease; `Lost` if it is no longer ours.
    async fn renew(&self, held: &mut Held) -> Result<(), UploadsError> {
        let asked = Instant::now();
        self.fenced(
            held,
            "UPDATE upload_sessions
                SET held_until = now() + $3::bigint * interval '1 millisecond', touched_at = now()
              WHERE id = $1::text::uuid AND holder = $2",
            &[&self.lease_ms()],
        )
        .await?;
        held.confirmed = asked;
        Ok(())
    }

    /// Runs a bucket write that must end while the lease surely holds (a quarter of it to
    /// spare), so no request writes a part after another has taken the session over: a part
    /// number is reused by whoever continues, and not every store checks the ETags named at
    /// completion (SeaweedFS assembles a part replaced after its ETag was recorded).
    async fn within_lease<T>(
        &self,
        held: &Held,
        write: impl std::future::Future<Output = Result<T, ObjectsError>>,
    ) -> Result<Result<T, ObjectsError>, UploadsError> {
        let deadline = held.confirmed + self.options.lease * 3 / 4;
        tokio::time::timeout_at(deadline, write)
            .await
            .map_err(|_| UploadsError::Slow)
    }

    /// Runs `sql` (one row: `$1` the session id, `$2` this request's token, then `more`) only
    /// while this request holds the session; `Lost` otherwise.
    async fn fenced(
        &self,
        held: &mut Held,
        sql: &str,
        more: &[&(dyn ToSql + Sync)],
    ) -> Result<(), UploadsError> {
        let id = held.id.to_string();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id, &held.token];
        params.extend_from_slice(more);
        let n = self.db.client().await?.execute(sql, &params).await?;
        if n != 1 {
            held.armed = false;
            return Err(UploadsError::Lost);
        }
        Ok(())
    }

    /// Renews the lease unless more than half of it is left, so a part or a completion sent
    /// now ends well before anyone else can take the session.
    async fn keep_margin(&self, held: &mut Held) -> Result<(), UploadsError> {
        if held.confirmed.elapsed() > self.options.lease / 2 {
            self.renew(held).await?;
        }
        Ok(())
    }

    /// Appends `bytes` to the session at `expected_offset` (where the client believes it is);
    /// returns the new offset. On error the session stays at its last recorded offset (the
    /// start, or the end of the last full part recorded by this request) and is released.
    pub async fn append<S, E>(
        &self,
        repo: &RepoName,
        id: SessionId,
        expected_offset: u64,
        bytes: S,
    ) -> Result<u64, UploadsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut held = self.take(repo, id).await?;
        let result = if held.offset() != expected_offset {
            Err(UploadsError::OffsetMismatch {
                expected: expected_offset,
                offset: held.offset(),
            })
        } else {
            self.append_held(&mut held, bytes).await
        };
        if held.armed {
            held.release().await;
        }
        result
    }

    async fn append_held<S, E>(&self, held: &mut Held, bytes: S) -> Result<u64, UploadsError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut bytes = std::pin::pin!(bytes);
        let part_size = self.objects.part_size();
        loop {
            // A client that pauses longer than a lease keeps the session: the lease is renewed
            // while this request waits.
            let wake = held.confirmed + self.options.lease / 3;
            let chunk = match tokio::time::timeout_at(wake, bytes.next()).await {
                Err(_) => {
                    self.renew(held).await?;
                    continue;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(UploadsError::Source(Box::new(e))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            held.pending.push(chunk);
            while held.pending.len() >= part_size {
                let part = held.pending.take(part_size);
                self.upload_part(held, part).await?;
            }
        }
        // The end of the request: the tail, the offset and the release in one statement.
        let offset = held.offset();
        let tail = held.pending.concat();
        self.fenced(
            held,
            "UPDATE upload_sessions
                SET byte_offset = $3, tail = $4, holder = NULL, held_until = NULL,
                    touched_at = now()
              WHERE id = $1::text::uuid AND holder = $2",
            &[&to_i64(offset), &&tail[..]],
        )
        .await?;
        held.armed = false;
        Ok(offset)
    }

    /// Sends one part and records it with the offset at its end and the hash through it.
    async fn upload_part(&self, held: &mut Held, part: Vec<Bytes>) -> Result<(), UploadsError> {
        if held.parts >= MAX_PARTS {
            return Err(UploadsError::TooLarge);
        }
        self.keep_margin(held).await?;
        let upload_id = self.upload_id(held).await?;
        let size: usize = part.iter().map(Bytes::len).sum();
        for piece in &part {
            held.hash.update(piece);
        }
        let sent = self.objects.put_part(
            &held.key,
            &upload_id,
            held.parts,
            part.into_iter().collect(),
        );
        let etag = self.within_lease(held, sent).await??;
        held.parts += 1;
        held.part_bytes += size as u64;
        let asked = Instant::now();
        let mut db = self.db.client().await?;
        let tx = db.transaction().await?;
        let n = tx
            .execute(
                "UPDATE upload_sessions
                    SET byte_offset = $3, hash_state = $4, tail = ''::bytea,
                        held_until = now() + $5::bigint * interval '1 millisecond',
                        touched_at = now()
                  WHERE id = $1::text::uuid AND holder = $2",
                &[
                    &held.id.to_string(),
                    &held.token,
                    &to_i64(held.part_bytes),
                    &hash_state::save(&held.hash),
                    &self.lease_ms(),
                ],
            )
            .await?;
        if n != 1 {
            held.armed = false;
            return Err(UploadsError::Lost);
        }
        tx.execute(
            "INSERT INTO upload_parts (session_id, part_number, etag, size)
             VALUES ($1::text::uuid, $2, $3, $4)",
            &[
                &held.id.to_string(),
                &(held.parts as i32),
                &etag,
                &(size as i64),
            ],
        )
        .await?;
        tx.commit().await?;
        held.confirmed = asked;
        Ok(())
    }

    /// The session's multipart upload, started now if this is its first part (and aborted
    /// again if the session is no longer ours to record it in).
    async fn upload_id(&self, held: &mut Held) -> Result<String, UploadsError> {
        if let Some(id) = &held.upload_id {
            return Ok(id.clone());
        }
        let upload_id = self.objects.create_parts(&held.key).await?;
        let n = self
            .db
            .client()
            .await?
            .execute(
                "UPDATE upload_sessions SET s3_upload_id = $3
                  WHERE id = $1::text::uuid AND holder = $2 AND s3_upload_id IS NULL",
                &[&held.id.to_string(), &held.token, &upload_id],
            )
            .await;
        if !matches!(n, Ok(1)) {
            self.objects.abort_parts(&held.key, &upload_id).await?;
            held.armed = false;
            n?;
            return Err(UploadsError::Lost);
        }
        held.upload_id = Some(upload_id.clone());
        Ok(upload_id)
    }

    /// Completes the session as blob `digest`; returns its size. The bytes become visible
    /// under the blob's key only if they hash to `digest`; otherwise the session is discarded
    /// (`DigestMismatch`) and nothing of it stays in the bucket.
    pub async fn finish(
        &self,
        repo: &RepoName,
        id: SessionId,
        digest: &Digest,
    ) -> Result<u64, UploadsError> {
        let mut held = self.take(repo, id).await?;
        let result = self.finish_held(&mut held, digest).await;
        if held.armed {
            held.release().await;
        }
        result
    }

    async fn finish_held(&self, held: &mut Held, digest: &Digest) -> Result<u64, UploadsError> {
        let size = held.offset();
        let tail = held.pending.concat();
        let actual = if digest.algorithm() == held.algorithm {
            let mut hash = held.hash.clone();
            hash.update(&tail);
            hash.finish()
        } else {
            // The client names another algorithm than the session hashes (the spec lets it):
            // the recorded state is of no use, so the bytes are hashed again. Parts cannot be
            // read back before their upload completes: assemble first.
            self.rehash(held, &tail, digest.algorithm()).await?
        };
        if actual != *digest {
            self.discard(held).await?;
            return Err(UploadsError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        // Under the digest's fence (see `blob_fence`): GC cannot remove the blob's row or
        // object between what this finish sees of them and the rows it writes.
        let mut db = self.db.client().await?;
        let tx = db.transaction().await?;
        super::gc::blob_fence(&tx, digest).await?;
        let known = tx
            .query_opt(
                "SELECT 1 FROM blobs WHERE digest = $1",
                &[&digest.to_string()],
            )
            .await?
            .is_some();
        if known {
            // Already stored (pushed elsewhere, or filled): the parts are dropped once the
            // rows are in.
        } else if held.parts == 0 && !held.assembled {
            self.objects.put_checked_blob(digest, tail).await?;
        } else {
            self.assemble(held, tail).await?;
            if self.objects.head(digest).await? != Some(size) {
                self.objects.copy_to_blob(&held.key, digest).await?;
            }
        }
        let n = tx
            .execute(
                "DELETE FROM upload_sessions WHERE id = $1::text::uuid AND holder = $2",
                &[&held.id.to_string(), &held.token],
            )
            .await?;
        if n != 1 {
            // Cancelled meanwhile: the blob's object is verified, but its push is void.
            held.armed = false;
            return Err(UploadsError::Lost);
        }
        tx.execute(
            "INSERT INTO blobs (digest, size) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING",
            &[&digest.to_string(), &to_i64(size)],
        )
        .await?;
        tx.execute(
            "INSERT INTO repo_blobs (repo_id, digest, pushed) VALUES ($1, $2, true)
             ON CONFLICT (repo_id, digest) DO UPDATE SET pushed = true, linked_at = now()",
            &[&held.repo_id, &digest.to_string()],
        )
        .await?;
        tx.commit().await?;
        held.armed = false;
        // What the session left in the bucket: the assembled object, or parts of an upload
        // not needed after all. Left behind on failure for a lifecycle rule (the blob is in).
        let leftovers = if held.assembled {
            self.objects.delete_key(&held.key).await.map_err(Into::into)
        } else if known || held.upload_id.is_some() {
            self.clear_objects(&held.key, held.upload_id.as_deref())
                .await
        } else {
            Ok(())
        };
        if let Err(e) = leftovers {
            tracing::warn!(session = %held.id, error = %e, "a finished upload's leftovers stay in the bucket");
        }
        Ok(size)
    }

    /// The session's bytes hashed with `algorithm`: the tail alone, or the assembled object.
    async fn rehash(
        &self,
        held: &mut Held,
        tail: &Bytes,
        algorithm: Algorithm,
    ) -> Result<Digest, UploadsError> {
        let mut hash = Digester::new(algorithm);
        if held.parts == 0 && !held.assembled {
            hash.update(tail);
        } else {
            self.assemble(held, tail.clone()).await?;
            let mut bytes = self.objects.read_key(&held.key).await?;
            while let Some(piece) = bytes.next().await {
                // Reading a large blob back can outlast the lease: keep it.
                self.keep_margin(held).await?;
                hash.update(&piece?);
            }
        }
        Ok(hash.finish())
    }

    /// Completes the verified multipart upload at the session's key, the tail as its last part
    /// (unless an earlier finish got that far and recorded it). A finish that completed but
    /// could not record it leaves a session that cannot finish: the client starts over, and
    /// reap removes the object.
    async fn assemble(&self, held: &mut Held, tail: Bytes) -> Result<(), UploadsError> {
        if held.assembled {
            return Ok(());
        }
        let upload_id = held
            .upload_id
            .clone()
            .ok_or_else(|| corrupt(format!("upload {} has parts but no upload id", held.id)))?;
        let rows = self
            .db
            .client()
            .await?
            .query(
                "SELECT part_number, etag FROM upload_parts WHERE session_id = $1::text::uuid
                  ORDER BY part_number",
                &[&held.id.to_string()],
            )
            .await?;
        let mut etags = Vec::with_capacity(rows.len() + 1);
        for (i, row) in rows.iter().enumerate() {
            if row.get::<_, i32>(0) as usize != i + 1 {
                return Err(corrupt(format!("upload {} misses part {}", held.id, i + 1)));
            }
            etags.push(row.get::<_, String>(1));
        }
        self.keep_margin(held).await?;
        if !tail.is_empty() {
            if etags.len() >= MAX_PARTS {
                return Err(UploadsError::TooLarge);
            }
            let index = etags.len();
            let sent = self
                .objects
                .put_part(&held.key, &upload_id, index, tail.into());
            etags.push(self.within_lease(held, sent).await??);
            self.keep_margin(held).await?;
        }
        let completed = self.objects.complete_parts(&held.key, &upload_id, etags);
        self.within_lease(held, completed).await??;
        self.fenced(
            held,
            "UPDATE upload_sessions SET assembled = true, s3_upload_id = NULL
              WHERE id = $1::text::uuid AND holder = $2",
            &[],
        )
        .await?;
        held.assembled = true;
        held.upload_id = None;
        Ok(())
    }

    /// Removes a refused session: its bucket state first, then its row.
    async fn discard(&self, held: &mut Held) -> Result<(), UploadsError> {
        self.clear_objects(&held.key, held.upload_id.as_deref())
            .await?;
        self.db
            .client()
            .await?
            .execute(
                "DELETE FROM upload_sessions WHERE id = $1::text::uuid AND holder = $2",
                &[&held.id.to_string(), &held.token],
            )
            .await?;
        held.armed = false;
        Ok(())
    }

    /// Aborts a session's multipart upload and deletes its assembly object (either may
    /// already be gone).
    async fn clear_objects(&self, key: &Path, upload_id: Option<&str>) -> Result<(), UploadsError> {
        if let Some(upload_id) = upload_id {
            self.objects.abort_parts(key, upload_id).await?;
        }
        self.objects.delete_key(key).await?;
        Ok(())
    }

    /// Cancels the session, whoever holds it (a request writing to it then fails with `Lost`).
    pub async fn cancel(&self, repo: &RepoName, id: SessionId) -> Result<(), UploadsError> {
        let token = self.token();
        let row = self
            .db
            .client()
            .await?
            .query_opt(
                "UPDATE upload_sessions s
                    SET holder = $3, held_until = now() + $4::bigint * interval '1 millisecond'
                   FROM repositories r
                  WHERE s.id = $1::text::uuid AND r.id = s.repo_id AND r.name = $2
              RETURNING s.object_key, s.s3_upload_id",
                &[&id.to_string(), &repo.as_str(), &token, &self.lease_ms()],
            )
            .await?
            .ok_or(UploadsError::NotFound)?;
        self.remove_taken(id, &token, row.get(0), row.get(1)).await
    }

    /// Removes a session this replica has taken (for cancel or reap): bucket state, then row.
    async fn remove_taken(
        &self,
        id: SessionId,
        token: &str,
        key: &str,
        upload_id: Option<&str>,
    ) -> Result<(), UploadsError> {
        self.clear_objects(&Path::from(key), upload_id).await?;
        self.db
            .client()
            .await?
            .execute(
                "DELETE FROM upload_sessions WHERE id = $1::text::uuid AND holder = $2",
                &[&id.to_string(), &token],
            )
            .await?;
        Ok(())
    }

    /// Removes sessions untouched for `older_than` and held by no live request (abandoned by
    /// their clients, or by a replica that died); returns how many. A session whose bucket
    /// state cannot be removed now stays (taken for one lease) and is tried again later.
    pub async fn reap(&self, older_than: Duration) -> Result<usize, UploadsError> {
        let token = self.token();
        let mut reaped = 0;
        loop {
            let rows = self
                .db
                .client()
                .await?
                .query(
                    "UPDATE upload_sessions
                        SET holder = $1, held_until = now() + $2::bigint * interval '1 millisecond'
                      WHERE id IN (
                            SELECT id FROM upload_sessions
                             WHERE touched_at < now() - $3::bigint * interval '1 millisecond'
                               AND (holder IS NULL OR held_until < now())
                             LIMIT $4 FOR UPDATE SKIP LOCKED)
                  RETURNING id::text, object_key, s3_upload_id",
                    &[&token, &self.lease_ms(), &millis(older_than), &REAP_BATCH],
                )
                .await?;
            for row in &rows {
                let Some(id) = SessionId::parse(row.get(0)) else {
                    continue;
                };
                match self.remove_taken(id, &token, row.get(1), row.get(2)).await {
                    Ok(()) => reaped += 1,
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "cannot remove an abandoned upload session; trying again later");
                    }
                }
            }
            if (rows.len() as i64) < REAP_BATCH {
                return Ok(reaped);
            }
        }
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Bytes received but not yet in a part, as the chunks they came in (cut without copying).
#[derive(Debug, Default)]
struct Pending {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The first `n` bytes (or all there are), as chunks.
    fn take(&mut self, n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut want = n.min(self.len);
        self.len -= want;
        while want > 0 {
            let Some(mut chunk) = self.chunks.pop_front() else {
                break;
            };
            if chunk.len() > want {
                self.chunks.push_front(chunk.split_off(want));
            }
            want -= chunk.len();
            out.push(chunk);
        }
        out
    }

    /// Everything, in one piece (copied unless it is one chunk already).
    fn concat(&mut self) -> Bytes {
        let chunks = self.take(self.len);
        match chunks.as_slice() {
            [one] => one.clone(),
            _ => {
                let mut joined = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
                for c in &chunks {
                    joined.extend_from_slice(c);
                }
                joined.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_cuts_parts_across_chunks_without_losing_or_reordering_bytes() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut p = Pending::default();
        for piece in [
            &data[..7],
            &data[7..7],
            &data[7..40],
            &data[40..41],
            &data[41..],
        ] {
            p.push(Bytes::copy_from_slice(piece));
        }
        assert_eq!(p.len(), 100);
        let first: Vec<u8> = p.take(30).concat();
        assert_eq!(first, data[..30]);
        assert_eq!(p.len(), 70);
        let second: Vec<u8> = p.take(11).concat();
        assert_eq!(second, data[30..41]);
        let rest = p.concat();
        assert_eq!(rest, data[41..]);
        assert_eq!(p.len(), 0);
        assert!(p.take(5).is_empty());
        assert!(p.concat().is_empty());
    }

    #[test]
    fn only_canonical_session_ids_parse() {
        let id = SessionId(uuid::Uuid::new_v4());
        assert_eq!(SessionId::parse(&id.to_string()), Some(id));
        assert_eq!(SessionId::parse(&id.to_string().to_uppercase()), None);
        assert_eq!(SessionId::parse(&id.0.simple().to_string()), None);
        assert_eq!(SessionId::parse("../etc"), None);
    }
}
