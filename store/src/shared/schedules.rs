//! Schedules of preemptive rebuilds. A firing is claimed with a conditional update, so
//! exactly one process fires each slot however many run the scheduler.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use scholia_events::store::{ScheduleRecord, Schedules};
use scholia_events::{NewEvent, Result};

use super::{Backend, Db};
use crate::error::Ctx;
use crate::time::Timestamp;

type Row = (String, String, String, String, Option<Timestamp>, Timestamp);

const COLUMNS: &str = "name, analysis, cron, window_spec, last_fired, updated_at";

fn record((name, analysis, cron, window, last_fired, updated_at): Row) -> ScheduleRecord {
    ScheduleRecord {
        name,
        analysis,
        cron,
        window,
        last_fired: last_fired.map(Into::into),
        updated_at: updated_at.into(),
    }
}

#[async_trait]
impl Schedules for Backend {
    async fn put(&self, schedule: &ScheduleRecord, actor: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query::<Db>(
            "INSERT INTO schedules (name, analysis, cron, window_spec, last_fired, updated_at, updated_by) \
             VALUES ($1, $2, $3, $4, NULL, $5, $6) ON CONFLICT (name) DO UPDATE SET analysis = excluded.analysis, \
             cron = excluded.cron, window_spec = excluded.window_spec, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
        )
        .bind(&schedule.name)
        .bind(&schedule.analysis)
        .bind(&schedule.cron)
        .bind(&schedule.window)
        .bind(Timestamp(schedule.updated_at))
        .bind(actor)
        .execute(tx.conn())
        .await
        .ctx("storing a schedule")?;
        super::log::commit_audited(
            tx,
            NewEvent::admin(
            actor,
            "schedule.updated",
            &schedule.name,
            serde_json::json!({"analysis": schedule.analysis, "cron": schedule.cron, "window": schedule.window}),
            ),
        )
        .await?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        let row: Option<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM schedules WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading a schedule")?;
        Ok(row.map(record))
    }

    async fn list(&self) -> Result<Vec<ScheduleRecord>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM schedules ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .ctx("listing schedules")?;
        Ok(rows.into_iter().map(record).collect())
    }

    async fn claim_firing(&self, name: &str, slot: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let won = sqlx::query::<Db>(
            "UPDATE schedules SET last_fired = $2 WHERE name = $1 AND (last_fired IS NULL OR last_fired < $2)",
        )
        .bind(name)
        .bind(Timestamp(slot))
        .execute(tx.conn())
        .await
        .ctx("claiming a schedule firing")?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(won)
    }
}
