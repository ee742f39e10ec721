//! Invalidations: "rewind history" for a date range of one analysis or all of them.
//! Creating one queues (eager) or marks stale (lazy) every partition in the range, in
//! the same transaction that logs `analysis.invalidated`; each partition is settled by
//! the first build that started after the request. Progress is counted from the items.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use scholia_events::envelope::format_time;
use scholia_events::error::DbContext;
use scholia_events::{Database, EventBody, NewEvent, log};

use crate::queue::{self, PRIORITY_BULK, on_db, on_tx};
use crate::registry::Registry;
use crate::{Error, Result};

/// More partitions than this in one invalidation is almost surely a mistake.
pub const MAX_PARTITIONS: usize = 200_000;

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub id: Uuid,
    pub analysis: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub rebuild: String,
    pub actor: String,
    pub created_at: String,
    pub state: String,
    pub partitions_total: i64,
    pub partitions_done: i64,
    pub partitions_failed: i64,
    pub partitions_cancelled: i64,
}

/// Invalidate `[from, to)` of `analysis` (or of every analysis, for `*`).
#[allow(clippy::too_many_arguments)]
pub async fn create(
    db: &Database,
    registry: &Registry,
    analysis: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    reason: &str,
    eager: bool,
    actor: &str,
) -> Result<Uuid> {
    if to <= from {
        return Err(Error::Invalid(
            "the range is empty: \"to\" must come after \"from\" (ranges are half-open)".into(),
        ));
    }
    let analyses = if analysis == "*" {
        registry.refresh().await?;
        registry
            .names()
            .into_iter()
            .filter_map(|n| registry.get(&n))
            .collect::<Vec<_>>()
    } else {
        vec![registry.find(analysis).await?]
    };
    let plans: Vec<_> = analyses
        .iter()
        .map(|a| (a.clone(), a.partition().partitions_between(from, to)))
        .collect();
    let total: usize = plans.iter().map(|(_, p)| p.len()).sum();
    if total > MAX_PARTITIONS {
        return Err(Error::Invalid(format!(
            "the range covers {total} partitions, more than the {MAX_PARTITIONS} one invalidation may; split it"
        )));
    }
    let id = Uuid::now_v7();
    let now = Utc::now();
    let rebuild = if eager { "eager" } else { "lazy" };
    let mut tx = db.begin_write().await?;
    let sql = "INSERT INTO invalidations (id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at) \
               VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8)";
    on_tx!(&mut tx, |c| sqlx::query(sql)
        .bind(id)
        .bind(analysis)
        .bind(from)
        .bind(to)
        .bind(reason)
        .bind(rebuild)
        .bind(actor)
        .bind(now)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected())
        .context("recording an invalidation")?);
    let mut events = Vec::new();
    for (a, partitions) in &plans {
        let counters = queue::request(
            &mut tx,
            a.name(),
            partitions,
            PRIORITY_BULK,
            eager,
            queue::Want::Rebuild,
            now,
        )
        .await?;
        let items: Vec<_> = partitions.iter().zip(counters).collect();
        for chunk in items.chunks(500) {
            let head = "INSERT INTO invalidation_items (invalidation, analysis, partition, request, state) ";
            on_tx!(&mut tx, |c| {
                let mut q = sqlx::QueryBuilder::new(head);
                q.push_values(chunk, |mut row, (p, counter)| {
                    row.push_bind(id)
                        .push_bind(a.name().to_string())
                        .push_bind(p.to_string())
                        .push_bind(*counter)
                        .push_bind("pending");
                });
                q.build()
                    .execute(&mut **c)
                    .await
                    .map(|r| r.rows_affected())
                    .context("recording invalidated partitions")?
            });
        }
        events.push(NewEvent::new(
            actor,
            EventBody::AnalysisInvalidated {
                invalidation: id,
                analysis: a.name().to_string(),
                from,
                to,
                reason: reason.to_string(),
                rebuild: rebuild.to_string(),
                partitions: partitions.clone(),
            },
        ));
        if eager && !partitions.is_empty() {
            events.push(NewEvent::new(
                actor,
                EventBody::AnalysisRequested {
                    analysis: a.name().to_string(),
                    version: a.version(),
                    partitions: partitions.clone(),
                    priority: PRIORITY_BULK,
                    invalidation: Some(id),
                },
            ));
        }
    }
    log::append(&mut tx, events).await?;
    tx.commit().await?;
    Ok(id)
}

type InvalidationRow = (
    Uuid,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
);

/// The progress of one invalidation.
pub async fn progress(db: &Database, id: Uuid) -> Result<Progress> {
    let sql = "SELECT id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at FROM invalidations WHERE id = $1";
    let row: Option<InvalidationRow> = on_db!(db, |p| sqlx::query_as(sql)
        .bind(id)
        .fetch_optional(p)
        .await
        .context("reading an invalidation")?);
    let row = row.ok_or_else(|| Error::NotFound(format!("no invalidation has id {id}")))?;
    progress_of(db, row).await
}

async fn progress_of(db: &Database, row: InvalidationRow) -> Result<Progress> {
    let (id, analysis, from, to, reason, rebuild, stored_state, actor, created_at) = row;
    let counts: Vec<(String, i64)> = on_db!(db, |p| sqlx::query_as(
        "SELECT state, COUNT(*) FROM invalidation_items WHERE invalidation = $1 GROUP BY state"
    )
    .bind(id)
    .fetch_all(p)
    .await
    .context("counting invalidated partitions")?);
    let count = |s: &str| {
        counts
            .iter()
            .find(|(state, _)| state == s)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    let (pending, done, failed, cancelled) = (
        count("pending"),
        count("done"),
        count("failed"),
        count("cancelled"),
    );
    let total = pending + done + failed + cancelled;
    let state = if stored_state == "cancelled" {
        "cancelled"
    } else if pending == 0 && failed > 0 {
        "failed"
    } else if pending == 0 {
        "done"
    } else if done + failed > 0 {
        "running"
    } else {
        // Nothing settled yet: running if any of its partitions is being built.
        let running: i64 = on_db!(db, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM partition_state s JOIN invalidation_items i \
             ON i.analysis = s.analysis AND i.partition = s.partition \
             WHERE i.invalidation = $1 AND i.state = 'pending' AND s.state = 'running'"
        )
        .bind(id)
        .fetch_one(p)
        .await
        .context("checking running builds")?);
        if running > 0 { "running" } else { "pending" }
    };
    Ok(Progress {
        id,
        analysis,
        from: format_time(from),
        to: format_time(to),
        reason,
        rebuild,
        actor,
        created_at: format_time(created_at),
        state: state.to_string(),
        partitions_total: total,
        partitions_done: done,
        partitions_failed: failed,
        partitions_cancelled: cancelled,
    })
}

/// The most recent invalidations, newest first.
pub async fn list(db: &Database, limit: i64) -> Result<Vec<Progress>> {
    let sql = "SELECT id, analysis, range_from, range_to, reason, rebuild, state, actor, created_at \
               FROM invalidations ORDER BY created_at DESC LIMIT $1";
    let rows: Vec<InvalidationRow> = on_db!(db, |p| sqlx::query_as(sql)
        .bind(limit)
        .fetch_all(p)
        .await
        .context("listing invalidations")?);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(progress_of(db, row).await?);
    }
    Ok(out)
}

/// Cancel: no new build starts for it; what runs finishes. Partitions still waiting only
/// for this invalidation leave the queue.
pub async fn cancel(db: &Database, id: Uuid, actor: &str) -> Result<Progress> {
    let current = progress(db, id).await?;
    if matches!(current.state.as_str(), "done" | "failed" | "cancelled") {
        return Err(Error::Conflict(format!(
            "invalidation {id} is already {}; there is nothing to cancel",
            current.state
        )));
    }
    let mut tx = db.begin_write().await?;
    let now = Utc::now();
    on_tx!(&mut tx, |c| sqlx::query(
        "UPDATE invalidations SET state = 'cancelled', finished_at = $2 WHERE id = $1"
    )
    .bind(id)
    .bind(now)
    .execute(&mut **c)
    .await
    .map(|r| r.rows_affected())
    .context("cancelling an invalidation")?);
    on_tx!(&mut tx, |c| {
        sqlx::query("UPDATE invalidation_items SET state = 'cancelled' WHERE invalidation = $1 AND state = 'pending'")
        .bind(id)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected())
        .context("cancelling invalidated partitions")?
    });
    on_tx!(&mut tx, |c| {
        sqlx::query(
        "DELETE FROM partition_state WHERE state IN ('queued', 'stale') AND priority = $2 \
         AND EXISTS (SELECT 1 FROM invalidation_items i WHERE i.invalidation = $1 \
                     AND i.analysis = partition_state.analysis AND i.partition = partition_state.partition) \
         AND NOT EXISTS (SELECT 1 FROM invalidation_items o WHERE o.state = 'pending' \
                     AND o.analysis = partition_state.analysis AND o.partition = partition_state.partition)"
    )
    .bind(id)
    .bind(PRIORITY_BULK)
    .execute(&mut **c)
    .await
    .map(|r| r.rows_affected())
    .context("dequeueing cancelled partitions")?
    });
    log::append(
        &mut tx,
        vec![NewEvent::new(
            actor,
            EventBody::AdminAction {
                action: "invalidation.cancelled".into(),
                target: id.to_string(),
                detail: serde_json::json!({"analysis": current.analysis}),
            },
        )],
    )
    .await?;
    tx.commit().await?;
    progress(db, id).await
}
