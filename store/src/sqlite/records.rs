//! Writing and reading records on SQLite: the whole batch under the write lock, with
//! multi-row inserts; a load reads in one read transaction (one WAL snapshot).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::Result;
use scholia_events::store::{Batch, NewRecord, RecordRow, RecordSink, Summary, Written};

use super::shared::MAX_BINDS;
use super::shared::records::{
    batch_kinds, batches_after, existing_kinds, finish, plan, schemas_moved, span_summary,
    stored_schemas,
};
use super::{Db, SqliteStore};
use crate::error::Ctx;
use crate::time::Timestamp;

/// The stored digests of those of `ids` that are stored.
async fn known_digests(
    conn: &mut <Db as sqlx::Database>::Connection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, [u8; 32]>> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(MAX_BINDS) {
        let mut q =
            QueryBuilder::<Db>::new("SELECT data_id, digest FROM records WHERE data_id IN (");
        let mut list = q.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        q.push(")");
        let rows: Vec<(Uuid, Vec<u8>)> = q
            .build_query_as()
            .fetch_all(&mut *conn)
            .await
            .ctx("checking for known records")?;
        out.extend(
            rows.into_iter()
                .filter_map(|(id, d)| Some((id, <[u8; 32]>::try_from(d.as_slice()).ok()?))),
        );
    }
    Ok(out)
}

type ScanRow = (Uuid, String, Timestamp, Timestamp, String);

impl SqliteStore {
    pub(crate) async fn load_records(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: i64,
        sink: &mut dyn RecordSink,
    ) -> Result<Summary> {
        let mut tx = self.pool.begin().await.ctx("beginning a read")?;
        let summary = span_summary(&mut tx, kind, from, to).await?;
        if summary.rows == 0 || summary.max_seq <= after {
            tx.commit().await.ctx("ending a read")?;
            return Ok(summary);
        }
        if after == 0 {
            sink.reserve(usize::try_from(summary.rows).unwrap_or(0));
        }
        let sql = match batches_after(&mut tx, after).await? {
            // A rebuild after a few batches: read those batches' records through their
            // index (SQLite's planner would rather scan the span's) and keep the span's.
            Some(list) => {
                format!(
                    "SELECT r.data_id, r.source, r.created, r.received_at, r.data \
                     FROM records r INDEXED BY records_batch \
                     WHERE r.batch IN ({list}) AND r.kind = $1 AND r.created >= $2 AND r.created < $3 \
                     ORDER BY r.created, r.data_id"
                )
            }
            None => format!(
                "SELECT r.data_id, r.source, r.created, r.received_at, r.data \
                 FROM records r JOIN record_batches b ON b.batch = r.batch \
                 WHERE r.kind = $1 AND r.created >= $2 AND r.created < $3 AND b.seq > {after} \
                 ORDER BY r.created, r.data_id"
            ),
        };
        {
            let mut rows = sqlx::query_as::<Db, ScanRow>(sqlx::AssertSqlSafe(sql))
                .bind(kind)
                .bind(Timestamp(from))
                .bind(Timestamp(to))
                .fetch(&mut *tx);
            while let Some((data_id, source, created, received_at, data)) =
                rows.try_next().await.ctx("reading records")?
            {
                sink.push(RecordRow {
                    data_id,
                    source: &source,
                    created: created.0.timestamp_micros(),
                    received_at: received_at.0.timestamp_micros(),
                    data: &data,
                });
            }
        }
        tx.commit().await.ctx("ending a read")?;
        Ok(summary)
    }

    pub(crate) async fn write_batch(&self, batch: Batch) -> Result<Written> {
        let mut tx = self.write_batch_tx().await?;
        let ids: Vec<Uuid> = batch.records.iter().map(|r| r.envelope.data_id).collect();
        let known = known_digests(tx.conn(), &ids).await?;
        let kinds = batch_kinds(&batch);
        let stored = stored_schemas(tx.conn(), &kinds).await?;
        let known_kinds = existing_kinds(tx.conn(), &kinds).await?;
        let recheck = schemas_moved(&stored, &batch);
        let plan = plan(&batch, &known, &stored, recheck);
        // Everything is under the lock here, so each kind's batch id is simply its seq.
        let written = finish(&mut tx, &batch, &plan, None, &known_kinds).await?;
        let seq_of: HashMap<&str, i64> = written
            .events
            .iter()
            .filter_map(|e| match &e.body {
                scholia_events::EventBody::SourceIngested { kind, .. } => {
                    Some((kind.as_str(), e.seq))
                }
                _ => None,
            })
            .collect();
        let received = Timestamp(batch.received_at);
        for (kind, records) in &plan.fresh {
            insert(tx.conn(), records, seq_of[kind.as_str()], received).await?;
        }
        tx.commit().await?;
        Ok(written)
    }
}

/// Insert one kind's new records, stamped with their batch.
async fn insert(
    conn: &mut sqlx::SqliteConnection,
    records: &[&NewRecord],
    batch: i64,
    received: Timestamp,
) -> Result<()> {
    for chunk in records.chunks(MAX_BINDS / 8) {
        let mut q = QueryBuilder::<Db>::new(
            "INSERT INTO records (data_id, kind, source, created, received_at, batch, digest, data) ",
        );
        q.push_values(chunk, |mut row, r| {
            row.push_bind(r.envelope.data_id)
                .push_bind(r.envelope.kind.as_str())
                .push_bind(r.envelope.source.as_str())
                .push_bind(Timestamp(r.envelope.created))
                .push_bind(received)
                .push_bind(batch)
                .push_bind(&r.digest[..])
                .push_bind(r.data_json.as_str());
        });
        q.build()
            .execute(&mut *conn)
            .await
            .ctx("inserting records")?;
    }
    Ok(())
}
