//! The SQL database: SQLite (embedded) or PostgreSQL, chosen once from the URL.
//!
//! Queries are written once where both dialects agree (`$1` placeholders work in both)
//! and per backend where they do not. Writes that append to the event log go through
//! [`WriteTx`], which holds the deployment-wide log lock until commit so that `seq`
//! order is commit order; that is what lets the relay and replay read the log by `seq`
//! without ever missing an event committed late.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use crate::error::{DbContext, Error, Result};

/// The advisory lock key that serializes appends to the event log on PostgreSQL.
const LOG_LOCK_KEY: i64 = 0x05C4_011A;
/// The channel on which PostgreSQL announces new log events to relays in other processes.
pub const LOG_CHANNEL: &str = "scholia_log";

/// Where data lives when no `SCHOLIA_DATABASE_URL` is given.
pub const DEFAULT_DATA_DIR: &str = "scholia-data";

#[derive(Clone)]
pub enum Database {
    Sqlite(SqliteDb),
    Postgres(PgDb),
}

#[derive(Clone)]
pub struct SqliteDb {
    pub pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    log_appended: Arc<Notify>,
}

#[derive(Clone)]
pub struct PgDb {
    pub pool: PgPool,
    log_appended: Arc<Notify>,
}

/// A transaction that may append to the event log.
pub enum WriteTx {
    Sqlite {
        tx: Transaction<'static, Sqlite>,
        _guard: OwnedMutexGuard<()>,
        log_appended: Arc<Notify>,
    },
    Postgres {
        tx: Transaction<'static, Postgres>,
        log_appended: Arc<Notify>,
    },
}

impl WriteTx {
    /// Commit, then wake this process's relay.
    pub async fn commit(self) -> Result<()> {
        let log_appended = match self {
            WriteTx::Sqlite {
                tx, log_appended, ..
            } => {
                tx.commit().await.context("committing")?;
                log_appended
            }
            WriteTx::Postgres { tx, log_appended } => {
                tx.commit().await.context("committing")?;
                log_appended
            }
        };
        log_appended.notify_waiters();
        Ok(())
    }
}

impl Database {
    /// Connect to `url` (`sqlite://…` or `postgres://…`), or to the embedded SQLite file
    /// under `./scholia-data/` when `url` is `None`, and run pending migrations.
    pub async fn connect(url: Option<&str>) -> Result<Database> {
        let db = match url {
            None => {
                std::fs::create_dir_all(DEFAULT_DATA_DIR).map_err(|e| {
                    Error::Config(format!(
                        "cannot create the data directory ./{DEFAULT_DATA_DIR}: {e}"
                    ))
                })?;
                Self::connect_sqlite(&format!("sqlite://{DEFAULT_DATA_DIR}/scholia.db")).await?
            }
            Some(url) if url.starts_with("sqlite:") => Self::connect_sqlite(url).await?,
            Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                Self::connect_postgres(url).await?
            }
            Some(url) => {
                return Err(Error::Config(format!(
                    "SCHOLIA_DATABASE_URL must start with sqlite:// or postgres://, not {:?}",
                    url.split(':').next().unwrap_or(url)
                )));
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn connect_sqlite(url: &str) -> Result<Database> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("bad SQLite URL {url:?}: {e}")))?;
        if let Some(parent) = Path::new(options.get_filename()).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Config(format!("cannot create {}: {e}", parent.display())))?;
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged batch survives power loss, not only a killed process.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .context("opening the SQLite database")?;
        Ok(Database::Sqlite(SqliteDb {
            pool,
            write_lock: Arc::new(Mutex::new(())),
            log_appended: Arc::new(Notify::new()),
        }))
    }

    async fn connect_postgres(url: &str) -> Result<Database> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Config(format!("bad PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .context("connecting to PostgreSQL")?;
        Ok(Database::Postgres(PgDb {
            pool,
            log_appended: Arc::new(Notify::new()),
        }))
    }

    pub async fn migrate(&self) -> Result<()> {
        match self {
            Database::Sqlite(db) => sqlx::migrate!("../migrations/sqlite").run(&db.pool).await?,
            Database::Postgres(pg) => {
                sqlx::migrate!("../migrations/postgres")
                    .run(&pg.pool)
                    .await?
            }
        }
        Ok(())
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// Begin a transaction holding the log lock until it commits or is dropped.
    pub async fn begin_write(&self) -> Result<WriteTx> {
        match self {
            Database::Sqlite(db) => {
                let guard = db.write_lock.clone().lock_owned().await;
                let tx = db
                    .pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .context("beginning a write")?;
                Ok(WriteTx::Sqlite {
                    tx,
                    _guard: guard,
                    log_appended: db.log_appended.clone(),
                })
            }
            Database::Postgres(pg) => {
                let mut tx = pg.pool.begin().await.context("beginning a write")?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(LOG_LOCK_KEY)
                    .execute(&mut *tx)
                    .await
                    .context("taking the event log lock")?;
                Ok(WriteTx::Postgres {
                    tx,
                    log_appended: pg.log_appended.clone(),
                })
            }
        }
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Database::Sqlite(db) => sqlx::query("SELECT 1").execute(&db.pool).await.map(|_| ()),
            Database::Postgres(pg) => sqlx::query("SELECT 1").execute(&pg.pool).await.map(|_| ()),
        }
        .context("checking the database")
    }

    pub async fn close(&self) {
        match self {
            Database::Sqlite(db) => db.pool.close().await,
            Database::Postgres(pg) => pg.pool.close().await,
        }
    }

    /// Woken after every local commit that appended to the log.
    pub fn log_appended(&self) -> Arc<Notify> {
        match self {
            Database::Sqlite(db) => db.log_appended.clone(),
            Database::Postgres(pg) => pg.log_appended.clone(),
        }
    }

    pub fn pg(&self) -> Option<&PgPool> {
        match self {
            Database::Postgres(pg) => Some(&pg.pool),
            Database::Sqlite(_) => None,
        }
    }
}
