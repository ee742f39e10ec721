//! The SQLite backend of the embedded deployment: one file, one process. SQLite has one
//! writer at a time, so every write takes this process's write lock (which doubles as the
//! log lock) and `BEGIN IMMEDIATE`; readers use the pool freely (WAL). Notifications stay
//! in the process. The rest is `../shared`.

mod records;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use scholia_events::store::{Leadership, Watch};
use scholia_events::{Error, Result};

use crate::error::Ctx;

pub(crate) type Db = Sqlite;
/// What `Database::backend` answers.
pub(crate) const BACKEND: &str = "sqlite";
pub(crate) type Backend = SqliteStore;

/// A claim runs under the write lock, so it locks no row of its own.
pub(crate) const CLAIM_LOCK: &str = "";

// Compiled once per backend on purpose: here `Db` is this backend's (see `lib.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../shared/mod.rs"]
mod shared;

pub(crate) struct SqliteStore {
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    log_commits: watch::Sender<u64>,
    work_commits: watch::Sender<u64>,
}

impl SqliteStore {
    pub(crate) async fn connect(url: &str) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Invalid(format!("bad SQLite URL {url:?}: {e}")))?;
        if let Some(parent) = Path::new(options.get_filename()).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", parent.display())))?;
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
            .ctx("opening the SQLite database")?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| Error::internal("migrating the SQLite database", e))?;
        Ok(SqliteStore {
            pool,
            write_lock: Arc::new(Mutex::new(())),
            log_commits: watch::Sender::new(0),
            work_commits: watch::Sender::new(0),
        })
    }

    /// A transaction holding the write lock (which is also the log lock) until commit.
    pub(crate) async fn write(&self) -> Result<WriteTx> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("beginning a write")?;
        Ok(WriteTx {
            tx,
            _guard: guard,
            logged: false,
            queued: false,
            log_commits: self.log_commits.clone(),
            work_commits: self.work_commits.clone(),
        })
    }

    /// SQLite has one writer: every write takes the same lock.
    pub(crate) async fn begin(&self) -> Result<WriteTx> {
        self.write().await
    }

    pub(crate) async fn log_watch(&self) -> Result<Box<dyn Watch>> {
        Ok(Box::new(LocalWatch(self.log_commits.subscribe())))
    }

    pub(crate) async fn work_watch(&self) -> Result<Box<dyn Watch>> {
        Ok(Box::new(LocalWatch(self.work_commits.subscribe())))
    }

    /// One process owns an SQLite file, so it always leads.
    pub(crate) async fn lead_relay(&self) -> Result<Option<Box<dyn Leadership>>> {
        Ok(Some(Box::new(LocalLeadership)))
    }
}

pub(crate) struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _guard: OwnedMutexGuard<()>,
    logged: bool,
    queued: bool,
    log_commits: watch::Sender<u64>,
    work_commits: watch::Sender<u64>,
}

impl WriteTx {
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }

    pub(crate) async fn announce_log(&mut self) -> Result<()> {
        self.logged = true;
        Ok(())
    }

    pub(crate) async fn announce_work(&mut self) -> Result<()> {
        self.queued = true;
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<()> {
        self.tx.commit().await.ctx("committing")?;
        if self.logged {
            self.log_commits.send_modify(|n| *n += 1);
        }
        if self.queued {
            self.work_commits.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}

/// Woken by commits of this process.
struct LocalWatch(watch::Receiver<u64>);

#[async_trait]
impl Watch for LocalWatch {
    async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

struct LocalLeadership;

#[async_trait]
impl Leadership for LocalLeadership {
    async fn holds(&mut self) -> bool {
        true
    }
}
