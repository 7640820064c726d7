//! The metadata database: a pool of PostgreSQL connections (`Db`), opened with the schema
//! migrated to what this binary knows (`migrate`). Everything replicas must agree on lives
//! there; the operations on it are in sibling modules (`fill_lease`, `tags`, `signing_key`).
//! Time is always the database's `now()`, never a replica's clock.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::migrate;
use super::pg_tls::{self, Tls, TlsStream};

/// How long a caller waits for a free connection before the request fails.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://user@host:port/dbname` or `host=... dbname=...`, without a password.
    pub url: String,
    pub password: Option<String>,
    /// Connections kept at most.
    pub pool_size: usize,
    /// The CAs to trust for the server's certificate when the connection uses TLS, instead of
    /// the web PKI's roots (`None`).
    pub ca_roots: Option<rustls::RootCertStore>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.url)
            .field("pool_size", &self.pool_size)
            .field("ca_roots", &self.ca_roots.as_ref().map(|r| r.len()))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("storage.postgres.url: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot build the PostgreSQL pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("no PostgreSQL connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(
        "the PostgreSQL server's certificate failed verification ({0}): trust the CA that issued it with storage.postgres.ca_file, and connect by a host name (or address) the certificate names"
    )]
    Certificate(rustls::Error),
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error(
        "the database's schema is version {database}, newer than this binary knows ({binary}): upgrade transship before pointing it at this database"
    )]
    SchemaTooNew { database: i32, binary: i32 },
    #[error(
        "the database's schema (versions {database:?}) is not this binary's ({binary:?}): start a replica of this version first, which migrates it, or use the matching transship"
    )]
    SchemaNotCurrent {
        database: Vec<i32>,
        binary: Vec<i32>,
    },
    #[error("the database holds an unexpected value: {0}")]
    Corrupt(String),
}

/// The pooled database, its schema current.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// How the pool connects, kept for connections outside it (`connect_dedicated`).
    config: tokio_postgres::Config,
    tls: Tls,
}

impl Db {
    /// Connects and brings the schema up to date (see `migrate::apply`).
    pub async fn open(options: &PgOptions) -> Result<Self, PgError> {
        let db = Self::connect(options)?;
        migrate::apply(&mut db.client().await?).await?;
        Ok(db)
    }

    /// The pool, with no connection made yet.
    fn connect(options: &PgOptions) -> Result<Self, PgError> {
        let mut config: tokio_postgres::Config = options.url.parse().map_err(PgError::Url)?;
        if let Some(password) = &options.password {
            config.password(password);
        }
        if config.get_application_name().is_none() {
            config.application_name("transship");
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        let tls = pg_tls::connector(options.ca_roots.as_ref());
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()?;
        Ok(Self { pool, config, tls })
    }

    /// Connects to a database whose schema must already be exactly this binary's (for the
    /// offline commands: only a replica starting up changes the schema under the others).
    pub async fn open_current(options: &PgOptions) -> Result<Self, PgError> {
        let db = Self::connect(options)?;
        migrate::check_current(&db.client().await?).await?;
        Ok(db)
    }

    /// A connection of its own, outside the pool, named `application_name` in
    /// `pg_stat_activity`: for a session that must outlive requests (LISTEN). The caller drives
    /// the returned connection (its messages carry the notifications).
    pub async fn connect_dedicated(
        &self,
        application_name: &str,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>,
        ),
        PgError,
    > {
        let mut config = self.config.clone();
        config.application_name(application_name);
        config
            .connect(self.tls.clone())
            .await
            .map_err(|e| failed_connecting(e, PgError::Query))
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        self.pool
            .get()
            .await
            .map_err(|e| failed_connecting(e, PgError::Pool))
    }
}

/// Why a connection could not be made: the certificate failure hidden in `e` if there is one
/// (it names what to fix), else `e` as `other` says.
fn failed_connecting<E: std::error::Error + 'static>(
    e: E,
    other: impl FnOnce(E) -> PgError,
) -> PgError {
    match pg_tls::certificate_failure(&e) {
        Some(cert) => PgError::Certificate(cert.clone()),
        None => other(e),
    }
}
