//! Access control in the cluster profile: identities live in the cluster's PostgreSQL (a
//! `RecordStore::Cluster`), tokens are signed with the cluster's one key, and each replica's
//! in-memory copy follows the others' changes. The database announces every committed change
//! of a record (`Db::follow_identity_records`); the follower re-reads that record and applies
//! what the database holds now, so however changes interleave, the copy ends equal to the
//! database. Whenever the feed (re)connects, or a read fails, everything is reloaded: changes
//! announced while nobody listened are not lost. A change on one replica thus takes effect on
//! the others one notification and one read later (milliseconds); while the database is out
//! of reach, a replica keeps serving the identities it last saw.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::identities::Identities;
use super::jwt::TokenSigner;
use super::record_store::{RecordError, RecordStore};
use super::records::KIND_USER;
use super::{AuthBuildError, Authorizer};
use crate::cluster::identity_records::IdentityChange;
use crate::cluster::pg::Db;
use crate::config::Config;
use crate::proxy::route::Router;

/// After a failed read, how long the follower waits before reloading everything.
const RELOAD_RETRY: Duration = Duration::from_secs(1);

impl Authorizer {
    /// The cluster profile's authorizer over `db` (opened and migrated): identities read from
    /// and written to the database and kept in step with other replicas' changes, tokens
    /// signed with the cluster's key (`Db::token_signing_key`), so credentials and tokens
    /// from any replica work on all. Call from within the runtime that serves requests: the
    /// follower runs on it, and identity changes reach the database through it.
    pub async fn connect(
        config: &Config,
        db: &Db,
        router: Arc<Router>,
    ) -> Result<Self, AuthBuildError> {
        // Listening starts before the load; its first message reloads anyway, so a change
        // made in between is not missed.
        let changes = db.follow_identity_records();
        let records = RecordStore::cluster(db.clone(), Handle::current());
        let identities = Arc::new(Identities::load_from(config, records).await?);
        tokio::spawn(follow(Arc::downgrade(&identities), changes));
        let key = db.token_signing_key().await?;
        let signer = TokenSigner::from_pkcs8(&key, &config.auth.issuer, &config.auth.service)?;
        Ok(Self::assemble(config, identities, signer, router))
    }
}

/// Applies the database's changes to `ids` until it is dropped (or the feed ends).
async fn follow(ids: Weak<Identities>, mut changes: mpsc::Receiver<IdentityChange>) {
    let mut stale = false;
    loop {
        let next = if stale {
            // Retry the reload after a pause, sooner if the feed has news.
            tokio::time::timeout(RELOAD_RETRY, changes.recv())
                .await
                .unwrap_or(Some(IdentityChange::Resync))
        } else {
            changes.recv().await
        };
        let Some(change) = next else { return };
        let Some(ids) = ids.upgrade() else { return };
        let applied = match (stale, change) {
            (true, _) | (_, IdentityChange::Resync) => ids.reload().await,
            (false, IdentityChange::Changed { kind, id }) => ids.refresh(&kind, &id).await,
        };
        stale = match applied {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read identity changes; reloading shortly");
                true
            }
        };
    }
}

impl Identities {
    /// Replaces the in-memory records with what the backend holds now.
    async fn reload(&self) -> Result<(), RecordError> {
        let stored = Self::read_all(&self.records).await?;
        *self.write() = stored;
        self.verified.invalidate_all();
        Ok(())
    }

    /// Re-reads one record and keeps what the backend holds now (or forgets it).
    async fn refresh(&self, kind: &str, id: &str) -> Result<(), RecordError> {
        let RecordStore::Cluster(shared) = &self.records else {
            return Ok(());
        };
        let value = shared.db.identity_record(kind, id).await?;
        {
            let mut stored = self.write();
            match value {
                Some(v) => stored.insert(kind, id, &v),
                None => stored.remove(kind, id),
            }
        }
        // A password checked against the old hash must be checked again.
        if kind == KIND_USER {
            self.verified.invalidate_all();
        }
        Ok(())
    }
}
