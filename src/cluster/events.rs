//! The cluster's event outbox in the shared database: changes insert their (already encoded)
//! event records in their own transaction (`insert_events`), delivery reads them in `seq`
//! order from each endpoint's cursor, and keeps cursors and dead letters here too, so any
//! replica can take an endpoint over. The records are opaque bytes to this layer.
//!
//! `seq` comes from an identity column, which hands out numbers at insert time, not at commit:
//! two transactions could commit out of order and a reader pass a number still being written.
//! So every insert takes `pg_advisory_xact_lock(OUTBOX_LOCK)` right before it and holds it to
//! commit (a transaction's locks are released after its commit is visible): events commit in
//! `seq` order, and a reader that sees `seq` sees everything below it. The lock is the last
//! thing a change takes and nothing waits for while holding it, so it cannot deadlock; it
//! serialises only the commits of changes that record events.

use std::time::Duration;

use deadpool_postgres::Transaction;

use super::fill_lease::millis;
use super::gc::JobLease;
use super::pg::{Db, PgError};

/// The advisory lock that orders outbox inserts ("tsevents" in ASCII).
const OUTBOX_LOCK: i64 = 0x7473_6576_656e_7473;

/// An outbox row: its number and its encoded record.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: u64,
    pub record: Vec<u8>,
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadRow {
    pub endpoint: String,
    pub seq: u64,
    pub record: Vec<u8>,
    pub retry: bool,
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn seq_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Inserts `records` into the outbox inside `tx` (the caller commits), in order. Nothing to do
/// (and no lock taken) for none.
pub async fn insert_events(tx: &Transaction<'_>, records: &[Vec<u8>]) -> Result<(), PgError> {
    if records.is_empty() {
        return Ok(());
    }
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_LOCK])
        .await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO event_outbox (record)
             SELECT r FROM unnest($1::bytea[]) WITH ORDINALITY AS u(r, i) ORDER BY i",
        )
        .await?;
    tx.execute(&insert, &[&records]).await?;
    Ok(())
}

impl Db {
    /// Records events that go with no other change (pulls), in a transaction of their own
    /// that does not wait for the disk (like the local profile's relaxed write: a database
    /// crash can lose the last of them), so the outbox lock is held for microseconds, not
    /// for a flush, per pull.
    pub async fn append_events(&self, records: &[Vec<u8>]) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SET LOCAL synchronous_commit TO off", &[])
            .await?;
        insert_events(&tx, records).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` outbox rows after `after`, in order, and the highest committed number
    /// when the read began (at least `after`): when fewer than `limit` came back, every row
    /// up to it was seen (events commit in `seq` order), so a cursor may move there.
    pub async fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<OutboxRow>, u64), PgError> {
        let client = self.client().await?;
        // First the end, then the rows up to it: read the other way round, an event
        // committed between the two reads would be passed over unseen.
        let end = client
            .query_one("SELECT coalesce(max(seq), 0) FROM event_outbox", &[])
            .await?;
        let upto = seq_of(end.get(0)).max(after);
        let st = client
            .prepare_cached(
                "SELECT seq, record FROM event_outbox WHERE seq > $1 AND seq <= $2
                  ORDER BY seq LIMIT $3",
            )
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&st, &[&seq_param(after), &seq_param(upto), &limit])
            .await?
            .iter()
            .map(|r| OutboxRow {
                seq: seq_of(r.get(0)),
                record: r.get(1),
            })
            .collect();
        Ok((rows, upto))
    }

    /// The lowest cursor of all endpoints (the outbox is pruned up to it).
    pub async fn min_event_cursor(&self) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT min(seq) FROM event_cursors", &[])
            .await?;
        Ok(row.get::<_, Option<i64>>(0).map(seq_of))
    }

    /// The highest number the outbox has handed out so far (0 before the first).
    pub async fn last_event_seq(&self) -> Result<u64, PgError> {
        let client = self.client().await?;
        // The identity's sequence, not max(seq): pruning may have emptied the table.
        let row = client
            .query_one(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                   FROM event_outbox_seq_seq",
                &[],
            )
            .await?;
        Ok(seq_of(row.get(0)))
    }

    /// The cluster-wide prefix of event ids, created by the first replica that asks.
    pub async fn event_instance(&self) -> Result<String, PgError> {
        let client = self.client().await?;
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        client
            .execute(
                "INSERT INTO event_instance (id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&fresh],
            )
            .await?;
        Ok(client
            .query_one("SELECT id FROM event_instance", &[])
            .await?
            .get(0))
    }

    /// Every stored cursor: `(endpoint, last number it is done with)`.
    pub async fn event_cursors(&self) -> Result<Vec<(String, u64)>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT endpoint, seq FROM event_cursors ORDER BY endpoint",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), seq_of(r.get(1))))
            .collect())
    }

    /// Sets up the configured endpoints' cursors: a new endpoint starts at the current end of
    /// the outbox, one no longer configured loses its cursor and dead letters (every replica
    /// must name the same endpoints). Returns each cursor, in the order given.
    pub async fn open_event_cursors(&self, endpoints: &[&str]) -> Result<Vec<u64>, PgError> {
        let end = seq_param(self.last_event_seq().await?);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let names: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        tx.execute(
            "DELETE FROM event_cursors WHERE NOT (endpoint = ANY($1))",
            &[&names],
        )
        .await?;
        tx.execute(
            "DELETE FROM event_dead_letters WHERE NOT (endpoint = ANY($1))",
            &[&names],
        )
        .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in &names {
            tx.execute(
                "INSERT INTO event_cursors (endpoint, seq) VALUES ($1, $2)
                 ON CONFLICT (endpoint) DO NOTHING",
                &[name, &end],
            )
            .await?;
            let row = tx
                .query_one("SELECT seq FROM event_cursors WHERE endpoint = $1", &[name])
                .await?;
            out.push(seq_of(row.get(0)));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The endpoint's cursor.
    pub async fn event_cursor(&self, endpoint: &str) -> Result<Option<u64>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT seq FROM event_cursors WHERE endpoint = $1",
                &[&endpoint],
            )
            .await?
            .map(|r| seq_of(r.get(0))))
    }

    /// Moves the endpoint's cursor, only while `lease` on `job` is still this replica's:
    /// false (nothing written) if another replica took the endpoint over.
    pub async fn set_event_cursor(
        &self,
        endpoint: &str,
        seq: u64,
        job: &str,
        lease: &JobLease,
    ) -> Result<bool, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "UPDATE event_cursors SET seq = $2
                  WHERE endpoint = $1 AND EXISTS (
                        SELECT 1 FROM job_leases WHERE job = $3 AND lease_id = $4::text::uuid)",
            )
            .await?;
        Ok(client
            .execute(&st, &[&endpoint, &seq_param(seq), &job, &lease.lease_id])
            .await?
            == 1)
    }

    /// Removes outbox rows every endpoint is past (`seq <= upto`), at most `limit`.
    pub async fn prune_events(&self, upto: u64, limit: usize) -> Result<usize, PgError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let n = client
            .execute(
                "DELETE FROM event_outbox WHERE seq IN (
                     SELECT seq FROM event_outbox WHERE seq <= $1 ORDER BY seq LIMIT $2)",
                &[&seq_param(upto), &limit],
            )
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Keeps an event the endpoint gave up on (its retry mark cleared) and drops that
    /// endpoint's oldest beyond `keep`; returns how many were dropped.
    pub async fn dead_letter(
        &self,
        endpoint: &str,
        seq: u64,
        record: &[u8],
        reason: &str,
        keep: usize,
    ) -> Result<u64, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO event_dead_letters (endpoint, seq, reason, record, retry)
             VALUES ($1, $2, $3, $4, false)
             ON CONFLICT (endpoint, seq) DO UPDATE
                SET reason = excluded.reason, record = excluded.record, retry = false,
                    at = now()",
            &[&endpoint, &seq_param(seq), &reason, &record],
        )
        .await?;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let dropped = tx
            .execute(
                "DELETE FROM event_dead_letters WHERE endpoint = $1 AND seq IN (
                     SELECT seq FROM event_dead_letters WHERE endpoint = $1
                      ORDER BY seq DESC OFFSET $2)",
                &[&endpoint, &keep],
            )
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    /// A dead letter was delivered on retry.
    pub async fn forget_dead_letter(&self, endpoint: &str, seq: u64) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM event_dead_letters WHERE endpoint = $1 AND seq = $2",
                &[&endpoint, &seq_param(seq)],
            )
            .await?;
        Ok(())
    }

    /// Dead letters, of one endpoint or all, oldest first per endpoint.
    pub async fn dead_letters(&self, endpoint: Option<&str>) -> Result<Vec<DeadRow>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT endpoint, seq, record, retry FROM event_dead_letters
                  WHERE $1::text IS NULL OR endpoint = $1
                  ORDER BY endpoint, seq",
                &[&endpoint],
            )
            .await?
            .iter()
            .map(|r| DeadRow {
                endpoint: r.get(0),
                seq: seq_of(r.get(1)),
                record: r.get(2),
                retry: r.get(3),
            })
            .collect())
    }

    /// Marks dead letters (of one endpoint or all) for another round; returns how many.
    pub async fn retry_dead_letters(&self, endpoint: Option<&str>) -> Result<u64, PgError> {
        Ok(self
            .client()
            .await?
            .execute(
                "UPDATE event_dead_letters SET retry = true WHERE $1::text IS NULL OR endpoint = $1",
                &[&endpoint],
            )
            .await?)
    }

    /// Whether the endpoint has dead letters marked for retry.
    pub async fn retry_wanted(&self, endpoint: &str) -> Result<bool, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM event_dead_letters WHERE endpoint = $1 AND retry)",
            )
            .await?;
        Ok(client.query_one(&st, &[&endpoint]).await?.get(0))
    }

    /// Ends a job lease this replica holds (one taken over meanwhile is left alone).
    pub async fn drop_job_lease(&self, job: &str, lease: &JobLease) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM job_leases WHERE job = $1 AND lease_id = $2::text::uuid",
                &[&job, &lease.lease_id],
            )
            .await?;
        Ok(())
    }

    /// Extends a job lease this replica holds; false if it lost it (expired and taken over,
    /// or released).
    pub async fn renew_job(
        &self,
        job: &str,
        lease: &JobLease,
        ttl: Duration,
    ) -> Result<bool, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "UPDATE job_leases SET expires_at = now() + $3::bigint * interval '1 millisecond'
                  WHERE job = $1 AND lease_id = $2::text::uuid",
            )
            .await?;
        Ok(client
            .execute(&st, &[&job, &lease.lease_id, &millis(ttl)])
            .await?
            == 1)
    }
}
