//! Upload sessions: monolithic, chunked (`Content-Range`), streamed (no length) and resumable
//! across restarts. Bytes are hashed as they arrive and appended to `ingest/<id>`; a session's
//! record in the index names its repository, so an id is useless in another repository. After
//! a restart the hash state is rebuilt from the ingest file the first time it is needed. A
//! failed or short chunk is rolled back, so the session stays usable (416 on out-of-order).
//!
//! Resources: sessions are capped globally and per client; an idle session holds no open file
//! (its ingest file is opened only while a request reads or writes it); and
//! every file and index operation runs on the blocking pool, never on an async worker. A
//! request's body is gathered into batches of `WRITE_BATCH` bytes, each written and hashed by
//! one blocking call while the next batch is read. The session's lock travels with its
//! blocking work, so a request that is dropped mid-write never leaves a write running on an
//! unlocked session. A session is removed (completed, cancelled, reaped) only under its lock,
//! and marked ended, so a request waiting for the lock finds it gone instead of writing into a
//! removed file.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;

use super::blobs::WritebackKick;
use super::index::{CF_UPLOADS, IndexError};
use super::{Store, StoreError, unix_now};
use crate::oci::{Algorithm, Digest, Digester, RepoName};

/// Bytes of a request body gathered before one blocking write: large enough that the hop to
/// the blocking pool is noise next to the copy and the hash, small enough to bound memory.
const WRITE_BATCH: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct UploadRecord {
    repo: String,
    started: u64,
    algorithm: String,
}

pub struct UploadSession {
    id: String,
    repo: RepoName,
    algorithm: Algorithm,
    size: u64,
    /// Hash of bytes `0..size`; `None` after a restart or a failed rollback. While it is
    /// `Some`, the ingest file (if it exists) is exactly `size` bytes long.
    hasher: Option<Digester>,
    last_active: u64,
    /// Completed, cancelled or reaped: whoever gets the lock next must not touch the file.
    ended: bool,
}

impl UploadSession {
    pub fn size(&self) -> u64 {
        self.size
    }
}

struct Entry {
    session: Arc<tokio::sync::Mutex<UploadSession>>,
    /// The client whose cap the session counts against; `None` for sessions recovered at
    /// start (they count only against the global cap).
    client: Option<String>,
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<String, Entry>,
    per_client: HashMap<String, usize>,
}

impl Registry {
    fn remove(&mut self, id: &str) {
        let Some(entry) = self.sessions.remove(id) else {
            return;
        };
        if let Some(client) = entry.client
            && let Some(n) = self.per_client.get_mut(&client)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
    }
}

/// How many upload sessions may exist at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_sessions: 4096,
            max_sessions_per_client: 512,
        }
    }
}

/// A point in an upload's blocking work, where a test hook runs (see `Store::set_upload_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStep {
    /// Before a batch of body bytes is written (on the blocking pool).
    Write,
    /// Before a verified upload is synced and committed (on the blocking pool).
    Commit,
    /// The reaper holds an idle session's lock and is about to remove it.
    Reap,
}

pub type UploadHook = Arc<dyn Fn(UploadStep) + Send + Sync>;

pub struct Uploads {
    registry: Mutex<Registry>,
    /// Ingest files owned by something other than an upload session (cache fills).
    claims: Mutex<HashSet<String>>,
    limits: UploadLimits,
    hook: RwLock<Option<UploadHook>>,
}

impl Uploads {
    pub fn new(limits: UploadLimits) -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            claims: Mutex::new(HashSet::new()),
            limits,
            hook: RwLock::new(None),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn active(&self) -> usize {
        self.registry().sessions.len()
    }

    fn hook(&self) -> Option<UploadHook> {
        self.hook.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Registers a new session unless a cap is reached.
    fn admit(&self, session: UploadSession, client: Option<&str>) -> Result<(), StoreError> {
        let mut reg = self.registry();
        if reg.sessions.len() >= self.limits.max_sessions {
            return Err(StoreError::TooManyUploads(format!(
                "the registry has {} upload sessions open, the most it allows",
                reg.sessions.len()
            )));
        }
        if let Some(c) = client {
            let n = reg.per_client.get(c).copied().unwrap_or(0);
            if n >= self.limits.max_sessions_per_client {
                return Err(StoreError::TooManyUploads(format!(
                    "this client has {n} upload sessions open, the most one client may have; \
                     complete or cancel some first"
                )));
            }
            *reg.per_client.entry(c.to_string()).or_insert(0) += 1;
        }
        reg.sessions.insert(
            session.id.clone(),
            Entry {
                session: Arc::new(tokio::sync::Mutex::new(session)),
                client: client.map(str::to_string),
            },
        );
        Ok(())
    }
}

impl Store {
    /// The ingest path of a cache fill; `id` is generated by transship (`fill-<uuid>`).
    pub fn ingest_path_for_fill(&self, id: &str) -> std::path::PathBuf {
        self.blobs.ingest_path(id)
    }

    /// Marks an ingest file as in use, so GC leaves it alone until `release_ingest`.
    pub fn claim_ingest(&self, id: &str) {
        self.uploads
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }

    pub fn release_ingest(&self, id: &str) {
        self.uploads
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Upload sessions in progress.
    pub fn uploads_active(&self) -> usize {
        self.uploads.active()
    }

    /// Installs a hook that upload work calls at each `UploadStep`; tests use it to hold an
    /// upload at a known point. Not for production use.
    #[doc(hidden)]
    pub fn set_upload_hook(&self, hook: Option<UploadHook>) {
        *self.uploads.hook.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }
}

/// Limits one request's contribution to an upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkSpec {
    /// `Content-Range: start-end` (inclusive), if sent.
    pub range: Option<(u64, u64)>,
    /// `Content-Length`, if sent.
    pub content_length: Option<u64>,
}

impl ChunkSpec {
    /// How many bytes the request declares: its `Content-Range`'s length (which a
    /// `Content-Length` must match) or its `Content-Length`; `None` when it declares none.
    pub fn declared_len(&self) -> Result<Option<u64>, StoreError> {
        match self.range {
            Some((start, end)) => {
                let len = end - start + 1;
                if self.content_length.is_some_and(|cl| cl != len) {
                    return Err(StoreError::SizeInvalid(format!(
                        "Content-Length {} does not match Content-Range {start}-{end}",
                        self.content_length.unwrap_or(0)
                    )));
                }
                Ok(Some(len))
            }
            None => Ok(self.content_length),
        }
    }
}

impl Store {
    /// Loads upload sessions recorded before a restart (their ingest files must still exist).
    pub(crate) fn recover_uploads(&self) -> Result<(), StoreError> {
        let mut records = Vec::new();
        self.index.scan(CF_UPLOADS, b"", None, |k, v| {
            records.push((k.to_vec(), v.to_vec()));
            true
        })?;
        let mut stale = self.index.batch();
        let mut reg = self.uploads.registry();
        for (k, v) in records {
            let id = String::from_utf8_lossy(&k).into_owned();
            let rec: Option<UploadRecord> = serde_json::from_slice(&v).ok();
            let parsed = rec.filter(|_| is_upload_id(&id)).and_then(|r| {
                let repo: RepoName = r.repo.parse().ok()?;
                let alg = Algorithm::parse(&r.algorithm)?;
                let size = std::fs::metadata(self.blobs.ingest_path(&id)).ok()?.len();
                Some((repo, alg, size, r.started))
            });
            match parsed {
                Some((repo, algorithm, size, started)) => {
                    let s = UploadSession {
                        id: id.clone(),
                        repo,
                        algorithm,
                        size,
                        hasher: None,
                        last_active: started.max(unix_now()),
                        ended: false,
                    };
                    reg.sessions.insert(
                        id,
                        Entry {
                            session: Arc::new(tokio::sync::Mutex::new(s)),
                            client: None,
                        },
                    );
                }
                None => stale.delete(CF_UPLOADS, &k),
            }
        }
        drop(reg);
        if !stale.is_empty() {
            self.index.write_synced(stale)?;
        }
        Ok(())
    }

    /// Starts an upload session in `repo` for `client` (whose per-client cap it counts
    /// against); returns its id. Beyond a cap: `TooManyUploads`. Blocking (file creation and
    /// an index write): call it off the async workers. The ingest file is created (and
    /// closed) before the record that names it; it is opened again only by requests.
    pub fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
        client: Option<&str>,
    ) -> Result<String, StoreError> {
        self.room_for_push()?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = unix_now();
        let rec = serde_json::to_vec(&UploadRecord {
            repo: repo.to_string(),
            started: now,
            algorithm: algorithm.as_str().into(),
        })
        .map_err(|e| IndexError::Corrupt {
            cf: CF_UPLOADS,
            what: e.to_string(),
        })?;
        self.uploads.admit(
            UploadSession {
                id: id.clone(),
                repo: repo.clone(),
                algorithm,
                size: 0,
                hasher: Some(Digester::new(algorithm)),
                last_active: now,
                ended: false,
            },
            client,
        )?;
        // Registered first, so GC (which removes ingest files no session owns) leaves the
        // new file alone.
        let path = self.blobs.ingest_path(&id);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map(drop)
            .map_err(StoreError::from)
            .and_then(|()| {
                let mut batch = self.index.batch();
                batch.put(CF_UPLOADS, id.as_bytes(), &rec);
                Ok(self.index.write_relaxed(batch)?)
            });
        if let Err(e) = created {
            self.uploads.registry().remove(&id);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(id)
    }

    /// The session `id`, locked for one request. An id used in another repository is
    /// unknown: a session's state is never revealed to, or changed from, another repository.
    pub async fn lock_upload(&self, repo: &RepoName, id: &str) -> Result<LockedUpload, StoreError> {
        let session = self
            .uploads
            .registry()
            .sessions
            .get(id)
            .map(|e| e.session.clone())
            .ok_or(StoreError::UploadUnknown)?;
        let guard = session.lock_owned().await;
        if guard.ended || guard.repo != *repo {
            return Err(StoreError::UploadUnknown);
        }
        Ok(LockedUpload {
            path: self.blobs.ingest_path(id),
            guard,
            file: None,
            hook: self.uploads.hook(),
        })
    }

    /// Bytes received so far (GET on the upload URL).
    pub async fn upload_size(&self, repo: &RepoName, id: &str) -> Result<u64, StoreError> {
        Ok(self.lock_upload(repo, id).await?.size())
    }

    /// Completes an upload whose bytes are all in: verifies the digest of the whole blob and
    /// commits it. Returns the blob size. On a digest mismatch nothing is committed and the
    /// session is kept. Blocking (hash, fsync, rename, synced index write).
    pub fn commit_upload(&self, mut up: LockedUpload, digest: &Digest) -> Result<u64, StoreError> {
        up.prepare()?;
        let actual = match &up.guard.hasher {
            Some(h) if h.algorithm() == digest.algorithm() => h.clone().finish(),
            _ => super::blobs::hash_file(&up.path, digest.algorithm())?.0,
        };
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        up.run_hook(UploadStep::Commit);
        if let Some(f) = up.file.take() {
            f.sync_data()?;
        }
        let size = up.guard.size;
        let repo = up.guard.repo.clone();
        let id = up.guard.id.clone();
        self.commit_blob(&up.path, digest, size, &repo, Some(&id))?;
        up.guard.ended = true;
        self.uploads.registry().remove(&id);
        Ok(size)
    }

    /// Cancels a session and removes its bytes. Blocking (synced index write, unlink).
    pub fn cancel_upload(&self, mut up: LockedUpload) -> Result<(), StoreError> {
        up.file = None;
        up.guard.ended = true;
        let id = up.guard.id.clone();
        self.drop_session(&id)
    }

    /// Removes a session whose lock the caller holds (and has marked ended).
    fn drop_session(&self, id: &str) -> Result<(), StoreError> {
        self.uploads.registry().remove(id);
        let mut batch = self.index.batch();
        batch.delete(CF_UPLOADS, id.as_bytes());
        self.index.write_synced(batch)?;
        match std::fs::remove_file(self.blobs.ingest_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Cancels sessions idle for longer than `max_idle`. Returns how many were reaped.
    /// Blocking. Each session is removed while its lock is held, so a request that arrives
    /// meanwhile waits and then finds the session gone, instead of being acknowledged and
    /// losing its bytes.
    pub fn reap_uploads(&self, max_idle: Duration) -> Result<usize, StoreError> {
        let cutoff = unix_now().saturating_sub(max_idle.as_secs());
        let candidates: Vec<_> = self
            .uploads
            .registry()
            .sessions
            .iter()
            .map(|(id, e)| (id.clone(), e.session.clone()))
            .collect();
        let hook = self.uploads.hook();
        let mut reaped = 0;
        for (id, s) in candidates {
            // A session busy with a request is active by definition.
            let Ok(mut g) = s.try_lock_owned() else {
                continue;
            };
            if g.ended || g.last_active > cutoff {
                continue;
            }
            if let Some(h) = &hook {
                h(UploadStep::Reap);
            }
            g.ended = true;
            self.drop_session(&id)?;
            reaped += 1;
        }
        Ok(reaped)
    }

    /// Removes `path` from `ingest/` unless a live session or a fill owns it. Only the check
    /// needs the locks: ids are fresh UUIDs, and a session creates its file only once it is
    /// registered, so a file found with no owner can never gain one.
    pub(crate) fn remove_unowned_ingest(
        &self,
        id: &str,
        path: &std::path::Path,
    ) -> std::io::Result<bool> {
        let owned = self.uploads.registry().sessions.contains_key(id)
            || self
                .uploads
                .claims
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id);
        if owned {
            return Ok(false);
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// An upload session locked for one request, with its ingest file once opened. Dropping it
/// closes the file and releases the session.
pub struct LockedUpload {
    guard: OwnedMutexGuard<UploadSession>,
    path: PathBuf,
    file: Option<File>,
    hook: Option<UploadHook>,
}

/// Runs blocking upload work on the blocking pool.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StoreError::Io(std::io::Error::other(format!(
            "upload I/O task failed: {e}"
        )))
    })
}

impl LockedUpload {
    pub fn id(&self) -> &str {
        &self.guard.id
    }

    pub fn size(&self) -> u64 {
        self.guard.size
    }

    fn run_hook(&self, step: UploadStep) {
        if let Some(h) = &self.hook {
            h(step);
        }
    }

    /// Opens the ingest file, and rebuilds the hash state if a restart or a failed rollback
    /// lost it. Blocking.
    fn prepare(&mut self) -> Result<(), StoreError> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => StoreError::UploadUnknown,
                    _ => e.into(),
                })?;
            self.file = Some(file);
        }
        if self.guard.hasher.is_none() {
            let file = self.file.as_ref().ok_or(StoreError::UploadUnknown)?;
            let size = self.guard.size;
            if file.metadata()?.len() < size {
                return Err(StoreError::Io(std::io::Error::other(format!(
                    "ingest file of upload {} is shorter than its {size} received bytes",
                    self.guard.id
                ))));
            }
            file.set_len(size)?;
            let mut hasher = Digester::new(self.guard.algorithm);
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0u64;
            while pos < size {
                let want = buf.len().min((size - pos) as usize);
                let n = file.read_at(&mut buf[..want], pos)?;
                if n == 0 {
                    return Err(StoreError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            self.guard.hasher = Some(hasher);
        }
        Ok(())
    }

    /// Appends one request body (PATCH, or the final chunk of a PUT) to the session. On any
    /// error the session is rolled back to its last complete chunk and released.
    pub async fn append<S>(mut self, spec: ChunkSpec, body: &mut S) -> Result<Self, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let size = self.guard.size;
        if spec.range.is_some_and(|(start, _)| start != size) {
            return Err(StoreError::RangeInvalid { size });
        }
        let expected = spec.declared_len()?;
        if expected == Some(0) {
            self.guard.last_active = unix_now();
            return Ok(self);
        }
        let (mut up, prepared) = off_runtime(move || {
            let r = self.prepare();
            (self, r)
        })
        .await?;
        prepared?;
        let before = up.guard.size;
        // The working hash leaves the session while bytes are written: if this request is
        // dropped or a write task dies, the session is left with no hash and is rebuilt (and
        // cut back to `size`) from the file on next use.
        let snapshot = up.guard.hasher.take().ok_or(StoreError::UploadUnknown)?;
        let writing = Writing {
            up,
            kick: WritebackKick::from(before),
            hasher: snapshot.clone(),
        };
        let (writing, result) = write_body(writing, before, expected, body).await?;
        let Writing { mut up, hasher, .. } = writing;
        up.guard.last_active = unix_now();
        match result {
            Ok(received) => {
                up.guard.size = before + received;
                up.guard.hasher = Some(hasher);
                Ok(up)
            }
            Err(e) => {
                // Roll back to the last complete chunk so the session stays consistent. If the
                // truncation fails, the hash is rebuilt (and the file cut) on next use.
                let (mut up, cut) = off_runtime(move || {
                    let r = up.file.as_ref().map(|f| f.set_len(before));
                    (up, r)
                })
                .await?;
                up.guard.size = before;
                up.guard.hasher = match cut {
                    Some(Ok(())) | None => Some(snapshot),
                    Some(Err(_)) => None,
                };
                Err(e)
            }
        }
    }
}

/// An upload between batches: the session, its writeback position and its working hash.
struct Writing {
    up: LockedUpload,
    kick: WritebackKick,
    hasher: Digester,
}

impl Writing {
    /// Writes and hashes one batch at `offset`. Blocking.
    fn write_batch(&mut self, offset: u64, batch: &[u8]) -> Result<(), StoreError> {
        self.up.run_hook(UploadStep::Write);
        let file = self.up.file.as_ref().ok_or(StoreError::UploadUnknown)?;
        self.hasher.update(batch);
        file.write_all_at(batch, offset)?;
        self.kick.after_write(file, offset + batch.len() as u64);
        Ok(())
    }
}

/// Reads the next batch of up to about `WRITE_BATCH` bytes; empty at the end of the body.
async fn next_batch<S>(
    body: &mut S,
    received: &mut u64,
    expected: Option<u64>,
) -> Result<Bytes, StoreError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    let mut buf = BytesMut::new();
    while buf.len() < WRITE_BATCH {
        let Some(chunk) = body.next().await else {
            break;
        };
        let chunk = chunk.map_err(StoreError::Body)?;
        *received += chunk.len() as u64;
        if expected.is_some_and(|e| *received > e) {
            return Err(StoreError::SizeInvalid(
                "request body is longer than its declared length".into(),
            ));
        }
        if buf.is_empty() && chunk.len() >= WRITE_BATCH {
            return Ok(chunk);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Streams `body` into the session from `before`: one batch is written on the blocking pool
/// while the next is read. Returns the state (the outer error only if a blocking task died,
/// which loses it) and how many bytes were received, or why the body is rejected.
async fn write_body<S>(
    writing: Writing,
    before: u64,
    expected: Option<u64>,
    body: &mut S,
) -> Result<(Writing, Result<u64, StoreError>), StoreError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    type Done = (Writing, Result<(), StoreError>);
    let mut held = Some(writing);
    let mut in_flight: Option<tokio::task::JoinHandle<Done>> = None;
    let mut received = 0u64;
    let outcome = loop {
        let next = next_batch(body, &mut received, expected).await;
        // One write in flight at a time, and none left running when this returns.
        if let Some(task) = in_flight.take() {
            let (w, r) = task.await.map_err(|e| {
                StoreError::Io(std::io::Error::other(format!(
                    "upload write task failed: {e}"
                )))
            })?;
            held = Some(w);
            if let Err(e) = r {
                break Err(e);
            }
        }
        let batch = match next {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        if batch.is_empty() {
            break Ok(received);
        }
        let Some(mut w) = held.take() else {
            break Err(StoreError::UploadUnknown);
        };
        let offset = before + received - batch.len() as u64;
        in_flight = Some(tokio::task::spawn_blocking(move || {
            let r = w.write_batch(offset, &batch);
            (w, r)
        }));
    };
    let writing = held.ok_or(StoreError::UploadUnknown)?;
    let outcome = outcome.and_then(|received| match expected {
        Some(e) if received != e => Err(StoreError::SizeInvalid(format!(
            "request body has {received} bytes, {e} were declared"
        ))),
        _ => Ok(received),
    });
    Ok((writing, outcome))
}

fn is_upload_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.to_string() == id)
}

/// Parses a client-supplied upload id; only ids transship could have issued pass.
pub fn parse_upload_id(id: &str) -> Option<&str> {
    is_upload_id(id).then_some(id)
}
