//! Writing and scanning records on SQLite: the whole batch under the write lock, with
//! multi-row inserts.

use std::collections::HashMap;

use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::Result;
use scholia_events::store::{Batch, NewRecord, Written};

use super::shared::MAX_BINDS;
use super::shared::records::{
    batch_kinds, existing_kinds, finish, known_digests, plan, schemas_moved, stored_schemas,
};
use super::{Db, SqliteStore};
use crate::error::Ctx;
use crate::time::Timestamp;

impl SqliteStore {
    pub(crate) async fn write_batch(&self, batch: Batch) -> Result<Written> {
        let mut tx = self.write().await?;
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
