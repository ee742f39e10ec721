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

use chrono::{DateTime, Utc};
use moka::future::Cache;
use polars::prelude::{Column, DataType, SortMultipleOptions};

use scholia_events::schema::{FieldType, KindSchema, column_name};
use scholia_events::store::Records;

use crate::frame::{self, ENVELOPE_COLUMNS, FrameBuilder, PartitionInput};
use crate::frame_files::FrameFiles;
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

/// The frame cache of one process.
#[derive(Clone)]
pub struct FrameCache {
    frames: Cache<Key, Arc<Entry>>,
    files: Option<Arc<FrameFiles>>,
}

impl FrameCache {
    /// A cache holding at most about `max_bytes` of frames in memory (0 turns it off), and
    /// those of `files` on disk.
    pub fn new(max_bytes: u64, files: Option<FrameFiles>) -> FrameCache {
        let frames = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, entry: &Arc<Entry>| {
                u32::try_from(entry.input.frame.estimated_size()).unwrap_or(u32::MAX)
            })
            .build();
        FrameCache {
            frames,
            files: files.map(Arc::new),
        }
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
                self.keep(key, schema, &input).await;
                return Ok((input, Source::Extended));
            }
        }
        let mut builder = FrameBuilder::new(kind, schema);
        let summary = records.load(kind, from, to, 0, &mut builder).await?;
        let input = builder.finish(summary).map_err(frame_error)?;
        self.keep(key, schema, &input).await;
        Ok((input, Source::Database))
    }

    async fn read_file(&self, key: &Key) -> Option<Arc<Entry>> {
        let files = self.files.clone()?;
        let key = key.clone();
        let read = tokio::task::spawn_blocking(move || files.read(&key.kind, key.from, key.to));
        let frame = read.await.ok()??;
        Some(Arc::new(Entry {
            schema: frame.schema,
            input: frame.input,
        }))
    }

    /// Keep a freshly read frame in memory, and write it to disk in the background.
    async fn keep(&self, key: Key, schema: &KindSchema, input: &PartitionInput) {
        if input.summary.rows == 0 {
            return;
        }
        let entry = Arc::new(Entry {
            schema: schema.clone(),
            input: input.clone(),
        });
        if let Some(files) = self.files.clone() {
            let entry = entry.clone();
            let key = key.clone();
            tokio::task::spawn_blocking(move || {
                files.write(&key.kind, key.from, key.to, &entry.schema, &entry.input)
            });
        }
        self.frames.insert(key, entry).await;
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
        input.frame.vstack_mut(&new.frame).map_err(frame_error)?;
        // In the order a full load gives.
        input.frame = input
            .frame
            .sort(
                ["created", "data_id"],
                SortMultipleOptions::default().with_maintain_order(true),
            )
            .map_err(frame_error)?;
    }
    input.summary = summary;
    Ok(Some(input))
}
