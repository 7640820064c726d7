//! Fill leases: one upstream fetch per digest for the whole cluster. The first replica to ask
//! becomes the owner (its internal URL recorded) and fetches; the others follow it, streaming
//! the in-progress bytes from the owner. A lease the owner stops renewing expires and the next
//! asker takes it over. Acquisition is one statement (`INSERT ... ON CONFLICT DO UPDATE ...
//! WHERE expired`), so PostgreSQL's row lock decides between concurrent askers; the lease id
//! fences an old owner's renewals and release after a take-over.

use std::time::Duration;

use super::pg::{Db, PgError};
use crate::oci::Digest;

/// What `acquire` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This replica fills; renew the lease while fetching, release it when done.
    Owner(Lease),
    /// Another replica is filling: stream from its internal URL.
    Follow(String),
}

/// A held fill lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub digest: Digest,
    pub lease_id: String,
    /// True when an expired lease of another owner was taken over (its partial fill is void).
    pub took_over: bool,
}

/// Whether a renewal kept the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    Held,
    /// Expired and taken over (or released) meanwhile: stop filling.
    Lost,
}

/// Attempts at deciding before giving up: a lease released between the insert and the read of
/// its owner makes one more round necessary, never many.
const ROUNDS: usize = 8;

impl Db {
    /// Becomes the owner of `digest`'s fill, or learns who is, for `ttl`.
    pub async fn acquire_fill(
        &self,
        digest: &Digest,
        owner_url: &str,
        ttl: Duration,
    ) -> Result<Acquired, PgError> {
        let client = self.client().await?;
        let ttl_ms = millis(ttl);
        let key = digest.to_string();
        for _ in 0..ROUNDS {
            let lease_id = uuid::Uuid::new_v4().to_string();
            // xmax is 0 for a freshly inserted row and set for an updated (taken over) one.
            let won = client
                .query_opt(
                    "INSERT INTO fill_leases (digest, owner, lease_id, expires_at)
                     VALUES ($1, $2, $3::text::uuid, now() + $4::bigint * interval '1 millisecond')
                     ON CONFLICT (digest) DO UPDATE
                        SET owner = EXCLUDED.owner, lease_id = EXCLUDED.lease_id,
                            acquired_at = now(), expires_at = EXCLUDED.expires_at
                        WHERE fill_leases.expires_at < now()
                     RETURNING xmax <> 0",
                    &[&key, &owner_url, &lease_id, &ttl_ms],
                )
                .await?;
            if let Some(row) = won {
                return Ok(Acquired::Owner(Lease {
                    digest: digest.clone(),
                    lease_id,
                    took_over: row.get(0),
                }));
            }
            let owner = client
                .query_opt(
                    "SELECT owner FROM fill_leases WHERE digest = $1 AND expires_at >= now()",
                    &[&key],
                )
                .await?;
            if let Some(row) = owner {
                return Ok(Acquired::Follow(row.get(0)));
            }
        }
        Err(PgError::Corrupt(format!(
            "the fill lease of {digest} changed hands {ROUNDS} times while being read"
        )))
    }

    /// Extends a held lease to `ttl` from now.
    pub async fn renew_fill(&self, lease: &Lease, ttl: Duration) -> Result<Renewed, PgError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE fill_leases
                    SET expires_at = now() + $3::bigint * interval '1 millisecond'
                  WHERE digest = $1 AND lease_id = $2::text::uuid",
                &[&lease.digest.to_string(), &lease.lease_id, &millis(ttl)],
            )
            .await?;
        Ok(if n == 1 { Renewed::Held } else { Renewed::Lost })
    }

    /// Ends a lease (the fill finished or failed); a lease already taken over is left alone.
    pub async fn release_fill(&self, lease: &Lease) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM fill_leases WHERE digest = $1 AND lease_id = $2::text::uuid",
                &[&lease.digest.to_string(), &lease.lease_id],
            )
            .await?;
        Ok(())
    }
}

/// Longest lease the database is asked for (a year): far past any fill, far from overflow.
const MAX_TTL_MS: u128 = 365 * 24 * 3600 * 1000;

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis().min(MAX_TTL_MS)).unwrap_or(i64::MAX)
}
