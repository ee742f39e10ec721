//! Analyses' definitions: one row per analysis, whatever it computes, so adding one never
//! changes the schema. A candidate is a row of its own (`name@candidate`); promoting one
//! moves its annotations to the live analysis in the transaction that changes the live
//! definition.

use async_trait::async_trait;
use chrono::Utc;
use uuid::Uuid;

use scholia_events::analysis::{AnalysisMeta, Input, Language};
use scholia_events::event::MAX_RUNS;
use scholia_events::partition::runs;
use scholia_events::store::{
    Analyses, AnalysisRecord, CANDIDATE_SUFFIX, CandidateSummary, Discarded, Promotion,
    candidate_of,
};
use scholia_events::{Error, EventBody, NewEvent, PartitionKey, Result};

use super::queue::key;
use super::{Backend, Db, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

type Row = (
    String,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    Timestamp,
    String,
    Option<String>,
);

const COLUMNS: &str = "name, version, partition, inputs, sql, description, fingerprint, updated_at, updated_by, row_key";

fn record(
    (
        name,
        version,
        partition,
        inputs,
        sql,
        description,
        fingerprint,
        updated_at,
        updated_by,
        row_key,
    ): Row,
) -> Result<AnalysisRecord> {
    let bad = |e: String| corrupt("reading an analysis", format!("{name}: {e}"));
    let inputs: Vec<Input> = serde_json::from_str(&inputs).map_err(|e| bad(e.to_string()))?;
    let key: Option<Vec<String>> = row_key
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| bad(e.to_string()))?;
    Ok(AnalysisRecord {
        meta: AnalysisMeta {
            partition: partition.parse().map_err(bad)?,
            inputs,
            language: if sql.is_some() {
                Language::Sql
            } else {
                Language::Builtin
            },
            sql,
            description,
            key,
            version,
            name,
        },
        fingerprint,
        updated_at: updated_at.into(),
        updated_by,
    })
}

#[async_trait]
impl Analyses for Backend {
    async fn list(&self) -> Result<Vec<AnalysisRecord>> {
        let rows: Vec<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM analyses ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .ctx("listing analyses")?;
        rows.into_iter().map(record).collect()
    }

    async fn get(&self, name: &str) -> Result<Option<AnalysisRecord>> {
        let row: Option<Row> = sqlx::query_as::<Db, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM analyses WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading an analysis")?;
        row.map(record).transpose()
    }

    async fn put(&self, analyses: Vec<(AnalysisMeta, String)>, actor: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let events = store_definitions(&mut tx, analyses, actor).await?;
        super::log::append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn candidates(&self) -> Result<Vec<CandidateSummary>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as::<Db, (String, i64, i64)>(
            "SELECT n.name, n.version, COUNT(a.partition) FROM analyses n \
             LEFT JOIN annotations a ON a.analysis = n.name AND a.version = n.version \
             WHERE n.name LIKE $1 GROUP BY n.name, n.version ORDER BY n.name",
        )
        .bind(format!("%{CANDIDATE_SUFFIX}"))
        .fetch_all(&self.pool)
        .await
        .ctx("listing candidates")?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, version, built)| {
                Some(CandidateSummary {
                    analysis: candidate_of(&name)?.to_string(),
                    version,
                    built,
                })
            })
            .collect())
    }

    async fn promote(&self, promotion: Promotion) -> Result<Vec<PartitionKey>> {
        let Promotion {
            candidate,
            candidate_version,
            live,
            fingerprint,
            downstream,
            actor,
        } = promotion;
        let mut tx = self.write().await?;
        let stored: Option<i64> =
            sqlx::query_scalar::<Db, i64>("SELECT version FROM analyses WHERE name = $1")
                .bind(&candidate)
                .fetch_optional(tx.conn())
                .await
                .ctx("reading a candidate")?;
        match stored {
            None => {
                return Err(Error::NotFound(format!(
                    "{:?} has no candidate; register one with PUT /v1/analyses/{}?candidate=true",
                    live.name, live.name
                )));
            }
            Some(version) if version != candidate_version => {
                return Err(Error::Conflict(format!(
                    "the candidate of {:?} changed while it was being promoted (it is version {version} now); look at it again",
                    live.name
                )));
            }
            Some(_) => {}
        }
        // What moves: the candidate's annotations of its version, each taking the live
        // partition's next generation.
        type Moving = (String, i64, i64, i64, Uuid, i64);
        let moving: Vec<Moving> = sqlx::query_as::<Db, Moving>(
            "SELECT c.partition, c.row_count, c.input_rows, c.input_seq, c.build_id, COALESCE(l.generation, 0) \
             FROM annotations c LEFT JOIN annotations l ON l.analysis = $2 AND l.partition = c.partition \
             WHERE c.analysis = $1 AND c.version = $3 ORDER BY c.partition",
        )
        .bind(&candidate)
        .bind(&live.name)
        .bind(candidate_version)
        .fetch_all(tx.conn())
        .await
        .ctx("reading a candidate's annotations")?;
        let mut definitions = vec![(live.clone(), fingerprint)];
        definitions.extend(downstream);
        let mut events = store_definitions(&mut tx, definitions, &actor).await?;
        let first_completed = events.len();
        let mut partitions = Vec::with_capacity(moving.len());
        for (partition, row_count, input_rows, input_seq, build, generation) in &moving {
            let partition = key(partition)?;
            partitions.push(partition);
            events.push(NewEvent::new(
                &actor,
                EventBody::AnalysisCompleted {
                    analysis: live.name.clone(),
                    version: live.version,
                    partition,
                    build: *build,
                    generation: generation + 1,
                    rows: (*row_count).max(0) as u64,
                    input_rows: (*input_rows).max(0) as u64,
                    input_seq: *input_seq,
                    duration_ms: 0,
                },
            ));
        }
        let promoted_runs = runs(partitions.iter().copied());
        let mut detail = serde_json::json!({
            "version": live.version,
            "candidate_version": candidate_version,
            "partitions": partitions.len(),
        });
        if promoted_runs.len() <= MAX_RUNS {
            detail["runs"] = serde_json::to_value(&promoted_runs).expect("runs serialize");
        }
        events.push(NewEvent::admin(
            &actor,
            "candidate.promoted",
            live.name.clone(),
            detail,
        ));
        let logged = super::log::append(&mut tx, events).await?;
        for (i, (partition, _, _, _, _, generation)) in moving.iter().enumerate() {
            sqlx::query::<Db>(
                "INSERT INTO annotations (analysis, partition, version, generation, computed_at, input_rows, input_seq, \
                                          committed_seq, row_count, columns, rows, build_id) \
                 SELECT $1, partition, $2, $3, computed_at, input_rows, input_seq, $4, row_count, columns, rows, build_id \
                 FROM annotations WHERE analysis = $5 AND partition = $6 \
                 ON CONFLICT (analysis, partition) DO UPDATE SET version = excluded.version, \
                   generation = excluded.generation, computed_at = excluded.computed_at, \
                   input_rows = excluded.input_rows, input_seq = excluded.input_seq, \
                   committed_seq = excluded.committed_seq, row_count = excluded.row_count, \
                   columns = excluded.columns, rows = excluded.rows, build_id = excluded.build_id",
            )
            .bind(&live.name)
            .bind(live.version)
            .bind(generation + 1)
            .bind(logged[first_completed + i].seq)
            .bind(&candidate)
            .bind(partition)
            .execute(tx.conn())
            .await
            .ctx("promoting an annotation")?;
        }
        // What the promoted builds read is now what the live partitions read; the live
        // partitions' own queued (not running) builds are answered by the promotion.
        let promoted = "SELECT partition FROM annotations WHERE analysis = $2 AND version = $3";
        for (statement, what) in [
            (
                format!(
                    "DELETE FROM annotation_inputs WHERE analysis = $1 AND partition IN ({promoted})"
                ),
                "replacing the live partitions' inputs",
            ),
            (
                format!(
                    "UPDATE annotation_inputs SET analysis = $1 WHERE analysis = $2 AND partition IN ({promoted})"
                ),
                "promoting a candidate's inputs",
            ),
            (
                format!(
                    "UPDATE invalidation_items SET state = 'done' WHERE analysis = $1 AND state = 'pending' \
                     AND partition IN (SELECT s.partition FROM partition_state s WHERE s.analysis = $1 \
                                       AND s.state <> 'running' AND s.partition IN ({promoted}))"
                ),
                "settling promoted partitions' invalidations",
            ),
            (
                format!(
                    "DELETE FROM partition_state WHERE analysis = $1 AND state <> 'running' AND partition IN ({promoted})"
                ),
                "dequeueing promoted partitions",
            ),
        ] {
            sqlx::query::<Db>(sqlx::AssertSqlSafe(statement))
                .bind(&live.name)
                .bind(&candidate)
                .bind(candidate_version)
                .execute(tx.conn())
                .await
                .ctx(what)?;
        }
        drop_candidate(&mut tx, &candidate).await?;
        // The builds that made the promoted partitions are now the live analysis' history.
        sqlx::query::<Db>("UPDATE builds SET analysis = $1 WHERE analysis = $2")
            .bind(&live.name)
            .bind(&candidate)
            .execute(tx.conn())
            .await
            .ctx("keeping a candidate's build history")?;
        tx.commit().await?;
        Ok(partitions)
    }

    async fn discard(&self, name: &str, actor: &str) -> Result<Discarded> {
        let live = candidate_of(name).unwrap_or(name).to_string();
        let mut tx = self.write().await?;
        let version: Option<i64> =
            sqlx::query_scalar::<Db, i64>("SELECT version FROM analyses WHERE name = $1")
                .bind(name)
                .fetch_optional(tx.conn())
                .await
                .ctx("reading a candidate")?;
        let version = version.ok_or_else(|| {
            Error::NotFound(format!(
                "{live:?} has no candidate; register one with PUT /v1/analyses/{live}?candidate=true"
            ))
        })?;
        let (partitions, queued) = drop_candidate(&mut tx, name).await?;
        sqlx::query::<Db>("DELETE FROM builds WHERE analysis = $1")
            .bind(name)
            .execute(tx.conn())
            .await
            .ctx("deleting a candidate's build history")?;
        super::log::commit_audited(
            tx,
            NewEvent::admin(
                actor,
                "candidate.discarded",
                live,
                serde_json::json!({"version": version, "partitions": partitions, "queued": queued}),
            ),
        )
        .await?;
        Ok(Discarded {
            version,
            partitions,
            queued,
        })
    }
}

/// Store definitions inside `tx`; returns their `analysis.registered` events.
async fn store_definitions(
    tx: &mut WriteTx,
    analyses: Vec<(AnalysisMeta, String)>,
    actor: &str,
) -> Result<Vec<NewEvent>> {
    let now = Timestamp(Utc::now());
    let mut events = Vec::with_capacity(analyses.len());
    for (meta, fingerprint) in analyses {
        let inputs = serde_json::to_string(&meta.inputs).expect("inputs serialize");
        let row_key = meta
            .key
            .as_ref()
            .map(|key| serde_json::to_string(key).expect("a key serializes"));
        sqlx::query::<Db>(
            "INSERT INTO analyses (name, version, kind, partition, inputs, sql, description, fingerprint, updated_at, updated_by, row_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, kind = excluded.kind, \
             partition = excluded.partition, inputs = excluded.inputs, sql = excluded.sql, \
             description = excluded.description, fingerprint = excluded.fingerprint, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by, \
             row_key = excluded.row_key",
        )
        .bind(&meta.name)
        .bind(meta.version)
        .bind(meta.kind().unwrap_or(""))
        .bind(meta.partition.as_str())
        .bind(inputs)
        .bind(meta.sql.as_deref())
        .bind(&meta.description)
        .bind(fingerprint)
        .bind(now)
        .bind(actor)
        .bind(row_key)
        .execute(tx.conn())
        .await
        .ctx("storing an analysis")?;
        events.push(NewEvent::new(
            actor,
            EventBody::AnalysisRegistered {
                analysis: meta.name.clone(),
                version: meta.version,
                kind: meta.kind().unwrap_or("").to_string(),
                partition: meta.partition,
                inputs: meta.inputs.clone(),
            },
        ));
    }
    Ok(events)
}

/// Delete a candidate's definition, annotations, their inputs and its queued builds inside
/// `tx`; returns (annotations, queued builds) deleted. A build of it still running loses
/// its lease, so its result is never stored.
async fn drop_candidate(tx: &mut WriteTx, name: &str) -> Result<(i64, i64)> {
    sqlx::query::<Db>("DELETE FROM annotation_inputs WHERE analysis = $1")
        .bind(name)
        .execute(tx.conn())
        .await
        .ctx("deleting a candidate's inputs")?;
    let partitions = sqlx::query::<Db>("DELETE FROM annotations WHERE analysis = $1")
        .bind(name)
        .execute(tx.conn())
        .await
        .ctx("deleting a candidate's annotations")?
        .rows_affected();
    let queued = sqlx::query::<Db>("DELETE FROM partition_state WHERE analysis = $1")
        .bind(name)
        .execute(tx.conn())
        .await
        .ctx("dequeueing a candidate's builds")?
        .rows_affected();
    sqlx::query::<Db>("DELETE FROM analyses WHERE name = $1")
        .bind(name)
        .execute(tx.conn())
        .await
        .ctx("deleting a candidate")?;
    Ok((partitions as i64, queued as i64))
}
