//! The durable write of one batch: records, their `source.ingested` events and the
//! quarantined lines commit together in one transaction, or not at all.
//!
//! Idempotency is decided under the log lock: an id already stored with the same digest
//! is a duplicate, with another digest a conflict (quarantined, since source data is
//! immutable). New records then go in with one bulk statement: `COPY` on PostgreSQL,
//! multi-row inserts on SQLite.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::db::WriteTx;
use scholia_events::error::{DbContext, Error, Result};
use scholia_events::{
    Database, Envelope, EventBody, Granularity, LoggedEvent, NewEvent, PartitionKey, log,
};

use crate::parse::Rejected;

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub duplicates: u64,
    /// Everything quarantined: unparseable and invalid lines, and conflicting ids.
    pub quarantined: Vec<Rejected>,
    pub events: Vec<LoggedEvent>,
}

/// A record of the batch that is not a repeat within the batch.
struct Candidate {
    line: usize,
    envelope: Envelope,
    digest: [u8; 32],
    /// `data` as compact JSON text.
    data_json: String,
    /// On PostgreSQL, the record's `COPY` row rendered ahead of the write lock: the
    /// columns before `seq` and those after it (the lock assigns `seq`).
    copy_row: Option<(String, String)>,
}

const CONFLICT: &str = "a record with this data_id already exists with different content; \
                        source data is immutable, so send the correction as a new record with a new data_id";

/// Write a batch durably. Returns only after the commit.
///
/// Everything that can happen before the write lock does: parsing, digests, rendering the
/// `COPY` rows and, on PostgreSQL, looking up which ids are already stored (stored
/// records never change, so what that finds stays true). Under the lock remain the log
/// append, the `COPY` and the commit. A batch that races another one carrying the same
/// new ids fails its `COPY` on the primary key; it is then written again with the lookup
/// under the lock.
pub async fn write_batch(
    db: &Database,
    envelopes: Vec<(usize, Envelope)>,
    rejected: Vec<Rejected>,
    actor: &str,
    received_at: DateTime<Utc>,
) -> Result<BatchOutcome> {
    let mut outcome = BatchOutcome {
        quarantined: rejected,
        ..Default::default()
    };

    // Within the batch: the first occurrence of an id wins.
    let postgres = matches!(db, Database::Postgres(_));
    let received = received_at.to_rfc3339();
    let mut first: HashMap<Uuid, [u8; 32]> = HashMap::with_capacity(envelopes.len());
    let mut candidates: Vec<Candidate> = Vec::with_capacity(envelopes.len());
    for (line, envelope) in envelopes {
        let data_json = envelope.data_json();
        let digest = envelope.digest_with(&data_json);
        match first.get(&envelope.data_id) {
            Some(seen) if *seen == digest => outcome.duplicates += 1,
            Some(_) => outcome.quarantined.push(conflict(line, &envelope)),
            None => {
                first.insert(envelope.data_id, digest);
                let copy_row =
                    postgres.then(|| copy_row(&envelope, &digest, &data_json, &received));
                candidates.push(Candidate {
                    line,
                    envelope,
                    digest,
                    data_json,
                    copy_row,
                });
            }
        }
    }

    let ids: Vec<Uuid> = candidates.iter().map(|c| c.envelope.data_id).collect();
    let written = match db {
        Database::Postgres(pg) if !ids.is_empty() => {
            let known = pg_digests(&pg.pool, &ids).await?;
            let quarantined = &outcome.quarantined;
            match write_locked(
                db,
                &candidates,
                Some(known),
                quarantined,
                actor,
                received_at,
            )
            .await
            {
                Err(e) if is_unique_violation(&e) => {
                    tracing::info!(
                        "A concurrent batch stored some of this batch's ids first; writing it again with the lookup under the lock"
                    );
                    write_locked(db, &candidates, None, quarantined, actor, received_at).await?
                }
                other => other?,
            }
        }
        _ => {
            let quarantined = &outcome.quarantined;
            write_locked(db, &candidates, None, quarantined, actor, received_at).await?
        }
    };
    outcome.accepted = written.accepted;
    outcome.duplicates += written.duplicates;
    outcome.quarantined.extend(written.conflicts);
    outcome.events = written.events;
    // Quarantined lines are reported in body order.
    outcome.quarantined.sort_by_key(|r| r.line);
    Ok(outcome)
}

/// What the locked part of a write did.
struct Written {
    accepted: u64,
    duplicates: u64,
    conflicts: Vec<Rejected>,
    events: Vec<LoggedEvent>,
}

/// The part of a batch's write that holds the log lock. `known` are the stored digests of
/// the candidates' ids when they were looked up before the lock; `None` looks them up
/// under it. `rejected` are the lines quarantined before the lock.
async fn write_locked(
    db: &Database,
    candidates: &[Candidate],
    known: Option<HashMap<Uuid, [u8; 32]>>,
    rejected: &[Rejected],
    actor: &str,
    received_at: DateTime<Utc>,
) -> Result<Written> {
    let mut tx = db.begin_write().await?;
    let existing = match known {
        Some(known) => known,
        None => {
            let ids: Vec<Uuid> = candidates.iter().map(|c| c.envelope.data_id).collect();
            existing_digests(&mut tx, &ids).await?
        }
    };
    let mut written = Written {
        accepted: 0,
        duplicates: 0,
        conflicts: Vec::new(),
        events: Vec::new(),
    };
    let mut fresh: Vec<&Candidate> = Vec::with_capacity(candidates.len());
    for c in candidates {
        match existing.get(&c.envelope.data_id) {
            Some(stored) if *stored == c.digest => written.duplicates += 1,
            Some(_) => written.conflicts.push(conflict(c.line, &c.envelope)),
            None => fresh.push(c),
        }
    }

    // One source.ingested event per kind; its seq stamps the kind's records.
    let mut by_kind: BTreeSet<&str> = BTreeSet::new();
    for c in &fresh {
        by_kind.insert(&c.envelope.kind);
    }
    let kinds: Vec<String> = by_kind.into_iter().map(str::to_string).collect();
    let mut new_events = Vec::with_capacity(kinds.len());
    let mut hour_counts: Vec<BTreeMap<PartitionKey, i64>> = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        let mut hours: BTreeMap<PartitionKey, i64> = BTreeMap::new();
        for c in fresh.iter().filter(|c| &c.envelope.kind == kind) {
            *hours
                .entry(Granularity::Hour.partition_of(c.envelope.created))
                .or_default() += 1;
        }
        new_events.push(NewEvent::new(
            actor,
            EventBody::SourceIngested {
                kind: kind.clone(),
                count: hours.values().sum::<i64>() as u64,
                hours: hours.keys().copied().collect(),
            },
        ));
        hour_counts.push(hours);
    }
    let events = log::append(&mut tx, new_events).await?;
    let seq_of: HashMap<&str, i64> = kinds
        .iter()
        .map(String::as_str)
        .zip(events.iter().map(|e| e.seq))
        .collect();

    insert_records(&mut tx, &fresh, &seq_of, received_at).await?;
    for ((kind, hours), event) in kinds.iter().zip(&hour_counts).zip(&events) {
        count_hours(&mut tx, kind, hours, event.seq).await?;
    }
    insert_kinds(&mut tx, &kinds, received_at).await?;
    insert_quarantine(&mut tx, rejected, actor, received_at).await?;
    insert_quarantine(&mut tx, &written.conflicts, actor, received_at).await?;
    tx.commit().await?;

    written.accepted = fresh.len() as u64;
    written.events = events;
    Ok(written)
}

/// Whether a write failed on a primary key: another batch stored one of its ids first.
fn is_unique_violation(error: &Error) -> bool {
    matches!(
        error,
        Error::Database { source: sqlx::Error::Database(e), .. } if e.is_unique_violation()
    )
}

fn conflict(line: usize, envelope: &Envelope) -> Rejected {
    let raw = serde_json::to_string(envelope).expect("envelopes serialize");
    Rejected {
        line,
        raw,
        error: CONFLICT.into(),
        kind: Some(envelope.kind.clone()),
        source: Some(envelope.source.clone()),
        data_id: Some(envelope.data_id),
    }
}

/// The stored digests of those of `ids` that are stored, on PostgreSQL.
async fn pg_digests<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, [u8; 32]>> {
    let rows: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT data_id, digest FROM records WHERE data_id = ANY($1)")
            .bind(ids)
            .fetch_all(executor)
            .await
            .context("checking for known records")?;
    Ok(digest_map(rows))
}

fn digest_map(rows: Vec<(Uuid, Vec<u8>)>) -> HashMap<Uuid, [u8; 32]> {
    rows.into_iter()
        .filter_map(|(id, digest)| Some((id, <[u8; 32]>::try_from(digest.as_slice()).ok()?)))
        .collect()
}

async fn existing_digests(tx: &mut WriteTx, ids: &[Uuid]) -> Result<HashMap<Uuid, [u8; 32]>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    match tx {
        WriteTx::Postgres { tx, .. } => pg_digests(&mut **tx, ids).await,
        WriteTx::Sqlite { tx, .. } => {
            let mut rows = Vec::new();
            for chunk in ids.chunks(5_000) {
                let mut q =
                    QueryBuilder::new("SELECT data_id, digest FROM records WHERE data_id IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(*id);
                }
                q.push(")");
                rows.extend(
                    q.build_query_as::<(Uuid, Vec<u8>)>()
                        .fetch_all(&mut **tx)
                        .await
                        .context("checking for known records")?,
                );
            }
            Ok(digest_map(rows))
        }
    }
}

/// One record's `COPY` text row, split around the `seq` column.
fn copy_row(
    envelope: &Envelope,
    digest: &[u8; 32],
    data_json: &str,
    received: &str,
) -> (String, String) {
    let mut head = String::with_capacity(128);
    let _ = write!(head, "{}\t", envelope.data_id);
    escape_copy(&mut head, &envelope.kind);
    head.push('\t');
    escape_copy(&mut head, &envelope.source);
    let _ = write!(head, "\t{}\t{}\t", envelope.created.to_rfc3339(), received);
    let mut tail = String::with_capacity(data_json.len() + 80);
    let _ = write!(tail, "\t\\\\x{}\t", hex_encode(digest));
    escape_copy(&mut tail, data_json);
    tail.push('\n');
    (head, tail)
}

async fn insert_records(
    tx: &mut WriteTx,
    fresh: &[&Candidate],
    seq_of: &HashMap<&str, i64>,
    received_at: DateTime<Utc>,
) -> Result<()> {
    if fresh.is_empty() {
        return Ok(());
    }
    match tx {
        WriteTx::Postgres { tx, .. } => {
            let mut copy = tx
                .copy_in_raw(
                    "COPY records (data_id, kind, source, created, received_at, seq, digest, data) FROM STDIN",
                )
                .await
                .context("starting to copy records")?;
            let mut buf = String::with_capacity(1 << 20);
            for c in fresh {
                let (head, tail) = c.copy_row.as_ref().expect("rendered for PostgreSQL");
                buf.push_str(head);
                let _ = write!(buf, "{}", seq_of[c.envelope.kind.as_str()]);
                buf.push_str(tail);
                if buf.len() > (1 << 20) - 4096 {
                    copy.send(buf.as_bytes()).await.context("copying records")?;
                    buf.clear();
                }
            }
            if !buf.is_empty() {
                copy.send(buf.as_bytes()).await.context("copying records")?;
            }
            copy.finish()
                .await
                .context("finishing the copy of records")?;
        }
        WriteTx::Sqlite { tx, .. } => {
            let received = received_at.timestamp_micros();
            for chunk in fresh.chunks(1_000) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO records (data_id, kind, source, created, received_at, seq, digest, data) ",
                );
                q.push_values(chunk, |mut row, c| {
                    row.push_bind(c.envelope.data_id)
                        .push_bind(c.envelope.kind.clone())
                        .push_bind(c.envelope.source.clone())
                        .push_bind(c.envelope.created.timestamp_micros())
                        .push_bind(received)
                        .push_bind(seq_of[c.envelope.kind.as_str()])
                        .push_bind(c.digest.to_vec())
                        .push_bind(c.data_json.clone());
                });
                q.build()
                    .execute(&mut **tx)
                    .await
                    .context("inserting records")?;
            }
        }
    }
    Ok(())
}

/// Add a batch's records to the per-hour summary of their kind (`record_hours`), in the
/// batch's transaction, so that the summary changes exactly when the records do.
async fn count_hours(
    tx: &mut WriteTx,
    kind: &str,
    hours: &BTreeMap<PartitionKey, i64>,
    seq: i64,
) -> Result<()> {
    if hours.is_empty() {
        return Ok(());
    }
    macro_rules! upsert {
        ($tx:expr) => {{
            let mut q = QueryBuilder::new("INSERT INTO record_hours (kind, hour, rows, max_seq) ");
            q.push_values(hours, |mut row, (hour, rows)| {
                row.push_bind(kind)
                    .push_bind(hour.to_string())
                    .push_bind(*rows)
                    .push_bind(seq);
            });
            // Batches commit in seq order (under the log lock), so the new seq is the highest.
            q.push(
                " ON CONFLICT (kind, hour) DO UPDATE SET rows = record_hours.rows + excluded.rows, \
                 max_seq = excluded.max_seq",
            );
            q.build()
                .execute(&mut **$tx)
                .await
                .map(|r| r.rows_affected())
        }};
    }
    match tx {
        WriteTx::Postgres { tx, .. } => upsert!(tx),
        WriteTx::Sqlite { tx, .. } => upsert!(tx),
    }
    .context("counting records per hour")?;
    Ok(())
}

async fn insert_kinds(tx: &mut WriteTx, kinds: &[String], now: DateTime<Utc>) -> Result<()> {
    let sql = "INSERT INTO kinds (kind, fields, updated_at) VALUES ($1, '{}', $2) ON CONFLICT (kind) DO NOTHING";
    for kind in kinds {
        match tx {
            WriteTx::Postgres { tx, .. } => sqlx::query(sql)
                .bind(kind)
                .bind(now)
                .execute(&mut **tx)
                .await
                .map(|r| r.rows_affected()),
            WriteTx::Sqlite { tx, .. } => sqlx::query(sql)
                .bind(kind)
                .bind(now)
                .execute(&mut **tx)
                .await
                .map(|r| r.rows_affected()),
        }
        .context("remembering a kind")?;
    }
    Ok(())
}

async fn insert_quarantine(
    tx: &mut WriteTx,
    rejected: &[Rejected],
    actor: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    for chunk in rejected.chunks(500) {
        macro_rules! build {
            ($q:ident) => {
                $q.push_values(chunk, |mut row, r| {
                    row.push_bind(now)
                        .push_bind(r.kind.clone())
                        .push_bind(r.source.clone())
                        .push_bind(r.data_id)
                        .push_bind(r.line as i32)
                        .push_bind(r.raw.clone())
                        .push_bind(r.error.clone())
                        .push_bind(actor.to_string());
                })
            };
        }
        let head =
            "INSERT INTO quarantine (received_at, kind, source, data_id, line, raw, error, actor) ";
        match tx {
            WriteTx::Postgres { tx, .. } => {
                let mut q = QueryBuilder::new(head);
                build!(q);
                q.build()
                    .execute(&mut **tx)
                    .await
                    .map(|r| r.rows_affected())
            }
            WriteTx::Sqlite { tx, .. } => {
                let mut q = QueryBuilder::new(head);
                build!(q);
                q.build()
                    .execute(&mut **tx)
                    .await
                    .map(|r| r.rows_affected())
            }
        }
        .context("quarantining records")?;
    }
    Ok(())
}

/// Escape text for PostgreSQL's COPY text format.
fn escape_copy(buf: &mut String, text: &str) {
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

fn hex_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_backslashes_and_line_breaks() {
        let mut buf = String::new();
        escape_copy(&mut buf, "a\\b\tc\nd");
        assert_eq!(buf, "a\\\\b\\tc\\nd");
    }
}
