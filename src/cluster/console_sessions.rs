//! Console sessions in the shared database (the cluster profile's): opened on one replica,
//! found on every other, ended everywhere at sign-out. Rows are keyed by the SHA-256 of the
//! cookie; expiry is the database's clock. The table is bounded as the local profile's
//! in-memory one is: a subject holds at most `per_subject` sessions (a new one ends its
//! oldest), and the table at most `max` (expired rows go first, then those closest to
//! expiry).

use std::time::Duration;

use super::pg::{Db, PgError};

/// A session row as a replica reads it back.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub subject: String,
    pub csrf: String,
    pub mark: Option<String>,
}

/// The bounds a sign-in keeps the table within.
#[derive(Debug, Clone, Copy)]
pub struct SessionBounds {
    pub ttl: Duration,
    pub per_subject: usize,
    pub max: usize,
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Db {
    /// Records a new session `id` (the cookie's hash) and trims the table to `bounds`, in one
    /// transaction.
    pub async fn open_console_session(
        &self,
        id: &[u8],
        row: &SessionRow,
        bounds: SessionBounds,
    ) -> Result<(), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "DELETE FROM console_sessions WHERE expires_at <= now()",
            &[],
        )
        .await?;
        // The subject's oldest beyond `per_subject - 1`, to make room for this one.
        tx.execute(
            "DELETE FROM console_sessions WHERE id IN (
                 SELECT id FROM console_sessions WHERE subject = $1
                  ORDER BY expires_at DESC OFFSET $2)",
            &[&row.subject, &count(bounds.per_subject.saturating_sub(1))],
        )
        .await?;
        tx.execute(
            "DELETE FROM console_sessions WHERE id IN (
                 SELECT id FROM console_sessions ORDER BY expires_at DESC OFFSET $1)",
            &[&count(bounds.max.saturating_sub(1))],
        )
        .await?;
        let ttl = i64::try_from(bounds.ttl.as_secs()).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO console_sessions (id, subject, csrf, mark, expires_at)
             VALUES ($1, $2, $3, $4, now() + $5::bigint * interval '1 second')",
            &[&id, &row.subject, &row.csrf, &row.mark, &ttl],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The live session `id`, if there is one.
    pub async fn console_session(&self, id: &[u8]) -> Result<Option<SessionRow>, PgError> {
        let client = self.client().await?;
        let st = client
            .prepare_cached(
                "SELECT subject, csrf, mark FROM console_sessions
                  WHERE id = $1 AND expires_at > now()",
            )
            .await?;
        Ok(client.query_opt(&st, &[&id]).await?.map(|r| SessionRow {
            subject: r.get(0),
            csrf: r.get(1),
            mark: r.get(2),
        }))
    }

    /// Ends session `id` (sign-out, or a credential that no longer holds).
    pub async fn close_console_session(&self, id: &[u8]) -> Result<(), PgError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM console_sessions WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }
}
