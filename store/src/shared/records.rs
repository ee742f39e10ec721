//! Source records, their per-hour summary (`record_hours`), their batches' place in the
//! log (`record_batches`), kinds' schemas as records teach them, and the quarantine rows
//! of a batch.
//!
//! A record points at its batch; the batch maps to the `seq` of its `source.ingested`
//! event, assigned under the log lock. So `seq` stays in commit order even when a
//! backend writes the records themselves before taking the lock (PostgreSQL's `COPY`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use sqlx::types::Json;
use uuid::Uuid;

use scholia_events::event::MAX_RUNS;
use scholia_events::partition::runs;
use scholia_events::schema::KindSchema;
use scholia_events::store::{
    Batch, ChangedHour, NewRecord, RecordSink, Records, Rejected, Summary, Written,
};
use scholia_events::{
    Envelope, EventBody, Granularity, NewEvent, PartitionKey, Result, StoredEnvelope,
};

use super::{Backend, Db, MAX_BINDS, WriteTx};
use crate::error::{Ctx, corrupt};
use crate::time::Timestamp;

const CONFLICT: &str = "a record with this data_id already exists with different content; \
                        source data is immutable, so send the correction as a new record with a new data_id";

/// The most raw text kept of one quarantined line.
const MAX_RAW: usize = 64 * 1024;

/// The stored schemas of `kinds` (absent kinds have none yet).
pub(crate) async fn stored_schemas(
    conn: &mut <Db as sqlx::Database>::Connection,
    kinds: &BTreeSet<String>,
) -> Result<BTreeMap<String, KindSchema>> {
    let mut out = BTreeMap::new();
    for kind in kinds {
        let fields: Option<String> =
            sqlx::query_scalar::<Db, String>("SELECT fields FROM kinds WHERE kind = $1")
                .bind(kind)
                .fetch_optional(&mut *conn)
                .await
                .ctx("reading a kind's schema")?;
        let schema = match fields {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| corrupt("reading a kind's schema", format!("{kind}: {e}")))?,
            None => KindSchema::default(),
        };
        out.insert(kind.clone(), schema);
    }
    Ok(out)
}

/// What a batch will do, decided from what is stored.
pub(crate) struct Plan<'a> {
    /// New records by kind, in line order.
    pub(crate) fresh: BTreeMap<String, Vec<&'a NewRecord>>,
    pub(crate) duplicates: u64,
    pub(crate) quarantined: Vec<Rejected>,
    /// Each kind's schema after the batch, and whether the batch changed it.
    pub(crate) schemas: BTreeMap<String, (KindSchema, bool)>,
}

/// Sort a batch's records into new ones, duplicates and conflicts (the first occurrence
/// of an id in the batch wins), and check new ones against their kind's schema:
/// `schemas` is what is stored, or what the records were already checked against.
pub(crate) fn plan<'a>(
    batch: &'a Batch,
    known: &HashMap<Uuid, [u8; 32]>,
    schemas: &BTreeMap<String, KindSchema>,
    recheck: bool,
) -> Plan<'a> {
    let mut plan = Plan {
        fresh: BTreeMap::new(),
        duplicates: 0,
        quarantined: batch.rejected.clone(),
        schemas: BTreeMap::new(),
    };
    let mut first: HashMap<Uuid, [u8; 32]> = HashMap::with_capacity(batch.records.len());
    for record in &batch.records {
        let id = record.envelope.data_id;
        let seen = first.get(&id).or_else(|| known.get(&id));
        match seen {
            Some(digest) if *digest == record.digest => plan.duplicates += 1,
            Some(_) => plan
                .quarantined
                .push(conflict(record.line, &record.envelope)),
            None => {
                let kind = &record.envelope.kind;
                let (schema, changed) = plan
                    .schemas
                    .entry(kind.clone())
                    .or_insert_with(|| (schemas.get(kind).cloned().unwrap_or_default(), false));
                if recheck && let Err(error) = schema.check(&record.envelope.data) {
                    plan.quarantined.push(Rejected {
                        line: record.line,
                        raw: serde_json::to_string(&record.envelope).expect("envelopes serialize"),
                        error,
                        kind: Some(kind.clone()),
                        source: Some(record.envelope.source.clone()),
                        data_id: Some(id),
                    });
                    continue;
                }
                *changed |= schema.learn(&record.envelope.data);
                first.insert(id, record.digest);
                plan.fresh.entry(kind.clone()).or_default().push(record);
            }
        }
    }
    plan.quarantined.sort_by_key(|r| r.line);
    plan
}

fn conflict(line: usize, envelope: &Envelope) -> Rejected {
    Rejected {
        line,
        raw: serde_json::to_string(envelope).expect("envelopes serialize"),
        error: CONFLICT.into(),
        kind: Some(envelope.kind.clone()),
        source: Some(envelope.source.clone()),
        data_id: Some(envelope.data_id),
    }
}

/// The hours each kind's new records fall in, with counts.
pub(crate) fn hour_counts(records: &[&NewRecord]) -> BTreeMap<PartitionKey, i64> {
    let mut hours = BTreeMap::new();
    for record in records {
        *hours
            .entry(Granularity::Hour.partition_of(record.envelope.created))
            .or_default() += 1;
    }
    hours
}

/// Log the batch's `source.ingested` events (one per kind, or several when its hours
/// would not fit one event), and return each kind's `seq`: that of its last event.
pub(crate) async fn append_events(
    tx: &mut WriteTx,
    plan: &Plan<'_>,
    actor: &str,
) -> Result<(Vec<scholia_events::LoggedEvent>, BTreeMap<String, i64>)> {
    let mut events = Vec::new();
    let mut owners = Vec::new();
    for (kind, records) in &plan.fresh {
        let hours = hour_counts(records);
        let runs = runs(hours.keys().copied());
        let pieces: Vec<_> = runs.chunks(MAX_RUNS).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let count = if i + 1 == pieces.len() {
                records.len() as u64
            } else {
                0
            };
            events.push(NewEvent::new(
                actor,
                EventBody::SourceIngested {
                    kind: kind.clone(),
                    count,
                    hours: piece.to_vec(),
                },
            ));
            owners.push(kind.clone());
        }
    }
    let logged = super::log::append(tx, events).await?;
    let mut seq_of = BTreeMap::new();
    for (kind, event) in owners.into_iter().zip(&logged) {
        seq_of.insert(kind, event.seq);
    }
    Ok((logged, seq_of))
}

/// Map each batch id to its `seq`.
pub(crate) async fn map_batches(
    conn: &mut <Db as sqlx::Database>::Connection,
    batches: &[(i64, i64)],
) -> Result<()> {
    for chunk in batches.chunks(MAX_BINDS / 2) {
        let mut q = QueryBuilder::<Db>::new("INSERT INTO record_batches (batch, seq) ");
        q.push_values(chunk, |mut row, (batch, seq)| {
            row.push_bind(*batch).push_bind(*seq);
        });
        q.build()
            .execute(&mut *conn)
            .await
            .ctx("recording a batch's place in the log")?;
    }
    Ok(())
}

/// Add a batch's records to the per-hour summary of their kind, in the batch's
/// transaction, so that the summary changes exactly when the records do.
pub(crate) async fn count_hours(
    conn: &mut <Db as sqlx::Database>::Connection,
    kind: &str,
    hours: &BTreeMap<PartitionKey, i64>,
    seq: i64,
) -> Result<()> {
    let hours: Vec<(&PartitionKey, &i64)> = hours.iter().collect();
    for chunk in hours.chunks(MAX_BINDS / 4) {
        let mut q =
            QueryBuilder::<Db>::new("INSERT INTO record_hours (kind, hour, rows, max_seq) ");
        q.push_values(chunk, |mut row, (hour, rows)| {
            row.push_bind(kind)
                .push_bind(hour.to_string())
                .push_bind(**rows)
                .push_bind(seq);
        });
        // Batches commit in seq order (under the log lock), so the new seq is the highest.
        q.push(
            " ON CONFLICT (kind, hour) DO UPDATE SET rows = record_hours.rows + excluded.rows, \
             max_seq = excluded.max_seq",
        );
        q.build()
            .execute(&mut *conn)
            .await
            .ctx("counting records per hour")?;
    }
    Ok(())
}

/// Store the schemas the batch changed, and remember new kinds.
pub(crate) async fn save_schemas(
    conn: &mut <Db as sqlx::Database>::Connection,
    plan: &Plan<'_>,
    known_kinds: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> Result<()> {
    for (kind, (schema, changed)) in &plan.schemas {
        if !changed && known_kinds.contains(kind) {
            continue;
        }
        let fields = serde_json::to_string(schema).expect("schemas serialize");
        sqlx::query::<Db>(
            "INSERT INTO kinds (kind, fields, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (kind) DO UPDATE SET fields = excluded.fields, updated_at = excluded.updated_at",
        )
        .bind(kind)
        .bind(fields)
        .bind(Timestamp(now))
        .execute(&mut *conn)
        .await
        .ctx("recording a kind's schema")?;
    }
    Ok(())
}

pub(crate) async fn insert_quarantine(
    conn: &mut <Db as sqlx::Database>::Connection,
    rejected: &[Rejected],
    actor: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    for chunk in rejected.chunks(MAX_BINDS / 8) {
        let mut q = QueryBuilder::<Db>::new(
            "INSERT INTO quarantine (received_at, kind, source, data_id, line, raw, error, actor) ",
        );
        q.push_values(chunk, |mut row, r| {
            row.push_bind(Timestamp(now))
                .push_bind(r.kind.as_deref())
                .push_bind(r.source.as_deref())
                .push_bind(r.data_id)
                .push_bind(i32::try_from(r.line).unwrap_or(i32::MAX))
                .push_bind(bounded_raw(&r.raw))
                .push_bind(r.error.as_str())
                .push_bind(actor);
        });
        q.build()
            .execute(&mut *conn)
            .await
            .ctx("quarantining records")?;
    }
    Ok(())
}

fn bounded_raw(raw: &str) -> String {
    if raw.len() <= MAX_RAW {
        raw.to_string()
    } else {
        format!(
            "{}… ({} bytes in all; the rest was not kept)",
            &raw[..raw.floor_char_boundary(MAX_RAW)],
            raw.len()
        )
    }
}

/// Everything a batch does once its records are in (or about to be, in the same
/// transaction): the events, the batches' place in the log, the hour summaries, the
/// schemas and the quarantine. `tx` holds the log lock; `batch_ids` are each kind's batch
/// id (`None` to use the kind's `seq`).
pub(crate) async fn finish(
    tx: &mut WriteTx,
    batch: &Batch,
    plan: &Plan<'_>,
    batch_ids: Option<&BTreeMap<String, i64>>,
    known_kinds: &BTreeSet<String>,
) -> Result<Written> {
    let (events, seq_of) = append_events(tx, plan, &batch.actor).await?;
    let pairs: Vec<(i64, i64)> = seq_of
        .iter()
        .map(|(kind, seq)| (batch_ids.map_or(*seq, |ids| ids[kind]), *seq))
        .collect();
    map_batches(tx.conn(), &pairs).await?;
    for (kind, records) in &plan.fresh {
        count_hours(tx.conn(), kind, &hour_counts(records), seq_of[kind]).await?;
    }
    save_schemas(tx.conn(), plan, known_kinds, batch.received_at).await?;
    insert_quarantine(
        tx.conn(),
        &plan.quarantined,
        &batch.actor,
        batch.received_at,
    )
    .await?;
    Ok(Written {
        accepted: plan.fresh.values().map(|r| r.len() as u64).sum(),
        duplicates: plan.duplicates,
        quarantined: plan.quarantined.clone(),
        events,
        schemas: plan
            .schemas
            .iter()
            .map(|(kind, (schema, _))| (kind.clone(), schema.clone()))
            .collect(),
    })
}

/// The kinds that already have a row in `kinds`.
pub(crate) async fn existing_kinds(
    conn: &mut <Db as sqlx::Database>::Connection,
    kinds: &BTreeSet<String>,
) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for kind in kinds {
        let found: Option<String> =
            sqlx::query_scalar::<Db, String>("SELECT kind FROM kinds WHERE kind = $1")
                .bind(kind)
                .fetch_optional(&mut *conn)
                .await
                .ctx("looking up a kind")?;
        out.extend(found);
    }
    Ok(out)
}

/// Whether the stored schema of any of the batch's kinds is not the one its records were
/// checked against (another batch taught or an admin declared something meanwhile).
pub(crate) fn schemas_moved(stored: &BTreeMap<String, KindSchema>, batch: &Batch) -> bool {
    stored
        .iter()
        .any(|(kind, schema)| batch.schemas.get(kind).cloned().unwrap_or_default() != *schema)
}

/// The kinds a batch's records belong to.
pub(crate) fn batch_kinds(batch: &Batch) -> BTreeSet<String> {
    batch
        .records
        .iter()
        .map(|r| r.envelope.kind.clone())
        .collect()
}

/// The first and last hour keys of `[from, to)`, as `record_hours` writes them.
fn hour_bounds(from: DateTime<Utc>, to: DateTime<Utc>) -> (String, String) {
    let hour = |t: DateTime<Utc>| Granularity::Hour.partition_of(t).to_string();
    (hour(from), hour(to - chrono::Duration::microseconds(1)))
}

/// A frame behind by at most this many batches is brought up to date by reading those
/// batches' records; one further behind, by reading its span's records above its seq.
pub(crate) const FEW_BATCHES: i64 = 64;

/// The batches whose seq is above `after` (a frame's), as a list for `batch IN (…)`,
/// when there are some and at most `FEW_BATCHES`.
pub(crate) async fn batches_after(
    conn: &mut <Db as sqlx::Database>::Connection,
    after: i64,
) -> Result<Option<String>> {
    if after == 0 {
        return Ok(None);
    }
    let batches: Vec<i64> = sqlx::query_scalar::<Db, i64>(
        "SELECT batch FROM record_batches WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(FEW_BATCHES + 1)
    .fetch_all(&mut *conn)
    .await
    .ctx("finding the batches after a frame")?;
    if batches.is_empty() || batches.len() as i64 > FEW_BATCHES {
        return Ok(None);
    }
    let list: Vec<String> = batches.iter().map(i64::to_string).collect();
    Ok(Some(list.join(",")))
}

/// What `record_hours` says of `kind`'s records in the whole hours `[from, to)`.
pub(crate) async fn span_summary(
    conn: &mut <Db as sqlx::Database>::Connection,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Summary> {
    let (first, last) = hour_bounds(from, to);
    let (rows, max_seq): (i64, i64) = sqlx::query_as::<Db, (i64, i64)>(
        "SELECT CAST(COALESCE(SUM(rows), 0) AS BIGINT), CAST(COALESCE(MAX(max_seq), 0) AS BIGINT) \
         FROM record_hours WHERE kind = $1 AND hour >= $2 AND hour <= $3",
    )
    .bind(kind)
    .bind(first)
    .bind(last)
    .fetch_one(&mut *conn)
    .await
    .ctx("summarizing records")?;
    Ok(Summary { rows, max_seq })
}

type StoredRow = (
    String,
    String,
    Timestamp,
    Timestamp,
    i64,
    Json<serde_json::Map<String, serde_json::Value>>,
);

#[async_trait]
impl Records for Backend {
    async fn write(&self, batch: Batch) -> Result<Written> {
        self.write_batch(batch).await
    }

    async fn get(&self, data_id: Uuid) -> Result<Option<StoredEnvelope>> {
        let row: Option<StoredRow> = sqlx::query_as::<Db, StoredRow>(
            "SELECT r.kind, r.source, r.created, r.received_at, b.seq, r.data \
             FROM records r JOIN record_batches b ON b.batch = r.batch WHERE r.data_id = $1",
        )
        .bind(data_id)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading a record")?;
        Ok(row.map(
            |(kind, source, created, received_at, seq, Json(data))| StoredEnvelope {
                envelope: Envelope {
                    data_id,
                    kind,
                    source,
                    created: created.into(),
                    data,
                },
                received_at: received_at.into(),
                seq,
            },
        ))
    }

    async fn load(
        &self,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after: i64,
        sink: &mut dyn RecordSink,
    ) -> Result<Summary> {
        self.load_records(kind, from, to, after, sink).await
    }

    async fn summary(&self, kind: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Summary> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .ctx("connecting to the database")?;
        span_summary(&mut conn, kind, from, to).await
    }

    async fn hours_changed_after(&self, seq: i64, limit: usize) -> Result<Vec<ChangedHour>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as::<Db, (String, String, i64)>(
            "SELECT kind, hour, max_seq FROM record_hours WHERE max_seq > $1 ORDER BY max_seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .ctx("finding hours with new records")?;
        rows.into_iter()
            .map(|(kind, hour, max_seq)| {
                let hour =
                    PartitionKey::parse(&hour).map_err(|e| corrupt("reading record_hours", e))?;
                Ok(ChangedHour {
                    kind,
                    hour,
                    max_seq,
                })
            })
            .collect()
    }
}
