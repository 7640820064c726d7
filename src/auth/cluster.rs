//! Access control in the cluster profile: identities live in the cluster's PostgreSQL (a
//! `RecordStore::Cluster`), tokens are signed with the cluster's one key, and each replica's
//! in-memory copy follows the others' changes. The database announces every committed change
//! of a record (`Db::follow_identity_records`); the follower re-reads that record and applies
//! what the database holds now, so however changes interleave, the copy ends equal to the
//! database. Whenever the feed (re)connects, or a read fails, everything is reloaded: changes
//! announced while nobody listened are not lost. A change on one replica thus takes effect on
//! the others one notification and one read later (milliseconds); while the database is out
//! of reach, a replica keeps serving the identities it last saw.
//!
//! A client can be faster than a notification: a refresh token from `docker login` on A may
//! be presented to B before B heard of it. So a credential naming a record this replica lacks
//! is looked up in the database once before it is refused, at most `LOOKUPS_PER_SECOND` times
//! a second for the whole replica, so made-up credentials cannot become database load.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::credentials::{CredentialError, presented_record, token_parts};
use super::identities::{Identities, Subject};
use super::jwt::TokenSigner;
use super::record_store::{RecordError, RecordStore};
use super::records::{KIND_KEY, KIND_TOKEN, KIND_USER, TokenKind};
use super::{AuthBuildError, Authorizer};
use crate::cluster::identity_records::IdentityChange;
use crate::cluster::pg::Db;
use crate::config::Config;
use crate::proxy::route::Router;

/// After a failed read, how long the follower waits before reloading everything.
const RELOAD_RETRY: Duration = Duration::from_secs(1);
/// Lookups of unknown credentials in the database, per second and replica.
const LOOKUPS_PER_SECOND: u32 = 20;

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
        let Some(change) = next else {
            tracing::error!(
                "the identity change feed stopped: identities no longer follow other replicas"
            );
            return;
        };
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

impl Authorizer {
    /// Checks a refused Basic login again if it names a record this replica lacks and the
    /// database has (see the module header); otherwise returns `first`, the refusal.
    pub(super) async fn recheck_unknown(
        &self,
        user: &str,
        secret: &str,
        first: CredentialError,
    ) -> Result<Subject, CredentialError> {
        let Some((kind, id)) = presented_record(user, secret) else {
            return Err(first);
        };
        if !self.identities.fetch_missing(kind, &id).await {
            return Err(first);
        }
        let (ids, user, secret) = (
            self.identities.clone(),
            user.to_string(),
            secret.to_string(),
        );
        // A password check runs argon2id.
        tokio::task::spawn_blocking(move || ids.verify_basic(&user, &secret))
            .await
            .unwrap_or(Err(first))
    }
}

impl Identities {
    /// `verify_token`, looking the token up in the database once if this replica lacks it.
    pub(super) async fn verify_token_anywhere(
        &self,
        token: &str,
        kind: TokenKind,
    ) -> Result<Subject, CredentialError> {
        let first = self.verify_token(token, kind);
        match (&first, token_parts(token, kind)) {
            (Err(CredentialError::UnknownToken), Some((id, _)))
                if self.fetch_missing(KIND_TOKEN, id).await =>
            {
                self.verify_token(token, kind)
            }
            _ => first,
        }
    }

    /// Reads the record `kind`/`id` from the database if this replica lacks it, within the
    /// lookup budget; true if it was found (and is now held).
    async fn fetch_missing(&self, kind: &'static str, id: &str) -> bool {
        let RecordStore::Cluster(shared) = &self.records else {
            return false;
        };
        if self.holds(kind, id) || !shared.lookups.take() {
            return false;
        }
        let _applying = shared.applying.lock().await;
        match shared.db.identity_record(kind, id).await {
            Ok(Some(value)) => {
                self.write().insert(kind, id, &value);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look an unknown credential up");
                false
            }
        }
    }

    /// True if the record `kind`/`id` is held here (or, for a user, declared in the config).
    fn holds(&self, kind: &str, id: &str) -> bool {
        let stored = self.read();
        match kind {
            KIND_USER => self.config_users.contains_key(id) || stored.users.contains_key(id),
            KIND_KEY => stored.keys.contains_key(id),
            KIND_TOKEN => stored.tokens.contains_key(id),
            _ => true,
        }
    }

    /// Replaces the in-memory records with what the backend holds now.
    async fn reload(&self) -> Result<(), RecordError> {
        let _applying = match &self.records {
            RecordStore::Cluster(shared) => Some(shared.applying.lock().await),
            RecordStore::Local(_) => None,
        };
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
        let _applying = shared.applying.lock().await;
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

/// A budget of lookups per one-second window (fixed windows: at most twice the rate across a
/// boundary, which is bound enough for this).
pub(super) struct LookupBudget {
    window: std::sync::Mutex<(Instant, u32)>,
}

impl LookupBudget {
    pub(super) fn new() -> Self {
        Self {
            window: std::sync::Mutex::new((Instant::now(), 0)),
        }
    }

    /// Takes one lookup from this second's budget, if any is left.
    fn take(&self) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        window.1 = window.1.saturating_add(1);
        window.1 <= LOOKUPS_PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_stay_within_the_budget_per_second() {
        let budget = LookupBudget::new();
        let start = Instant::now();
        let taken = (0..10_000).filter(|_| budget.take()).count();
        let windows = start.elapsed().as_secs() as usize + 1;
        assert!(taken >= LOOKUPS_PER_SECOND as usize, "{taken}");
        assert!(
            taken <= LOOKUPS_PER_SECOND as usize * windows,
            "{taken} in {windows} windows"
        );
    }
}
