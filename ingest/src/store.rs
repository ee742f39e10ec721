//! The durable write of one batch: records, their `source.ingested` events and the
//! quarantined lines commit together in one transaction, or not at all.
//!
//! Idempotency is decided under the log lock: an id already stored with the same digest
//! is a duplicate, with another digest a conflict (quarantined, since source data is
//! immutable). New records then go in with one bulk statement: `COPY` on PostgreSQL,
//! multi-row inserts on SQLite.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use scholia_events::db::WriteTx;
use scholia_events::error::{DbContext, Result};
use scholia_events::{Database, Envelope, EventBody, Granularity, LoggedEvent, NewEvent, log};

use crate::parse::Rejected;

#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub duplicates: u64,
    /// Everything quarantined: unparseable and invalid lines, and conflicting ids.
    pub quarantined: Vec<Rejected>,
    pub events: Vec<LoggedEvent>,
}

/// A new record: the envelope, its digest and its `data` as JSON text.
type Fresh = (Envelope, [u8; 32], String);

const CONFLICT: &str = "a record with this data_id already exists with different content; \
                        source data is immutable, so send the correction as a new record with a new data_id";

/// Write a batch durably. Returns only after the commit.
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
    let mut first: HashMap<Uuid, [u8; 32]> = HashMap::with_capacity(envelopes.len());
    let mut candidates: Vec<(usize, Envelope, [u8; 32], String)> =
        Vec::with_capacity(envelopes.len());
    for (line, envelope) in envelopes {
        let data_json = envelope.data_json();
        let digest = envelope.digest_with(&data_json);
        match first.get(&envelope.data_id) {
            Some(seen) if *seen == digest => outcome.duplicates += 1,
            Some(_) => outcome.quarantined.push(conflict(line, &envelope)),
            None => {
                first.insert(envelope.data_id, digest);
                candidates.push((line, envelope, digest, data_json));
            }
        }
    }

    let mut tx = db.begin_write().await?;
    let ids: Vec<Uuid> = candidates.iter().map(|(_, e, _, _)| e.data_id).collect();
    let existing = existing_digests(&mut tx, &ids).await?;
    let mut fresh: Vec<Fresh> = Vec::with_capacity(candidates.len());
    for (line, envelope, digest, data_json) in candidates {
        match existing.get(&envelope.data_id) {
            Some(stored) if *stored == digest => outcome.duplicates += 1,
            Some(_) => outcome.quarantined.push(conflict(line, &envelope)),
            None => fresh.push((envelope, digest, data_json)),
        }
    }

    // One source.ingested event per kind; its seq stamps the kind's records.
    let mut by_kind: BTreeSet<&str> = BTreeSet::new();
    for (envelope, _, _) in &fresh {
        by_kind.insert(&envelope.kind);
    }
    let kinds: Vec<String> = by_kind.into_iter().map(str::to_string).collect();
    let mut new_events = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        let mut hours = BTreeSet::new();
        let mut count = 0;
        for (envelope, _, _) in fresh.iter().filter(|(e, _, _)| &e.kind == kind) {
            hours.insert(Granularity::Hour.partition_of(envelope.created));
            count += 1;
        }
        new_events.push(NewEvent::new(
            actor,
            EventBody::SourceIngested {
                kind: kind.clone(),
                count,
                hours: hours.into_iter().collect(),
            },
        ));
    }
    let events = log::append(&mut tx, new_events).await?;
    let seq_of: HashMap<&str, i64> = kinds
        .iter()
        .map(String::as_str)
        .zip(events.iter().map(|e| e.seq))
        .collect();

    insert_records(&mut tx, &fresh, &seq_of, received_at).await?;
    insert_kinds(&mut tx, &kinds, received_at).await?;
    insert_quarantine(&mut tx, &outcome.quarantined, actor, received_at).await?;
    tx.commit().await?;

    outcome.accepted = fresh.len() as u64;
    outcome.events = events;
    Ok(outcome)
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

async fn existing_digests(tx: &mut WriteTx, ids: &[Uuid]) -> Result<HashMap<Uuid, [u8; 32]>> {
    let mut found = HashMap::new();
    if ids.is_empty() {
        return Ok(found);
    }
    let rows: Vec<(Uuid, Vec<u8>)> = match tx {
        WriteTx::Postgres { tx, .. } => {
            sqlx::query_as("SELECT data_id, digest FROM records WHERE data_id = ANY($1)")
                .bind(ids)
                .fetch_all(&mut **tx)
                .await
                .context("checking for known records")?
        }
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
            rows
        }
    };
    for (id, digest) in rows {
        if let Ok(digest) = <[u8; 32]>::try_from(digest.as_slice()) {
            found.insert(id, digest);
        }
    }
    Ok(found)
}

async fn insert_records(
    tx: &mut WriteTx,
    fresh: &[Fresh],
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
            let received = received_at.to_rfc3339();
            let mut buf = String::with_capacity(1 << 20);
            for (envelope, digest, data_json) in fresh {
                let _ = write!(buf, "{}\t", envelope.data_id);
                escape_copy(&mut buf, &envelope.kind);
                buf.push('\t');
                escape_copy(&mut buf, &envelope.source);
                let _ = write!(
                    buf,
                    "\t{}\t{}\t{}\t\\\\x{}\t",
                    envelope.created.to_rfc3339(),
                    received,
                    seq_of[envelope.kind.as_str()],
                    hex_encode(digest)
                );
                escape_copy(&mut buf, data_json);
                buf.push('\n');
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
                q.push_values(chunk, |mut row, (envelope, digest, data_json)| {
                    row.push_bind(envelope.data_id)
                        .push_bind(envelope.kind.clone())
                        .push_bind(envelope.source.clone())
                        .push_bind(envelope.created.timestamp_micros())
                        .push_bind(received)
                        .push_bind(seq_of[envelope.kind.as_str()])
                        .push_bind(digest.to_vec())
                        .push_bind(data_json.clone());
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
