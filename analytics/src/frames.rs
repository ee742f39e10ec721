//! Partitions' input frames, kept in memory and reused while their records are unchanged.
//!
//! Rewinding history reruns analyses over records that do not change: they are
//! immutable, and a partition only ever gains records. Each worker process therefore
//! keeps the columnar frames it loaded (bounded by size), and before reusing one it asks
//! the partition's per-hour summary (`record_hours`, written by ingest in the records'
//! own transaction) whether anything arrived since. One indexed lookup replaces reading
//! and parsing every row again.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use moka::future::Cache;

use scholia_events::{Database, Granularity};

use crate::Result;
use crate::frame::{self, Declared, PartitionInput};

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
    /// Read from the database.
    Database,
}

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
        if let Some(entry) = self.frames.get(&key).await
            && entry.summary == summary
            && entry.declared == *declared
        {
            return Ok((entry.input.clone(), Source::Memory));
        }
        let input = frame::load(db, kind, from, to, declared).await?;
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

/// The summary of `kind`'s records created in `[from, to)` (whole hours).
pub async fn summary(
    db: &Database,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Summary> {
    let hour = |t: DateTime<Utc>| Granularity::Hour.partition_of(t).to_string();
    // Round the end up to the hour that holds its last instant.
    let (first, last) = (hour(from), hour(to - chrono::Duration::microseconds(1)));
    let sql = "SELECT CAST(COALESCE(SUM(rows), 0) AS BIGINT), CAST(COALESCE(MAX(max_seq), 0) AS BIGINT) \
               FROM record_hours WHERE kind = $1 AND hour >= $2 AND hour <= $3";
    let (rows, max_seq): (i64, i64) = match db {
        Database::Postgres(pg) => {
            sqlx::query_as(sql)
                .bind(kind)
                .bind(&first)
                .bind(&last)
                .fetch_one(&pg.pool)
                .await?
        }
        Database::Sqlite(d) => {
            sqlx::query_as(sql)
                .bind(kind)
                .bind(&first)
                .bind(&last)
                .fetch_one(&d.pool)
                .await?
        }
    };
    Ok(Summary { rows, max_seq })
}
