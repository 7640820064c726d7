//! Upload sessions: monolithic, chunked (`Content-Range`), streamed (no length) and resumable
//! across restarts. Bytes are hashed as they arrive and appended to `ingest/<id>`; a session's
//! record in the index names its repository, so an id is useless in another repository. After
//! a restart the hash state is rebuilt from the ingest file the first time it is needed. A
//! failed or short chunk is rolled back, so the session stays usable (416 on out-of-order).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use super::index::{CF_UPLOADS, IndexError};
use super::{Store, StoreError, unix_now};
use crate::oci::{Algorithm, Digest, Digester, RepoName};

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
    file: Option<File>,
    size: u64,
    /// Hash of bytes `0..size`; `None` after a restart or a rolled-back chunk.
    hasher: Option<Digester>,
    last_active: u64,
}

impl UploadSession {
    pub fn size(&self) -> u64 {
        self.size
    }
}

#[derive(Default)]
pub struct Uploads {
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<UploadSession>>>>,
}

impl Uploads {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<UploadSession>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn active(&self) -> usize {
        self.map().len()
    }
}

impl Store {
    /// Upload sessions in progress.
    pub fn uploads_active(&self) -> usize {
        self.uploads.active()
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

impl Store {
    /// Loads upload sessions recorded before a restart (their ingest files must still exist).
    pub(crate) fn recover_uploads(&self) -> Result<(), StoreError> {
        let mut records = Vec::new();
        self.index.scan(CF_UPLOADS, b"", None, |k, v| {
            records.push((k.to_vec(), v.to_vec()));
            true
        })?;
        let mut stale = self.index.batch();
        let mut map = self.uploads.map();
        for (k, v) in records {
            let id = String::from_utf8_lossy(&k).into_owned();
            let rec: Option<UploadRecord> = serde_json::from_slice(&v).ok();
            let path = self.blobs.ingest_path(&id);
            let parsed = rec.and_then(|r| {
                let repo: RepoName = r.repo.parse().ok()?;
                let alg = Algorithm::parse(&r.algorithm)?;
                let size = std::fs::metadata(&path).ok()?.len();
                Some((repo, alg, size, r.started))
            });
            match parsed {
                Some((repo, algorithm, size, started)) if is_upload_id(&id) => {
                    let s = UploadSession {
                        id: id.clone(),
                        repo,
                        algorithm,
                        file: None,
                        size,
                        hasher: None,
                        last_active: started.max(unix_now()),
                    };
                    map.insert(id, Arc::new(tokio::sync::Mutex::new(s)));
                }
                _ => stale.delete(CF_UPLOADS, &k),
            }
        }
        drop(map);
        if !stale.is_empty() {
            self.index.write_synced(stale)?;
        }
        Ok(())
    }

    /// Starts an upload session in `repo`; returns its id.
    pub fn start_upload(
        &self,
        repo: &RepoName,
        algorithm: Algorithm,
    ) -> Result<String, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.blobs.ingest_path(&id);
        // The session map is locked from the file's creation until the session is in it, so GC
        // (which deletes ingest files no session owns, under the same lock) never sees the
        // file without its owner.
        let mut sessions = self.uploads.map();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let now = unix_now();
        let rec = UploadRecord {
            repo: repo.to_string(),
            started: now,
            algorithm: algorithm.as_str().into(),
        };
        let mut batch = self.index.batch();
        batch.put(
            CF_UPLOADS,
            id.as_bytes(),
            &serde_json::to_vec(&rec).map_err(|e| IndexError::Corrupt {
                cf: CF_UPLOADS,
                what: e.to_string(),
            })?,
        );
        self.index.write_relaxed(batch)?;
        let session = UploadSession {
            id: id.clone(),
            repo: repo.clone(),
            algorithm,
            file: Some(file),
            size: 0,
            hasher: Some(Digester::new(algorithm)),
            last_active: now,
        };
        sessions.insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok(id)
    }

    /// The session `id`, locked. An id used in another repository is unknown: a session's
    /// state is never revealed to, or changed from, another repository.
    async fn locked_session(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<UploadSession>, StoreError> {
        let session = self
            .uploads
            .map()
            .get(id)
            .cloned()
            .ok_or(StoreError::UploadUnknown)?;
        let guard = session.lock_owned().await;
        if guard.repo != *repo {
            return Err(StoreError::UploadUnknown);
        }
        Ok(guard)
    }

    /// Bytes received so far (GET on the upload URL).
    pub async fn upload_size(&self, repo: &RepoName, id: &str) -> Result<u64, StoreError> {
        let g = self.locked_session(repo, id).await?;
        Ok(g.size)
    }

    /// Appends one request body (PATCH) to the session. Returns the new size.
    pub async fn append_upload<S>(
        &self,
        repo: &RepoName,
        id: &str,
        spec: ChunkSpec,
        body: &mut S,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let mut g = self.locked_session(repo, id).await?;
        self.append_locked(&mut g, spec, body).await?;
        Ok(g.size)
    }

    async fn append_locked<S>(
        &self,
        s: &mut UploadSession,
        spec: ChunkSpec,
        body: &mut S,
    ) -> Result<(), StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let expected = match spec.range {
            Some((start, end)) => {
                if start != s.size {
                    return Err(StoreError::RangeInvalid { size: s.size });
                }
                let len = end - start + 1;
                if spec.content_length.is_some_and(|cl| cl != len) {
                    return Err(StoreError::SizeInvalid(format!(
                        "Content-Length {} does not match Content-Range {start}-{end}",
                        spec.content_length.unwrap_or(0)
                    )));
                }
                Some(len)
            }
            None => spec.content_length,
        };
        self.ensure_ready(s)?;
        let before = s.size;
        let result = write_body(s, expected, body).await;
        s.last_active = unix_now();
        if let Err(e) = result {
            // Roll back to the last complete chunk so the session stays consistent.
            if let Some(f) = &s.file {
                let _ = f.set_len(before);
            }
            s.size = before;
            s.hasher = None;
            return Err(e);
        }
        Ok(())
    }

    /// Opens the ingest file and rebuilds the hash state if a restart or rollback lost it.
    fn ensure_ready(&self, s: &mut UploadSession) -> Result<(), StoreError> {
        if s.file.is_none() {
            let path = self.blobs.ingest_path(&s.id);
            s.file = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => StoreError::UploadUnknown,
                        _ => e.into(),
                    })?,
            );
        }
        if s.hasher.is_none() {
            let file = s.file.as_mut().ok_or(StoreError::UploadUnknown)?;
            file.set_len(s.size)?;
            file.seek(SeekFrom::Start(0))?;
            let mut hasher = Digester::new(s.algorithm);
            let mut buf = vec![0u8; 1 << 20];
            let mut reader = (&*file).take(s.size);
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            s.hasher = Some(hasher);
        }
        Ok(())
    }

    /// Completes an upload (PUT `?digest=`): appends the optional final chunk, verifies the
    /// digest of the whole blob, and commits it. Returns the blob size. On a digest mismatch
    /// nothing is committed and the session is kept.
    pub async fn finish_upload<S>(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        spec: ChunkSpec,
        body: &mut S,
    ) -> Result<u64, StoreError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    {
        let mut g = self.locked_session(repo, id).await?;
        self.append_locked(&mut g, spec, body).await?;
        self.ensure_ready(&mut g)?;
        let actual = match &g.hasher {
            Some(h) if h.algorithm() == digest.algorithm() => h.clone().finish(),
            _ => super::blobs::hash_file(&self.blobs.ingest_path(id), digest.algorithm())?.0,
        };
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        if let Some(f) = g.file.take() {
            f.sync_data()?;
        }
        let size = g.size;
        self.commit_blob(&self.blobs.ingest_path(id), digest, size, repo, Some(id))?;
        self.uploads.map().remove(id);
        Ok(size)
    }

    /// Cancels a session and removes its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), StoreError> {
        let g = self.locked_session(repo, id).await?;
        self.drop_session(&g.id)
    }

    fn drop_session(&self, id: &str) -> Result<(), StoreError> {
        self.uploads.map().remove(id);
        let mut batch = self.index.batch();
        batch.delete(CF_UPLOADS, id.as_bytes());
        self.index.write_synced(batch)?;
        match std::fs::remove_file(self.blobs.ingest_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Cancels sessions idle for longer than `max_idle`. Returns how many were reaped.
    pub fn reap_uploads(&self, max_idle: Duration) -> Result<usize, StoreError> {
        let cutoff = unix_now().saturating_sub(max_idle.as_secs());
        let candidates: Vec<_> = self
            .uploads
            .map()
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        let mut reaped = 0;
        for (id, s) in candidates {
            // A session busy with a request is active by definition.
            let Ok(g) = s.try_lock() else { continue };
            if g.last_active <= cutoff {
                drop(g);
                self.drop_session(&id)?;
                reaped += 1;
            }
        }
        Ok(reaped)
    }

    /// Removes `path` from `ingest/` unless a live session owns it. The check and the removal
    /// happen under the session-map lock, which `start_upload` holds while creating its file.
    pub(crate) fn remove_unowned_ingest(
        &self,
        id: &str,
        path: &std::path::Path,
    ) -> std::io::Result<bool> {
        let sessions = self.uploads.map();
        if sessions.contains_key(id) {
            return Ok(false);
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn is_upload_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.to_string() == id)
}

/// Parses a client-supplied upload id; only ids transship could have issued pass.
pub fn parse_upload_id(id: &str) -> Option<&str> {
    is_upload_id(id).then_some(id)
}

/// Bytes written between writeback kicks (see `WritebackKick`).
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts the kernel's writeback of the bytes written so far without waiting for it, so the
/// fsync at commit only waits for the tail of a large upload instead of all of it.
struct WritebackKick {
    flushed_to: u64,
}

impl WritebackKick {
    fn after_write(&mut self, file: &File, written_to: u64) {
        if written_to - self.flushed_to < WRITEBACK_STEP {
            return;
        }
        use std::os::fd::AsRawFd;
        let len = (written_to - self.flushed_to) as libc::off64_t;
        // SAFETY: a plain syscall on an open fd; failure only means no early writeback.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                self.flushed_to as libc::off64_t,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed_to = written_to;
    }
}

async fn write_body<S>(
    s: &mut UploadSession,
    expected: Option<u64>,
    body: &mut S,
) -> Result<(), StoreError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    let file = s.file.as_mut().ok_or(StoreError::UploadUnknown)?;
    file.seek(SeekFrom::Start(s.size))?;
    let hasher = s.hasher.as_mut().ok_or(StoreError::UploadUnknown)?;
    let mut kick = WritebackKick { flushed_to: s.size };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, &*file);
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(StoreError::Body)?;
        received += chunk.len() as u64;
        if expected.is_some_and(|e| received > e) {
            return Err(StoreError::SizeInvalid(
                "request body is longer than its declared length".into(),
            ));
        }
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        kick.after_write(out.get_ref(), s.size + received - out.buffer().len() as u64);
    }
    out.flush()?;
    if let Some(e) = expected
        && received != e
    {
        return Err(StoreError::SizeInvalid(format!(
            "request body has {received} bytes, {e} were declared"
        )));
    }
    s.size += received;
    Ok(())
}
