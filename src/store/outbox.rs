//! The durable event outbox: every change a notification endpoint may want to hear about
//! (a push, a delete, a cache fill, a moved upstream tag, an eviction, optionally a pull) is
//! written as a neutral `EventRecord` in the same RocksDB write batch as the change itself, so
//! an acknowledged change always has its event, even across `kill -9`. Delivery (formatting,
//! HTTP, retries) lives outside the store; it reads the outbox in sequence order, keeps one
//! cursor per endpoint, and dead-letters what it gives up on.
//!
//! Sequence numbers are allocated while a batch is built, from an in-memory counter started
//! after the last stored key. Writers commit in any order, so a reader must not pass a number
//! still being written: `watermark` is the highest number below which every allocated number
//! is either committed or abandoned (its batch failed). Readers never look past it.
//!
//! Nothing is recorded for an event kind no endpoint asks for (`Kinds` is empty when no
//! `[[notify]]` endpoint is configured): the feature costs nothing to those who do not use it.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::index::{
    self, CF_EVENT_CURSORS, CF_EVENT_DEAD, CF_EVENTS, CF_META, Index, IndexBatch, IndexError,
};
use super::{Store, StoreError};
use crate::oci::{Digest, RepoName, Tag};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "push")]
    Push,
    #[serde(rename = "delete")]
    Delete,
    #[serde(rename = "pull")]
    Pull,
    #[serde(rename = "cache.fill")]
    CacheFill,
    #[serde(rename = "cache.evict")]
    CacheEvict,
    #[serde(rename = "tag.moved")]
    TagMoved,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Push,
        EventKind::Delete,
        EventKind::Pull,
        EventKind::CacheFill,
        EventKind::CacheEvict,
        EventKind::TagMoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Push => "push",
            EventKind::Delete => "delete",
            EventKind::Pull => "pull",
            EventKind::CacheFill => "cache.fill",
            EventKind::CacheEvict => "cache.evict",
            EventKind::TagMoved => "tag.moved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of event kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub fn with(self, kind: EventKind) -> Self {
        Self(self.0 | kind.bit())
    }
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn union(self, other: Kinds) -> Self {
        Self(self.0 | other.0)
    }
}

impl FromIterator<EventKind> for Kinds {
    fn from_iter<I: IntoIterator<Item = EventKind>>(iter: I) -> Self {
        iter.into_iter().fold(Kinds::default(), Kinds::with)
    }
}

/// One change, as the store saw it; formats are the delivery side's business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub action: EventKind,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `tag.moved`: the digest the tag pointed at before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Unix milliseconds.
    pub time_ms: u64,
}

impl EventRecord {
    /// A record of `action` on `repository` now, the other fields empty.
    pub fn new(action: EventKind, repository: &str) -> Self {
        Self {
            action,
            repository: repository.to_string(),
            digest: None,
            tag: None,
            media_type: None,
            size: None,
            previous: None,
            actor: None,
            time_ms: unix_millis(),
        }
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An event read back from the outbox.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub record: EventRecord,
}

/// A dead-lettered event of one endpoint.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub endpoint: String,
    pub event: StoredEvent,
    /// `transship events retry` asked for it to be delivered again.
    pub retry: bool,
}

struct Seqs {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// The outbox's in-memory state: which kinds to record, the sequence counter, and a wake-up
/// for the delivery tasks.
pub struct Outbox {
    kinds: Kinds,
    seqs: Mutex<Seqs>,
    instance: String,
    /// Woken after every committed event and after `retry_dead_letters`.
    pub notify: tokio::sync::Notify,
    retry_generation: AtomicU64,
}

const INSTANCE_KEY: &[u8] = b"events_instance";
/// Outbox events removed by one `prune_events` at most.
pub const PRUNE_BATCH: usize = 10_000;
const DEAD: u8 = 0;
const RETRY: u8 = 1;
/// Dead letters kept per endpoint: `prune_dead_letters` drops the oldest beyond this, so a
/// receiver that refuses everything for months cannot grow the index without bound.
pub const MAX_DEAD_LETTERS: usize = 10_000;

impl Outbox {
    pub(crate) fn open(index: &Index, kinds: Kinds) -> Result<Self, IndexError> {
        let mut last = 0;
        index.scan_last(CF_EVENTS, |k| last = seq_of(k).unwrap_or(0))?;
        // Pruning can leave the outbox empty: numbering must still go on above everything an
        // endpoint has passed or holds as a dead letter, or new events would sort below its
        // cursor and never be sent.
        index.scan(CF_EVENT_CURSORS, b"", None, |_, v| {
            if let Ok(b) = <[u8; 8]>::try_from(v) {
                last = last.max(u64::from_be_bytes(b));
            }
            true
        })?;
        index.scan(CF_EVENT_DEAD, b"", None, |k, _| {
            if let Some(b) = k.get(k.len().saturating_sub(8)..)
                && let Ok(b) = <[u8; 8]>::try_from(b)
            {
                last = last.max(u64::from_be_bytes(b));
            }
            true
        })?;
        let instance = match index.get(CF_META, INSTANCE_KEY)? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let mut b = index.batch();
                b.put(CF_META, INSTANCE_KEY, id.as_bytes());
                index.write_synced(b)?;
                id
            }
        };
        Ok(Self {
            kinds,
            seqs: Mutex::new(Seqs {
                next: last + 1,
                in_flight: BTreeSet::new(),
            }),
            instance,
            notify: tokio::sync::Notify::new(),
            // Starts above what a reader has seen (0): a retry asked for while the server
            // was stopped is picked up at start.
            retry_generation: AtomicU64::new(1),
        })
    }

    /// Whether events of `kind` are recorded (some endpoint wants them).
    pub fn records(&self, kind: EventKind) -> bool {
        self.kinds.contains(kind)
    }

    /// A stable prefix for event ids: unique to this data directory.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn seqs(&self) -> std::sync::MutexGuard<'_, Seqs> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every sequence number up to this one is committed or abandoned.
    pub fn watermark(&self) -> u64 {
        let s = self.seqs();
        s.in_flight.first().map_or(s.next - 1, |first| first - 1)
    }

    fn allocate(&self, n: usize) -> Vec<u64> {
        let mut s = self.seqs();
        let seqs: Vec<u64> = (s.next..s.next + n as u64).collect();
        s.next += n as u64;
        s.in_flight.extend(&seqs);
        seqs
    }

    /// Bumped by every `retry_dead_letters`: a reader that saw an older value looks for dead
    /// letters marked for retry.
    pub fn retry_generation(&self) -> u64 {
        self.retry_generation.load(Ordering::Acquire)
    }
}

/// Holds the sequence numbers of events added to a batch until the batch is written (or
/// given up): dropping it lets readers pass them. Keep it alive until after the write.
#[must_use = "keep the guard until the batch is written"]
pub struct EventsGuard<'a> {
    outbox: Option<&'a Outbox>,
    seqs: Vec<u64>,
}

impl Drop for EventsGuard<'_> {
    fn drop(&mut self) {
        // Nothing allocated (the kind wanted, but this write raised no event): nobody to wake.
        if let Some(o) = self.outbox.filter(|_| !self.seqs.is_empty()) {
            let mut s = o.seqs();
            for seq in &self.seqs {
                s.in_flight.remove(seq);
            }
            drop(s);
            o.notify.notify_waiters();
        }
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn dead_key(endpoint: &str, seq: u64) -> Vec<u8> {
    let mut k = index::prefix(&[endpoint]);
    k.extend_from_slice(&seq_key(seq));
    k
}

/// Where a dead letter's key splits: `endpoint \0 seq` (the seq's bytes may hold zeros, so
/// split by length).
fn dead_key_split(k: &[u8]) -> Option<usize> {
    k.len().checked_sub(9).filter(|i| k[*i] == 0)
}

fn decode(cf: &'static str, seq: u64, v: &[u8]) -> Result<EventRecord, IndexError> {
    serde_json::from_slice(v).map_err(|e| IndexError::Corrupt {
        cf,
        what: format!("event {seq}: {e}"),
    })
}

impl Store {
    /// The outbox (for delivery: wake-ups, watermark, instance id).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Adds the events `make` builds to `batch`, if any endpoint wants `kind` (`make` is not
    /// called otherwise). Keep the returned guard until the batch is written. This is how a
    /// change records its events: one call while building its batch.
    pub fn record_events(
        &self,
        batch: &mut IndexBatch<'_>,
        kind: EventKind,
        make: impl FnOnce() -> Vec<EventRecord>,
    ) -> EventsGuard<'_> {
        if !self.outbox.kinds.contains(kind) {
            return EventsGuard {
                outbox: None,
                seqs: Vec::new(),
            };
        }
        let records = make();
        let seqs = self.outbox.allocate(records.len());
        for (seq, r) in seqs.iter().zip(&records) {
            match serde_json::to_vec(r) {
                Ok(v) => batch.put(CF_EVENTS, &seq_key(*seq), &v),
                Err(e) => tracing::error!(error = %e, "cannot encode an event record"),
            }
        }
        EventsGuard {
            outbox: Some(&self.outbox),
            seqs,
        }
    }

    /// Records events in a batch of their own written without waiting for the disk (pulls:
    /// one synced write per request would be too dear). Such events can be lost in a crash.
    pub fn record_events_relaxed(
        &self,
        kind: EventKind,
        make: impl FnOnce() -> Vec<EventRecord>,
    ) -> Result<(), StoreError> {
        if !self.outbox.kinds.contains(kind) {
            return Ok(());
        }
        let mut batch = self.index.batch();
        let _guard = self.record_events(&mut batch, kind, make);
        Ok(self.index.write_relaxed(batch)?)
    }

    /// Up to `limit` events after `after`, not past the watermark, in order, and the
    /// watermark used: when fewer than `limit` came back, every event up to it was seen.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<StoredEvent>, u64), StoreError> {
        let upto = self.outbox.watermark();
        let mut out = Vec::new();
        if after >= upto {
            return Ok((out, upto));
        }
        let start = seq_key(after + 1);
        let mut bad = None;
        self.index.scan(CF_EVENTS, b"", Some(&start), |k, v| {
            let Some(seq) = seq_of(k) else { return true };
            if seq > upto || out.len() >= limit {
                return false;
            }
            match decode(CF_EVENTS, seq, v) {
                Ok(record) => out.push(StoredEvent { seq, record }),
                Err(e) => bad = Some(e),
            }
            bad.is_none()
        })?;
        match bad {
            Some(e) => Err(e.into()),
            None => Ok((out, upto)),
        }
    }

    /// Every stored cursor: `(endpoint, last sequence number it is done with)`.
    pub fn event_cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        self.index.scan(CF_EVENT_CURSORS, b"", None, |k, v| {
            if let Ok([c]) = index::decode_u64s::<1>(CF_EVENT_CURSORS, v) {
                out.push((String::from_utf8_lossy(k).into_owned(), c));
            }
            true
        })?;
        Ok(out)
    }

    /// The endpoint's delivery cursor (the last sequence number it is done with).
    pub fn event_cursor(&self, endpoint: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .index
            .get_with(CF_EVENT_CURSORS, endpoint.as_bytes(), |v| {
                index::decode_u64s::<1>(CF_EVENT_CURSORS, v)
            })?
            .transpose()?
            .map(|[s]| s))
    }

    /// Moves the endpoint's cursor. A relaxed write: a cursor lost in a crash only means the
    /// events after the durable one are delivered again (at least once).
    pub fn set_event_cursor(&self, endpoint: &str, seq: u64) -> Result<(), StoreError> {
        let mut b = self.index.batch();
        b.put(
            CF_EVENT_CURSORS,
            endpoint.as_bytes(),
            &index::encode_u64s(&[seq]),
        );
        Ok(self.index.write_relaxed(b)?)
    }

    /// Sets up the cursors of the configured endpoints: a new endpoint starts at the current
    /// end of the outbox (it is not sent history), an endpoint no longer configured loses its
    /// cursor and dead letters. Returns each endpoint's cursor, in the order given.
    pub fn open_event_cursors(&self, endpoints: &[&str]) -> Result<Vec<u64>, StoreError> {
        let mut stale = Vec::new();
        self.index.scan(CF_EVENT_CURSORS, b"", None, |k, _| {
            if !endpoints.iter().any(|e| e.as_bytes() == k) {
                stale.push(k.to_vec());
            }
            true
        })?;
        let mut batch = self.index.batch();
        for k in &stale {
            batch.delete(CF_EVENT_CURSORS, k);
            let p = [k.as_slice(), b"\0"].concat();
            self.index.scan(CF_EVENT_DEAD, &p, None, |dk, _| {
                batch.delete(CF_EVENT_DEAD, dk);
                true
            })?;
        }
        let end = self.outbox.watermark();
        let mut cursors = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let c = match self.event_cursor(e)? {
                Some(c) => c,
                None => {
                    batch.put(CF_EVENT_CURSORS, e.as_bytes(), &index::encode_u64s(&[end]));
                    end
                }
            };
            cursors.push(c);
        }
        self.index.write_synced(batch)?;
        Ok(cursors)
    }

    /// Removes outbox events after `after` up to and including `upto` (every endpoint is
    /// past them), at most `PRUNE_BATCH` at a time. Returns how many went.
    pub fn prune_events(&self, after: u64, upto: u64) -> Result<usize, StoreError> {
        let mut batch = self.index.batch();
        let mut n = 0;
        let start = seq_key(after.saturating_add(1));
        self.index.scan(CF_EVENTS, b"", Some(&start), |k, _| {
            if seq_of(k).is_none_or(|s| s > upto) || n >= PRUNE_BATCH {
                return false;
            }
            batch.delete(CF_EVENTS, k);
            n += 1;
            true
        })?;
        if n > 0 {
            self.index.write_relaxed(batch)?;
        }
        Ok(n)
    }

    /// Keeps an event an endpoint gave up on, for `events ls --failed` and `events retry`.
    /// Durable: the cursor may move past it right after.
    pub fn dead_letter(&self, endpoint: &str, event: &StoredEvent) -> Result<(), StoreError> {
        let mut v = vec![DEAD];
        v.extend(serde_json::to_vec(&event.record).unwrap_or_default());
        let mut b = self.index.batch();
        b.put(CF_EVENT_DEAD, &dead_key(endpoint, event.seq), &v);
        Ok(self.index.write_synced(b)?)
    }

    /// A dead letter was delivered on retry.
    pub fn forget_dead_letter(&self, endpoint: &str, seq: u64) -> Result<(), StoreError> {
        let mut b = self.index.batch();
        b.delete(CF_EVENT_DEAD, &dead_key(endpoint, seq));
        Ok(self.index.write_synced(b)?)
    }

    /// Drops each endpoint's oldest dead letters beyond `keep`; returns how many went.
    pub fn prune_dead_letters(&self, keep: usize) -> Result<usize, StoreError> {
        let mut counts: std::collections::HashMap<Vec<u8>, usize> = Default::default();
        self.index.scan(CF_EVENT_DEAD, b"", None, |k, _| {
            if let Some(split) = dead_key_split(k) {
                *counts.entry(k[..=split].to_vec()).or_default() += 1;
            }
            true
        })?;
        let mut removed = 0;
        for (prefix, count) in counts {
            let mut excess = count.saturating_sub(keep);
            while excess > 0 {
                let mut batch = self.index.batch();
                let mut n = 0;
                self.index.scan(CF_EVENT_DEAD, &prefix, None, |k, _| {
                    if n == excess.min(PRUNE_BATCH) {
                        return false;
                    }
                    batch.delete(CF_EVENT_DEAD, k);
                    n += 1;
                    true
                })?;
                if n == 0 {
                    break;
                }
                self.index.write_relaxed(batch)?;
                excess -= n;
                removed += n;
            }
        }
        Ok(removed)
    }

    /// Dead letters, of one endpoint or all, oldest first per endpoint.
    pub fn dead_letters(&self, endpoint: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let p = endpoint.map(|e| index::prefix(&[e])).unwrap_or_default();
        let mut out = Vec::new();
        let mut bad = None;
        self.index.scan(CF_EVENT_DEAD, &p, None, |k, v| {
            let Some(split) = dead_key_split(k) else {
                return true;
            };
            let (Some(seq), Some((state, json))) = (seq_of(&k[split + 1..]), v.split_first())
            else {
                return true;
            };
            match decode(CF_EVENT_DEAD, seq, json) {
                Ok(record) => out.push(DeadLetter {
                    endpoint: String::from_utf8_lossy(&k[..split]).into_owned(),
                    event: StoredEvent { seq, record },
                    retry: *state == RETRY,
                }),
                Err(e) => bad = Some(e),
            }
            bad.is_none()
        })?;
        match bad {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// Marks every dead letter (of one endpoint or all) for another round of delivery and
    /// wakes the delivery tasks. Returns how many were marked.
    pub fn retry_dead_letters(&self, endpoint: Option<&str>) -> Result<usize, StoreError> {
        let dead = self.dead_letters(endpoint)?;
        let mut b = self.index.batch();
        for d in &dead {
            let mut v = vec![RETRY];
            v.extend(serde_json::to_vec(&d.event.record).unwrap_or_default());
            b.put(CF_EVENT_DEAD, &dead_key(&d.endpoint, d.event.seq), &v);
        }
        if !dead.is_empty() {
            self.index.write_synced(b)?;
        }
        self.outbox.retry_generation.fetch_add(1, Ordering::AcqRel);
        self.outbox.notify.notify_waiters();
        Ok(dead.len())
    }
}

/// A manifest event: `repo@digest` (and `:tag`).
pub fn manifest_event(
    action: EventKind,
    repo: &RepoName,
    digest: &Digest,
    media_type: &str,
    size: usize,
    tag: Option<&Tag>,
) -> EventRecord {
    EventRecord {
        digest: Some(digest.to_string()),
        media_type: Some(media_type.to_string()),
        size: Some(size as u64),
        tag: tag.map(|t| t.as_str().to_string()),
        ..EventRecord::new(action, repo.as_str())
    }
}

/// The event of a tag delete: the tag and the digest it pointed at.
pub(crate) fn tag_delete_event(repo: &RepoName, tag: &Tag, digest: Option<String>) -> EventRecord {
    EventRecord {
        digest,
        tag: Some(tag.as_str().to_string()),
        ..EventRecord::new(EventKind::Delete, repo.as_str())
    }
}

/// One push event per tag the manifest was pushed under, or one without a tag.
pub(crate) fn push_events(
    repo: &RepoName,
    digest: &Digest,
    media_type: &str,
    size: usize,
    tags: &[Tag],
) -> Vec<EventRecord> {
    if tags.is_empty() {
        return vec![manifest_event(
            EventKind::Push,
            repo,
            digest,
            media_type,
            size,
            None,
        )];
    }
    tags.iter()
        .map(|t| manifest_event(EventKind::Push, repo, digest, media_type, size, Some(t)))
        .collect()
}

impl Store {
    /// The digest a tag points at now, read from the index (for events about a tag).
    fn stored_tag_target(&self, repo: &RepoName, tag: &Tag) -> Option<String> {
        self.index
            .get(index::CF_TAGS, &index::key(&[repo.as_str(), tag.as_str()]))
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// The event of a tag delete: the tag and the digest it pointed at.
    pub(crate) fn tag_delete_events(&self, repo: &RepoName, tag: &Tag) -> Vec<EventRecord> {
        vec![tag_delete_event(
            repo,
            tag,
            self.stored_tag_target(repo, tag),
        )]
    }

    /// `tag.moved` if a cached tag pointed at another digest before this write.
    pub(crate) fn tag_moved_events(
        &self,
        repo: &RepoName,
        tag: Option<&Tag>,
        digest: &Digest,
        media_type: &str,
        size: usize,
    ) -> Vec<EventRecord> {
        let Some(tag) = tag else { return Vec::new() };
        let digest_key = digest.to_string();
        match self.stored_tag_target(repo, tag) {
            Some(before) if before != digest_key => vec![EventRecord {
                previous: Some(before),
                ..manifest_event(
                    EventKind::TagMoved,
                    repo,
                    digest,
                    media_type,
                    size,
                    Some(tag),
                )
            }],
            _ => Vec::new(),
        }
    }

    /// `cache.fill` for a manifest newly stored in a cache repository.
    pub(crate) fn manifest_fill_events(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        size: usize,
        tag: Option<&Tag>,
    ) -> Vec<EventRecord> {
        let k = index::key(&[repo.as_str(), &digest.to_string()]);
        if self.index.exists(index::CF_MANIFESTS, &k).unwrap_or(true) {
            return Vec::new();
        }
        vec![manifest_event(
            EventKind::CacheFill,
            repo,
            digest,
            media_type,
            size,
            tag,
        )]
    }
}

/// `cache.fill` for a blob committed by a fill (no upload session); nothing for uploads.
pub(crate) fn blob_fill_events(
    repo: &RepoName,
    digest: &Digest,
    size: u64,
    upload_id: Option<&str>,
) -> Vec<EventRecord> {
    if upload_id.is_some() {
        return Vec::new();
    }
    vec![EventRecord {
        digest: Some(digest.to_string()),
        size: Some(size),
        ..EventRecord::new(EventKind::CacheFill, repo.as_str())
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn store(dir: &std::path::Path, kinds: Kinds) -> Store {
        Store::open(
            dir,
            StoreOptions {
                event_kinds: kinds,
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }

    fn write(s: &Store, kind: EventKind, repo: &str) {
        let mut b = s.index.batch();
        let _g = s.record_events(&mut b, kind, || vec![EventRecord::new(kind, repo)]);
        s.index.write_synced(b).unwrap();
    }

    #[test]
    fn nothing_is_recorded_for_kinds_no_endpoint_wants() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), [EventKind::Push].into_iter().collect());
        let mut b = s.index.batch();
        let _g = s.record_events(&mut b, EventKind::Pull, || panic!("must not be built"));
        assert!(b.is_empty());
        drop(_g);
        write(&s, EventKind::Push, "p/a");
        let got = s.events_after(0, 10).unwrap().0;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.repository, "p/a");
    }

    #[test]
    fn readers_never_pass_a_sequence_number_still_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), [EventKind::Push].into_iter().collect());
        let mut slow = s.index.batch();
        let slow_guard = s.record_events(&mut slow, EventKind::Push, || {
            vec![EventRecord::new(EventKind::Push, "p/slow")]
        });
        write(&s, EventKind::Push, "p/fast");
        // The fast writer (seq 2) committed first, but seq 1 is in flight: nothing visible.
        assert!(s.events_after(0, 10).unwrap().0.is_empty());
        s.index.write_synced(slow).unwrap();
        drop(slow_guard);
        let got: Vec<_> = s
            .events_after(0, 10)
            .unwrap()
            .0
            .into_iter()
            .map(|e| (e.seq, e.record.repository))
            .collect();
        assert_eq!(got, vec![(1, "p/slow".into()), (2, "p/fast".into())]);
    }

    /// Concurrent writers commit out of order; a reader following the watermark still sees
    /// every event exactly once, in sequence order.
    #[test]
    fn a_reader_racing_concurrent_writers_misses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(dir.path(), [EventKind::Push].into_iter().collect()));
        let (writers, each) = (6, 150);
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..each {
                        let mut b = s.index.batch();
                        let _g = s.record_events(&mut b, EventKind::Push, || {
                            vec![EventRecord::new(EventKind::Push, &format!("w{w}/{i}"))]
                        });
                        if i % 3 == 0 {
                            std::thread::yield_now();
                        }
                        s.index.write_relaxed(b).unwrap();
                    }
                })
            })
            .collect();
        let mut cursor = 0;
        let mut seen = Vec::new();
        // Read while the writers run, then once more after they finished.
        let mut last_round = false;
        loop {
            let done = handles.iter().all(|h| h.is_finished());
            let (events, upto) = s.events_after(cursor, 64).unwrap();
            let complete = events.len() < 64;
            for e in events {
                assert!(e.seq > cursor, "in order, once");
                cursor = e.seq;
                seen.push(e.record.repository);
            }
            if complete {
                cursor = cursor.max(upto);
                if last_round {
                    break;
                }
                last_round = done;
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), writers * each);
        assert!(s.events_after(cursor, 64).unwrap().0.is_empty());
    }

    /// The numbers of (up to 10) events after `seq`.
    fn seqs_after(s: &Store, seq: u64) -> Vec<u64> {
        let events = s.events_after(seq, 10).unwrap().0;
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn sequence_cursors_and_dead_letters_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = [EventKind::Push, EventKind::Delete].into_iter().collect();
        {
            let s = store(dir.path(), kinds);
            assert_eq!(s.open_event_cursors(&["a", "b"]).unwrap(), vec![0, 0]);
            write(&s, EventKind::Push, "p/1");
            write(&s, EventKind::Delete, "p/2");
            s.set_event_cursor("a", 1).unwrap();
            let first = s.events_after(0, 1).unwrap().0.remove(0);
            s.dead_letter("b", &first).unwrap();
            s.flush().unwrap();
        }
        let s = store(dir.path(), kinds);
        write(&s, EventKind::Push, "p/3");
        assert_eq!(seqs_after(&s, 0), vec![1, 2, 3]);
        // "c" is new: it starts at the end; "b" is gone: its state goes.
        assert_eq!(s.open_event_cursors(&["a", "c"]).unwrap(), vec![1, 3]);
        assert!(s.dead_letters(None).unwrap().is_empty());
        s.dead_letter("a", &s.events_after(1, 1).unwrap().0[0])
            .unwrap();
        assert_eq!(s.retry_dead_letters(None).unwrap(), 1);
        let dead = s.dead_letters(Some("a")).unwrap();
        assert!(dead[0].retry && dead[0].event.seq == 2);
        assert_eq!(s.prune_events(0, 2).unwrap(), 2);
        assert_eq!(seqs_after(&s, 0), vec![3]);
    }

    #[test]
    fn only_the_newest_dead_letters_of_each_endpoint_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), [EventKind::Push].into_iter().collect());
        for i in 0..7 {
            write(&s, EventKind::Push, &format!("p/{i}"));
        }
        let events = s.events_after(0, 10).unwrap().0;
        for e in &events {
            s.dead_letter("a", e).unwrap();
        }
        s.dead_letter("b", &events[0]).unwrap();
        assert_eq!(s.prune_dead_letters(3).unwrap(), 4);
        let kept: Vec<(String, u64)> = s
            .dead_letters(None)
            .unwrap()
            .into_iter()
            .map(|d| (d.endpoint, d.event.seq))
            .collect();
        let want = [("a", 5), ("a", 6), ("a", 7), ("b", 1)].map(|(e, n)| (e.to_string(), n));
        assert_eq!(kept, want);
        assert_eq!(s.prune_dead_letters(3).unwrap(), 0);
    }

    /// Everything delivered and pruned, then a restart: new events are numbered above the
    /// cursors, so the endpoints see them (they used to start again at 1, below every cursor).
    #[test]
    fn numbering_goes_on_above_the_cursors_after_the_outbox_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = [EventKind::Push].into_iter().collect();
        {
            let s = store(dir.path(), kinds);
            s.open_event_cursors(&["a"]).unwrap();
            for i in 0..3 {
                write(&s, EventKind::Push, &format!("p/{i}"));
            }
            s.set_event_cursor("a", 3).unwrap();
            assert_eq!(s.prune_events(0, 3).unwrap(), 3);
            s.flush().unwrap();
        }
        let s = store(dir.path(), kinds);
        assert_eq!(s.open_event_cursors(&["a"]).unwrap(), vec![3]);
        write(&s, EventKind::Push, "p/after-restart");
        assert_eq!(seqs_after(&s, 3), vec![4]);
    }
}
