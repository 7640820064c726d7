//! `transship events ls [--failed]` and `transship events retry`: what the outbox holds for
//! each endpoint and what was dead-lettered, from the store (running server or stopped).

use serde::{Deserialize, Serialize};

use super::format::{event_id, timestamp};
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

fn info(store: &Store, endpoint: &str, ev: &StoredEvent, retrying: bool) -> EventInfo {
    EventInfo {
        endpoint: endpoint.to_string(),
        id: event_id(store.outbox().instance(), ev.seq),
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
    if failed {
        return Ok(store
            .dead_letters(None)?
            .iter()
            .map(|d| info(store, &d.endpoint, &d.event, d.retry))
            .collect());
    }
    let mut out = Vec::new();
    for (endpoint, cursor) in store.event_cursors()? {
        let (events, _) = store.events_after(cursor, MAX_LISTED)?;
        out.extend(events.iter().map(|e| info(store, &endpoint, e, false)));
    }
    Ok(out)
}
