//! Invalidations: "rewind history" over a date range. Creating one queues (eager) or
//! marks stale (lazy) every partition it covers, in the transaction that logs
//! `analysis.invalidated`; each partition is settled by the first build that started after
//! the request. Progress is counted from the items. A retry is a new invalidation of
//! exactly the items of another that failed, naming the one it retries.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use scholia_events::envelope::format_time;
use scholia_events::event::run_pieces;
use scholia_events::partition::runs;
use scholia_events::status::{InvalidationState, PRIORITY_BULK, Rebuild, Want};
use scholia_events::store::{InvalidationPlan, Invalidations, Progress, Retried};
use scholia_events::{Error, EventBody, Granularity, NewEvent, PartitionKey, Result};

use super::queue::{key, request_in};
use super::{Backend, Db, MAX_BINDS, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

type Row = (
    Uuid,
    String,
    Timestamp,
    Timestamp,
    String,
    String,
    String,
    String,
    Timestamp,
    Option<Uuid>,
);

const COLUMNS: &str =
    "id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at, retry_of";

impl Backend {
    async fn progress_of(&self, row: Row) -> Result<Progress> {
        let (id, analysis, from, to, reason, rebuild, stored_state, actor, created_at, retry_of) =
            row;
        let counts: Vec<(String, i64)> = sqlx::query_as::<Db, (String, i64)>(
            "SELECT state, COUNT(*) FROM invalidation_items WHERE invalidation = $1 GROUP BY state",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .ctx("counting invalidated partitions")?;
        let count = |s: &str| {
            counts
                .iter()
                .find(|(state, _)| state == s)
                .map_or(0, |(_, n)| *n)
        };
        let (pending, done, failed, cancelled) = (
            count("pending"),
            count("done"),
            count("failed"),
            count("cancelled"),
        );
        let state = if stored_state == InvalidationState::Cancelled.as_str() {
            InvalidationState::Cancelled
        } else if pending == 0 && failed > 0 {
            InvalidationState::Failed
        } else if pending == 0 {
            InvalidationState::Done
        } else if done + failed > 0 {
            InvalidationState::Running
        } else {
            // Nothing settled yet: running if any of its partitions is being built.
            let running: i64 = sqlx::query_scalar::<Db, i64>(
                "SELECT COUNT(*) FROM partition_state s JOIN invalidation_items i \
                 ON i.analysis = s.analysis AND i.partition = s.partition \
                 WHERE i.invalidation = $1 AND i.state = 'pending' AND s.state = 'running'",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .ctx("checking running builds")?;
            if running > 0 {
                InvalidationState::Running
            } else {
                InvalidationState::Pending
            }
        };
        Ok(Progress {
            id,
            analysis,
            from: format_time(from.into()),
            to: format_time(to.into()),
            reason,
            rebuild: rebuild
                .parse::<Rebuild>()
                .map_err(|e| corrupt("reading an invalidation", e))?,
            actor,
            created_at: format_time(created_at.into()),
            state,
            partitions_total: pending + done + failed + cancelled,
            partitions_done: done,
            partitions_failed: failed,
            partitions_cancelled: cancelled,
            retry_of,
        })
    }
}

async fn insert_items(
    tx: &mut WriteTx,
    id: Uuid,
    analysis: &str,
    items: &[(String, i64)],
) -> Result<()> {
    for chunk in items.chunks(MAX_BINDS / 5) {
        let mut q = sqlx::QueryBuilder::<Db>::new(
            "INSERT INTO invalidation_items (invalidation, analysis, partition, request, state) ",
        );
        q.push_values(chunk, |mut row, (partition, request)| {
            row.push_bind(id)
                .push_bind(analysis)
                .push_bind(partition.as_str())
                .push_bind(*request)
                .push_bind("pending");
        });
        q.build()
            .execute(tx.conn())
            .await
            .ctx("recording invalidated partitions")?;
    }
    Ok(())
}

/// Record `plan` as invalidation `id` inside `tx`: queue (eager) or mark stale (lazy) its
/// partitions, record its items, and return its events (not yet appended).
async fn create_in(
    tx: &mut WriteTx,
    id: Uuid,
    plan: &InvalidationPlan,
    retry_of: Option<Uuid>,
) -> Result<Vec<NewEvent>> {
    let now = Utc::now();
    let eager = plan.rebuild == Rebuild::Eager;
    sqlx::query::<Db>(
        "INSERT INTO invalidations (id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at, retry_of) \
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9)",
    )
    .bind(id)
    .bind(&plan.target)
    .bind(Timestamp(plan.from))
    .bind(Timestamp(plan.to))
    .bind(&plan.reason)
    .bind(plan.rebuild.as_str())
    .bind(&plan.actor)
    .bind(Timestamp(now))
    .bind(retry_of)
    .execute(tx.conn())
    .await
    .ctx("recording an invalidation")?;
    let mut events = Vec::new();
    for (analysis, version, partitions) in &plan.analyses {
        let counters = request_in(
            tx,
            analysis,
            partitions,
            PRIORITY_BULK,
            eager,
            Want::Rebuild,
            now,
        )
        .await?;
        let items: Vec<(String, i64)> = counters
            .iter()
            .map(|(partition, request)| (partition.to_string(), *request))
            .collect();
        insert_items(tx, id, analysis, &items).await?;
        let partition_runs = runs(partitions.iter().copied());
        for piece in run_pieces(&partition_runs) {
            events.push(NewEvent::new(
                &plan.actor,
                EventBody::AnalysisInvalidated {
                    invalidation: id,
                    analysis: analysis.clone(),
                    from: plan.from,
                    to: plan.to,
                    reason: plan.reason.clone(),
                    rebuild: plan.rebuild,
                    partitions: piece.clone(),
                },
            ));
            if eager {
                events.push(NewEvent::new(
                    &plan.actor,
                    EventBody::AnalysisRequested {
                        analysis: analysis.clone(),
                        version: *version,
                        partitions: piece,
                        priority: PRIORITY_BULK,
                        invalidation: Some(id),
                    },
                ));
            }
        }
    }
    Ok(events)
}

#[async_trait]
impl Invalidations for Backend {
    async fn create(&self, plan: InvalidationPlan) -> Result<Uuid> {
        let id = Uuid::now_v7();
        let mut tx = self.write().await?;
        let events = create_in(&mut tx, id, &plan, None).await?;
        super::log::append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn progress(&self, id: Uuid) -> Result<Progress> {
        let row: Option<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM invalidations WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading an invalidation")?;
        let row = row.ok_or_else(|| Error::NotFound(format!("no invalidation has id {id}")))?;
        self.progress_of(row).await
    }

    async fn list(&self, limit: usize) -> Result<Vec<Progress>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM invalidations ORDER BY created_at DESC LIMIT $1"
        )))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("listing invalidations")?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(self.progress_of(row).await?);
        }
        Ok(out)
    }

    async fn cancel(&self, id: Uuid, actor: &str) -> Result<Progress> {
        let current = self.progress(id).await?;
        if matches!(
            current.state,
            InvalidationState::Done | InvalidationState::Failed | InvalidationState::Cancelled
        ) {
            return Err(Error::Conflict(format!(
                "invalidation {id} is already {}; there is nothing to cancel",
                current.state
            )));
        }
        let mut tx = self.write().await?;
        sqlx::query::<Db>(
            "UPDATE invalidations SET state = 'cancelled', finished_at = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(Timestamp(Utc::now()))
        .execute(tx.conn())
        .await
        .ctx("cancelling an invalidation")?;
        sqlx::query::<Db>(
            "UPDATE invalidation_items SET state = 'cancelled' WHERE invalidation = $1 AND state = 'pending'",
        )
        .bind(id)
        .execute(tx.conn())
        .await
        .ctx("cancelling invalidated partitions")?;
        // Partitions waiting only for this invalidation leave the queue.
        sqlx::query::<Db>(
            "DELETE FROM partition_state WHERE state IN ('queued', 'stale') AND priority = $2 \
             AND EXISTS (SELECT 1 FROM invalidation_items i WHERE i.invalidation = $1 \
                         AND i.analysis = partition_state.analysis AND i.partition = partition_state.partition) \
             AND NOT EXISTS (SELECT 1 FROM invalidation_items o WHERE o.state = 'pending' \
                         AND o.analysis = partition_state.analysis AND o.partition = partition_state.partition)",
        )
        .bind(id)
        .bind(PRIORITY_BULK)
        .execute(tx.conn())
        .await
        .ctx("dequeueing cancelled partitions")?;
        super::log::commit_audited(
            tx,
            NewEvent::admin(
                actor,
                "invalidation.cancelled",
                id.to_string(),
                serde_json::json!({"analysis": current.analysis}),
            ),
        )
        .await?;
        self.progress(id).await
    }
    async fn retry(&self, id: Uuid, actor: &str) -> Result<Retried> {
        let mut tx = self.write().await?;
        let found: Option<(String, Timestamp, Timestamp, String)> =
            sqlx::query_as::<Db, (String, Timestamp, Timestamp, String)>(
                "SELECT analysis, range_from, range_to, reason FROM invalidations WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(tx.conn())
            .await
            .ctx("reading an invalidation")?;
        let (target, from, to, reason) =
            found.ok_or_else(|| Error::NotFound(format!("no invalidation has id {id}")))?;
        let pending: i64 = sqlx::query_scalar::<Db, i64>(
            "SELECT COUNT(*) FROM invalidation_items WHERE invalidation = $1 AND state = 'pending'",
        )
        .bind(id)
        .fetch_one(tx.conn())
        .await
        .ctx("counting pending partitions")?;
        if pending > 0 {
            return Err(Error::Conflict(format!(
                "invalidation {id} is still running ({pending} partitions pending); retry what failed once it has finished, or cancel it first"
            )));
        }
        let failed: Vec<(String, String)> = sqlx::query_as::<Db, (String, String)>(
            "SELECT analysis, partition FROM invalidation_items \
             WHERE invalidation = $1 AND state = 'failed' ORDER BY analysis, partition",
        )
        .bind(id)
        .fetch_all(tx.conn())
        .await
        .ctx("listing failed partitions")?;
        if failed.is_empty() {
            return Err(Error::Conflict(format!(
                "no partition of invalidation {id} failed; there is nothing to retry"
            )));
        }
        let total = failed.len() as i64;
        let mut by_analysis: BTreeMap<String, Vec<PartitionKey>> = BTreeMap::new();
        for (analysis, partition) in failed {
            by_analysis
                .entry(analysis)
                .or_default()
                .push(key(&partition)?);
        }
        let mut analyses = Vec::with_capacity(by_analysis.len());
        for (analysis, partitions) in by_analysis {
            let version: Option<i64> =
                sqlx::query_scalar::<Db, i64>("SELECT version FROM analyses WHERE name = $1")
                    .bind(&analysis)
                    .fetch_optional(tx.conn())
                    .await
                    .ctx("reading an analysis' version")?;
            analyses.push((analysis, version.unwrap_or(0), partitions));
        }
        let plan = InvalidationPlan {
            target,
            from: from.into(),
            to: to.into(),
            reason: format!("retry of the failed partitions of {id}: {reason}"),
            rebuild: Rebuild::Eager,
            actor: actor.to_string(),
            analyses,
        };
        let new_id = Uuid::now_v7();
        let mut events = create_in(&mut tx, new_id, &plan, Some(id)).await?;
        events.push(NewEvent::admin(
            actor,
            "invalidation.retried",
            id.to_string(),
            serde_json::json!({"retry": new_id, "partitions": total}),
        ));
        super::log::append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(Retried {
            id: new_id,
            retry_of: id,
            partitions: total,
        })
    }

    async fn hour_rows(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(PartitionKey, i64)>> {
        if to <= from {
            return Ok(Vec::new());
        }
        let hour = |t: DateTime<Utc>| Granularity::Hour.partition_of(t).to_string();
        let rows: Vec<(String, i64)> = sqlx::query_as::<Db, (String, i64)>(
            "SELECT hour, rows FROM record_hours WHERE kind = $1 AND hour >= $2 AND hour <= $3 ORDER BY hour",
        )
        .bind(kind)
        .bind(hour(from))
        .bind(hour(to - chrono::Duration::microseconds(1)))
        .fetch_all(&self.pool)
        .await
        .ctx("counting records per hour")?;
        rows.into_iter()
            .map(|(hour, rows)| Ok((key(&hour)?, rows)))
            .collect()
    }
}
