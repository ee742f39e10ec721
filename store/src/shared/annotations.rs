//! Annotations: the latest of each (analysis, partition), in one generic table, and what
//! each build read of each input (`annotation_inputs`): the span it covered and that
//! span's summary (rows, highest `seq`).
//!
//! Staleness is derived from SQL. An input moved when something in its span is newer
//! than what the build read: an hour of `record_hours` with a higher `max_seq`, or an
//! upstream annotation committed at a higher `seq`. Both only grow, so comparing the
//! highest `seq` is exact. The commit checks it before it lets a partition count as
//! current; the planner and the reconciler check it afterwards.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::analysis::InputSource;
use scholia_events::envelope::format_time;
use scholia_events::status::{ItemState, PRIORITY_LIVE};
use scholia_events::store::{
    AnnotationKey, Annotations, BUILDS_KEPT_DAYS, BUILDS_KEPT_PER_PARTITION, BuildRecord,
    ChangedHour, Claim, Committed, InputRead, NewAnnotation, StoredAnnotation,
};
use scholia_events::{EventBody, NewEvent, PartitionKey, Result};

use super::queue::{BuildLine, holds_lease, key, record_build, settle_items};
use super::{Backend, Db, MAX_BINDS, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

type Row = (String, i64, i64, Timestamp, i64, i64, i64, String, String);

/// How long after its input moved a partition's next build waits, so that a burst of
/// records coalesces into one build.
const DEBOUNCE: chrono::Duration = chrono::Duration::milliseconds(100);

/// Whether an input moved since the build read it.
async fn input_moved(tx: &mut WriteTx, input: &InputRead) -> Result<bool> {
    let newest: Option<i64> = match &input.source {
        InputSource::Kind(kind) => sqlx::query_scalar::<Db, Option<i64>>(
            "SELECT MAX(max_seq) FROM record_hours WHERE kind = $1 AND hour >= $2 AND hour < $3",
        )
        .bind(kind)
        .bind(&input.span_from)
        .bind(&input.span_to)
        .fetch_one(tx.conn())
        .await
        .ctx("checking a build's input")?,
        InputSource::Analysis(upstream) => sqlx::query_scalar::<Db, Option<i64>>(
            "SELECT MAX(committed_seq) FROM annotations WHERE analysis = $1 AND partition >= $2 AND partition < $3",
        )
        .bind(upstream)
        .bind(&input.span_from)
        .bind(&input.span_to)
        .fetch_one(tx.conn())
        .await
        .ctx("checking a build's input")?,
    };
    Ok(newest.unwrap_or(0) > input.max_seq)
}

async fn save_inputs(tx: &mut WriteTx, claim: &Claim, inputs: &[InputRead]) -> Result<()> {
    let partition = claim.partition.to_string();
    sqlx::query::<Db>("DELETE FROM annotation_inputs WHERE analysis = $1 AND partition = $2")
        .bind(&claim.analysis)
        .bind(&partition)
        .execute(tx.conn())
        .await
        .ctx("replacing a build's inputs")?;
    for chunk in inputs.chunks(MAX_BINDS / 8) {
        let mut q = QueryBuilder::<Db>::new(
            "INSERT INTO annotation_inputs (analysis, partition, input_type, input, span_from, span_to, rows, max_seq) ",
        );
        q.push_values(chunk, |mut row, input| {
            row.push_bind(&claim.analysis)
                .push_bind(&partition)
                .push_bind(input.source.type_word())
                .push_bind(input.source.name())
                .push_bind(&input.span_from)
                .push_bind(&input.span_to)
                .push_bind(input.rows)
                .push_bind(input.max_seq);
        });
        q.build()
            .execute(tx.conn())
            .await
            .ctx("recording a build's inputs")?;
    }
    Ok(())
}

fn stored(row: Row) -> Result<StoredAnnotation> {
    let (
        partition,
        version,
        generation,
        computed_at,
        input_rows,
        input_seq,
        committed_seq,
        columns,
        rows,
    ) = row;
    Ok(StoredAnnotation {
        partition: key(&partition)?,
        version,
        generation,
        computed_at: computed_at.into(),
        input_rows,
        input_seq,
        committed_seq,
        columns: serde_json::from_str(&columns)
            .map_err(|e| corrupt("reading an annotation's columns", e))?,
        rows: RawValue::from_string(rows)
            .map_err(|e| corrupt("reading an annotation's rows", e))?,
    })
}

fn keys(rows: Vec<(String, String)>) -> Result<Vec<AnnotationKey>> {
    let mut out: Vec<AnnotationKey> = rows
        .into_iter()
        .map(|(analysis, partition)| {
            Ok(AnnotationKey {
                analysis,
                partition: key(&partition)?,
            })
        })
        .collect::<Result<_>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Keep the build history bounded: of `analysis`' partition, the newest
/// [`BUILDS_KEPT_PER_PARTITION`] builds; of the analysis, none older than
/// [`BUILDS_KEPT_DAYS`]. Called with every build recorded, inside its transaction; both
/// deletes are index range scans that find nothing almost every time.
pub(crate) async fn prune_builds(tx: &mut WriteTx, analysis: &str, partition: &str) -> Result<()> {
    sqlx::query::<Db>(
        "DELETE FROM builds WHERE analysis = $1 AND partition = $2 AND finished_at < ( \
           SELECT finished_at FROM builds WHERE analysis = $1 AND partition = $2 \
           ORDER BY finished_at DESC LIMIT 1 OFFSET $3)",
    )
    .bind(analysis)
    .bind(partition)
    .bind(BUILDS_KEPT_PER_PARTITION - 1)
    .execute(tx.conn())
    .await
    .ctx("pruning a partition's build history")?;
    sqlx::query::<Db>("DELETE FROM builds WHERE analysis = $1 AND finished_at < $2")
        .bind(analysis)
        .bind(Timestamp(
            Utc::now() - chrono::Duration::days(BUILDS_KEPT_DAYS),
        ))
        .execute(tx.conn())
        .await
        .ctx("pruning an analysis' build history")?;
    Ok(())
}

type BuildRow = (
    Uuid,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    i64,
    i32,
    String,
    String,
    Option<String>,
    Timestamp,
    Timestamp,
);

fn build_record(row: BuildRow) -> Result<BuildRecord> {
    let (
        id,
        partition,
        version,
        generation,
        rows_read,
        rows_written,
        duration_ms,
        attempt,
        worker,
        outcome,
        error,
        started_at,
        finished_at,
    ) = row;
    Ok(BuildRecord {
        id,
        partition: key(&partition)?,
        version,
        generation,
        rows_read,
        rows_written,
        duration_ms,
        attempt,
        worker,
        outcome,
        error,
        started_at: format_time(started_at.into()),
        finished_at: format_time(finished_at.into()),
    })
}

/// Partitions with a row in the build queue will be built anyway (or were given up on,
/// until something asks again): the reconciler leaves them be.
const NOT_QUEUED: &str = "NOT EXISTS (SELECT 1 FROM partition_state s \
                          WHERE s.analysis = i.analysis AND s.partition = i.partition)";

#[async_trait]
impl Annotations for Backend {
    async fn load(
        &self,
        analysis: &str,
        first: &PartitionKey,
        last: &PartitionKey,
    ) -> Result<Vec<StoredAnnotation>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(
            "SELECT partition, version, generation, computed_at, input_rows, input_seq, committed_seq, columns, rows \
             FROM annotations WHERE analysis = $1 AND partition >= $2 AND partition <= $3",
        )
        .bind(analysis)
        .bind(first.to_string())
        .bind(last.to_string())
        .fetch_all(&self.pool)
        .await
        .ctx("reading annotations")?;
        rows.into_iter().map(stored).collect()
    }

    async fn commit(&self, claim: &Claim, annotation: &NewAnnotation) -> Result<Committed> {
        let mut tx = self.write().await?;
        let Some(requested) = holds_lease(&mut tx, claim).await? else {
            return Ok(Committed::LostLease);
        };
        let partition = claim.partition.to_string();
        let previous: Option<i64> = sqlx::query_scalar::<Db, i64>(
            "SELECT generation FROM annotations WHERE analysis = $1 AND partition = $2",
        )
        .bind(&claim.analysis)
        .bind(&partition)
        .fetch_optional(tx.conn())
        .await
        .ctx("reading a generation")?;
        let generation = previous.unwrap_or(0) + 1;
        let (input_rows, input_seq) = (annotation.input_rows(), annotation.input_seq());
        let logged = super::log::append(
            &mut tx,
            vec![NewEvent::new(
                format!("worker:{}", claim.owner),
                EventBody::AnalysisCompleted {
                    analysis: claim.analysis.clone(),
                    version: annotation.version,
                    partition: claim.partition,
                    build: claim.build,
                    generation,
                    rows: annotation.row_count,
                    input_rows: input_rows as u64,
                    input_seq,
                    duration_ms: annotation.duration.as_millis() as u64,
                },
            )],
        )
        .await?;
        let committed_seq = logged[0].seq;
        let columns = serde_json::to_string(&annotation.columns).expect("columns serialize");
        sqlx::query::<Db>(
            "INSERT INTO annotations (analysis, partition, version, generation, computed_at, input_rows, input_seq, \
                                      committed_seq, row_count, columns, rows, build_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (analysis, partition) DO UPDATE SET version = excluded.version, \
               generation = excluded.generation, computed_at = excluded.computed_at, \
               input_rows = excluded.input_rows, input_seq = excluded.input_seq, \
               committed_seq = excluded.committed_seq, row_count = excluded.row_count, \
               columns = excluded.columns, rows = excluded.rows, build_id = excluded.build_id",
        )
        .bind(&claim.analysis)
        .bind(&partition)
        .bind(annotation.version)
        .bind(generation)
        .bind(Timestamp(Utc::now()))
        .bind(input_rows)
        .bind(input_seq)
        .bind(committed_seq)
        .bind(annotation.row_count as i64)
        .bind(columns)
        .bind(&annotation.rows_json)
        .bind(claim.build)
        .execute(tx.conn())
        .await
        .ctx("storing an annotation")?;
        save_inputs(&mut tx, claim, &annotation.inputs).await?;
        settle_items(&mut tx, claim, ItemState::Done).await?;
        let mut moved = false;
        for input in &annotation.inputs {
            if input_moved(&mut tx, input).await? {
                moved = true;
                break;
            }
        }
        let again = moved || requested > claim.claimed;
        if again {
            // Asked for again while it was built, or its input moved after the build read
            // it: go round once more (soon, so that a burst still coalesces).
            let now = Utc::now();
            sqlx::query::<Db>(
                "UPDATE partition_state SET state = 'queued', lease_owner = NULL, lease_until = NULL, \
                 attempts = 0, error = NULL, not_before = $3, updated_at = $4, \
                 requested = CASE WHEN $5 THEN requested + 1 ELSE requested END, \
                 priority = CASE WHEN $5 AND priority > $6 THEN $6 ELSE priority END \
                 WHERE analysis = $1 AND partition = $2",
            )
            .bind(&claim.analysis)
            .bind(&partition)
            .bind(Timestamp(if moved { now + DEBOUNCE } else { now }))
            .bind(Timestamp(now))
            .bind(moved)
            .bind(PRIORITY_LIVE)
            .execute(tx.conn())
            .await
            .ctx("queueing a partition again")?;
            tx.announce_work().await?;
        } else {
            sqlx::query::<Db>("DELETE FROM partition_state WHERE analysis = $1 AND partition = $2")
                .bind(&claim.analysis)
                .bind(&partition)
                .execute(tx.conn())
                .await
                .ctx("finishing a build")?;
        }
        record_build(
            &mut tx,
            BuildLine {
                claim,
                version: annotation.version,
                generation: Some(generation),
                rows_read: input_rows,
                rows_written: annotation.row_count as i64,
                error: None,
                outcome: "completed",
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Committed::Generation { generation, again })
    }

    async fn behind(
        &self,
        analysis: &str,
        input: &InputSource,
        partitions: &[PartitionKey],
        seq: i64,
    ) -> Result<Vec<PartitionKey>> {
        let mut out = Vec::new();
        for chunk in partitions.chunks(MAX_BINDS - 8) {
            let mut q = QueryBuilder::<Db>::new(
                "SELECT partition FROM annotation_inputs WHERE analysis = ",
            );
            q.push_bind(analysis);
            q.push(" AND input_type = ");
            q.push_bind(input.type_word());
            q.push(" AND input = ");
            q.push_bind(input.name());
            q.push(" AND max_seq < ");
            q.push_bind(seq);
            q.push(" AND partition IN (");
            let mut list = q.separated(", ");
            for p in chunk {
                list.push_bind(p.to_string());
            }
            q.push(")");
            let rows: Vec<(String,)> = q
                .build_query_as()
                .fetch_all(&self.pool)
                .await
                .ctx("finding partitions behind their input")?;
            for (partition,) in rows {
                out.push(key(&partition)?);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn moved(&self, hours: Option<&[ChangedHour]>) -> Result<Vec<AnnotationKey>> {
        let mut rows: Vec<(String, String)> = Vec::new();
        match hours {
            None => {
                let sql = format!(
                    "SELECT i.analysis, i.partition FROM annotation_inputs i \
                     WHERE i.input_type = 'kind' AND {NOT_QUEUED} AND EXISTS ( \
                       SELECT 1 FROM record_hours h WHERE h.kind = i.input \
                       AND h.hour >= i.span_from AND h.hour < i.span_to AND h.max_seq > i.max_seq)"
                );
                rows.extend(
                    sqlx::query_as::<Db, (String, String)>(sqlx::AssertSqlSafe(sql))
                        .fetch_all(&self.pool)
                        .await
                        .ctx("comparing built partitions with their records")?,
                );
            }
            Some(hours) => {
                for chunk in hours.chunks(MAX_BINDS / 3) {
                    let mut q = QueryBuilder::<Db>::new("WITH changed (kind, hour, max_seq) AS (");
                    q.push_values(chunk, |mut row, h| {
                        row.push_bind(&h.kind)
                            .push_bind(h.hour.to_string())
                            .push_bind(h.max_seq);
                    });
                    q.push(format!(
                        ") SELECT DISTINCT i.analysis, i.partition FROM changed c \
                         JOIN annotation_inputs i ON i.input_type = 'kind' AND i.input = c.kind \
                         AND i.span_from <= c.hour AND i.span_to > c.hour AND i.max_seq < c.max_seq \
                         WHERE {NOT_QUEUED}"
                    ));
                    rows.extend(
                        q.build_query_as::<(String, String)>()
                            .fetch_all(&self.pool)
                            .await
                            .ctx("comparing built partitions with their records")?,
                    );
                }
            }
        }
        let upstream = format!(
            "SELECT i.analysis, i.partition FROM annotation_inputs i \
             WHERE i.input_type = 'analysis' AND {NOT_QUEUED} AND EXISTS ( \
               SELECT 1 FROM annotations u WHERE u.analysis = i.input \
               AND u.partition >= i.span_from AND u.partition < i.span_to AND u.committed_seq > i.max_seq)"
        );
        rows.extend(
            sqlx::query_as::<Db, (String, String)>(sqlx::AssertSqlSafe(upstream))
                .fetch_all(&self.pool)
                .await
                .ctx("comparing built partitions with their upstream annotations")?,
        );
        keys(rows)
    }

    async fn inputs(&self, analysis: &str, partition: &PartitionKey) -> Result<Vec<InputRead>> {
        let rows: Vec<(String, String, String, String, i64, i64)> = sqlx::query_as::<Db, _>(
            "SELECT input_type, input, span_from, span_to, rows, max_seq FROM annotation_inputs \
             WHERE analysis = $1 AND partition = $2 ORDER BY input_type, input",
        )
        .bind(analysis)
        .bind(partition.to_string())
        .fetch_all(&self.pool)
        .await
        .ctx("reading a build's inputs")?;
        rows.into_iter()
            .map(|(ty, name, span_from, span_to, rows, max_seq)| {
                Ok(InputRead {
                    source: InputSource::from_parts(&ty, name)
                        .map_err(|e| corrupt("reading a build's inputs", e))?,
                    span_from,
                    span_to,
                    rows,
                    max_seq,
                })
            })
            .collect()
    }

    async fn readers(
        &self,
        input: &InputSource,
        key: &str,
        seq: i64,
    ) -> Result<Vec<AnnotationKey>> {
        let rows: Vec<(String, String)> = sqlx::query_as::<Db, (String, String)>(
            "SELECT analysis, partition FROM annotation_inputs \
             WHERE input_type = $1 AND input = $2 AND span_from <= $3 AND span_to > $3 AND max_seq >= $4",
        )
        .bind(input.type_word())
        .bind(input.name())
        .bind(key)
        .bind(seq)
        .fetch_all(&self.pool)
        .await
        .ctx("finding what was built from an input")?;
        keys(rows)
    }
    async fn builds(
        &self,
        analysis: &str,
        partition: Option<&PartitionKey>,
        limit: usize,
    ) -> Result<Vec<BuildRecord>> {
        let mut q = QueryBuilder::<Db>::new(
            "SELECT build_id, partition, version, generation, rows_read, rows_written, duration_ms, \
                    attempt, worker, outcome, error, started_at, finished_at \
             FROM builds WHERE analysis = ",
        );
        q.push_bind(analysis);
        if let Some(partition) = partition {
            q.push(" AND partition = ");
            q.push_bind(partition.to_string());
        }
        q.push(" ORDER BY finished_at DESC, build_id DESC LIMIT ");
        q.push_bind(limit as i64);
        let rows: Vec<BuildRow> = q
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .ctx("reading build history")?;
        rows.into_iter().map(build_record).collect()
    }

    async fn row_counts(
        &self,
        analysis: &str,
        first: &PartitionKey,
        last: &PartitionKey,
    ) -> Result<Vec<(PartitionKey, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as::<Db, (String, i64)>(
            "SELECT partition, row_count FROM annotations \
             WHERE analysis = $1 AND partition >= $2 AND partition <= $3 ORDER BY partition",
        )
        .bind(analysis)
        .bind(first.to_string())
        .bind(last.to_string())
        .fetch_all(&self.pool)
        .await
        .ctx("counting annotation rows")?;
        let mut out = Vec::with_capacity(rows.len());
        for (partition, rows) in rows {
            let partition = key(&partition)?;
            // Keys of another granularity (from before the analysis changed it) sort among
            // these as text; they are not read.
            if partition.granularity == first.granularity {
                out.push((partition, rows));
            }
        }
        Ok(out)
    }

    async fn built(&self, analysis: &str, version: i64, limit: usize) -> Result<Vec<PartitionKey>> {
        let rows: Vec<(String,)> = sqlx::query_as::<Db, (String,)>(
            "SELECT partition FROM annotations WHERE analysis = $1 AND version = $2 \
             ORDER BY partition DESC LIMIT $3",
        )
        .bind(analysis)
        .bind(version)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("listing built partitions")?;
        rows.into_iter().map(|(p,)| key(&p)).collect()
    }

    async fn workers_seen(&self, analyses: &[String], since: DateTime<Utc>) -> Result<Vec<String>> {
        let mut seen: Vec<String> = sqlx::query_scalar::<Db, String>(
            "SELECT DISTINCT lease_owner FROM partition_state \
             WHERE state = 'running' AND lease_owner IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("listing running builds")?;
        for chunk in analyses.chunks(MAX_BINDS - 8) {
            let mut q =
                QueryBuilder::<Db>::new("SELECT DISTINCT worker FROM builds WHERE finished_at >= ");
            q.push_bind(Timestamp(since));
            q.push(" AND analysis IN (");
            let mut list = q.separated(", ");
            for analysis in chunk {
                list.push_bind(analysis);
            }
            q.push(")");
            let rows: Vec<(String,)> = q
                .build_query_as()
                .fetch_all(&self.pool)
                .await
                .ctx("listing recent builds' workers")?;
            seen.extend(rows.into_iter().map(|(w,)| w));
        }
        seen.sort();
        seen.dedup();
        Ok(seen)
    }
}
