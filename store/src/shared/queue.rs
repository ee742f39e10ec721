//! The build queue (`partition_state`), shared by every worker process.
//!
//! A request upserts the partition's row and bumps its `requested` counter, so that any
//! number of requests for one partition coalesce into one build. A worker claims a row by
//! taking a lease (`running`, `lease_owner`, `lease_until`), remembers the counter it
//! started from (`claimed`), and counts the attempt. A worker that dies loses its lease
//! when it expires and another takes the partition over; after `max_attempts` builds
//! that never finished, the partition is given up on (`abandon_poisoned`). A build's
//! commit (`annotations.rs`) first checks it still holds the lease, so a build that lost
//! it, or a redelivered message, never adds a generation.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::event::run_pieces;
use scholia_events::partition::runs;
use scholia_events::status::{BuildState, ItemState, Want};
use scholia_events::store::{Abandoned, BuildQueue, BuildRequest, Claim, QueueState, Watch};
use scholia_events::{EventBody, NewEvent, PartitionKey, Result};

use super::{Backend, CLAIM_LOCK, Db, MAX_BINDS, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

pub(crate) fn key(text: &str) -> Result<PartitionKey> {
    PartitionKey::parse(text).map_err(|e| corrupt("reading a partition key", e))
}

fn duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Queue (`eager`) or mark stale these partitions of `analysis`, inside `tx`. Returns
/// each partition's request counter, which a build must reach to settle it.
pub(crate) async fn request_in(
    tx: &mut WriteTx,
    analysis: &str,
    partitions: &[PartitionKey],
    priority: i32,
    eager: bool,
    want: Want,
    not_before: DateTime<Utc>,
) -> Result<BTreeMap<PartitionKey, i64>> {
    let state = if eager {
        BuildState::Queued
    } else {
        BuildState::Stale
    };
    let now = Timestamp(Utc::now());
    let mut counters = BTreeMap::new();
    // Nine binds a row, and one for the statement.
    for chunk in partitions.chunks(MAX_BINDS / 10) {
        let mut q = QueryBuilder::<Db>::new(
            "INSERT INTO partition_state (analysis, partition, state, priority, requested, claimed, not_before, attempts, updated_at) ",
        );
        q.push_values(chunk, |mut row, partition| {
            row.push_bind(analysis)
                .push_bind(partition.to_string())
                .push_bind(state.as_str())
                .push_bind(priority)
                .push_bind(1_i64)
                .push_bind(0_i64)
                .push_bind(Timestamp(not_before))
                .push_bind(0_i32)
                .push_bind(now);
        });
        q.push(
            " ON CONFLICT (analysis, partition) DO UPDATE SET \
               requested = CASE WHEN ",
        );
        // Only an admin's rebuild makes a build under way go round again.
        q.push_bind(want != Want::Rebuild);
        q.push(
            " AND partition_state.state IN ('queued', 'running') \
                  THEN partition_state.requested ELSE partition_state.requested + 1 END, \
               state = CASE WHEN partition_state.state = 'running' THEN 'running' \
                            WHEN excluded.state = 'queued' OR partition_state.state = 'queued' THEN 'queued' \
                            ELSE 'stale' END, \
               priority = CASE WHEN excluded.priority < partition_state.priority THEN excluded.priority ELSE partition_state.priority END, \
               not_before = CASE WHEN partition_state.state = 'queued' AND partition_state.not_before < excluded.not_before \
                                 THEN partition_state.not_before ELSE excluded.not_before END, \
               attempts = CASE WHEN partition_state.state IN ('failed', 'stale') THEN 0 ELSE partition_state.attempts END, \
               error = CASE WHEN partition_state.state = 'failed' THEN NULL ELSE partition_state.error END, \
               updated_at = excluded.updated_at \
             RETURNING partition, requested",
        );
        let rows: Vec<(String, i64)> = q
            .build_query_as()
            .fetch_all(tx.conn())
            .await
            .ctx("queueing builds")?;
        for (partition, requested) in rows {
            counters.insert(key(&partition)?, requested);
        }
    }
    if eager {
        tx.announce_work().await?;
    }
    Ok(counters)
}

/// Settle the invalidation items a build (or its failure) answers.
pub(crate) async fn settle_items(tx: &mut WriteTx, claim: &Claim, state: ItemState) -> Result<()> {
    sqlx::query::<Db>(
        "UPDATE invalidation_items SET state = $1 \
         WHERE analysis = $2 AND partition = $3 AND state = 'pending' AND request <= $4",
    )
    .bind(state.as_str())
    .bind(&claim.analysis)
    .bind(claim.partition.to_string())
    .bind(claim.claimed)
    .execute(tx.conn())
    .await
    .ctx("settling invalidation items")?;
    Ok(())
}

/// The request counter, when `tx` still holds the claim's lease.
pub(crate) async fn holds_lease(tx: &mut WriteTx, claim: &Claim) -> Result<Option<i64>> {
    sqlx::query_scalar::<Db, i64>(
        "SELECT requested FROM partition_state \
         WHERE analysis = $1 AND partition = $2 AND state = 'running' AND build_id = $3",
    )
    .bind(&claim.analysis)
    .bind(claim.partition.to_string())
    .bind(claim.build)
    .fetch_optional(tx.conn())
    .await
    .ctx("checking a lease")
}

/// One line of build history.
pub(crate) struct BuildLine<'a> {
    pub(crate) claim: &'a Claim,
    pub(crate) version: i64,
    pub(crate) generation: Option<i64>,
    pub(crate) rows_read: i64,
    pub(crate) rows_written: i64,
    pub(crate) error: Option<&'a str>,
    pub(crate) outcome: &'a str,
}

pub(crate) async fn record_build(tx: &mut WriteTx, line: BuildLine<'_>) -> Result<()> {
    let now = Utc::now();
    let duration_ms = (now - line.claim.claimed_at).num_milliseconds().max(0);
    sqlx::query::<Db>(
        "INSERT INTO builds (build_id, analysis, partition, version, generation, rows_read, rows_written, \
                             started_at, finished_at, duration_ms, attempt, worker, outcome, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (build_id) DO NOTHING",
    )
    .bind(line.claim.build)
    .bind(&line.claim.analysis)
    .bind(line.claim.partition.to_string())
    .bind(line.version)
    .bind(line.generation)
    .bind(line.rows_read)
    .bind(line.rows_written)
    .bind(Timestamp(line.claim.claimed_at))
    .bind(Timestamp(now))
    .bind(duration_ms)
    .bind(line.claim.attempts)
    .bind(&line.claim.owner)
    .bind(line.outcome)
    .bind(line.error)
    .execute(tx.conn())
    .await
    .ctx("recording a build")?;
    super::annotations::prune_builds(tx, &line.claim.analysis, &line.claim.partition.to_string())
        .await
}

#[async_trait]
impl BuildQueue for Backend {
    async fn request(&self, request: BuildRequest) -> Result<Vec<PartitionKey>> {
        if request.partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = if request.log {
            self.write().await?
        } else {
            self.begin().await?
        };
        let mut partitions = request.partitions.clone();
        if request.want == Want::Present {
            // A reader may look at a cache a moment behind: what is built by this version
            // and not waiting for a rebuild needs nothing.
            let mut current = std::collections::BTreeSet::new();
            for chunk in partitions.chunks(MAX_BINDS - 8) {
                let mut q = QueryBuilder::<Db>::new(
                    "SELECT a.partition FROM annotations a WHERE a.analysis = ",
                );
                q.push_bind(&request.analysis);
                q.push(" AND a.version >= ");
                q.push_bind(request.version);
                q.push(" AND a.partition IN (");
                let mut list = q.separated(", ");
                for p in chunk {
                    list.push_bind(p.to_string());
                }
                q.push(
                    ") AND NOT EXISTS (SELECT 1 FROM partition_state s \
                     WHERE s.analysis = a.analysis AND s.partition = a.partition)",
                );
                let built: Vec<(String,)> = q
                    .build_query_as()
                    .fetch_all(tx.conn())
                    .await
                    .ctx("checking partitions")?;
                current.extend(built.into_iter().map(|(p,)| p));
            }
            partitions.retain(|p| !current.contains(&p.to_string()));
            if partitions.is_empty() {
                return Ok(partitions);
            }
        }
        request_in(
            &mut tx,
            &request.analysis,
            &partitions,
            request.priority,
            true,
            request.want,
            request.not_before,
        )
        .await?;
        if request.log {
            let events = run_pieces(&runs(partitions.iter().copied()))
                .map(|piece| {
                    NewEvent::new(
                        &request.actor,
                        EventBody::AnalysisRequested {
                            analysis: request.analysis.clone(),
                            version: request.version,
                            partitions: piece,
                            priority: request.priority,
                            invalidation: None,
                        },
                    )
                })
                .collect();
            super::log::append(&mut tx, events).await?;
        }
        tx.commit().await?;
        Ok(partitions)
    }

    async fn hasten(
        &self,
        analysis: &str,
        from_key: &str,
        to_key: &str,
        priority: i32,
    ) -> Result<u64> {
        let raised = sqlx::query::<Db>(
            "UPDATE partition_state SET priority = $1 \
             WHERE analysis = $2 AND partition >= $3 AND partition < $4 \
               AND state = 'queued' AND priority > $5",
        )
        .bind(priority)
        .bind(analysis)
        .bind(from_key)
        .bind(to_key)
        .bind(priority)
        .execute(&self.pool)
        .await
        .ctx("moving queued builds ahead")?
        .rows_affected();
        Ok(raised)
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        max_attempts: i32,
    ) -> Result<Option<Claim>> {
        let now = Utc::now();
        let build = Uuid::now_v7();
        let mut tx = self.begin().await?;
        let row: Option<(String, String, i64, i32, i32)> =
            sqlx::query_as::<Db, _>(sqlx::AssertSqlSafe(format!(
                "UPDATE partition_state SET state = 'running', lease_owner = $1, lease_until = $2, \
               claimed = requested, build_id = $3, attempts = attempts + 1, updated_at = $4 \
             WHERE (analysis, partition) = ( \
               SELECT analysis, partition FROM partition_state \
               WHERE (state = 'queued' AND not_before <= $4) \
                  OR (state = 'running' AND lease_until < $4 AND attempts < $5) \
               ORDER BY priority, not_before LIMIT 1{CLAIM_LOCK}) \
             RETURNING analysis, partition, claimed, attempts, priority"
            )))
            .bind(owner)
            .bind(Timestamp(now + duration(lease)))
            .bind(build)
            .bind(Timestamp(now))
            .bind(max_attempts)
            .fetch_optional(tx.conn())
            .await
            .ctx("claiming a build")?;
        tx.commit().await?;
        row.map(|(analysis, partition, claimed, attempts, priority)| {
            Ok(Claim {
                analysis,
                partition: key(&partition)?,
                claimed,
                attempts,
                priority,
                build,
                owner: owner.to_string(),
                claimed_at: now,
            })
        })
        .transpose()
    }

    async fn heartbeat(&self, claim: &Claim, lease: Duration) -> Result<bool> {
        let done = sqlx::query::<Db>(
            "UPDATE partition_state SET lease_until = $1 \
             WHERE analysis = $2 AND partition = $3 AND build_id = $4 AND state = 'running'",
        )
        .bind(Timestamp(Utc::now() + duration(lease)))
        .bind(&claim.analysis)
        .bind(claim.partition.to_string())
        .bind(claim.build)
        .execute(&self.pool)
        .await
        .ctx("extending a lease")?
        .rows_affected();
        Ok(done == 1)
    }

    async fn fail(
        &self,
        claim: &Claim,
        version: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<Option<bool>> {
        let mut tx = self.write().await?;
        if holds_lease(&mut tx, claim).await?.is_none() {
            return Ok(None);
        }
        let now = Utc::now();
        let gave_up = retry_in.is_none();
        match retry_in {
            None => {
                sqlx::query::<Db>(
                    "UPDATE partition_state SET state = 'failed', error = $3, lease_owner = NULL, \
                     lease_until = NULL, updated_at = $4 WHERE analysis = $1 AND partition = $2",
                )
                .bind(&claim.analysis)
                .bind(claim.partition.to_string())
                .bind(error)
                .bind(Timestamp(now))
                .execute(tx.conn())
                .await
                .ctx("marking a partition failed")?;
                settle_items(&mut tx, claim, ItemState::Failed).await?;
            }
            Some(delay) => {
                sqlx::query::<Db>(
                    "UPDATE partition_state SET state = 'queued', error = $3, lease_owner = NULL, \
                     lease_until = NULL, not_before = $4, updated_at = $5 WHERE analysis = $1 AND partition = $2",
                )
                .bind(&claim.analysis)
                .bind(claim.partition.to_string())
                .bind(error)
                .bind(Timestamp(now + duration(delay)))
                .bind(Timestamp(now))
                .execute(tx.conn())
                .await
                .ctx("scheduling a retry")?;
                tx.announce_work().await?;
            }
        }
        record_build(
            &mut tx,
            BuildLine {
                claim,
                version,
                generation: None,
                rows_read: 0,
                rows_written: 0,
                error: Some(error),
                outcome: if gave_up { "failed" } else { "retrying" },
            },
        )
        .await?;
        super::log::append(
            &mut tx,
            vec![NewEvent::new(
                format!("worker:{}", claim.owner),
                EventBody::AnalysisFailed {
                    analysis: claim.analysis.clone(),
                    version,
                    partition: claim.partition,
                    build: claim.build,
                    error: error.to_string(),
                    attempt: claim.attempts,
                    gave_up,
                },
            )],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(gave_up))
    }

    async fn defer(&self, claim: &Claim, until: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query::<Db>(
            "UPDATE partition_state SET state = 'queued', attempts = attempts - 1, lease_owner = NULL, \
             lease_until = NULL, not_before = $4, updated_at = $5 \
             WHERE analysis = $1 AND partition = $2 AND build_id = $3 AND state = 'running'",
        )
        .bind(&claim.analysis)
        .bind(claim.partition.to_string())
        .bind(claim.build)
        .bind(Timestamp(until))
        .bind(Timestamp(Utc::now()))
        .execute(tx.conn())
        .await
        .ctx("deferring a build")?
        .rows_affected();
        tx.announce_work().await?;
        tx.commit().await?;
        Ok(done == 1)
    }

    async fn abandon_poisoned(&self, max_attempts: i32, error: &str) -> Result<Vec<Abandoned>> {
        let now = Timestamp(Utc::now());
        // Look first without the lock: almost always there is nothing.
        let any: i64 = sqlx::query_scalar::<Db, i64>(
            "SELECT COUNT(*) FROM partition_state WHERE state = 'running' AND lease_until < $1 AND attempts >= $2",
        )
        .bind(now)
        .bind(max_attempts)
        .fetch_one(&self.pool)
        .await
        .ctx("looking for abandoned builds")?;
        if any == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        let rows: Vec<(String, String, i32, Option<i64>, Option<Uuid>)> = sqlx::query_as::<Db, _>(
            "UPDATE partition_state SET state = 'failed', error = $3, lease_owner = NULL, lease_until = NULL, updated_at = $1 \
             WHERE state = 'running' AND lease_until < $1 AND attempts >= $2 \
             RETURNING analysis, partition, attempts, claimed, build_id",
        )
        .bind(now)
        .bind(max_attempts)
        .bind(error)
        .fetch_all(tx.conn())
        .await
        .ctx("giving up abandoned builds")?;
        let mut abandoned = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        for (analysis, partition, attempts, claimed, build) in rows {
            let partition = key(&partition)?;
            let claim = Claim {
                analysis: analysis.clone(),
                partition,
                claimed: claimed.unwrap_or(0),
                attempts,
                priority: 0,
                build: build.unwrap_or_else(Uuid::nil),
                owner: String::new(),
                claimed_at: now.0,
            };
            settle_items(&mut tx, &claim, ItemState::Failed).await?;
            events.push(NewEvent::new(
                "scholia (abandoned builds)",
                EventBody::AnalysisFailed {
                    analysis: analysis.clone(),
                    version: 0,
                    partition,
                    build: claim.build,
                    error: error.to_string(),
                    attempt: attempts,
                    gave_up: true,
                },
            ));
            abandoned.push(Abandoned {
                analysis,
                partition,
                attempts,
            });
        }
        super::log::append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(abandoned)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        let due: Option<Timestamp> = sqlx::query_scalar::<Db, Option<Timestamp>>(
            "SELECT MIN(CASE WHEN state = 'queued' THEN not_before ELSE lease_until END) \
             FROM partition_state WHERE state IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await
        .ctx("finding the next due build")?;
        Ok(due.map(Into::into))
    }

    async fn states(
        &self,
        analysis: &str,
        from_key: &str,
        to_key: &str,
    ) -> Result<Vec<QueueState>> {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as::<Db, _>(
            "SELECT partition, state, error FROM partition_state \
             WHERE analysis = $1 AND partition >= $2 AND partition < $3",
        )
        .bind(analysis)
        .bind(from_key)
        .bind(to_key)
        .fetch_all(&self.pool)
        .await
        .ctx("reading build states")?;
        rows.into_iter()
            .map(|(partition, state, error)| {
                Ok(QueueState {
                    partition: key(&partition)?,
                    state: state
                        .parse()
                        .map_err(|e| corrupt("reading a build state", e))?,
                    error,
                })
            })
            .collect()
    }

    async fn watch(&self) -> Result<Box<dyn Watch>> {
        self.work_watch().await
    }
}
