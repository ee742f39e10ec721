//! Partitions' input frames, kept in memory and reused while their records are unchanged.
//!
//! Rewinding history reruns analyses over records that do not change: they are
//! immutable, and a partition only ever gains records. Each worker process therefore
//! keeps the columnar frames it loaded (bounded by size), and before reusing one it asks
//! the partition's per-hour summary (`record_hours`, written by ingest in the records'
//! own transaction) whether anything arrived since. One indexed lookup replaces reading
//! and parsing every row again. When records did arrive (late data into a built day),
//! only the hours that gained records are read, only their new rows, and appended.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use moka::future::Cache;
use polars::prelude::SortMultipleOptions;

use scholia_events::{Database, Granularity, PartitionKey};

use crate::Result;
use crate::frame::{self, Declared, PartitionInput};
use crate::queue::on_db;

/// What `record_hours` says of a range: records and the highest seq among them. Both only
/// grow, so an unchanged summary means unchanged records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub rows: i64,
    pub max_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

struct Entry {
    /// The summary read before the frame was loaded.
    summary: Summary,
    declared: BTreeMap<String, Declared>,
    input: PartitionInput,
}

/// Where a load came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reused from memory: the partition's records had not changed.
    Memory,
    /// Reused, with the records that arrived since read from the database and appended.
    Extended,
    /// Read from the database.
    Database,
}

/// Beyond this many hours with new records, reading the whole partition is simpler.
const MAX_EXTEND_HOURS: usize = 6;

/// The frame cache of one process.
#[derive(Clone)]
pub struct FrameCache {
    frames: Cache<Key, Arc<Entry>>,
}

impl FrameCache {
    /// A cache holding at most about `max_bytes` of frames (0 turns it off).
    pub fn new(max_bytes: u64) -> FrameCache {
        let frames = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, entry: &Arc<Entry>| {
                u32::try_from(entry.input.frame.estimated_size()).unwrap_or(u32::MAX)
            })
            .build();
        FrameCache { frames }
    }

    /// The records of `kind` created in `[from, to)`, from memory when they are unchanged.
    pub async fn load(
        &self,
        db: &Database,
        kind: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        declared: &BTreeMap<String, Declared>,
    ) -> Result<(PartitionInput, Source)> {
        // Read the summary first: a batch committing during the load below changes the
        // summary, so the entry can only ever be reused while it is exact.
        let summary = summary(db, kind, from, to).await?;
        let key = Key {
            kind: kind.to_string(),
            from,
            to,
        };
        let cached = self
            .frames
            .get(&key)
            .await
            .filter(|entry| entry.declared == *declared);
        if let Some(entry) = &cached
            && entry.summary == summary
        {
            return Ok((entry.input.clone(), Source::Memory));
        }
        if let Some(entry) = cached
            && let Some(input) = extend(db, &entry, kind, from, to, declared).await?
        {
            let entry = Entry {
                summary,
                declared: declared.clone(),
                input: input.clone(),
            };
            self.frames.insert(key, Arc::new(entry)).await;
            return Ok((input, Source::Extended));
        }
        let expected = usize::try_from(summary.rows).unwrap_or(0);
        let input = frame::load_after(db, kind, from, to, declared, 0, expected).await?;
        if input.rows > 0 {
            let entry = Entry {
                summary,
                declared: declared.clone(),
                input: input.clone(),
            };
            self.frames.insert(key, Arc::new(entry)).await;
        }
        Ok((input, Source::Database))
    }
}

/// The cached frame with the records that arrived since it was loaded, or `None` when
/// reading the whole partition again is the better (or only) way.
///
/// Commits are in `seq` order (under the log lock), so what a load saw of a partition is
/// exactly its records up to some `seq`: those above the frame's highest are the new ones.
async fn extend(
    db: &Database,
    entry: &Entry,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    declared: &BTreeMap<String, Declared>,
) -> Result<Option<PartitionInput>> {
    let after = entry.input.max_seq;
    let hours = changed_hours(db, kind, from, to, after).await?;
    if hours.is_empty() {
        // The summary moved, but only by records the frame's load already saw (they
        // committed between reading the summary and the load).
        return Ok(Some(entry.input.clone()));
    }
    if hours.len() > MAX_EXTEND_HOURS {
        return Ok(None);
    }
    let mut input = entry.input.clone();
    for hour in hours {
        let (start, end) = (hour.start.max(from), hour.end().min(to));
        let new = frame::load_after(db, kind, start, end, declared, after, 0).await?;
        if new.rows == 0 {
            continue;
        }
        // New fields, or values that widen a column's type: read the whole partition.
        if new.frame.schema() != input.frame.schema() {
            return Ok(None);
        }
        input.frame.vstack_mut(&new.frame)?;
        input.rows += new.rows;
        input.max_seq = input.max_seq.max(new.max_seq);
    }
    // In the order a full load gives.
    input.frame = input.frame.sort(
        ["created", "data_id"],
        SortMultipleOptions::default().with_maintain_order(true),
    )?;
    Ok(Some(input))
}

/// The hours of `[from, to)` that gained records of `kind` with a `seq` above `after`.
async fn changed_hours(
    db: &Database,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: i64,
) -> Result<Vec<PartitionKey>> {
    let (first, last) = hour_bounds(from, to);
    let sql = "SELECT hour FROM record_hours \
               WHERE kind = $1 AND hour >= $2 AND hour <= $3 AND max_seq > $4 ORDER BY hour";
    let hours: Vec<String> = on_db!(db, |p| sqlx::query_scalar(sql)
        .bind(kind)
        .bind(&first)
        .bind(&last)
        .bind(after)
        .fetch_all(p)
        .await?);
    Ok(hours
        .iter()
        .filter_map(|h| PartitionKey::parse(h).ok())
        .collect())
}

/// The first and last hour keys (`2024-05-05T13`) of `[from, to)`.
fn hour_bounds(from: DateTime<Utc>, to: DateTime<Utc>) -> (String, String) {
    let hour = |t: DateTime<Utc>| Granularity::Hour.partition_of(t).to_string();
    (hour(from), hour(to - chrono::Duration::microseconds(1)))
}

/// The summary of `kind`'s records created in `[from, to)` (whole hours).
pub async fn summary(
    db: &Database,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Summary> {
    let (first, last) = hour_bounds(from, to);
    let sql = "SELECT CAST(COALESCE(SUM(rows), 0) AS BIGINT), CAST(COALESCE(MAX(max_seq), 0) AS BIGINT) \
               FROM record_hours WHERE kind = $1 AND hour >= $2 AND hour <= $3";
    let (rows, max_seq): (i64, i64) = on_db!(db, |p| sqlx::query_as(sql)
        .bind(kind)
        .bind(&first)
        .bind(&last)
        .fetch_one(p)
        .await?);
    Ok(Summary { rows, max_seq })
}
