//! A cluster replica's local disk cache of bucket blobs (`data_dir/read-cache`): hot blobs are
//! served from local files, as in the local profile, instead of from the bucket on every GET.
//!
//! Files are named `<algorithm>-<hex>` directly in the cache directory; a fetch writes
//! `fetch-<uuid>.tmp` beside them, hashing the bytes as they are written, and renames it into
//! place only when digest and size match, so a name always holds verified bytes (the file is
//! fsynced before the rename: a file found at start is trusted without hashing it again).
//! Which files exist, their sizes and their order of last use are kept in memory; the total
//! stays within a byte budget by unlinking the least recently used files after each insert.
//! An unlinked file stays readable through any descriptor a response still holds.
//!
//! Concurrent misses of one digest share one fetch (single flight): the first caller fetches,
//! the others wait for its outcome and get their own descriptor of the same file, or its error.
//! The fetch runs inside the first caller's future; if that future is dropped, the fetch is
//! cancelled (its temp file removed) and one of the waiters takes over with its own fetch, so
//! nobody inherits another request's cancellation.
//!
//! Files handed out may be shared descriptors (`try_clone`): read them with positional reads
//! (`BlobChunks` maps windows and uses `pread`), never through the shared cursor.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::oci::{Algorithm, Digest, Digester};
use crate::store::WritebackKick;

/// Bytes gathered from the fetch stream before one blocking write-and-hash call.
const WRITE_BATCH: usize = 1 << 20;
/// Temp files: `fetch-<uuid>.tmp`. Anything with this prefix at start is a leftover.
const TEMP_PREFIX: &str = "fetch-";
const TEMP_SUFFIX: &str = ".tmp";
/// A hit moves a file's mtime (its last use across restarts) at most this often: one syscall
/// per file and minute rather than per request.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Where the cache lives and how much it may keep.
#[derive(Debug, Clone)]
pub struct ReadCacheOptions {
    /// `<data_dir>/read-cache`; created if missing.
    pub dir: PathBuf,
    /// Total bytes of cached files, at most.
    pub max_bytes: u64,
}

/// The cache's directory under a replica's `data_dir`.
pub const DIR_NAME: &str = "read-cache";

impl ReadCacheOptions {
    /// `<data_dir>/read-cache` with a budget of `max_bytes`.
    pub fn in_data_dir(data_dir: &Path, max_bytes: u64) -> Self {
        Self {
            dir: data_dir.join(DIR_NAME),
            max_bytes,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadCacheError {
    #[error("read cache: {path}: {source}")]
    Io {
        path: PathBuf,
        source: Arc<io::Error>,
    },
    #[error("fetching {digest} failed: {reason}")]
    Fetch { digest: Digest, reason: String },
    #[error("fetched bytes for {expected} hash to {actual}: refused")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("fetched {digest} is longer than its {expected} bytes: refused")]
    TooLong { digest: Digest, expected: u64 },
    #[error("fetched {digest} ended after {got} of its {expected} bytes: refused")]
    TooShort {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("read cache: a blocking task failed: {0}")]
    Task(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ReadCacheError + '_ {
    move |source| ReadCacheError::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// Removes a file; one already gone is fine (someone wiped the directory, or evicted it).
fn unlink(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "read cache: cannot remove a file");
    }
}

fn fetch_failed(digest: &Digest, e: impl std::fmt::Display) -> ReadCacheError {
    ReadCacheError::Fetch {
        digest: digest.clone(),
        reason: e.to_string(),
    }
}

fn file_name(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().as_str(), digest.hex())
}

/// The digest a cache file is named after; `None` for any other name.
fn parse_file_name(name: &str) -> Option<Digest> {
    let (alg, hex) = name.split_once('-')?;
    let digest: Digest = format!("{}:{hex}", Algorithm::parse(alg)?.as_str())
        .parse()
        .ok()?;
    Some(digest)
}

fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// One cached file as the index knows it.
struct Entry {
    size: u64,
    /// Position in `State::lru` (larger = used later).
    tick: u64,
    /// Tells this insert from a later one of the same digest.
    id: u64,
    /// When its mtime was last moved, if ever in this process.
    touched: Option<Instant>,
}

/// A fetch in progress; waiters clone `done`.
struct Flight {
    id: u64,
    done: watch::Receiver<Option<Outcome>>,
    joined: usize,
}

/// What a finished fetch hands its waiters.
type Outcome = Result<Arc<File>, ReadCacheError>;

#[derive(Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    lru: BTreeMap<u64, Digest>,
    bytes: u64,
    clock: u64,
    flights: HashMap<Digest, Flight>,
}

impl State {
    fn next(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn insert(&mut self, digest: Digest, size: u64, touched: Option<Instant>) {
        self.remove(&digest);
        let tick = self.next();
        self.lru.insert(tick, digest.clone());
        self.bytes += size;
        let entry = Entry {
            size,
            tick,
            id: tick,
            touched,
        };
        self.entries.insert(digest, entry);
    }

    fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        let entry = self.entries.remove(digest)?;
        self.lru.remove(&entry.tick);
        self.bytes -= entry.size;
        Some(entry)
    }

    /// Removes the entry only if it is still the insert `id` (not a newer one).
    fn remove_if(&mut self, digest: &Digest, id: u64) {
        if self.entries.get(digest).is_some_and(|e| e.id == id) {
            self.remove(digest);
        }
    }

    /// Marks a use; says whether the file's mtime should be moved too.
    fn used(&mut self, digest: &Digest, now: Instant) -> bool {
        let tick = self.next();
        let Some(entry) = self.entries.get_mut(digest) else {
            return false;
        };
        // The digest moves to its new position without another allocation.
        let key = self
            .lru
            .remove(&entry.tick)
            .unwrap_or_else(|| digest.clone());
        entry.tick = tick;
        self.lru.insert(tick, key);
        let touch = entry
            .touched
            .is_none_or(|t| now.duration_since(t) >= TOUCH_EVERY);
        if touch {
            entry.touched = Some(now);
        }
        touch
    }

    /// Takes least recently used entries out until the total fits `max_bytes`.
    fn evict_over(&mut self, max_bytes: u64) -> Vec<Digest> {
        let mut victims = Vec::new();
        while self.bytes > max_bytes {
            let Some((_, digest)) = self.lru.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&digest) {
                self.bytes -= entry.size;
            }
            victims.push(digest);
        }
        victims
    }

    fn end_flight(&mut self, digest: &Digest, id: u64) {
        if self.flights.get(digest).is_some_and(|f| f.id == id) {
            self.flights.remove(digest);
        }
    }
}

/// What the cache did since it was opened (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCacheStats {
    /// Requests served from a cached file.
    pub hits: u64,
    /// Fetches started (one per flight, plus any a waiter started after its leader left).
    pub fetches: u64,
    /// Requests that waited for another's fetch and got its outcome.
    pub shared: u64,
    /// Files unlinked to stay within the budget.
    pub evicted: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    fetches: AtomicU64,
    shared: AtomicU64,
    evicted: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    counters: Counters,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(file_name(digest))
    }

    fn unlink_all(&self, victims: &[Digest]) {
        bump(&self.counters.evicted, victims.len() as u64);
        for digest in victims {
            unlink(&self.path(digest));
        }
    }

    /// Verifies a fully written temp file and makes it the cached copy, or (over the budget,
    /// or with the directory wiped meanwhile) hands it out unlinked. Blocking.
    fn commit(
        &self,
        spool: Spool,
        digest: &Digest,
        size: u64,
        flight: u64,
    ) -> Result<File, ReadCacheError> {
        let Spool {
            file,
            mut temp,
            hasher,
            written,
            ..
        } = spool;
        if written != size {
            return Err(ReadCacheError::TooShort {
                digest: digest.clone(),
                expected: size,
                got: written,
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(ReadCacheError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        if size > self.max_bytes {
            // Larger than the whole budget: served from the unlinked file, not kept.
            return Ok(file);
        }
        let Some(temp_path) = temp.0.clone() else {
            return Ok(file);
        };
        file.sync_data().map_err(io_error(&temp_path))?;
        let dest = self.path(digest);
        match fs::rename(&temp_path, &dest) {
            Ok(()) => temp.0 = None,
            // The directory was wiped under the fetch: serve these bytes, keep nothing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(file),
            Err(e) => return Err(io_error(&dest)(e)),
        }
        let victims = {
            let mut state = self.state();
            state.insert(digest.clone(), size, Some(Instant::now()));
            state.end_flight(digest, flight);
            state.evict_over(self.max_bytes)
        };
        self.unlink_all(&victims);
        Ok(file)
    }
}

/// A replica's read cache; clones share it.
#[derive(Clone)]
pub struct ReadCache {
    inner: Arc<Inner>,
}

enum Role {
    /// The index has the file now (inserted since the caller looked): look again.
    Cached,
    Wait(watch::Receiver<Option<Outcome>>),
    Lead(Lead),
}

impl ReadCache {
    /// Creates the directory if need be, removes leftover temp files and indexes the cached
    /// files by size, oldest mtime first (no hashing: names are only ever given to verified,
    /// fsynced bytes). Files beyond the budget are evicted; unknown names are left alone.
    pub fn open(options: ReadCacheOptions) -> Result<Self, ReadCacheError> {
        let dir = options.dir;
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if is_temp(name) {
                unlink(&entry.path());
                continue;
            }
            let Some(digest) = parse_file_name(name) else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&entry.path())(e)),
            };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, digest, meta.len()));
        }
        found.sort_by_key(|(used, _, _)| *used);
        let mut state = State::default();
        for (_, digest, size) in found {
            state.insert(digest, size, None);
        }
        let victims = state.evict_over(options.max_bytes);
        let inner = Inner {
            dir,
            max_bytes: options.max_bytes,
            state: Mutex::new(state),
            counters: Counters::default(),
        };
        inner.unlink_all(&victims);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The cached file of `digest`, if it is there with exactly `size` bytes; records the
    /// use. A file that has gone (a wiped directory) or has another length is a miss and
    /// leaves the index.
    pub fn open_cached(&self, digest: &Digest, size: u64) -> Option<File> {
        let now = Instant::now();
        let (id, touch) = {
            let mut state = self.inner.state();
            let entry = state.entries.get(digest)?;
            let id = entry.id;
            if entry.size != size {
                state.remove(digest);
                drop(state);
                unlink(&self.inner.path(digest));
                return None;
            }
            (id, state.used(digest, now))
        };
        let path = self.inner.path(digest);
        let file = File::open(&path)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.len() == size));
        let Some(file) = file else {
            self.inner.state().remove_if(digest, id);
            return None;
        };
        if touch {
            // Last use across restarts; failing only makes the order after a restart stale.
            let _ = file.set_modified(SystemTime::now());
        }
        bump(&self.inner.counters.hits, 1);
        Some(file)
    }

    /// The cached file of `digest`, fetching it on a miss: one fetch per digest however many
    /// callers miss at once (the others wait and share its file or its error; the next call
    /// after a failure fetches again). The bytes are written to a temp file and hashed on the
    /// blocking pool while the next batch arrives, and become visible only when digest and
    /// size match. A blob larger than the whole budget is served from an unlinked file.
    pub async fn get_or_fetch<F, Fut, S, E>(
        &self,
        digest: &Digest,
        size: u64,
        fetch: F,
    ) -> Result<File, ReadCacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<S, E>>,
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let lead = loop {
            if let Some(file) = self.open_cached(digest, size) {
                return Ok(file);
            }
            match self.join_or_lead(digest) {
                Role::Cached => continue,
                Role::Lead(lead) => break lead,
                Role::Wait(mut done) => {
                    let outcome = match done.wait_for(Option::is_some).await {
                        Ok(outcome) => outcome.clone(),
                        // The fetching request went away without an outcome: take over.
                        Err(_) => continue,
                    };
                    let path = self.inner.path(digest);
                    if let Some(outcome) = outcome {
                        bump(&self.inner.counters.shared, 1);
                        return outcome.and_then(|f| f.try_clone().map_err(io_error(&path)));
                    }
                }
            }
        };
        bump(&self.inner.counters.fetches, 1);
        let outcome = async {
            // Recreated if someone removed it: one mkdir, EEXIST as a rule.
            let dir = &self.inner.dir;
            fs::create_dir_all(dir).map_err(io_error(dir))?;
            let spool = Spool::create(dir, digest.algorithm())?;
            let stream = fetch().await.map_err(|e| fetch_failed(digest, e))?;
            self.spool(digest, size, lead.id, spool, stream).await
        };
        lead.finish(outcome.await)
    }

    /// Decides, under the lock, whether this caller waits for a fetch or starts one.
    fn join_or_lead(&self, digest: &Digest) -> Role {
        let mut state = self.inner.state();
        if state.entries.contains_key(digest) {
            return Role::Cached;
        }
        if let Some(flight) = state.flights.get_mut(digest) {
            flight.joined += 1;
            return Role::Wait(flight.done.clone());
        }
        let id = state.next();
        let (tx, done) = watch::channel(None);
        state.flights.insert(
            digest.clone(),
            Flight {
                id,
                done,
                joined: 0,
            },
        );
        Role::Lead(Lead {
            cache: Arc::clone(&self.inner),
            digest: digest.clone(),
            id,
            tx,
        })
    }

    /// The leader's fetch into its temp file, then the commit.
    async fn spool<S, E>(
        &self,
        digest: &Digest,
        size: u64,
        flight: u64,
        spool: Spool,
        stream: S,
    ) -> Result<File, ReadCacheError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let mut stream = std::pin::pin!(stream);
        let mut pipe = Pipe {
            idle: Some(spool),
            busy: None,
        };
        let mut received = 0u64;
        loop {
            let batch = gather(&mut stream, &mut received)
                .await
                .map_err(|e| fetch_failed(digest, e))?;
            if received > size {
                return Err(ReadCacheError::TooLong {
                    digest: digest.clone(),
                    expected: size,
                });
            }
            if batch.is_empty() {
                break;
            }
            pipe.push(batch).await?;
        }
        let spool = pipe.drain().await?;
        let inner = Arc::clone(&self.inner);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || inner.commit(spool, &digest, size, flight))
            .await
            .map_err(|e| ReadCacheError::Task(e.to_string()))?
    }

    /// Forgets and unlinks the cached file of `digest` (after a delete, say). A descriptor
    /// already handed out keeps reading. Unlinking a large file can take a moment: call it
    /// off the async workers where that matters.
    pub fn remove(&self, digest: &Digest) {
        if self.inner.state().remove(digest).is_some() {
            unlink(&self.inner.path(digest));
        }
    }

    /// Bytes and files the cache holds.
    pub fn usage(&self) -> (u64, u64) {
        let state = self.inner.state();
        (state.bytes, state.entries.len() as u64)
    }

    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    pub fn stats(&self) -> ReadCacheStats {
        let c = &self.inner.counters;
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ReadCacheStats {
            hits: get(&c.hits),
            fetches: get(&c.fetches),
            shared: get(&c.shared),
            evicted: get(&c.evicted),
        }
    }

    /// How many callers wait for the fetch of `digest` in progress (tests synchronise on it).
    #[cfg(test)]
    fn waiting(&self, digest: &Digest) -> usize {
        self.inner
            .state()
            .flights
            .get(digest)
            .map_or(0, |f| f.joined)
    }
}

/// The fetching caller's side of a flight. Dropped without `finish` (its request went away),
/// it ends the flight without an outcome, and the waiters take over.
struct Lead {
    cache: Arc<Inner>,
    digest: Digest,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Lead {
    /// Ends the flight (no one joins it after this) and hands the outcome to its waiters.
    fn finish(&self, outcome: Result<File, ReadCacheError>) -> Result<File, ReadCacheError> {
        let inner = &self.cache;
        inner.state().end_flight(&self.digest, self.id);
        if self.tx.receiver_count() > 0 {
            let shared = match &outcome {
                Ok(file) => file
                    .try_clone()
                    .map(Arc::new)
                    .map_err(io_error(&inner.path(&self.digest))),
                Err(e) => Err(e.clone()),
            };
            self.tx.send_replace(Some(shared));
        }
        outcome
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // Before `tx` goes: a waiter woken by its closing must not find this flight again.
        self.cache.state().end_flight(&self.digest, self.id);
    }
}

/// A temp file's name, unlinked when dropped unless taken.
struct TempName(Option<PathBuf>);

impl Drop for TempName {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            unlink(&path);
        }
    }
}

/// A fetch being written: the temp file, its hash so far and how much is in it.
struct Spool {
    file: File,
    temp: TempName,
    hasher: Digester,
    written: u64,
    kick: WritebackKick,
}

impl Spool {
    fn create(dir: &Path, algorithm: Algorithm) -> Result<Self, ReadCacheError> {
        let path = dir.join(format!(
            "{TEMP_PREFIX}{}{TEMP_SUFFIX}",
            uuid::Uuid::new_v4()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        Ok(Self {
            file,
            temp: TempName(Some(path)),
            hasher: Digester::new(algorithm),
            written: 0,
            kick: WritebackKick::from(0),
        })
    }

    /// Hashes and appends one batch (positional, so the descriptor's cursor stays at 0).
    /// Blocking.
    fn append(&mut self, batch: &[u8]) -> io::Result<()> {
        self.hasher.update(batch);
        self.file.write_all_at(batch, self.written)?;
        self.written += batch.len() as u64;
        self.kick.after_write(&self.file, self.written);
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.temp.0.clone().unwrap_or_default()
    }
}

/// The spool with at most one batch being written on the blocking pool, so the next batch
/// arrives while the last is written. Dropped mid-write, the running write finishes and drops
/// the spool on its thread (unlinking the temp file).
struct Pipe {
    idle: Option<Spool>,
    busy: Option<JoinHandle<(Spool, io::Result<()>)>>,
}

impl Pipe {
    /// Waits for the write in flight, if any.
    async fn settle(&mut self) -> Result<(), ReadCacheError> {
        if let Some(task) = self.busy.take() {
            let (spool, written) = task
                .await
                .map_err(|e| ReadCacheError::Task(e.to_string()))?;
            written.map_err(io_error(&spool.path()))?;
            self.idle = Some(spool);
        }
        Ok(())
    }

    async fn push(&mut self, batch: Bytes) -> Result<(), ReadCacheError> {
        self.settle().await?;
        let mut spool = self
            .idle
            .take()
            .ok_or_else(|| ReadCacheError::Task("the temp file was lost".into()))?;
        self.busy = Some(tokio::task::spawn_blocking(move || {
            let written = spool.append(&batch);
            (spool, written)
        }));
        Ok(())
    }

    async fn drain(mut self) -> Result<Spool, ReadCacheError> {
        self.settle().await?;
        self.idle
            .take()
            .ok_or_else(|| ReadCacheError::Task("the temp file was lost".into()))
    }
}

/// Up to about `WRITE_BATCH` bytes from the stream (a big chunk passes whole); empty at its
/// end. Counts what arrived into `received` (the caller refuses a batch past the size).
async fn gather<S, E>(stream: &mut Pin<&mut S>, received: &mut u64) -> Result<Bytes, E>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let mut buf = BytesMut::new();
    while buf.len() < WRITE_BATCH {
        let Some(chunk) = stream.next().await else {
            break;
        };
        let chunk = chunk?;
        *received += chunk.len() as u64;
        if buf.is_empty() && chunk.len() >= WRITE_BATCH {
            return Ok(chunk);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::stream;
    use tokio::sync::Semaphore;

    use super::*;

    type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

    fn cache(dir: &Path, max_bytes: u64) -> ReadCache {
        ReadCache::open(ReadCacheOptions {
            dir: dir.to_path_buf(),
            max_bytes,
        })
        .expect("open read cache")
    }

    /// `len` bytes that differ per `seed`, and their digest.
    fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        (Digest::sha256_of(&bytes), Bytes::from(bytes))
    }

    /// The bytes in 64 KiB chunks (several write batches for a blob over 1 MiB).
    fn chunks(bytes: &Bytes) -> Chunks {
        let pieces: Vec<Result<Bytes, String>> = bytes
            .chunks(64 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(stream::iter(pieces))
    }

    /// A cache with a fetch counter and a gate that holds fetched bytes back.
    struct Rig {
        cache: ReadCache,
        calls: Arc<AtomicUsize>,
        started: Arc<Semaphore>,
        gate: Arc<Semaphore>,
    }

    impl Rig {
        fn new(dir: &Path, max_bytes: u64) -> Self {
            Self {
                cache: cache(dir, max_bytes),
                calls: Arc::new(AtomicUsize::new(0)),
                started: Arc::new(Semaphore::new(0)),
                gate: Arc::new(Semaphore::new(0)),
            }
        }

        /// A counted fetch whose stream says it started (a permit on `started`), waits for a
        /// permit of `gate` before yielding `bytes`, then ends with `tail` (an error, say).
        fn gated(
            &self,
            bytes: Bytes,
            tail: Option<String>,
        ) -> impl FnOnce() -> std::future::Ready<Result<Chunks, String>> + Send + 'static {
            let (started, gate) = (Arc::clone(&self.started), Arc::clone(&self.gate));
            counted(&self.calls, move || {
                let head = stream::once(async move {
                    started.add_permits(1);
                    let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
                    Ok(bytes)
                });
                Box::pin(head.chain(stream::iter(tail.map(Err))))
            })
        }

        /// `get_or_fetch` of a gated fetch on a task of its own.
        fn spawn_gated(
            &self,
            digest: &Digest,
            size: u64,
            bytes: Bytes,
            tail: Option<String>,
        ) -> JoinHandle<Result<Vec<u8>, ReadCacheError>> {
            let (cache, digest) = (self.cache.clone(), digest.clone());
            let fetch = self.gated(bytes, tail);
            tokio::spawn(async move {
                let file = cache.get_or_fetch(&digest, size, fetch).await?;
                Ok(contents(&file))
            })
        }

        /// Until `n` callers of `digest` have started a fetch or joined one.
        async fn joined(&self, digest: &Digest, n: usize) {
            while self.calls.load(Ordering::SeqCst) + self.cache.waiting(digest) < n {
                tokio::task::yield_now().await;
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    /// A fetch that counts its calls and yields `make()`.
    fn counted(
        calls: &Arc<AtomicUsize>,
        make: impl FnOnce() -> Chunks + Send + 'static,
    ) -> impl FnOnce() -> std::future::Ready<Result<Chunks, String>> + Send + 'static {
        let calls = Arc::clone(calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(make()))
        }
    }

    /// The whole file, by positional reads.
    fn contents(file: &File) -> Vec<u8> {
        let len = file.metadata().expect("metadata").len();
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, 0).expect("read");
        buf
    }

    /// Names in the cache directory, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn fill(cache: &ReadCache, digest: &Digest, bytes: &Bytes) -> File {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = bytes.clone();
        cache
            .get_or_fetch(
                digest,
                bytes.len() as u64,
                counted(&calls, move || chunks(&b)),
            )
            .await
            .expect("fetch")
    }

    #[tokio::test]
    async fn a_miss_fetches_once_then_hits_from_disk() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("read-cache");
        let cache = cache(&dir, 64 << 20);
        let (digest, bytes) = blob(1, (3 << 20) + 123);
        let size = bytes.len() as u64;
        assert!(cache.open_cached(&digest, size).is_none());

        let calls = Arc::new(AtomicUsize::new(0));
        let b = bytes.clone();
        let file = cache
            .get_or_fetch(&digest, size, counted(&calls, move || chunks(&b)))
            .await
            .expect("fetch");
        assert_eq!(contents(&file), bytes);
        assert_eq!(cache.usage(), (size, 1));
        assert_eq!(names(&dir), vec![file_name(&digest)]);
        assert_eq!(fs::read(dir.join(file_name(&digest))).expect("file"), bytes);

        let hit = cache.open_cached(&digest, size).expect("hit");
        assert_eq!(contents(&hit), bytes);
        let again = cache
            .get_or_fetch(&digest, size, counted(&calls, || unreachable!()))
            .await
            .expect("hit");
        assert_eq!(contents(&again), bytes);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.fetches, stats.shared), (2, 1, 0));
        // Another size is a miss (and drops the file: the record and the file disagree).
        assert!(cache.open_cached(&digest, size + 1).is_none());
        assert_eq!(cache.usage(), (0, 0));
        assert!(names(&dir).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_fetch() {
        const N: usize = 16;
        let tmp = tempfile::tempdir().expect("tempdir");
        let rig = Rig::new(tmp.path(), 64 << 20);
        let (digest, bytes) = blob(2, (2 << 20) + 7);
        let size = bytes.len() as u64;
        let tasks: Vec<_> = (0..N)
            .map(|_| rig.spawn_gated(&digest, size, bytes.clone(), None))
            .collect();
        // The bytes flow only once everyone is either fetching or waiting for a fetch.
        rig.joined(&digest, N).await;
        rig.gate.add_permits(N);
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("fetch"), bytes);
        }
        assert_eq!(rig.calls(), 1);
        let stats = rig.cache.stats();
        assert_eq!((stats.fetches, stats.shared), (1, N as u64 - 1));
        assert_eq!(rig.cache.usage(), (size, 1));
        assert_eq!(names(tmp.path()), vec![file_name(&digest)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_fails_its_waiters_and_the_next_call_retries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rig = Rig::new(tmp.path(), 64 << 20);
        let (digest, bytes) = blob(3, 100_000);
        let size = bytes.len() as u64;
        let reset = Some("upstream reset the connection".to_string());
        let tasks: Vec<_> = (0..4)
            .map(|_| rig.spawn_gated(&digest, size, bytes.slice(..50_000), reset.clone()))
            .collect();
        rig.joined(&digest, 4).await;
        rig.gate.add_permits(4);
        for task in tasks {
            let err = task.await.expect("task").expect_err("the fetch failed");
            assert!(matches!(err, ReadCacheError::Fetch { .. }), "{err}");
            assert!(err.to_string().contains("upstream reset"), "{err}");
        }
        assert_eq!(rig.calls(), 1);
        assert_eq!(rig.cache.usage(), (0, 0));
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));

        let file = fill(&rig.cache, &digest, &bytes).await;
        assert_eq!(contents(&file), bytes);
        assert_eq!(rig.cache.usage(), (size, 1));
    }

    #[tokio::test]
    async fn wrong_bytes_or_sizes_are_refused_and_not_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = cache(tmp.path(), 64 << 20);
        let (digest, bytes) = blob(4, (1 << 20) + 5);
        let (_, other) = blob(5, bytes.len());
        let size = bytes.len() as u64;
        let calls = Arc::new(AtomicUsize::new(0));

        let err = cache
            .get_or_fetch(&digest, size, counted(&calls, move || chunks(&other)))
            .await
            .expect_err("wrong bytes");
        assert!(
            matches!(err, ReadCacheError::DigestMismatch { .. }),
            "{err}"
        );
        let b = bytes.clone();
        let err = cache
            .get_or_fetch(&digest, size - 1, counted(&calls, move || chunks(&b)))
            .await
            .expect_err("longer than said");
        assert!(matches!(err, ReadCacheError::TooLong { .. }), "{err}");
        let b = bytes.clone();
        let err = cache
            .get_or_fetch(&digest, size + 1, counted(&calls, move || chunks(&b)))
            .await
            .expect_err("shorter than said");
        assert!(
            matches!(err, ReadCacheError::TooShort { got, .. } if got == size),
            "{err}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.usage(), (0, 0));
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
        assert!(cache.open_cached(&digest, size).is_none());
    }

    #[tokio::test]
    async fn least_recently_used_files_go_first_and_open_ones_keep_reading() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = cache(tmp.path(), 300);
        let [a, b, c, d] = [10, 11, 12, 13].map(|seed| blob(seed, 100));
        let held_b = fill(&cache, &b.0, &b.1).await;
        fill(&cache, &a.0, &a.1).await;
        fill(&cache, &c.0, &c.1).await;
        // b is older than a and c, but a use makes it the most recent; a is now the oldest.
        let used_b = cache.open_cached(&b.0, 100).expect("hit");
        fill(&cache, &d.0, &d.1).await;
        let mut kept = vec![file_name(&b.0), file_name(&c.0), file_name(&d.0)];
        kept.sort();
        assert_eq!(names(tmp.path()), kept);
        assert_eq!(cache.usage(), (300, 3));
        assert!(cache.open_cached(&a.0, 100).is_none());

        // Evict b (the oldest now) with a blob of 200 bytes: c goes too.
        let (e, e_bytes) = blob(14, 200);
        fill(&cache, &e, &e_bytes).await;
        let mut kept = vec![file_name(&d.0), file_name(&e)];
        kept.sort();
        assert_eq!(names(tmp.path()), kept);
        assert_eq!(cache.usage(), (300, 2));
        assert_eq!(cache.stats().evicted, 3);
        // The descriptors handed out before still read the evicted bytes.
        assert_eq!(contents(&held_b), b.1);
        assert_eq!(contents(&used_b), b.1);

        cache.remove(&d.0);
        assert_eq!(names(tmp.path()), vec![file_name(&e)]);
        assert_eq!(cache.usage(), (200, 1));
    }

    #[tokio::test]
    async fn a_blob_over_the_budget_is_served_but_not_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = cache(tmp.path(), 1000);
        let (digest, bytes) = blob(6, 1001);
        let file = fill(&cache, &digest, &bytes).await;
        assert_eq!(contents(&file), bytes);
        assert_eq!(cache.usage(), (0, 0));
        assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
    }

    #[tokio::test]
    async fn reopening_finds_files_by_last_use_and_drops_temp_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let [a, b, c] = [20, 21, 22].map(|seed| blob(seed, 100));
        {
            let cache = cache(tmp.path(), 1000);
            for (digest, bytes) in [&a, &b, &c] {
                fill(&cache, digest, bytes).await;
            }
        }
        // b was used last, a before it, c long ago; a crash left a temp file; a file of the
        // right name lost its tail; someone put a note there.
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        for (digest, when) in [(&a.0, 2_000_000_000), (&b.0, 2_000_000_100), (&c.0, 1)] {
            let file = File::options()
                .write(true)
                .open(tmp.path().join(file_name(digest)))
                .expect("open");
            file.set_modified(at(when)).expect("set mtime");
        }
        fs::write(tmp.path().join("fetch-0000.tmp"), b"partial").expect("temp");
        fs::write(tmp.path().join("NOTES"), b"mine").expect("note");
        let (short, short_bytes) = blob(23, 100);
        fs::write(tmp.path().join(file_name(&short)), &short_bytes[..60]).expect("short");

        // Room for three of the four named files: the least recently used (c) goes.
        let cache = cache(tmp.path(), 300);
        assert_eq!(cache.usage(), (260, 3));
        let mut left = vec![
            "NOTES".to_string(),
            file_name(&a.0),
            file_name(&b.0),
            file_name(&short),
        ];
        left.sort();
        assert_eq!(names(tmp.path()), left);
        assert_eq!(contents(&cache.open_cached(&a.0, 100).expect("a")), a.1);
        assert_eq!(contents(&cache.open_cached(&b.0, 100).expect("b")), b.1);
        assert!(cache.open_cached(&c.0, 100).is_none());
        // The short file is not served for its digest's size, and goes.
        assert!(cache.open_cached(&short, 100).is_none());
        assert!(!tmp.path().join(file_name(&short)).exists());
        assert_eq!(cache.usage(), (200, 2));
        assert_eq!(
            contents(&fill(&cache, &short, &short_bytes).await),
            short_bytes
        );
    }

    #[tokio::test]
    async fn a_wiped_directory_is_a_miss_and_comes_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("read-cache");
        let rig = Rig::new(&dir, 1 << 20);
        let cache = &rig.cache;
        let (digest, bytes) = blob(30, 5000);
        let size = bytes.len() as u64;
        fill(cache, &digest, &bytes).await;
        fs::remove_dir_all(&dir).expect("wipe");
        assert!(cache.open_cached(&digest, size).is_none());
        assert_eq!(cache.usage(), (0, 0));
        assert_eq!(contents(&fill(cache, &digest, &bytes).await), bytes);
        assert_eq!(names(&dir), vec![file_name(&digest)]);

        // Wiped in the middle of a fetch: the bytes are served, nothing is kept.
        let (other, other_bytes) = blob(31, 5000);
        let fetching = rig.spawn_gated(&other, 5000, other_bytes.clone(), None);
        let _started = rig.started.acquire().await.expect("started");
        fs::remove_dir_all(&dir).expect("wipe");
        rig.gate.add_permits(1);
        assert_eq!(fetching.await.expect("task").expect("served"), other_bytes);
        assert!(!dir.exists());
        assert_eq!(
            contents(&fill(cache, &other, &other_bytes).await),
            other_bytes
        );
        assert_eq!(names(&dir), vec![file_name(&other)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_takes_over_when_the_fetching_request_goes_away() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rig = Rig::new(tmp.path(), 1 << 20);
        let (digest, bytes) = blob(40, 70_000);
        let size = bytes.len() as u64;
        // The gate never opens for the first caller.
        let leader = rig.spawn_gated(&digest, size, bytes.clone(), None);
        let _started = rig.started.acquire().await.expect("started");
        let waiter = {
            let (cache, digest, b) = (rig.cache.clone(), digest.clone(), bytes.clone());
            let fetch = counted(&rig.calls, move || chunks(&b));
            tokio::spawn(async move { cache.get_or_fetch(&digest, size, fetch).await })
        };
        rig.joined(&digest, 2).await;
        leader.abort();
        assert!(leader.await.expect_err("aborted").is_cancelled());
        let file = waiter.await.expect("task").expect("fetch");
        assert_eq!(contents(&file), bytes);
        assert_eq!(rig.calls(), 2);
        // The abandoned fetch's temp file is gone; only the verified file is there.
        assert_eq!(names(tmp.path()), vec![file_name(&digest)]);
    }

    #[test]
    fn file_names_round_trip_and_nothing_else_parses() {
        let digest = Digest::sha256_of(b"x");
        assert_eq!(parse_file_name(&file_name(&digest)), Some(digest));
        let sha512 = Digest::of(Algorithm::Sha512, b"x");
        assert_eq!(parse_file_name(&file_name(&sha512)), Some(sha512));
        for other in ["NOTES", "sha256-abc", "md5-00", "fetch-1.tmp", "sha256"] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
        assert!(is_temp("fetch-0000.tmp") && !is_temp("sha256-00"));
    }
}
