//! Writing records on PostgreSQL, with `COPY` outside the log lock.
//!
//! Before any lock: take batch ids from a sequence and render the `COPY` rows. Then, in
//! one transaction: `COPY` the records (batches copy in parallel), take the log lock,
//! append the `source.ingested` events, map batch ids to their `seq`, count hours, learn
//! schemas, quarantine, commit. The lock is held for that short tail only.
//!
//! The fast path assumes the batch's ids are new, as they nearly always are: looking them
//! up first would cost PostgreSQL more than the `COPY` (it plans a scan of the table for
//! thousands of ids). When one is stored already (a producer's retry, or another batch
//! storing it first) the `COPY` fails on the primary key, and the batch takes the slow
//! path: under the lock, its ids are looked up one index probe each (same digest →
//! duplicate, other digest → conflict), then it is written. A kind's schema moving
//! between the check and the lock takes the slow path too.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use scholia_events::Result;
use scholia_events::schema::KindSchema;
use scholia_events::store::{Batch, Written};

use super::shared::records::{
    Plan, batch_kinds, existing_kinds, finish, plan, schemas_moved, stored_schemas,
};
use super::{Db, PG_EPOCH_MICROS, PgStore, WriteTx};
use crate::error::{Ctx, classify};

impl PgStore {
    pub(crate) async fn write_batch(&self, batch: Batch) -> Result<Written> {
        if batch.records.is_empty() {
            return self.write_locked(&batch).await;
        }
        let kinds = batch_kinds(&batch);
        let base: BTreeMap<String, KindSchema> = kinds
            .iter()
            .map(|k| (k.clone(), batch.schemas.get(k).cloned().unwrap_or_default()))
            .collect();
        let assumed_new = HashMap::new();
        let plan = plan(&batch, &assumed_new, &base, false);
        let batch_ids = {
            let mut conn = self.connection().await?;
            allocate_batches(&mut conn, &plan).await?
        };
        let rows = render(&plan, &batch_ids, &batch);

        let mut tx = self.begin().await?;
        if let Err(error) = copy(&mut tx, &rows).await {
            if raced(&error) {
                drop(tx);
                tracing::info!(
                    "Some of this batch's ids are stored already; writing it again with the lookup under the lock"
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

/// The stored digests of those of `ids` that are stored, one primary-key probe each (the
/// `LIMIT` keeps the planner from turning the probes into a scan of the table).
async fn known_digests(
    conn: &mut sqlx::PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, [u8; 32]>> {
    let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as::<Db, (Uuid, Vec<u8>)>(
        "SELECT i.id, r.digest FROM unnest($1::uuid[]) AS i(id) \
         JOIN LATERAL (SELECT digest FROM records WHERE data_id = i.id LIMIT 1) r ON true",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
    .ctx("checking for known records")?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, d)| Some((id, <[u8; 32]>::try_from(d.as_slice()).ok()?)))
        .collect())
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

/// The batch's records as one binary `COPY` stream (no text to format here, none to
/// parse in PostgreSQL): the signature, then each row's eight fields as length and bytes.
fn render(plan: &Plan<'_>, batch_ids: &BTreeMap<String, i64>, batch: &Batch) -> Vec<u8> {
    let rows: usize = plan.fresh.values().map(Vec::len).sum();
    if rows == 0 {
        return Vec::new();
    }
    let size: usize = plan
        .fresh
        .values()
        .flatten()
        .map(|r| r.data_json.len() + r.envelope.kind.len() + r.envelope.source.len() + 110)
        .sum();
    let mut out = Vec::with_capacity(size + 32);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    let received = batch.received_at.timestamp_micros() - PG_EPOCH_MICROS;
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    for (kind, records) in &plan.fresh {
        let batch_id = batch_ids[kind];
        for r in records {
            out.extend_from_slice(&8i16.to_be_bytes());
            field(&mut out, r.envelope.data_id.as_bytes());
            field(&mut out, r.envelope.kind.as_bytes());
            field(&mut out, r.envelope.source.as_bytes());
            let created = r.envelope.created.timestamp_micros() - PG_EPOCH_MICROS;
            field(&mut out, &created.to_be_bytes());
            field(&mut out, &received.to_be_bytes());
            field(&mut out, &batch_id.to_be_bytes());
            field(&mut out, &r.digest);
            // jsonb's binary form: a version byte, then the JSON text.
            out.extend_from_slice(&(r.data_json.len() as i32 + 1).to_be_bytes());
            out.push(1);
            out.extend_from_slice(r.data_json.as_bytes());
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

async fn copy(tx: &mut WriteTx, rows: &[u8]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = tx
        .conn()
        .copy_in_raw(
            "COPY records (data_id, kind, source, created, received_at, batch, digest, data) FROM STDIN (FORMAT binary)",
        )
        .await?;
    for chunk in rows.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    copy.finish().await?;
    Ok(())
}
