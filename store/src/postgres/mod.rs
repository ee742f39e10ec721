//! The PostgreSQL backend. What only PostgreSQL does lives here: the advisory log lock,
//! `NOTIFY`/`LISTEN` between processes, the relay's session lock, `COPY` of records
//! before the log lock, and `FOR UPDATE SKIP LOCKED` claims. The rest is `../shared`.

mod load;
mod records;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::watch;

use scholia_events::store::{Leadership, Watch};
use scholia_events::{Error, Result};

use crate::error::Ctx;

pub(crate) type Db = Postgres;
/// What `Database::backend` answers.
pub(crate) const BACKEND: &str = "postgres";
pub(crate) type Backend = PgStore;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01), for binary `COPY`.
pub(crate) const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// The advisory lock key that serializes appends to the event log.
const LOG_LOCK_KEY: i64 = 0x05C4_011A;
/// The session advisory lock the deployment's relay holds.
const RELAY_LOCK_KEY: i64 = 0x05C4_011B;
/// Announces new log events to other processes (at commit).
const LOG_CHANNEL: &str = "scholia_log";
/// Announces queued builds to workers in other processes (at commit).
const WORK_CHANNEL: &str = "scholia_work";

/// What locks the row a claim takes: other workers skip it rather than wait.
pub(crate) const CLAIM_LOCK: &str = " FOR UPDATE SKIP LOCKED";

// Compiled once per backend on purpose: here `Db` is this backend's (see `lib.rs`).
#[allow(clippy::duplicate_mod)]
#[path = "../shared/mod.rs"]
mod shared;

pub(crate) struct PgStore {
    pool: PgPool,
    /// Bumped after local commits that appended to the log or queued work, so that this
    /// process's watchers need not wait for a notification's round trip.
    log_commits: watch::Sender<u64>,
    work_commits: watch::Sender<u64>,
}

impl PgStore {
    pub(crate) async fn connect(url: &str) -> Result<PgStore> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Invalid(format!("bad PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(24)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .ctx("connecting to PostgreSQL")?;
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| Error::internal("migrating the PostgreSQL database", e))?;
        Ok(PgStore {
            pool,
            log_commits: watch::Sender::new(0),
            work_commits: watch::Sender::new(0),
        })
    }

    async fn connection(&self) -> Result<PoolConnection<Postgres>> {
        self.pool.acquire().await.ctx("connecting to PostgreSQL")
    }

    /// A transaction holding the log lock until it commits or is dropped.
    pub(crate) async fn write(&self) -> Result<WriteTx> {
        let mut tx = self.begin().await?;
        tx.lock_log().await?;
        Ok(tx)
    }

    /// A transaction that does not append to the log.
    pub(crate) async fn begin(&self) -> Result<WriteTx> {
        let tx = self.begin_with("BEGIN", "beginning a transaction").await?;
        Ok(WriteTx {
            tx,
            logged: false,
            queued: false,
            log_commits: self.log_commits.clone(),
            work_commits: self.work_commits.clone(),
        })
    }

    /// A transaction begun with `statement`, in a task of its own so that a caller dropped
    /// meanwhile (a producer that hung up) cannot leave it half begun: sqlx 0.9.0 counts a
    /// transaction only once `BEGIN` is answered, and a `begin` cancelled before that
    /// returns its connection to the pool inside a transaction nobody ends, where the next
    /// borrower's writes would never commit. Finished in its own task, an abandoned
    /// transaction is dropped whole, and so rolled back.
    pub(crate) async fn begin_with(
        &self,
        statement: &'static str,
        what: &'static str,
    ) -> Result<Transaction<'static, Postgres>> {
        let pool = self.pool.clone();
        tokio::spawn(async move { pool.begin_with(statement).await })
            .await
            .map_err(|e| Error::internal("beginning a transaction", e))?
            .ctx(what)
    }

    fn watch_channel(&self, channel: &'static str, local: &watch::Sender<u64>) -> PgWatch {
        PgWatch {
            pool: self.pool.clone(),
            channel,
            listener: None,
            local: local.subscribe(),
        }
    }
}

pub(crate) struct WriteTx {
    tx: Transaction<'static, Postgres>,
    logged: bool,
    queued: bool,
    log_commits: watch::Sender<u64>,
    work_commits: watch::Sender<u64>,
}

impl WriteTx {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Take the log lock (held until commit), so that `seq` order is commit order.
    pub(crate) async fn lock_log(&mut self) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LOG_LOCK_KEY)
            .execute(&mut *self.tx)
            .await
            .ctx("taking the event log lock")?;
        Ok(())
    }

    /// This transaction appended to the log: tell relays, here and elsewhere, at commit.
    pub(crate) async fn announce_log(&mut self) -> Result<()> {
        if !self.logged {
            notify(&mut self.tx, LOG_CHANNEL).await?;
            self.logged = true;
        }
        Ok(())
    }

    /// This transaction queued builds: tell workers, here and elsewhere, at commit.
    pub(crate) async fn announce_work(&mut self) -> Result<()> {
        if !self.queued {
            notify(&mut self.tx, WORK_CHANNEL).await?;
            self.queued = true;
        }
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

async fn notify(conn: &mut PgConnection, channel: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await
        .ctx("announcing a commit")?;
    Ok(())
}

/// Woken by `NOTIFY` on one channel, or by a local commit.
struct PgWatch {
    pool: PgPool,
    channel: &'static str,
    listener: Option<PgListener>,
    local: watch::Receiver<u64>,
}

#[async_trait]
impl Watch for PgWatch {
    async fn changed(&mut self) {
        if self.listener.is_none() {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut listener) => match listener.listen(self.channel).await {
                    Ok(()) => self.listener = Some(listener),
                    Err(error) => tracing::debug!(error = %error, "Cannot listen; polling"),
                },
                Err(error) => tracing::debug!(error = %error, "Cannot listen; polling"),
            }
            if self.listener.is_none() {
                // Callers poll SQL after a wake-up; a second is as often as that is worth.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        }
        let listener = self.listener.as_mut().expect("connected above");
        tokio::select! {
            received = listener.try_recv() => {
                if received.is_err() {
                    self.listener = None;
                }
            }
            _ = self.local.changed() => {}
        }
    }
}

/// The relay's session lock, on a connection of its own.
struct PgLeadership {
    conn: PgConnection,
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn holds(&mut self) -> bool {
        sqlx::query("SELECT 1")
            .execute(&mut self.conn)
            .await
            .is_ok()
    }
}

impl PgStore {
    pub(crate) async fn log_watch(&self) -> Result<Box<dyn Watch>> {
        Ok(Box::new(self.watch_channel(LOG_CHANNEL, &self.log_commits)))
    }

    pub(crate) async fn work_watch(&self) -> Result<Box<dyn Watch>> {
        Ok(Box::new(
            self.watch_channel(WORK_CHANNEL, &self.work_commits),
        ))
    }

    pub(crate) async fn lead_relay(&self) -> Result<Option<Box<dyn Leadership>>> {
        let mut conn = self.connection().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .ctx("taking the relay lock")?;
        Ok(got.then(|| Box::new(PgLeadership { conn }) as Box<dyn Leadership>))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[tokio::test]
    async fn a_transaction_abandoned_while_it_begins_leaves_no_connection_inside_it() {
        let Some(scratch) = Scratch::postgres().await else {
            return;
        };
        let store = PgStore::connect(&scratch.url)
            .await
            .expect("connecting the store");
        let other = PgPool::connect(&scratch.url).await.expect("a second pool");
        sqlx::query("CREATE TABLE seen (x int)")
            .execute(&store.pool)
            .await
            .expect("creating a table");

        // Begins dropped before they finish, as a request handler is dropped when its
        // producer hangs up (after a varying number of polls, so that some drops land
        // between the BEGIN going out and its answer coming back). After each, a
        // single-statement write through the pool, as a lease's heartbeat is, must be
        // committed: seen from another connection.
        let mut unseen = 0;
        for i in 0..400 {
            {
                let mut begin = std::pin::pin!(store.begin());
                for _ in 0..=(i % 40) {
                    if futures::poll!(begin.as_mut()).is_ready() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            sqlx::query("INSERT INTO seen VALUES ($1)")
                .bind(i)
                .execute(&store.pool)
                .await
                .expect("writing");
            let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen WHERE x = $1")
                .bind(i)
                .fetch_one(&other)
                .await
                .expect("reading");
            if seen == 0 {
                unseen += 1;
            }
        }
        store.pool.close().await;
        other.close().await;
        scratch.remove().await;
        assert_eq!(
            unseen, 0,
            "writes that went into a transaction an abandoned begin left open"
        );
    }
}
