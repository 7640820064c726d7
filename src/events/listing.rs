//! `transship events ls [--failed]` and `transship events retry`: what the outbox holds for
//! each endpoint and what was dead-lettered, from the store (running server or stopped), or
//! in the cluster profile from the shared database.

use serde::{Deserialize, Serialize};

use super::delivery::DeliveryError;
use super::format::{event_id, timestamp};
use super::source::cluster_dead_letters;
use crate::admin::{AdminRequest, AdminResponse};
use crate::cluster::pg::{Db, PgError};
use crate::store::outbox::StoredEvent;
use crate::store::{Store, StoreError};

/// Events listed per endpoint at most.
const MAX_LISTED: usize = 1000;

/// One line of `transship events ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventInfo {
    pub endpoint: String,
    pub id: String,
    pub seq: u64,
    pub action: String,
    pub repository: String,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    pub time: String,
    /// Dead letters only: a retry was asked for and has not finished.
    #[serde(default)]
    pub retrying: bool,
}

fn info(instance: &str, endpoint: &str, ev: &StoredEvent, retrying: bool) -> EventInfo {
    EventInfo {
        endpoint: endpoint.to_string(),
        id: event_id(instance, ev.seq),
        seq: ev.seq,
        action: ev.record.action.as_str().to_string(),
        repository: ev.record.repository.clone(),
        digest: ev.record.digest.clone(),
        tag: ev.record.tag.clone(),
        time: timestamp(ev.record.time_ms),
        retrying,
    }
}

/// Dead letters (`failed`), or the events each endpoint has not delivered yet (at most
/// `MAX_LISTED` per endpoint; kinds an endpoint does not want are listed too until its task
/// passes them).
pub fn list(store: &Store, failed: bool) -> Result<Vec<EventInfo>, StoreError> {
    let instance = store.outbox().instance();
    if failed {
        return Ok(store
            .dead_letters(None)?
            .iter()
            .map(|d| info(instance, &d.endpoint, &d.event, d.retry))
            .collect());
    }
    let mut out = Vec::new();
    for (endpoint, cursor) in store.event_cursors()? {
        let (events, _) = store.events_after(cursor, MAX_LISTED)?;
        out.extend(events.iter().map(|e| info(instance, &endpoint, e, false)));
    }
    Ok(out)
}

/// `list` of the cluster's outbox.
pub async fn list_cluster(db: &Db, failed: bool) -> Result<Vec<EventInfo>, DeliveryError> {
    let instance = db.event_instance().await?;
    if failed {
        return Ok(cluster_dead_letters(db, None)
            .await?
            .iter()
            .map(|d| info(&instance, &d.endpoint, &d.event, d.retry))
            .collect());
    }
    let mut out = Vec::new();
    for (endpoint, cursor) in db.event_cursors().await? {
        let (rows, _) = db.events_after(cursor, MAX_LISTED).await?;
        for r in rows {
            let record = serde_json::from_slice(&r.record)
                .map_err(|e| PgError::Corrupt(format!("event {}: {e}", r.seq)))?;
            let ev = StoredEvent { seq: r.seq, record };
            out.push(info(&instance, &endpoint, &ev, false));
        }
    }
    Ok(out)
}

/// `events ls` and `events retry` in the cluster profile: on the database every replica
/// shares (the replica delivering an endpoint finds the retry marks at its next round).
pub async fn apply_cluster(db: &Db, req: AdminRequest) -> AdminResponse {
    let result = match req {
        AdminRequest::EventsList { failed } => list_cluster(db, failed)
            .await
            .map(|events| AdminResponse::Events { events }),
        AdminRequest::EventsRetry { endpoint } => db
            .retry_dead_letters(endpoint.as_deref())
            .await
            .map(|count| AdminResponse::Retried {
                count: usize::try_from(count).unwrap_or(usize::MAX),
            })
            .map_err(DeliveryError::from),
        _ => {
            return AdminResponse::Error {
                message: "not an events request".into(),
            };
        }
    };
    result.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}
