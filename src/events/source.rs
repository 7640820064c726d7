//! Where a delivery task's outbox lives: the replica's own store (`Local`), or the cluster's
//! database (`Cluster`), where replicas share every endpoint's cursor and dead letters and
//! one replica at a time delivers an endpoint, under a `job_leases` row it renews. The
//! delivery loop (`delivery::Task`) is the same for both; this is the seam.
//!
//! Cluster lease: `events:<endpoint id>`, taken for `LEASE` when free or expired, renewed
//! every `LEASE / 3` while the task runs (`keep`), and fencing every cursor write: a replica
//! that lost it cannot move the cursor, and stops at its next write. A dead replica's
//! endpoints are taken over once its lease expires; the new holder starts from the stored
//! cursor, so the events after it may be delivered twice (at least once, never lost).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::delivery::DeliveryError;
use crate::cluster::gc::JobLease;
use crate::cluster::pg::{Db, PgError};
use crate::store::Store;
use crate::store::outbox::{DeadLetter, EventRecord, MAX_DEAD_LETTERS, PRUNE_BATCH, StoredEvent};

/// How long a replica holds an endpoint without renewing it: a dead replica's endpoints wait
/// this long before another replica delivers them.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a cluster task looks for events committed on other replicas (this replica's own
/// commits wake it at once).
const CLUSTER_POLL: Duration = Duration::from_secs(1);
/// How often the local outbox is looked at without a wake-up (a safety net).
const LOCAL_POLL: Duration = Duration::from_secs(5);

/// The cluster's outbox, shared by the endpoints' tasks of one replica.
pub struct ClusterOutbox {
    pub db: Db,
    /// The cluster-wide prefix of event ids.
    pub instance: String,
    /// How this replica names itself in leases.
    pub replica: String,
    /// Notified after this replica commits events.
    pub wake: Arc<tokio::sync::Notify>,
}

/// A lease this replica holds, and when it was last renewed.
pub struct Held {
    lease: Arc<JobLease>,
    renewed: Instant,
}

/// One endpoint's outbox.
pub enum Source {
    Local(Arc<Store>),
    Cluster {
        outbox: Arc<ClusterOutbox>,
        /// The endpoint's lease, while this replica holds it.
        held: Mutex<Option<Held>>,
    },
}

fn job(endpoint: &str) -> String {
    format!("events:{endpoint}")
}

fn decode(seq: u64, bytes: &[u8]) -> Result<EventRecord, DeliveryError> {
    serde_json::from_slice(bytes)
        .map_err(|e| DeliveryError::from(PgError::Corrupt(format!("event {seq}: {e}"))))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, DeliveryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeliveryError::Request(format!("store task failed: {e}")))?
        .map_err(DeliveryError::from)
}

impl Source {
    pub fn cluster(outbox: Arc<ClusterOutbox>) -> Self {
        Self::Cluster {
            outbox,
            held: Mutex::new(None),
        }
    }

    fn held(&self) -> Option<Arc<JobLease>> {
        match self {
            Self::Local(_) => None,
            Self::Cluster { held, .. } => lock(held).as_ref().map(|h| h.lease.clone()),
        }
    }

    /// The prefix of event ids.
    pub fn instance(&self) -> &str {
        match self {
            Self::Local(s) => s.outbox().instance(),
            Self::Cluster { outbox, .. } => &outbox.instance,
        }
    }

    /// Woken when events may have been committed.
    pub fn notify(&self) -> &tokio::sync::Notify {
        match self {
            Self::Local(s) => &s.outbox().notify,
            Self::Cluster { outbox, .. } => &outbox.wake,
        }
    }

    /// How long an idle task waits without a wake-up.
    pub fn idle_poll(&self) -> Duration {
        match self {
            Self::Local(_) => LOCAL_POLL,
            Self::Cluster { .. } => CLUSTER_POLL,
        }
    }

    /// Whether this task may deliver now. In the cluster, takes the endpoint's lease if it is
    /// free and then reads the endpoint's cursor into `cursor` (another replica may have
    /// moved it); false while another replica holds it.
    pub async fn hold(&self, endpoint: &str, cursor: &AtomicU64) -> Result<bool, DeliveryError> {
        let Self::Cluster { outbox, held } = self else {
            return Ok(true);
        };
        if lock(held).is_some() {
            return Ok(true);
        }
        let Some(lease) = outbox
            .db
            .acquire_job(&job(endpoint), &outbox.replica, LEASE)
            .await?
        else {
            return Ok(false);
        };
        let stored = outbox.db.event_cursor(endpoint).await?.unwrap_or(0);
        cursor.store(stored, Ordering::Release);
        tracing::info!(
            endpoint,
            cursor = stored,
            "this replica delivers the endpoint's events"
        );
        *lock(held) = Some(Held {
            lease: Arc::new(lease),
            renewed: Instant::now(),
        });
        Ok(true)
    }

    /// Renews the cluster lease every third of `LEASE` while it is held; returns when it is
    /// lost (never for the local outbox).
    pub async fn keep(&self, endpoint: &str) {
        let Self::Cluster { outbox, held } = self else {
            return std::future::pending().await;
        };
        loop {
            let Some((lease, renewed)) = lock(held).as_ref().map(|h| (h.lease.clone(), h.renewed))
            else {
                // Not held (yet): the round takes it; look again shortly.
                tokio::time::sleep(CLUSTER_POLL).await;
                continue;
            };
            tokio::time::sleep_until((renewed + LEASE / 3).into()).await;
            match outbox.db.renew_job(&job(endpoint), &lease, LEASE).await {
                Ok(true) => {
                    if let Some(h) = lock(held).as_mut() {
                        h.renewed = Instant::now();
                    }
                }
                Ok(false) => {
                    tracing::warn!(endpoint, "another replica took the endpoint's events over");
                    *lock(held) = None;
                    return;
                }
                Err(e) => {
                    // Tried again shortly; the lease may run out meanwhile, and then the
                    // cursor writes, which are fenced, say so.
                    tracing::warn!(endpoint, error = %e, "cannot renew the events lease");
                    if let Some(h) = lock(held).as_mut() {
                        h.renewed = Instant::now() - LEASE / 3 + Duration::from_secs(1);
                    }
                }
            }
        }
    }

    /// Gives the cluster lease up (at shutdown), so another replica takes the endpoint over
    /// at once rather than after `LEASE`.
    pub async fn release(&self, endpoint: &str) {
        let Self::Cluster { outbox, held } = self else {
            return;
        };
        let Some(h) = lock(held).take() else { return };
        if let Err(e) = outbox.db.drop_job_lease(&job(endpoint), &h.lease).await {
            tracing::warn!(endpoint, error = %e, "cannot release the events lease");
        }
    }

    /// Whether dead letters marked by `events retry` wait (`seen`: the local generation this
    /// task handled last).
    pub async fn retry_wanted(
        &self,
        endpoint: &str,
        seen: &mut u64,
    ) -> Result<bool, DeliveryError> {
        match self {
            Self::Local(s) => {
                let generation = s.outbox().retry_generation();
                let wanted = generation != *seen;
                *seen = generation;
                Ok(wanted)
            }
            Self::Cluster { outbox, .. } => Ok(outbox.db.retry_wanted(endpoint).await?),
        }
    }

    /// Up to `limit` events after `after`, and how far the read saw (see
    /// `Store::events_after`).
    pub async fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<StoredEvent>, u64), DeliveryError> {
        match self {
            Self::Local(s) => {
                let s = s.clone();
                blocking(move || s.events_after(after, limit)).await
            }
            Self::Cluster { outbox, .. } => {
                let (rows, upto) = outbox.db.events_after(after, limit).await?;
                let events = rows
                    .iter()
                    .map(|r| {
                        Ok(StoredEvent {
                            seq: r.seq,
                            record: decode(r.seq, &r.record)?,
                        })
                    })
                    .collect::<Result<Vec<_>, DeliveryError>>()?;
                Ok((events, upto))
            }
        }
    }

    /// Stores the endpoint's cursor (in the cluster only while the lease is this replica's).
    pub async fn set_cursor(&self, endpoint: &str, seq: u64) -> Result<(), DeliveryError> {
        match self {
            Self::Local(s) => {
                let (s, id) = (s.clone(), endpoint.to_string());
                blocking(move || s.set_event_cursor(&id, seq)).await
            }
            Self::Cluster { outbox, held } => {
                let lease = self.held().ok_or(DeliveryError::NotHeld)?;
                if outbox
                    .db
                    .set_event_cursor(endpoint, seq, &job(endpoint), &lease)
                    .await?
                {
                    Ok(())
                } else {
                    *lock(held) = None;
                    Err(DeliveryError::NotHeld)
                }
            }
        }
    }

    /// The lowest cursor of every endpoint: `local` holds this replica's (the local outbox's
    /// endpoints are all here), the cluster's are in the database.
    pub async fn min_cursor(&self, local: &[AtomicU64]) -> Result<u64, DeliveryError> {
        match self {
            Self::Local(_) => Ok(local
                .iter()
                .map(|c| c.load(Ordering::Acquire))
                .min()
                .unwrap_or(0)),
            Self::Cluster { outbox, .. } => Ok(outbox.db.min_event_cursor().await?.unwrap_or(0)),
        }
    }

    /// Removes events after `after` up to `upto`; how many went (at most `PRUNE_BATCH`).
    pub async fn prune(&self, after: u64, upto: u64) -> Result<usize, DeliveryError> {
        match self {
            Self::Local(s) => {
                let s = s.clone();
                blocking(move || s.prune_events(after, upto)).await
            }
            Self::Cluster { outbox, .. } => Ok(outbox.db.prune_events(upto, PRUNE_BATCH).await?),
        }
    }

    /// Keeps an event the endpoint gave up on (in the cluster, its oldest beyond
    /// `MAX_DEAD_LETTERS` go at once; locally the hourly prune drops them).
    pub async fn dead_letter(&self, endpoint: &str, ev: &StoredEvent) -> Result<(), DeliveryError> {
        match self {
            Self::Local(s) => {
                let (s, id, ev) = (s.clone(), endpoint.to_string(), ev.clone());
                blocking(move || s.dead_letter(&id, &ev)).await
            }
            Self::Cluster { outbox, .. } => {
                let record = serde_json::to_vec(&ev.record).unwrap_or_default();
                let dropped = outbox
                    .db
                    .dead_letter(endpoint, ev.seq, &record, "not delivered", MAX_DEAD_LETTERS)
                    .await?;
                if dropped > 0 {
                    tracing::warn!(
                        endpoint,
                        removed = dropped,
                        keep = MAX_DEAD_LETTERS,
                        "dropped the oldest dead-lettered events"
                    );
                }
                Ok(())
            }
        }
    }

    /// A dead letter was delivered on retry.
    pub async fn forget_dead_letter(&self, endpoint: &str, seq: u64) -> Result<(), DeliveryError> {
        match self {
            Self::Local(s) => {
                let (s, id) = (s.clone(), endpoint.to_string());
                blocking(move || s.forget_dead_letter(&id, seq)).await
            }
            Self::Cluster { outbox, .. } => Ok(outbox.db.forget_dead_letter(endpoint, seq).await?),
        }
    }

    /// The endpoint's dead letters, oldest first.
    pub async fn dead_letters(&self, endpoint: &str) -> Result<Vec<DeadLetter>, DeliveryError> {
        match self {
            Self::Local(s) => {
                let (s, id) = (s.clone(), endpoint.to_string());
                blocking(move || s.dead_letters(Some(&id))).await
            }
            Self::Cluster { outbox, .. } => cluster_dead_letters(&outbox.db, Some(endpoint)).await,
        }
    }
}

/// The cluster's dead letters (of one endpoint or all), decoded.
pub async fn cluster_dead_letters(
    db: &Db,
    endpoint: Option<&str>,
) -> Result<Vec<DeadLetter>, DeliveryError> {
    db.dead_letters(endpoint)
        .await?
        .into_iter()
        .map(|d| {
            Ok(DeadLetter {
                event: StoredEvent {
                    seq: d.seq,
                    record: decode(d.seq, &d.record)?,
                },
                endpoint: d.endpoint,
                retry: d.retry,
            })
        })
        .collect()
}

fn lock(held: &Mutex<Option<Held>>) -> std::sync::MutexGuard<'_, Option<Held>> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}
