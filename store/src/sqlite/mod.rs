//! The SQLite backend of the embedded deployment: one file, one process. SQLite has one
//! writer at a time, so every write transaction takes this process's write lock (which
//! doubles as the log lock) and `BEGIN IMMEDIATE`; two single-statement updates that must
//! not queue behind batches (a lease's heartbeat, the relay's cursor) go straight to the
//! pool and rely on SQLite's busy wait. Readers use the pool freely (WAL). Notifications
//! stay in the process. The rest is `../shared`.

mod records;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How long a batch of records may wait for the write lock (see `write_batch_tx`).
const INGEST_LOCK_WAIT: Duration = Duration::from_secs(10);
/// A write holding the lock longer than this is logged.
const SLOW_WRITE: Duration = Duration::from_secs(2);

// Compiled once per backend on purpose: here `Db` is this backend's (see `lib.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../shared/mod.rs"]
mod shared;

pub(crate) struct SqliteStore {
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    /// `INGEST_LOCK_WAIT`, but for tests.
    ingest_lock_wait: Duration,
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
            ingest_lock_wait: INGEST_LOCK_WAIT,
            log_commits: watch::Sender::new(0),
            work_commits: watch::Sender::new(0),
        })
    }

    /// A transaction holding the write lock (which is also the log lock) until commit.
    pub(crate) async fn write(&self) -> Result<WriteTx> {
        let guard = self.write_lock.clone().lock_owned().await;
        self.begin_holding(guard).await
    }

    /// `write`, for a batch of records: it waits at most `INGEST_LOCK_WAIT` for the lock,
    /// and is refused as unavailable (503 with `Retry-After`) past that, having done
    /// nothing. The lock is fair, so a batch waits for every one ahead of it: when they
    /// are more than the disk writes in that time, an answer now keeps the producers'
    /// requests from timing out one after another while the server finishes each
    /// abandoned one, and the batches that do get the lock keep the disk busy.
    pub(crate) async fn write_batch_tx(&self) -> Result<WriteTx> {
        let wait = self.ingest_lock_wait;
        let guard = tokio::time::timeout(wait, self.write_lock.clone().lock_owned())
            .await
            .map_err(|_| {
                Error::unavailable(
                    "the database",
                    format!(
                        "it has been busy writing other batches for {:.1} s; nothing of this batch was written, send it again shortly",
                        wait.as_secs_f64()
                    ),
                )
            })?;
        self.begin_holding(guard).await
    }

    async fn begin_holding(&self, guard: OwnedMutexGuard<()>) -> Result<WriteTx> {
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("beginning a write")?;
        Ok(WriteTx {
            tx,
            _guard: guard,
            locked_at: Instant::now(),
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
    locked_at: Instant,
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
        let held = self.locked_at.elapsed();
        if held > SLOW_WRITE {
            tracing::warn!(
                held_ms = held.as_millis() as u64,
                "a write held the SQLite write lock for long; every other write waited for it"
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[tokio::test]
    async fn a_batch_that_cannot_get_the_write_lock_in_time_is_refused_as_unavailable() {
        let scratch = Scratch::sqlite();
        let mut store = SqliteStore::connect(&scratch.url).await.expect("opening");
        store.ingest_lock_wait = Duration::from_millis(200);

        let held = store.write().await.expect("a write holding the lock");
        let started = Instant::now();
        let refused = store.write_batch_tx().await;
        assert!(
            matches!(refused, Err(Error::Unavailable { .. })),
            "refused while another write holds the lock: {:?}",
            refused.err()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let said = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            said.contains("for 0.2 s") && said.contains("send it again"),
            "{said}"
        );
        drop(held);
        let tx = store.write_batch_tx().await.expect("the lock once free");
        tx.commit().await.expect("committing");
        drop(store);
        scratch.remove().await;
    }
}
