//! Where identity records are kept: the replica's own index (`Local`, the local profile) or
//! the cluster's PostgreSQL (`Cluster`), shared by every replica. `Identities` writes through
//! it before changing its in-memory copy. Writes are blocking in both arms and run on the
//! blocking pool (or a thread outside the runtime): the local arm does a synced RocksDB write,
//! the cluster arm waits for the database with `Handle::block_on`, which Tokio refuses with a
//! panic on an async worker thread, so a write misplaced on the request path fails loudly at
//! its first use instead of stalling a worker.

use std::sync::Arc;

use tokio::runtime::Handle;

use super::cluster::LookupBudget;
use crate::cluster::pg::{Db, PgError};
use crate::store::{Store, StoreError};

/// The backend of identity records.
#[derive(Clone)]
pub enum RecordStore {
    Local(Arc<Store>),
    Cluster(Arc<SharedRecords>),
}

/// The cluster's records: the database, the runtime its connections belong to, and what
/// keeps this replica's copy in order (see `cluster`).
pub struct SharedRecords {
    pub(super) db: Db,
    runtime: Handle,
    /// Held across each read of the database and its application to the in-memory copy, so
    /// an older read is never applied after a newer one.
    pub(super) applying: tokio::sync::Mutex<()>,
    /// Lookups of records this replica lacks (see `cluster`).
    pub(super) lookups: LookupBudget,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("identity records: {0}")]
    Db(#[from] PgError),
}

impl RecordStore {
    /// The cluster's records in `db`, reached through `runtime` (the one `db` was opened on)
    /// from blocking threads.
    pub fn cluster(db: Db, runtime: Handle) -> Self {
        Self::Cluster(Arc::new(SharedRecords {
            db,
            runtime,
            applying: tokio::sync::Mutex::new(()),
            lookups: LookupBudget::new(),
        }))
    }

    /// Every record of one kind, as `(id, value)`.
    pub(super) async fn list(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, RecordError> {
        Ok(match self {
            Self::Local(store) => store.auth_records(kind)?,
            Self::Cluster(shared) => shared.db.identity_records(kind).await?,
        })
    }

    /// Creates or replaces a record, durably. Blocking: see the module header.
    pub(super) fn put(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), RecordError> {
        match self {
            Self::Local(store) => Ok(store.put_auth_record(kind, id, value)?),
            Self::Cluster(shared) => Ok(shared
                .runtime
                .block_on(shared.db.put_identity_record(kind, id, value))?),
        }
    }

    /// Removes a record (none is no error), durably. Blocking: see the module header.
    pub(super) fn delete(&self, kind: &str, id: &str) -> Result<(), RecordError> {
        match self {
            Self::Local(store) => store.delete_auth_record(kind, id).map(drop)?,
            Self::Cluster(shared) => shared
                .runtime
                .block_on(shared.db.delete_identity_record(kind, id))
                .map(drop)?,
        }
        Ok(())
    }
}
