//! The build queue, in SQL (`partition_state`), shared by every worker process.
//!
//! A request upserts the partition's row and bumps its `requested` counter, so that any
//! number of requests for one partition coalesce into one build. A worker claims a row
//! by taking a lease (`running`, `lease_owner`, `lease_until`) and remembers the counter
//! it started from (`claimed`); a worker that dies loses its lease when it expires, and
//! another takes the partition over. The build commits its annotation, settles the
//! requests it started from, and removes or re-queues the row, all in one transaction
//! that first checks it still holds the lease: a build that lost its lease, or a
//! redelivered message, never adds a generation.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use scholia_events::db::WriteTx;
use scholia_events::error::DbContext;
use scholia_events::{Database, EventBody, NewEvent, PartitionKey, log};

use crate::Result;
use crate::rows::ColumnSpec;

/// Someone is waiting for this partition (a reader, a live chart, new data in it).
pub const PRIORITY_LIVE: i32 = 0;
/// A bulk rebuild (an invalidation, a schedule).
pub const PRIORITY_BULK: i32 = 10;
/// How long a claim holds before another worker may take the partition over.
pub const LEASE: Duration = Duration::from_secs(30);
/// Builds of one partition fail this many times before it is left `failed`.
pub const MAX_ATTEMPTS: i32 = 3;

macro_rules! on_tx {
    ($wtx:expr, |$c:ident| $body:expr) => {
        match $wtx {
            scholia_events::db::WriteTx::Postgres { tx: $c, .. } => $body,
            scholia_events::db::WriteTx::Sqlite { tx: $c, .. } => $body,
        }
    };
}
pub(crate) use on_tx;

macro_rules! on_db {
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            scholia_events::Database::Postgres(pg) => {
                let $p = &pg.pool;
                $body
            }
            scholia_events::Database::Sqlite(d) => {
                let $p = &d.pool;
                $body
            }
        }
    };
}
pub(crate) use on_db;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A build that starts after this request: the input or the definition changed.
    Rebuild,
    /// Any build will do, pending or running: a reader wants the partition there. Asking
    /// again while one is pending costs nothing, so readers may ask as often as they look.
    Present,
}

/// Queue (eager) or mark stale (lazy) these partitions of `analysis`, inside `tx`.
/// Returns each partition's request counter, which a build must reach to settle it.
pub async fn request(
    tx: &mut WriteTx,
    analysis: &str,
    partitions: &[PartitionKey],
    priority: i32,
    eager: bool,
    want: Want,
    not_before: DateTime<Utc>,
) -> Result<Vec<i64>> {
    let sql = "INSERT INTO partition_state (analysis, partition, state, priority, requested, claimed, not_before, attempts, updated_at) \
               VALUES ($1, $2, $3, $4, 1, 0, $5, 0, $6) \
               ON CONFLICT (analysis, partition) DO UPDATE SET \
                 requested = CASE WHEN $7 AND partition_state.state IN ('queued', 'running') \
                                  THEN partition_state.requested ELSE partition_state.requested + 1 END, \
                 state = CASE WHEN partition_state.state = 'running' THEN 'running' \
                              WHEN excluded.state = 'queued' OR partition_state.state = 'queued' THEN 'queued' \
                              ELSE 'stale' END, \
                 priority = CASE WHEN excluded.priority < partition_state.priority THEN excluded.priority ELSE partition_state.priority END, \
                 not_before = CASE WHEN partition_state.state = 'queued' AND partition_state.not_before < excluded.not_before \
                                   THEN partition_state.not_before ELSE excluded.not_before END, \
                 attempts = CASE WHEN partition_state.state = 'failed' THEN 0 ELSE partition_state.attempts END, \
                 error = CASE WHEN partition_state.state = 'failed' THEN NULL ELSE partition_state.error END, \
                 updated_at = excluded.updated_at \
               RETURNING requested";
    let state = if eager { "queued" } else { "stale" };
    let now = Utc::now();
    let mut counters = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let key = partition.to_string();
        let counter: i64 = on_tx!(tx, |c| sqlx::query_scalar(sql)
            .bind(analysis)
            .bind(&key)
            .bind(state)
            .bind(priority)
            .bind(not_before)
            .bind(now)
            .bind(want == Want::Present)
            .fetch_one(&mut **c)
            .await
            .context("queueing a build")?);
        counters.push(counter);
    }
    Ok(counters)
}

/// Request live builds (someone is waiting) in a transaction of their own, and log
/// `analysis.requested`.
pub async fn request_now(
    db: &Database,
    analysis: &str,
    version: i64,
    partitions: &[PartitionKey],
    want: Want,
    delay: Duration,
    actor: &str,
) -> Result<()> {
    if partitions.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin_write().await?;
    let mut partitions = partitions.to_vec();
    if want == Want::Present {
        // A reader may look at a cache a moment behind: what is built, current and not
        // marked stale needs nothing.
        let sql = "SELECT a.version FROM annotations a WHERE a.analysis = $1 AND a.partition = $2 \
                   AND NOT EXISTS (SELECT 1 FROM partition_state s \
                                   WHERE s.analysis = a.analysis AND s.partition = a.partition)";
        let mut needed = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let built: Option<i64> = on_tx!(&mut tx, |c| sqlx::query_scalar(sql)
                .bind(analysis)
                .bind(partition.to_string())
                .fetch_optional(&mut **c)
                .await
                .context("checking a partition")?);
            if built.is_none_or(|v| v < version) {
                needed.push(partition);
            }
        }
        partitions = needed;
        if partitions.is_empty() {
            return Ok(());
        }
    }
    let partitions = &partitions[..];
    let priority = PRIORITY_LIVE;
    let not_before = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
    request(
        &mut tx, analysis, partitions, priority, true, want, not_before,
    )
    .await?;
    log::append(
        &mut tx,
        vec![NewEvent::new(
            actor,
            EventBody::AnalysisRequested {
                analysis: analysis.to_string(),
                version,
                partitions: partitions.to_vec(),
                priority,
                invalidation: None,
            },
        )],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A partition this worker holds the lease of.
#[derive(Debug, Clone)]
pub struct Claim {
    pub analysis: String,
    pub partition: String,
    pub claimed: i64,
    pub attempts: i32,
    pub build: Uuid,
    pub owner: String,
}

/// Take the most urgent partition that is due (or whose lease expired).
pub async fn claim(db: &Database, owner: &str) -> Result<Option<Claim>> {
    let now = Utc::now();
    let lease_until = now + chrono::Duration::from_std(LEASE).expect("the lease fits");
    let build = Uuid::now_v7();
    let set = "SET state = 'running', lease_owner = $1, lease_until = $2, claimed = requested, build_id = $3, \
               attempts = CASE WHEN state = 'running' THEN attempts + 1 ELSE attempts END, updated_at = $4";
    let due = "(state = 'queued' AND not_before <= $4) OR (state = 'running' AND lease_until < $4)";
    let row: Option<(String, String, i64, i32)> = match db {
        Database::Postgres(pg) => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE partition_state {set} WHERE (analysis, partition) = ( \
               SELECT analysis, partition FROM partition_state WHERE {due} \
               ORDER BY priority, not_before LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING analysis, partition, claimed, attempts"
        )))
        .bind(owner)
        .bind(lease_until)
        .bind(build)
        .bind(now)
        .fetch_optional(&pg.pool)
        .await
        .context("claiming a build")?,
        Database::Sqlite(_) => {
            let mut tx = db.begin_write().await?;
            let row = on_tx!(&mut tx, |c| {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE partition_state {set} WHERE rowid = ( \
                   SELECT rowid FROM partition_state WHERE {due} ORDER BY priority, not_before LIMIT 1) \
                 RETURNING analysis, partition, claimed, attempts"
            )))
            .bind(owner)
            .bind(lease_until)
            .bind(build)
            .bind(now)
            .fetch_optional(&mut **c)
            .await
            .context("claiming a build")?
            });
            tx.commit().await?;
            row
        }
    };
    Ok(row.map(|(analysis, partition, claimed, attempts)| Claim {
        analysis,
        partition,
        claimed,
        attempts,
        build,
        owner: owner.to_string(),
    }))
}

/// When the earliest queued build becomes due (debounced requests wait a little).
pub async fn next_due(db: &Database) -> Result<Option<DateTime<Utc>>> {
    let sql = "SELECT MIN(not_before) FROM partition_state WHERE state = 'queued'";
    Ok(on_db!(db, |p| sqlx::query_scalar(sql)
        .fetch_one(p)
        .await
        .context("finding the next due build")?))
}

/// Extend the lease; false when it was lost.
pub async fn heartbeat(db: &Database, claim: &Claim) -> Result<bool> {
    let until = Utc::now() + chrono::Duration::from_std(LEASE).expect("the lease fits");
    let sql = "UPDATE partition_state SET lease_until = $1 \
               WHERE analysis = $2 AND partition = $3 AND build_id = $4 AND state = 'running'";
    let done = on_db!(db, |p| sqlx::query(sql)
        .bind(until)
        .bind(&claim.analysis)
        .bind(&claim.partition)
        .bind(claim.build)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        .context("extending a lease")?);
    Ok(done == 1)
}

/// What a finished build produced.
pub struct BuildResult {
    pub version: i64,
    pub columns: Vec<ColumnSpec>,
    /// The rows as a JSON array.
    pub rows_json: String,
    pub row_count: u64,
    pub input_rows: u64,
    pub input_seq: i64,
    pub duration: Duration,
}

/// How a commit went.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// The annotation is stored with this generation.
    Generation(i64),
    /// Another worker took the partition over; nothing was written.
    LostLease,
}

/// Does this transaction still hold the claim's lease?
async fn holds_lease(tx: &mut WriteTx, claim: &Claim) -> Result<Option<i64>> {
    let sql = "SELECT requested FROM partition_state \
               WHERE analysis = $1 AND partition = $2 AND state = 'running' AND build_id = $3";
    Ok(on_tx!(tx, |c| sqlx::query_scalar(sql)
        .bind(&claim.analysis)
        .bind(&claim.partition)
        .bind(claim.build)
        .fetch_optional(&mut **c)
        .await
        .context("checking a lease")?))
}

/// Store the annotation, settle the requests the build started from, and log
/// `analysis.completed`, in one transaction.
pub async fn complete(db: &Database, claim: &Claim, result: &BuildResult) -> Result<Committed> {
    let mut tx = db.begin_write().await?;
    let Some(requested) = holds_lease(&mut tx, claim).await? else {
        return Ok(Committed::LostLease);
    };
    let now = Utc::now();
    let columns = serde_json::to_string(&result.columns).expect("columns serialize");
    let upsert = "INSERT INTO annotations (analysis, partition, version, generation, computed_at, input_rows, input_seq, row_count, columns, rows, build_id) \
                  VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8, $9, $10) \
                  ON CONFLICT (analysis, partition) DO UPDATE SET version = excluded.version, \
                    generation = annotations.generation + 1, computed_at = excluded.computed_at, \
                    input_rows = excluded.input_rows, input_seq = excluded.input_seq, row_count = excluded.row_count, \
                    columns = excluded.columns, rows = excluded.rows, build_id = excluded.build_id \
                  RETURNING generation";
    let generation: i64 = on_tx!(&mut tx, |c| sqlx::query_scalar(upsert)
        .bind(&claim.analysis)
        .bind(&claim.partition)
        .bind(result.version)
        .bind(now)
        .bind(result.input_rows as i64)
        .bind(result.input_seq)
        .bind(result.row_count as i64)
        .bind(&columns)
        .bind(&result.rows_json)
        .bind(claim.build)
        .fetch_one(&mut **c)
        .await
        .context("storing an annotation")?);
    settle_items(&mut tx, claim, "done").await?;
    if requested > claim.claimed {
        // Asked for again while it was being built: go round once more.
        let sql = "UPDATE partition_state SET state = 'queued', lease_owner = NULL, lease_until = NULL, \
                   attempts = 0, error = NULL, not_before = $3, updated_at = $3 WHERE analysis = $1 AND partition = $2";
        on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(&claim.analysis)
            .bind(&claim.partition)
            .bind(now)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected())
            .context("re-queueing a partition")?);
    } else {
        let sql = "DELETE FROM partition_state WHERE analysis = $1 AND partition = $2";
        on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(&claim.analysis)
            .bind(&claim.partition)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected())
            .context("finishing a build")?);
    }
    let partition = PartitionKey::parse(&claim.partition).map_err(crate::Error::Invalid)?;
    log::append(
        &mut tx,
        vec![NewEvent::new(
            format!("worker:{}", claim.owner),
            EventBody::AnalysisCompleted {
                analysis: claim.analysis.clone(),
                version: result.version,
                partition,
                build: claim.build,
                generation,
                rows: result.row_count,
                input_rows: result.input_rows,
                input_seq: result.input_seq,
                duration_ms: result.duration.as_millis() as u64,
            },
        )],
    )
    .await?;
    tx.commit().await?;
    Ok(Committed::Generation(generation))
}

/// Record a failed build: retry later with backoff, or give up after `MAX_ATTEMPTS`.
/// Returns whether it gave up.
pub async fn fail(
    db: &Database,
    claim: &Claim,
    version: i64,
    error: &str,
    retryable: bool,
) -> Result<Option<bool>> {
    let mut tx = db.begin_write().await?;
    if holds_lease(&mut tx, claim).await?.is_none() {
        return Ok(None);
    }
    let attempts = claim.attempts + 1;
    let gave_up = !retryable || attempts >= MAX_ATTEMPTS;
    let now = Utc::now();
    if gave_up {
        let sql = "UPDATE partition_state SET state = 'failed', attempts = $3, error = $4, lease_owner = NULL, \
                   lease_until = NULL, updated_at = $5 WHERE analysis = $1 AND partition = $2";
        on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(&claim.analysis)
            .bind(&claim.partition)
            .bind(attempts)
            .bind(error)
            .bind(now)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected())
            .context("marking a partition failed")?);
        settle_items(&mut tx, claim, "failed").await?;
    } else {
        let backoff = chrono::Duration::milliseconds(500 * (1 << attempts.min(10)) as i64);
        let sql = "UPDATE partition_state SET state = 'queued', attempts = $3, error = $4, lease_owner = NULL, \
                   lease_until = NULL, not_before = $5, updated_at = $6 WHERE analysis = $1 AND partition = $2";
        on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(&claim.analysis)
            .bind(&claim.partition)
            .bind(attempts)
            .bind(error)
            .bind(now + backoff)
            .bind(now)
            .execute(&mut **c)
            .await
            .map(|r| r.rows_affected())
            .context("scheduling a retry")?);
    }
    let partition = PartitionKey::parse(&claim.partition).map_err(crate::Error::Invalid)?;
    log::append(
        &mut tx,
        vec![NewEvent::new(
            format!("worker:{}", claim.owner),
            EventBody::AnalysisFailed {
                analysis: claim.analysis.clone(),
                version,
                partition,
                build: claim.build,
                error: error.to_string(),
                attempt: attempts,
                gave_up,
            },
        )],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(gave_up))
}

async fn settle_items(tx: &mut WriteTx, claim: &Claim, state: &str) -> Result<()> {
    let sql = "UPDATE invalidation_items SET state = $1 \
               WHERE analysis = $2 AND partition = $3 AND state = 'pending' AND request <= $4";
    on_tx!(tx, |c| sqlx::query(sql)
        .bind(state)
        .bind(&claim.analysis)
        .bind(&claim.partition)
        .bind(claim.claimed)
        .execute(&mut **c)
        .await
        .map(|r| r.rows_affected())
        .context("settling invalidation items")?);
    Ok(())
}

/// The queue state of one partition, as readers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueState {
    pub partition: String,
    /// `stale`, `queued`, `running` or `failed`.
    pub state: String,
    pub error: Option<String>,
}

/// Queue states of `analysis` for partition keys in `[from_key, to_key)`.
pub async fn states(
    db: &Database,
    analysis: &str,
    from_key: &str,
    to_key: &str,
) -> Result<Vec<QueueState>> {
    let sql = "SELECT partition, state, error FROM partition_state \
               WHERE analysis = $1 AND partition >= $2 AND partition < $3";
    let rows: Vec<(String, String, Option<String>)> = on_db!(db, |p| sqlx::query_as(sql)
        .bind(analysis)
        .bind(from_key)
        .bind(to_key)
        .fetch_all(p)
        .await
        .context("reading build states")?);
    Ok(rows
        .into_iter()
        .map(|(partition, state, error)| QueueState {
            partition,
            state,
            error,
        })
        .collect())
}
