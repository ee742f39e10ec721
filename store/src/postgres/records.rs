//! Writing records on PostgreSQL, with `COPY` outside the log lock.
//!
//! Before any lock: look up which ids are stored (stored records never change, so what
//! that finds stays true), take batch ids from a sequence, render the `COPY` rows. Then,
//! in one transaction: `COPY` the records (batches copy in parallel), take the log lock,
//! append the `source.ingested` events, map batch ids to their `seq`, count hours, learn
//! schemas, quarantine, commit. The lock is held for that short tail only.
//!
//! Two races send a batch down the slow path, where everything happens under the lock:
//! another batch storing one of its new ids first (the `COPY` fails on the primary key),
//! and a kind's schema moving between the check and the lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use uuid::Uuid;

use scholia_events::Result;
use scholia_events::envelope::format_time;
use scholia_events::schema::KindSchema;
use scholia_events::store::{Batch, Written};

use super::shared::records::{
    Plan, batch_kinds, existing_kinds, finish, known_digests, plan, schemas_moved, stored_schemas,
};
use super::{Db, PgStore, WriteTx};
use crate::error::{Ctx, classify};

impl PgStore {
    pub(crate) async fn write_batch(&self, batch: Batch) -> Result<Written> {
        if batch.records.is_empty() {
            return self.write_locked(&batch).await;
        }
        let ids: Vec<Uuid> = batch.records.iter().map(|r| r.envelope.data_id).collect();
        let kinds = batch_kinds(&batch);
        let base: BTreeMap<String, KindSchema> = kinds
            .iter()
            .map(|k| (k.clone(), batch.schemas.get(k).cloned().unwrap_or_default()))
            .collect();
        let (plan, batch_ids) = {
            let mut conn = self.connection().await?;
            let known = known_digests(&mut conn, &ids).await?;
            let plan = plan(&batch, &known, &base, false);
            let batch_ids = allocate_batches(&mut conn, &plan).await?;
            (plan, batch_ids)
        };
        let rows = render(&plan, &batch_ids, &batch);

        let mut tx = self.begin().await?;
        if let Err(error) = copy(&mut tx, &rows).await {
            if raced(&error) {
                drop(tx);
                tracing::info!(
                    "A concurrent batch stored some of this batch's ids first; writing it again with the lookup under the lock"
                );
                return self.write_locked(&batch).await;
            }
            return Err(classify("copying records", error));
        }
        tx.lock_log().await?;
        let stored = stored_schemas(tx.conn(), &kinds).await?;
        if schemas_moved(&stored, &batch) {
            drop(tx);
            return self.write_locked(&batch).await;
        }
        let known_kinds = existing_kinds(tx.conn(), &kinds).await?;
        let written = finish(&mut tx, &batch, &plan, Some(&batch_ids), &known_kinds).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// The whole batch under the log lock: the lookup, the schema check and the `COPY`.
    async fn write_locked(&self, batch: &Batch) -> Result<Written> {
        let mut tx = self.write().await?;
        let ids: Vec<Uuid> = batch.records.iter().map(|r| r.envelope.data_id).collect();
        let kinds = batch_kinds(batch);
        let known = known_digests(tx.conn(), &ids).await?;
        let stored = stored_schemas(tx.conn(), &kinds).await?;
        let known_kinds = existing_kinds(tx.conn(), &kinds).await?;
        let plan = plan(batch, &known, &stored, schemas_moved(&stored, batch));
        let batch_ids = allocate_batches(tx.conn(), &plan).await?;
        let rows = render(&plan, &batch_ids, batch);
        copy(&mut tx, &rows)
            .await
            .map_err(|e| classify("copying records", e))?;
        let written = finish(&mut tx, batch, &plan, Some(&batch_ids), &known_kinds).await?;
        tx.commit().await?;
        Ok(written)
    }
}

/// Whether a failed `COPY` lost a race to another batch (its ids were stored first, or
/// the two batches deadlocked on each other's ids).
fn raced(error: &sqlx::Error) -> bool {
    crate::error::is_unique_violation(error)
        || matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("40P01"))
}

/// One batch id per kind of the batch.
async fn allocate_batches(
    conn: &mut sqlx::PgConnection,
    plan: &Plan<'_>,
) -> Result<BTreeMap<String, i64>> {
    let ids: Vec<i64> = sqlx::query_scalar::<Db, i64>(
        "SELECT nextval('record_batch_ids') FROM generate_series(1, $1)",
    )
    .bind(plan.fresh.len() as i64)
    .fetch_all(conn)
    .await
    .ctx("allocating batch ids")?;
    Ok(plan.fresh.keys().cloned().zip(ids).collect())
}

/// The batch's records as `COPY` text rows.
fn render(plan: &Plan<'_>, batch_ids: &BTreeMap<String, i64>, batch: &Batch) -> String {
    let received = format_time(batch.received_at);
    let size: usize = plan
        .fresh
        .values()
        .flatten()
        .map(|r| r.data_json.len() + 200)
        .sum();
    let mut out = String::with_capacity(size);
    for (kind, records) in &plan.fresh {
        let batch_id = batch_ids[kind];
        for r in records {
            let _ = write!(out, "{}\t", r.envelope.data_id);
            escape(&mut out, &r.envelope.kind);
            out.push('\t');
            escape(&mut out, &r.envelope.source);
            let _ = write!(
                out,
                "\t{}\t{received}\t{batch_id}\t\\\\x",
                format_time(r.envelope.created)
            );
            for b in r.digest {
                let _ = write!(out, "{b:02x}");
            }
            out.push('\t');
            escape(&mut out, &r.data_json);
            out.push('\n');
        }
    }
    out
}

async fn copy(tx: &mut WriteTx, rows: &str) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = tx
        .conn()
        .copy_in_raw(
            "COPY records (data_id, kind, source, created, received_at, batch, digest, data) FROM STDIN",
        )
        .await?;
    for chunk in rows.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// Escape text for PostgreSQL's `COPY` text format.
fn escape(buf: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c => buf.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_backslashes_and_line_breaks() {
        let mut buf = String::new();
        escape(&mut buf, "a\\b\tc\nd");
        assert_eq!(buf, "a\\\\b\\tc\\nd");
    }
}
