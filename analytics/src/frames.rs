//! Kinds' frames, kept in memory (and on local disk) and reused while their records are
//! unchanged.
//!
//! Rewinding history reruns analyses over records that do not change: they are
//! immutable, and a span only ever gains records. Each worker process therefore keeps
//! the columnar frames it loaded (in memory, bounded by size, and in files that outlive
//! the process: `frame_files`), each with the summary of what it holds: its rows and
//! their highest `seq`. Before reusing one it asks the span's per-hour summary
//! (`record_hours`, written by ingest in the records' own transaction) whether anything
//! arrived since: equal summaries mean equal records. When records did arrive (late data
//! into a built day), only those with a `seq` above the frame's highest are read, and
//! appended.
//!
//! Exact because `seq` is assigned in commit order (under the log lock) and a load reads
//! the summary and the records in one snapshot: a frame holds every record of its span up
//! to its highest `seq` and none above it, so "above the frame's highest `seq`" is exactly
//! what it lacks, and a batch is wholly in an extension or wholly out of it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use moka::future::Cache;
use polars::prelude::{
    Column, DataFrame, DataType, Int64Chunked, PolarsResult, SortMultipleOptions, StringChunked,
};

use scholia_events::schema::{FieldType, KindSchema, column_name};
use scholia_events::store::Records;

use crate::frame::{self, ENVELOPE_COLUMNS, FrameBuilder, PartitionInput};
use crate::frame_files::FrameFiles;
pub use crate::frame_writer::Building;
use crate::frame_writer::Writer;
use crate::{Result, frame_error};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

struct Entry {
    /// The schema the frame was built with; another one means another frame.
    schema: KindSchema,
    input: PartitionInput,
}

/// Where a load came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reused from memory: the span's records had not changed.
    Memory,
    /// Reused from a file on local disk: the span's records had not changed.
    Disk,
    /// Reused, with the records that arrived since read from the database and appended.
    Extended,
    /// Read from the database.
    Database,
}

impl Source {
    pub fn metric(self) -> &'static str {
        match self {
            Source::Memory => "scholia_build_frames_reused_total",
            Source::Disk => "scholia_build_frames_from_disk_total",
            Source::Extended => "scholia_build_frames_extended_total",
            Source::Database => "scholia_build_frames_loaded_total",
        }
    }
}

/// How long a frame that was extended waits before it is written to disk. Late records
/// come in runs (a live source sends one every few hundred milliseconds), and every
/// extension of a day rewrote its whole file, tens of megabytes, beside the next build:
/// one write now covers a run. A file that lags its frame is still exact (it is extended
/// from its own summary when it is read), so the delay costs at most the catching up of
/// what arrived in it after a restart.
const WRITE_BEHIND: Duration = Duration::from_secs(2);

/// The frame cache of one process.
#[derive(Clone)]
pub struct FrameCache {
    frames: Cache<Key, Arc<Entry>>,
    files: Option<(Arc<FrameFiles>, Writer<Key, Entry>)>,
}

impl FrameCache {
    /// A cache holding at most about `max_bytes` of frames in memory (0 turns it off), and
    /// those of `files` on disk. Frames waiting to be written to disk that memory has let
    /// go are held up to a quarter of `max_bytes` more (`frame_writer`).
    pub fn new(max_bytes: u64, files: Option<FrameFiles>) -> FrameCache {
        let frames = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, entry: &Arc<Entry>| {
                u32::try_from(entry.input.frame.estimated_size()).unwrap_or(u32::MAX)
            })
            .build();
        FrameCache {
            frames,
            files: files.map(|files| {
                let files = Arc::new(files);
                let writing = files.clone();
                let writer = Writer::start(max_bytes / 4, move |key: &Key, entry: &Entry| {
                    writing.write(&key.kind, key.from, key.to, &entry.schema, &entry.input)
                });
                (files, writer)
            }),
        }
    }

    /// Mark a build under way until the value is dropped: frame files are written in the
    /// pauses between builds.
    pub fn building(&self) -> Building {
        match &self.files {
            Some((_, writer)) => writer.building(),
            None => Building::none(),
        }
    }

    /// Wait (on a blocking thread) until the frame files asked for so far are written, or
    /// `limit` passed; whether they all were. For a graceful stop.
    pub async fn flush_files(&self, limit: Duration) -> bool {
        let Some((_, writer)) = self.files.clone() else {
            return true;
        };
        tokio::task::spawn_blocking(move || writer.flush(limit))
            .await
            .unwrap_or(false)
    }

    /// The records of `kind` created in the whole hours `[from, to)`, from memory or disk
    /// when they are unchanged.
    pub async fn load(
        &self,
        records: &dyn Records,
        kind: &str,
        schema: &KindSchema,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(PartitionInput, Source)> {
        let key = Key {
            kind: kind.to_string(),
            from,
            to,
        };
        let now = records.summary(kind, from, to).await?;
        let (found, origin) = match self.frames.get(&key).await {
            Some(entry) => (Some(entry), Source::Memory),
            None => (self.read_file(&key).await, Source::Disk),
        };
        let usable = match found {
            Some(entry) if entry.schema == *schema => Some(entry),
            // The kind's schema grew (records elsewhere brought a field): an unchanged
            // frame gets the new columns, null; one whose span gained records is read again.
            Some(entry) if entry.input.summary == now => conform(&entry, schema)?.map(Arc::new),
            _ => None,
        };
        if let Some(entry) = usable {
            if entry.input.summary == now {
                let input = entry.input.clone();
                self.frames.insert(key, entry).await;
                return Ok((input, origin));
            }
            if let Some(input) = extend(records, &entry, kind, from, to).await? {
                self.keep(key, schema, &input, WRITE_BEHIND).await;
                return Ok((input, Source::Extended));
            }
        }
        let mut builder = FrameBuilder::new(kind, schema);
        let summary = records.load(kind, from, to, 0, &mut builder).await?;
        let input = builder.finish(summary).map_err(frame_error)?;
        self.keep(key, schema, &input, Duration::ZERO).await;
        Ok((input, Source::Database))
    }

    async fn read_file(&self, key: &Key) -> Option<Arc<Entry>> {
        let (files, _) = self.files.clone()?;
        let key = key.clone();
        let read = tokio::task::spawn_blocking(move || files.read(&key.kind, key.from, key.to));
        let frame = read.await.ok()??;
        Some(Arc::new(Entry {
            schema: frame.schema,
            input: frame.input,
        }))
    }

    /// Keep a freshly read frame in memory, and hand it to the writer, to be written no
    /// sooner than `delay` (a newer frame of the span asked for meanwhile takes its place).
    async fn keep(&self, key: Key, schema: &KindSchema, input: &PartitionInput, delay: Duration) {
        if input.summary.rows == 0 {
            return;
        }
        let entry = Arc::new(Entry {
            schema: schema.clone(),
            input: input.clone(),
        });
        self.frames.insert(key.clone(), entry.clone()).await;
        if let Some((_, writer)) = &self.files {
            let bytes = entry.input.frame.estimated_size() as u64;
            writer.submit(key, entry, bytes, delay);
        }
    }
}

/// A cached frame brought to a newer schema of its kind, when the newer one only adds
/// fields (null in every row the frame holds) or widens ints to floats: schemas only grow,
/// so that is the usual case, and it costs no read.
fn conform(entry: &Entry, schema: &KindSchema) -> Result<Option<Entry>> {
    let mut frame = entry.input.frame.clone();
    for (name, spec) in &schema.fields {
        let column = column_name(name);
        match (entry.schema.fields.get(name), frame.column(&column)) {
            (Some(old), _) if old.ty == spec.ty => {}
            (Some(old), Ok(existing))
                if old.ty == FieldType::Int && spec.ty == FieldType::Float =>
            {
                let widened = existing.cast(&DataType::Float64).map_err(frame_error)?;
                frame.with_column(widened).map_err(frame_error)?;
            }
            (None, Err(_)) => {
                let empty = frame::empty(
                    "",
                    &KindSchema {
                        fields: [(name.clone(), spec.clone())].into(),
                    },
                )
                .map_err(frame_error)?;
                let dtype = empty.column(&column).map_err(frame_error)?.dtype().clone();
                let nulls = Column::full_null(column.into(), frame.height(), &dtype);
                frame.with_column(nulls).map_err(frame_error)?;
            }
            _ => return Ok(None),
        }
    }
    if entry
        .schema
        .fields
        .keys()
        .any(|name| !schema.fields.contains_key(name))
    {
        return Ok(None);
    }
    // Envelope columns first, then fields by name, as a load makes them.
    let mut order: Vec<String> = frame
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| !ENVELOPE_COLUMNS.contains(&c.as_str()))
        .collect();
    order.sort();
    let order: Vec<String> = ENVELOPE_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(order)
        .collect();
    let frame = frame.select(order).map_err(frame_error)?;
    Ok(Some(Entry {
        schema: schema.clone(),
        input: PartitionInput {
            frame,
            summary: entry.input.summary,
        },
    }))
}

/// The cached frame with the records that arrived since it was loaded, or `None` when
/// they bring new fields or widen a column (reading the whole span is simpler then).
async fn extend(
    records: &dyn Records,
    entry: &Entry,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Option<PartitionInput>> {
    let after = entry.input.summary.max_seq;
    let mut builder = FrameBuilder::new(kind, &entry.schema);
    let summary = records.load(kind, from, to, after, &mut builder).await?;
    let new = builder.finish(summary).map_err(frame_error)?;
    let rows = entry.input.summary.rows + new.frame.height() as i64;
    if rows != summary.rows {
        // Not what the snapshot says the span holds: read it whole.
        return Ok(None);
    }
    let mut input = entry.input.clone();
    if new.frame.height() > 0 {
        if new.frame.schema() != input.frame.schema() {
            return Ok(None);
        }
        input.frame = merge_ordered(&input.frame, &new.frame).map_err(frame_error)?;
    }
    input.summary = summary;
    Ok(Some(input))
}

/// A row's place in the order of a frame: (`created`, `data_id`).
fn key<'a>(
    created: &Int64Chunked,
    ids: &'a StringChunked,
    i: usize,
) -> (Option<i64>, Option<&'a str>) {
    (created.get(i), ids.get(i))
}

/// At most this many new rows are spliced into a held frame; more are sorted in.
const MAX_SPLICED: usize = 64;
/// A frame made of more chunks than this is made one again.
const MAX_CHUNKS: usize = 256;

/// `held` with the rows of `new` merged in, both ordered by (`created`, `data_id`), in the
/// order a full load gives. The held rows are not copied: the result is slices of `held`
/// with each new row between them. Live records land at the end, so usually that is one
/// append; a late record splits the frame once. Only when the slices pile up past
/// `MAX_CHUNKS` is the frame copied into one chunk again. Many new rows at once are
/// sorted in instead: a sort copies every row, but does it once.
fn merge_ordered(held: &DataFrame, new: &DataFrame) -> PolarsResult<DataFrame> {
    if new.height() > MAX_SPLICED {
        let mut all = held.clone();
        all.vstack_mut(new)?;
        return all.sort(
            ["created", "data_id"],
            SortMultipleOptions::default().with_maintain_order(true),
        );
    }
    let held_created = held.column("created")?.datetime()?.physical().clone();
    let held_ids = held.column("data_id")?.str()?.clone();
    let new_created = new.column("created")?.datetime()?.physical().clone();
    let new_ids = new.column("data_id")?.str()?.clone();

    let mut merged = held.slice(0, 0);
    let mut start = 0;
    for j in 0..new.height() {
        let row = key(&new_created, &new_ids, j);
        // The first held row after `row` (equal keys keep the held row first).
        let (mut lo, mut hi) = (start, held.height());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if key(&held_created, &held_ids, mid) <= row {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo > start {
            merged.vstack_mut_owned(held.slice(start as i64, lo - start))?;
        }
        merged.vstack_mut_owned(new.slice(j as i64, 1))?;
        start = lo;
    }
    if start < held.height() {
        merged.vstack_mut_owned(held.slice(start as i64, held.height() - start))?;
    }
    if merged.max_n_chunks() > MAX_CHUNKS {
        merged.rechunk_mut();
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::{IntoColumn, IntoSeries, NamedFrom, Series, TimeUnit};

    fn frame(rows: &[(i64, String, f64)]) -> DataFrame {
        let created: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let values: Vec<f64> = rows.iter().map(|r| r.2).collect();
        DataFrame::new(
            rows.len(),
            vec![
                Series::new("data_id".into(), ids).into_column(),
                Series::new("created".into(), created)
                    .into_datetime(TimeUnit::Microseconds, None)
                    .into_series()
                    .into_column(),
                Series::new("v".into(), values).into_column(),
            ],
        )
        .expect("a frame")
    }

    fn sorted(mut rows: Vec<(i64, String, f64)>) -> Vec<(i64, String, f64)> {
        rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        rows
    }

    #[test]
    fn merging_new_rows_into_a_held_frame_gives_the_order_of_a_full_sort() {
        let mut next = crate::testing::numbers(0x5C401A);
        for case in 0..200 {
            let held_rows = next(300) as usize;
            let new_rows = [0, 1, 2, 5, 64, 65, 200][case % 7];
            let mut row = |i: u64| {
                // Few distinct times, so that ties on `created` are broken by `data_id`.
                (
                    next(50) as i64 * 1_000_000,
                    format!("{:08x}-{i}", next(1 << 20)),
                    i as f64,
                )
            };
            let held = sorted((0..held_rows as u64).map(&mut row).collect());
            let new = sorted((0..new_rows as u64).map(|i| row(10_000 + i)).collect());
            let mut all: Vec<_> = held.iter().chain(&new).cloned().collect();
            let mut merged = merge_ordered(&frame(&held), &frame(&new)).expect("merging");
            for round in 0..3 {
                // Again into the result, as successive rebuilds do.
                let more = sorted((0..2).map(|i| row(20_000 + 10 * round + i)).collect());
                all.extend(more.iter().cloned());
                merged = merge_ordered(&merged, &frame(&more)).expect("merging again");
            }
            let expected = frame(&sorted(all));
            assert!(
                merged.equals(&expected),
                "case {case}: {held_rows} held, {new_rows} new\n{merged}\n{expected}"
            );
        }
    }
}
