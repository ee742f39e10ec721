//! The SQL both backends share. This folder is compiled once inside each backend module
//! (`postgres` and `sqlite`, through `#[path]`), where `Db`, `Backend` and `WriteTx` are
//! that backend's: one source, two typed implementations. Statements here use what both
//! dialects agree on (`$1` placeholders, `ON CONFLICT`, `RETURNING`, row values); times go
//! through `Timestamp`, and anything else that differs is asked of the backend module.

pub(crate) mod analyses;
pub(crate) mod annotations;
pub(crate) mod invalidations;
pub(crate) mod kinds;
pub(crate) mod log;
pub(crate) mod quarantine;
pub(crate) mod queue;
pub(crate) mod records;
pub(crate) mod schedules;
pub(crate) mod tokens;

pub(crate) use super::{BACKEND, Backend, CLAIM_LOCK, Db, WriteTx};

use async_trait::async_trait;
use uuid::Uuid;

use scholia_events::Result;

use crate::error::Ctx;

/// The most bind parameters one statement carries: under both backends' limits
/// (PostgreSQL 65,535; SQLite 32,766).
pub(crate) const MAX_BINDS: usize = 30_000;

#[async_trait]
impl scholia_events::store::Database for Backend {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .ctx("checking the database")?;
        Ok(())
    }

    async fn installation(&self) -> Result<Uuid> {
        sqlx::query_scalar::<Db, Uuid>("SELECT id FROM installation")
            .fetch_one(&self.pool)
            .await
            .ctx("reading the installation id")
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
