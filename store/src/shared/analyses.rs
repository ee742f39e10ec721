//! Analyses' definitions: one row per analysis, whatever it computes, so adding one never
//! changes the schema.

use async_trait::async_trait;
use chrono::Utc;

use scholia_events::analysis::{AnalysisMeta, Input, Language};
use scholia_events::store::{Analyses, AnalysisRecord};
use scholia_events::{EventBody, NewEvent, Result};

use super::{Backend, Db};
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
);

const COLUMNS: &str =
    "name, version, partition, inputs, sql, description, fingerprint, updated_at, updated_by";

fn record(
    (name, version, partition, inputs, sql, description, fingerprint, updated_at, updated_by): Row,
) -> Result<AnalysisRecord> {
    let bad = |e: String| corrupt("reading an analysis", format!("{name}: {e}"));
    let inputs: Vec<Input> = serde_json::from_str(&inputs).map_err(|e| bad(e.to_string()))?;
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
        let now = Timestamp(Utc::now());
        let mut events = Vec::with_capacity(analyses.len());
        for (meta, fingerprint) in analyses {
            let inputs = serde_json::to_string(&meta.inputs).expect("inputs serialize");
            sqlx::query::<Db>(
                "INSERT INTO analyses (name, version, kind, partition, inputs, sql, description, fingerprint, updated_at, updated_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (name) DO UPDATE SET version = excluded.version, kind = excluded.kind, \
                 partition = excluded.partition, inputs = excluded.inputs, sql = excluded.sql, \
                 description = excluded.description, fingerprint = excluded.fingerprint, \
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
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
        super::log::append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }
}
