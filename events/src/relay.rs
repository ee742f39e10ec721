//! The relay: publishes committed log events to the bus, in `seq` order (the outbox).
//!
//! One relay publishes per deployment at a time: on PostgreSQL the leader holds a
//! session advisory lock, and others stand by. The position reached is kept in SQL
//! (`relay_cursor`), so after a crash or a NATS outage the relay resumes where the bus
//! last acknowledged, and the bus deduplicates what it publishes twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::db::{Database, LOG_CHANNEL};
use crate::error::{DbContext, Result};
use crate::log;

const RELAY_LOCK_KEY: i64 = 0x05C4_011B;
const BATCH: i64 = 1_000;

/// What the relay has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct RelayStatus {
    /// The highest `seq` the bus has acknowledged.
    pub published_seq: AtomicI64,
    /// How many publish attempts failed since start.
    pub failures: AtomicI64,
}

pub struct Relay {
    db: Database,
    bus: Arc<dyn Bus>,
    /// Where the cursor of this bus is kept; `None` to start from the log head (an
    /// in-process bus has no consumers from before this process).
    cursor_name: Option<String>,
    pub status: Arc<RelayStatus>,
}

impl Relay {
    pub fn new(db: Database, bus: Arc<dyn Bus>, cursor_name: Option<String>) -> Self {
        Relay {
            db,
            bus,
            cursor_name,
            status: Arc::new(RelayStatus::default()),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        loop {
            // On PostgreSQL, hold the relay lock on a connection of our own.
            let leader = match &self.db {
                Database::Postgres(pg) => {
                    let mut conn = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        conn = pg.pool.acquire() => match conn {
                            Ok(conn) => conn.detach(),
                            Err(error) => {
                                tracing::warn!(error = %error, "Relay cannot reach the database; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        },
                    };
                    let got: std::result::Result<bool, _> =
                        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                            .bind(RELAY_LOCK_KEY)
                            .fetch_one(&mut conn)
                            .await;
                    match got {
                        Ok(true) => Some(conn),
                        Ok(false) => {
                            drop(conn);
                            tokio::select! {
                                _ = shutdown.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                            }
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "Relay cannot take its lock; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                Database::Sqlite(_) => None,
            };
            match self.lead(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    drop(leader);
                    tracing::warn!(error = %error, "Relay stopped on an error; restarting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    async fn lead(&self, shutdown: &CancellationToken) -> Result<()> {
        let mut cursor = match &self.cursor_name {
            Some(name) => self.load_cursor(name).await?,
            None => log::head(&self.db).await?,
        };
        self.status.published_seq.store(cursor, Ordering::Relaxed);
        let mut listener = match &self.db {
            Database::Postgres(pg) => {
                let mut listener = PgListener::connect_with(&pg.pool)
                    .await
                    .context("listening for log events")?;
                listener
                    .listen(LOG_CHANNEL)
                    .await
                    .context("listening for log events")?;
                Some(listener)
            }
            Database::Sqlite(_) => None,
        };
        let local = self.db.log_appended();
        let mut backoff = Duration::from_millis(100);
        tracing::info!(
            bus = self.bus.name(),
            after = cursor,
            "Relay publishing the event log"
        );
        loop {
            // Register interest before reading, so a commit in between still wakes us.
            let notified = local.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let events = log::read_after(&self.db, cursor, BATCH).await?;
            if events.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut notified => {}
                    _ = async {
                        match listener.as_mut() {
                            Some(listener) => { let _ = listener.try_recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let (published, result) = self.bus.publish(&events).await;
            if published > 0 {
                cursor = events[published - 1].seq;
                self.status.published_seq.store(cursor, Ordering::Relaxed);
                if let Some(name) = &self.cursor_name {
                    self.save_cursor(name, cursor).await?;
                }
            }
            if let Err(error) = result {
                let failures = self.status.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures % 20 == 1 {
                    tracing::warn!(error = %error, pending_after = cursor, "Bus refused events; they stay in the log and will be retried");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            } else {
                backoff = Duration::from_millis(100);
            }
        }
    }

    async fn load_cursor(&self, name: &str) -> Result<i64> {
        let sql = "SELECT seq FROM relay_cursor WHERE name = $1";
        let seq: Option<i64> = match &self.db {
            Database::Sqlite(db) => {
                sqlx::query_scalar(sql)
                    .bind(name)
                    .fetch_optional(&db.pool)
                    .await
            }
            Database::Postgres(pg) => {
                sqlx::query_scalar(sql)
                    .bind(name)
                    .fetch_optional(&pg.pool)
                    .await
            }
        }
        .context("reading the relay cursor")?;
        Ok(seq.unwrap_or(0))
    }

    async fn save_cursor(&self, name: &str, seq: i64) -> Result<()> {
        let sql = "INSERT INTO relay_cursor (name, seq) VALUES ($1, $2) \
                   ON CONFLICT (name) DO UPDATE SET seq = excluded.seq";
        match &self.db {
            Database::Sqlite(db) => sqlx::query(sql)
                .bind(name)
                .bind(seq)
                .execute(&db.pool)
                .await
                .map(|_| ()),
            Database::Postgres(pg) => sqlx::query(sql)
                .bind(name)
                .bind(seq)
                .execute(&pg.pool)
                .await
                .map(|_| ()),
        }
        .context("saving the relay cursor")?;
        Ok(())
    }
}
