//! The auth layer's identity records (users, keys, tokens, memberships: opaque `kind`/`id` →
//! bytes) in the `identity_records` table, shared by every replica, and the feed of their
//! changes. A trigger (migration 0004) announces each committed change on `CHANNEL`;
//! `Db::follow_identity_records` listens on a connection of its own, outside the pool, and
//! hands each change on, plus `Resync` whenever it (re)connects: notifications sent while no
//! connection listened are lost, so the follower reloads everything then. A connection that
//! dies silently is found by a ping every `PING_EVERY`.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::pg::{Db, PgError};

/// The NOTIFY channel of migration 0004.
pub const CHANNEL: &str = "transship_identity_records";
/// `application_name` of the listening connection (seen in `pg_stat_activity`).
pub const LISTENER_NAME: &str = "transship-identities";

/// How often the listening connection is checked, and how long a check may take: together the
/// longest a silently broken connection goes unnoticed.
const PING_EVERY: Duration = Duration::from_secs(20);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits between reconnection attempts, doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Changes queued for the follower before the listener stops reading (PostgreSQL queues the
/// rest server-side).
const QUEUE: usize = 1024;

/// Why one listening connection ended.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("the connection stopped answering")]
    Stalled,
    #[error("the reader task ended: {0}")]
    Reader(#[from] tokio::task::JoinError),
}

/// What the follower learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChange {
    /// Listening (again): changes may have been missed; reload every record.
    Resync,
    /// This record changed or went: read it again.
    Changed { kind: String, id: String },
}

/// PostgreSQL text cannot hold NUL, which the auth layer uses inside ids (`project\0user`):
/// stored as U+001F (unit separator), which no validated name or id contains.
fn to_pg(id: &str) -> String {
    id.replace('\0', "\u{1f}")
}

fn from_pg(id: &str) -> String {
    id.replace('\u{1f}', "\0")
}

impl Db {
    /// Every record of one kind, as `(id, value)`, in id order.
    pub async fn identity_records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, value FROM identity_records WHERE kind = $1 ORDER BY id",
                &[&kind],
            )
            .await?;
        Ok(rows.iter().map(|r| (from_pg(r.get(0)), r.get(1))).collect())
    }

    /// One record, if it exists.
    pub async fn identity_record(&self, kind: &str, id: &str) -> Result<Option<Vec<u8>>, PgError> {
        Ok(self
            .client()
            .await?
            .query_opt(
                "SELECT value FROM identity_records WHERE kind = $1 AND id = $2",
                &[&kind, &to_pg(id)],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Creates or replaces a record (committed when this returns).
    pub async fn put_identity_record(
        &self,
        kind: &str,
        id: &str,
        value: &[u8],
    ) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO identity_records (kind, id, value) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, id) DO UPDATE SET value = EXCLUDED.value",
                &[&kind, &to_pg(id), &value],
            )
            .await?;
        Ok(())
    }

    /// Removes a record; false if there was none.
    pub async fn delete_identity_record(&self, kind: &str, id: &str) -> Result<bool, PgError> {
        let n = self
            .client()
            .await?
            .execute(
                "DELETE FROM identity_records WHERE kind = $1 AND id = $2",
                &[&kind, &to_pg(id)],
            )
            .await?;
        Ok(n > 0)
    }

    /// Starts following changes: a task that listens (reconnecting as long as the receiver
    /// lives) and sends `Resync` each time it starts listening, then each change. It ends
    /// when the receiver is dropped. Call from within a Tokio runtime.
    pub fn follow_identity_records(&self) -> mpsc::Receiver<IdentityChange> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(follow(self.clone(), tx));
        rx
    }
}

async fn follow(db: Db, tx: mpsc::Sender<IdentityChange>) {
    let mut wait = RETRY_FIRST;
    loop {
        let ended = tokio::select! {
            () = tx.closed() => return,
            ended = listen(&db, &tx, &mut wait) => ended,
        };
        match ended {
            Ok(()) => tracing::warn!("the identity change feed ended; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "the identity change feed failed; reconnecting"),
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// One listening connection, until it fails. `wait` is reset once listening works.
async fn listen(
    db: &Db,
    tx: &mpsc::Sender<IdentityChange>,
    wait: &mut Duration,
) -> Result<(), FeedError> {
    let (client, mut connection) = db.connect_dedicated(LISTENER_NAME).await?;
    let forward = tx.clone();
    // The connection's messages carry the notifications; it must be polled for the client's
    // queries to make progress too, so it runs as a task of its own.
    let mut reader = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let AsyncMessage::Notification(n) = message? else {
                continue;
            };
            if n.channel() != CHANNEL {
                continue;
            }
            match serde_json::from_str::<(String, String)>(n.payload()) {
                Ok((kind, id)) => {
                    let change = IdentityChange::Changed {
                        kind,
                        id: from_pg(&id),
                    };
                    if forward.send(change).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable identity change notification"),
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    });
    let listening = subscribe(&client, tx, wait);
    let result = tokio::select! {
        read = &mut reader => read.map_err(FeedError::from).and_then(|r| r.map_err(FeedError::from)),
        failed = listening => failed,
    };
    reader.abort();
    result
}

/// LISTENs, tells the follower to reload, then pings until the connection fails.
async fn subscribe(
    client: &tokio_postgres::Client,
    tx: &mpsc::Sender<IdentityChange>,
    wait: &mut Duration,
) -> Result<(), FeedError> {
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Listening from here on: whatever changed before is read by the reload.
    if tx.send(IdentityChange::Resync).await.is_err() {
        return Ok(());
    }
    *wait = RETRY_FIRST;
    loop {
        tokio::time::sleep(PING_EVERY).await;
        tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1"))
            .await
            .map_err(|_| FeedError::Stalled)??;
    }
}
