//! What the cluster profile records in the shared event outbox: the same kinds and records
//! as the local profile (`store::outbox`'s builders), encoded here and handed to the
//! database methods that insert them in the change's own transaction. Only kinds some
//! `[[notify]]` endpoint wants are recorded, so without endpoints nothing is.

use std::sync::Arc;

use super::cluster::ClusterStore;
use crate::oci::{Digest, RepoName, Tag};
use crate::store::StoreError;
use crate::store::outbox::{self, EventKind, EventRecord, Kinds};

/// The kinds to record, and a wake-up for this replica's delivery tasks.
#[derive(Default)]
pub struct EventRecorder {
    kinds: Kinds,
    wake: Arc<tokio::sync::Notify>,
}

impl EventRecorder {
    /// The records `make` builds, encoded, if `kind` is wanted (`make` is not called
    /// otherwise).
    fn encode(&self, kind: EventKind, make: impl FnOnce() -> Vec<EventRecord>) -> Vec<Vec<u8>> {
        if !self.kinds.contains(kind) {
            return Vec::new();
        }
        make()
            .iter()
            .filter_map(|r| match serde_json::to_vec(r) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an event record");
                    None
                }
            })
            .collect()
    }

    /// After a commit that recorded `events`: wakes this replica's delivery tasks (other
    /// replicas find them at their next poll).
    fn committed(&self, events: &[Vec<u8>]) {
        if !events.is_empty() {
            self.wake.notify_waiters();
        }
    }
}

impl ClusterStore {
    /// Records the kinds the configured endpoints want (none until called).
    pub fn set_event_kinds(&mut self, kinds: Kinds) {
        self.events.kinds = kinds;
    }

    /// Whether events of `kind` are recorded.
    pub fn records(&self, kind: EventKind) -> bool {
        self.events.kinds.contains(kind)
    }

    /// Notified after each commit on this replica that recorded events.
    pub fn event_wake(&self) -> Arc<tokio::sync::Notify> {
        self.events.wake.clone()
    }

    pub(super) fn push_events(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        size: usize,
        tags: &[Tag],
    ) -> Vec<Vec<u8>> {
        self.events.encode(EventKind::Push, || {
            outbox::push_events(repo, digest, media_type, size, tags)
        })
    }

    pub(super) fn tag_delete_events(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: &str,
    ) -> Vec<Vec<u8>> {
        self.events.encode(EventKind::Delete, || {
            vec![outbox::tag_delete_event(
                repo,
                tag,
                Some(digest.to_string()),
            )]
        })
    }

    /// The delete event of manifest `digest`, read before the delete (a manifest's bytes never
    /// change, so its media type and size are what the delete removes).
    pub(super) async fn manifest_delete_events(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        if !self.records(EventKind::Delete) {
            return Ok(Vec::new());
        }
        let Some((media_type, body)) = self.db().manifest(repo, digest).await? else {
            return Ok(Vec::new());
        };
        Ok(self.events.encode(EventKind::Delete, || {
            vec![outbox::manifest_event(
                EventKind::Delete,
                repo,
                digest,
                &media_type,
                body.len(),
                None,
            )]
        }))
    }

    /// The records `make` builds, encoded, if `kind` is recorded.
    pub(super) fn encode_events(
        &self,
        kind: EventKind,
        make: impl FnOnce() -> Vec<EventRecord>,
    ) -> Vec<Vec<u8>> {
        self.events.encode(kind, make)
    }

    pub(super) fn events_committed(&self, events: &[Vec<u8>]) {
        self.events.committed(events);
    }

    /// Records events that go with no change (pulls), in a transaction of their own.
    pub async fn record_events_alone(
        &self,
        kind: EventKind,
        make: impl FnOnce() -> Vec<EventRecord>,
    ) -> Result<(), StoreError> {
        let events = self.events.encode(kind, make);
        if events.is_empty() {
            return Ok(());
        }
        self.db().append_events(&events).await?;
        self.events.committed(&events);
        Ok(())
    }
}
