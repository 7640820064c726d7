//! Notifications: delivery of the store's durable event outbox to the `[[notify]]` webhook
//! endpoints (`delivery`), in the format each asks for (`format`), and the `transship events`
//! listing and retry (`listing`). The store records events in the write batch of the change
//! they report; this module only reads them, so it never slows a push or a pull.

pub mod cluster;
pub mod delivery;
pub mod format;
pub mod listing;
pub mod source;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::App;
use crate::config::{NotifyConfig, NotifyEvent};
use crate::oci::{Reference, RepoName};
use crate::store::StoredManifest;
use crate::store::outbox::{EventKind, Kinds, manifest_event};

pub fn kind_of(e: NotifyEvent) -> EventKind {
    match e {
        NotifyEvent::Push => EventKind::Push,
        NotifyEvent::Delete => EventKind::Delete,
        NotifyEvent::Pull => EventKind::Pull,
        NotifyEvent::CacheFill => EventKind::CacheFill,
        NotifyEvent::CacheEvict => EventKind::CacheEvict,
        NotifyEvent::TagMoved => EventKind::TagMoved,
    }
}

/// The event kinds the store must record: those some endpoint wants (none without endpoints).
pub fn recorded_kinds(endpoints: &[NotifyConfig]) -> Kinds {
    endpoints
        .iter()
        .flat_map(|n| n.events.iter().map(|e| kind_of(*e)))
        .collect()
}

/// Starts one delivery task per endpoint on `tasks`, stopped by `cancel`. Sets up the
/// endpoints' cursors first (a new endpoint starts at the end of the outbox); without
/// endpoints, empties the outbox of what earlier endpoints left.
pub fn start(app: &Arc<App>, cancel: &CancellationToken, tasks: &TaskTracker) {
    let host = app.config.server.listen.to_string();
    let endpoints: Vec<Arc<delivery::Endpoint>> = app
        .config
        .notify
        .iter()
        .filter_map(|c| delivery::Endpoint::from_config(c, &host).map(Arc::new))
        .collect();
    let ids: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
    let cursors = match app.store.open_event_cursors(&ids) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the event outbox; notifications are off");
            return;
        }
    };
    if endpoints.is_empty() {
        while let Ok(n) = app.store.prune_events(0, u64::MAX) {
            if n == 0 {
                break;
            }
        }
        return;
    }
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        // Every event is the cluster's (the replica's own store records none).
        cluster::start(app, c, endpoints, cancel, tasks);
        return;
    }
    let cursors = Arc::new(cursors.into_iter().map(AtomicU64::new).collect::<Vec<_>>());
    let client = delivery::client();
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        tracing::info!(endpoint = %endpoint.id, format = ?endpoint.format, "delivering events");
        let task = delivery::Task {
            endpoint,
            source: source::Source::Local(app.store.clone()),
            metrics: app.metrics.clone(),
            client: client.clone(),
            cursors: cursors.clone(),
            index,
            pruned: AtomicU64::new(0),
            receiver_down: std::sync::atomic::AtomicBool::new(false),
        };
        tasks.spawn(task.run(cancel.clone()));
    }
}

/// Records a pull of the registry (`App.storage`): in the cluster profile into the cluster's
/// outbox, otherwise as `pulled`.
pub fn pulled_registry(app: &App, repo: &RepoName, m: &Arc<StoredManifest>, reference: &Reference) {
    match &app.storage {
        crate::storage::Storage::Cluster(c) => cluster::pulled(c, repo, m, reference),
        crate::storage::Storage::Local(_) => pulled(app, repo, m, reference),
    }
}

/// Records a pull (a manifest GET) if an endpoint wants pulls: on the blocking pool, after the
/// response is decided, in a write that does not wait for the disk (a crash can lose it).
pub fn pulled(app: &App, repo: &RepoName, m: &Arc<StoredManifest>, reference: &Reference) {
    if !app.store.outbox().records(EventKind::Pull) {
        return;
    }
    let tag = match reference {
        Reference::Tag(t) => Some(t.clone()),
        Reference::Digest(_) => None,
    };
    let (store, repo, m) = (app.store.clone(), repo.clone(), m.clone());
    tokio::task::spawn_blocking(move || {
        let make = || {
            let size = m.bytes.len();
            vec![manifest_event(
                EventKind::Pull,
                &repo,
                &m.digest,
                &m.media_type,
                size,
                tag.as_ref(),
            )]
        };
        if let Err(e) = store.record_events_relaxed(EventKind::Pull, make) {
            tracing::warn!(error = %e, "cannot record a pull event");
        }
    });
}
