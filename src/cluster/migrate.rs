//! Schema migrations: numbered SQL files in `src/cluster/migrations/`, embedded in the binary
//! and applied at start, each once, in order. Replicas starting together serialise on an
//! advisory lock, and all pending migrations run in one transaction with the
//! `schema_migrations` rows that record them, so a crash leaves the schema as it was. A database
//! migrated by a newer binary is refused rather than used with a schema this one does not know.

use super::pg::PgError;

/// One embedded migration.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this binary knows, in order. Never edit one that has shipped: add the next.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "upload_tails",
        sql: include_str!("migrations/0002_upload_tails.sql"),
    },
    Migration {
        version: 3,
        name: "registry_metadata",
        sql: include_str!("migrations/0003_registry_metadata.sql"),
    },
    Migration {
        version: 4,
        name: "identity_notify",
        sql: include_str!("migrations/0004_identity_notify.sql"),
    },
    Migration {
        version: 5,
        name: "console_sessions",
        sql: include_str!("migrations/0005_console_sessions.sql"),
    },
    Migration {
        version: 6,
        name: "event_delivery",
        sql: include_str!("migrations/0006_event_delivery.sql"),
    },
    Migration {
        version: 7,
        name: "cache_state",
        sql: include_str!("migrations/0007_cache_state.sql"),
    },
];

/// The advisory lock key replicas take while migrating ("tsmigrat" in ASCII).
const LOCK_KEY: i64 = 0x7473_6d69_6772_6174;

/// The schema version this binary expects.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies what is pending; returns the versions applied (none when the schema is current).
pub async fn apply(client: &mut deadpool_postgres::Client) -> Result<Vec<i32>, PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    // The versions applied, not just the highest: migrations written on parallel branches may
    // be merged out of order, and one numbered below an applied one must still run.
    let done: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let current = done.iter().copied().max().unwrap_or(0);
    if current > latest() {
        return Err(PgError::SchemaTooNew {
            database: current,
            binary: latest(),
        });
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "applied database migrations");
    }
    Ok(applied)
}

/// Refuses a schema other than exactly this binary's migrations (nothing is changed).
pub async fn check_current(client: &deadpool_postgres::Client) -> Result<(), PgError> {
    let mut database: Vec<i32> = match client
        .query("SELECT version FROM schema_migrations", &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // No table: nothing was ever migrated.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    database.sort_unstable();
    let binary: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    if database != binary {
        return Err(PgError::SchemaNotCurrent { database, binary });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_up_in_order() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "{} is not numbered after {last}", m.name);
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
            last = m.version;
        }
        assert_eq!(latest(), last);
    }
}
