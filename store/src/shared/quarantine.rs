//! The quarantine: lines that could not be accepted, with their raw text, kept for a
//! while and up to a number of rows (`prune`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use scholia_events::Result;
use scholia_events::store::{Quarantine, Quarantined};

use super::{Backend, Db};
use crate::error::Ctx;
use crate::time::Timestamp;

type Row = (
    i64,
    Timestamp,
    Option<String>,
    Option<String>,
    Option<Uuid>,
    i32,
    String,
    String,
    String,
);

const COLUMNS: &str = "id, received_at, kind, source, data_id, line, raw, error, actor";

fn quarantined(
    (id, received_at, kind, source, data_id, line, raw, error, actor): Row,
) -> Quarantined {
    Quarantined {
        id,
        received_at: received_at.into(),
        kind,
        source,
        data_id,
        line,
        raw,
        error,
        actor,
    }
}

#[async_trait]
impl Quarantine for Backend {
    async fn list(&self, before: Option<i64>, limit: usize) -> Result<Vec<Quarantined>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM quarantine WHERE id < $1 ORDER BY id DESC LIMIT $2"
        )))
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("reading the quarantine")?;
        Ok(rows.into_iter().map(quarantined).collect())
    }

    async fn list_after(&self, after: i64, limit: usize) -> Result<Vec<Quarantined>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM quarantine WHERE id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("reading the quarantine")?;
        Ok(rows.into_iter().map(quarantined).collect())
    }

    async fn prune(&self, older_than: DateTime<Utc>, keep: u64) -> Result<u64> {
        let mut tx = self.begin().await?;
        let old = sqlx::query::<Db>("DELETE FROM quarantine WHERE received_at < $1")
            .bind(Timestamp(older_than))
            .execute(tx.conn())
            .await
            .ctx("pruning the quarantine")?
            .rows_affected();
        // The id below which rows are beyond the newest `keep`.
        let cut: Option<i64> = sqlx::query_scalar::<Db, i64>(
            "SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET $1",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .fetch_optional(tx.conn())
        .await
        .ctx("pruning the quarantine")?;
        let over = match cut {
            Some(cut) => sqlx::query::<Db>("DELETE FROM quarantine WHERE id <= $1")
                .bind(cut)
                .execute(tx.conn())
                .await
                .ctx("pruning the quarantine")?
                .rows_affected(),
            None => 0,
        };
        tx.commit().await?;
        Ok(old + over)
    }
}
