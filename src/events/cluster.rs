//! Notifications in the cluster profile: the registry's changes are in the database's outbox
//! (recorded by `storage::cluster_events` in each change's transaction), delivered by the
//! same `delivery::Task` over a `Source::Cluster`, one replica per endpoint at a time. What
//! the replica's local store records (its pull-through cache's fills and evictions) is still
//! delivered from its local outbox, as in the local profile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::{self, Endpoint, Task};
use super::source::{ClusterOutbox, Source};
use crate::App;
use crate::oci::{Reference, RepoName};
use crate::storage::cluster::ClusterStore;
use crate::store::StoredManifest;
use crate::store::outbox::{EventKind, manifest_event};

/// How long a replica waits before trying again when the database cannot be read at start.
const SETUP_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts one delivery task per endpoint over the cluster's outbox, once the endpoints'
/// cursors are set up (retried until the database answers, or `cancel`).
pub fn start(
    app: &Arc<App>,
    store: &Arc<ClusterStore>,
    endpoints: Vec<Arc<Endpoint>>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) {
    let metrics = app.metrics.clone();
    let (store, cancel, inner) = (store.clone(), cancel.clone(), tasks.clone());
    tasks.spawn(async move {
        let db = store.db().clone();
        let ids: Vec<&str> = endpoints.iter().map(|e| e.id.as_str()).collect();
        let (cursors, instance) = loop {
            let setup = async { Ok::<_, delivery::DeliveryError>((db.open_event_cursors(&ids).await?, db.event_instance().await?)) };
            match setup.await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the cluster's event outbox; trying again");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(SETUP_RETRY) => {}
                    }
                }
            }
        };
        let outbox = Arc::new(ClusterOutbox {
            db,
            instance,
            replica: store.replica().to_string(),
            wake: store.event_wake(),
        });
        let cursors = Arc::new(cursors.into_iter().map(AtomicU64::new).collect::<Vec<_>>());
        let client = delivery::client();
        for (index, endpoint) in endpoints.into_iter().enumerate() {
            let task = Task {
                endpoint,
                source: Source::cluster(outbox.clone()),
                metrics: metrics.clone(),
                client: client.clone(),
                cursors: cursors.clone(),
                index,
                pruned: AtomicU64::new(0),
                receiver_down: AtomicBool::new(false),
            };
            inner.spawn(task.run(cancel.clone()));
        }
    });
}

/// Records a pull of the cluster's registry if an endpoint wants pulls: in a task of its own,
/// after the response is decided (a failure loses the event, as a crash does locally).
pub fn pulled(
    store: &Arc<ClusterStore>,
    repo: &RepoName,
    m: &Arc<StoredManifest>,
    reference: &Reference,
) {
    if !store.records(EventKind::Pull) {
        return;
    }
    let tag = match reference {
        Reference::Tag(t) => Some(t.clone()),
        Reference::Digest(_) => None,
    };
    let (store, repo, m) = (store.clone(), repo.clone(), m.clone());
    tokio::spawn(async move {
        let make = || {
            vec![manifest_event(
                EventKind::Pull,
                &repo,
                &m.digest,
                &m.media_type,
                m.bytes.len(),
                tag.as_ref(),
            )]
        };
        if let Err(e) = store.record_events_alone(EventKind::Pull, make).await {
            tracing::warn!(error = %e, "cannot record a pull event");
        }
    });
}
