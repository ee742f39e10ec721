//! Loading what one partition of an analysis reads: for each input, the frame of its span
//! (the partition, and the lookback before it) and what the build read of it (the span
//! and its summary), which the commit records and staleness is later derived from.
//!
//! A kind's span is whole hours, so that its summary is exactly `record_hours`'. An
//! analysis input is read only when every upstream partition of its span is ready: else
//! the build waits for them (and asks for those nobody is building).

use std::sync::atomic::Ordering;

use chrono::{DateTime, Duration, Utc};
use polars::prelude::*;

use scholia_annotation_cache::{AnnotationCache, rows_to_frame};
use scholia_events::analysis::{AnalysisMeta, Input, InputSource};
use scholia_events::status::PartitionStatus;
use scholia_events::store::InputRead;
use scholia_events::{Error, Granularity, PartitionKey, Result};

use crate::analysis::Inputs;
use crate::frames::FrameCache;

/// What a partition's inputs are, when they can be read.
pub(crate) enum Loaded {
    Ready {
        inputs: Inputs,
        reads: Vec<InputRead>,
    },
    /// Upstream partitions are not ready; of each upstream analysis, those nobody builds
    /// yet (possibly none: they are under way).
    Waiting {
        missing: Vec<(AnalysisMeta, Vec<PartitionKey>)>,
    },
    /// An upstream partition failed for good.
    UpstreamFailed(String),
}

/// The first hour of a span reaching `lookback` before `start`.
fn span_start(start: DateTime<Utc>, lookback: Duration) -> DateTime<Utc> {
    Granularity::Hour.partition_of(start - lookback).start
}

pub(crate) async fn load(
    cache: &AnnotationCache,
    frames: &FrameCache,
    meta: &AnalysisMeta,
    partition: &PartitionKey,
) -> Result<Loaded> {
    let core = cache.core();
    let mut inputs = Inputs::new();
    let mut reads = Vec::with_capacity(meta.inputs.len());
    let mut missing = Vec::new();
    for input in &meta.inputs {
        let lookback = input.lookback_duration();
        match &input.source {
            InputSource::Kind(kind) => {
                let schema = core
                    .store
                    .kinds
                    .get(kind)
                    .await?
                    .map(|k| k.schema)
                    .unwrap_or_default();
                let from = span_start(partition.start, lookback);
                let to = partition.end();
                let (loaded, source) = frames
                    .load(&*core.store.records, kind, &schema, from, to)
                    .await?;
                core.metrics
                    .counter(
                        source.metric(),
                        "Partition inputs reused from memory, extended, or read from the database.",
                    )
                    .fetch_add(1, Ordering::Relaxed);
                let mut frame = loaded.frame;
                if input.lookback.is_some() {
                    mark_partition_rows(&mut frame, "created", partition.start)?;
                }
                reads.push(InputRead {
                    source: input.source.clone(),
                    span_from: Granularity::Hour.partition_of(from).to_string(),
                    span_to: Granularity::Hour.partition_of(to).to_string(),
                    rows: loaded.summary.rows,
                    max_seq: loaded.summary.max_seq,
                });
                inputs.insert(input.source.clone(), frame);
            }
            InputSource::Analysis(name) => {
                let upstream = cache.catalog().find(name).await?;
                match read_upstream(cache, &upstream, input, partition).await? {
                    Upstream::Ready(frame, read) => {
                        reads.push(read);
                        inputs.insert(input.source.clone(), frame);
                    }
                    Upstream::Waiting(keys) => missing.push(((*upstream).clone(), keys)),
                    Upstream::Failed(error) => return Ok(Loaded::UpstreamFailed(error)),
                }
            }
        }
    }
    if !missing.is_empty() {
        return Ok(Loaded::Waiting { missing });
    }
    Ok(Loaded::Ready { inputs, reads })
}

enum Upstream {
    Ready(DataFrame, InputRead),
    /// Not all ready; these are missing with nothing under way.
    Waiting(Vec<PartitionKey>),
    Failed(String),
}

async fn read_upstream(
    cache: &AnnotationCache,
    upstream: &AnalysisMeta,
    input: &Input,
    partition: &PartitionKey,
) -> Result<Upstream> {
    let first = upstream
        .partition
        .partition_of(partition.start - input.lookback_duration());
    let last = upstream
        .partition
        .partition_of(partition.end() - Duration::microseconds(1));
    let views = cache.read(upstream, first.start, last.end()).await?;
    if let Some(failed) = views.iter().find(|v| v.status == PartitionStatus::Failed) {
        return Ok(Upstream::Failed(format!(
            "upstream analysis {} failed for {}: {}",
            upstream.name,
            failed.partition,
            failed.error.as_deref().unwrap_or("no error recorded")
        )));
    }
    if !views.iter().all(|v| v.is_ready()) {
        return Ok(Upstream::Waiting(
            views
                .iter()
                .filter(|v| v.needs_request())
                .map(|v| v.partition)
                .collect(),
        ));
    }
    let mut frames = Vec::with_capacity(views.len());
    let mut max_seq = 0;
    for view in &views {
        let stored = view.rows.as_ref().ok_or_else(|| {
            Error::internal(
                "reading an upstream annotation",
                "a ready partition has no rows",
            )
        })?;
        max_seq = max_seq.max(stored.committed_seq);
        let rows: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(stored.rows.get())
                .map_err(|e| Error::internal("reading an upstream annotation", e))?;
        let mut frame = rows_to_frame(&stored.columns, &rows)
            .map_err(|e| Error::internal("reading an upstream annotation", e))?;
        let height = frame.height();
        frame
            .with_column(
                Series::new("partition".into(), vec![view.partition.to_string(); height])
                    .into_column(),
            )
            .map_err(|e| Error::internal("reading an upstream annotation", e))?;
        frames.push(frame);
    }
    let mut frame = concat_frames(frames)?;
    if input.lookback.is_some() {
        let first_own = upstream.partition.partition_of(partition.start).to_string();
        let flags: Vec<bool> = frame
            .column("partition")
            .and_then(|c| c.str().cloned())
            .map_err(|e| Error::internal("reading an upstream annotation", e))?
            .iter()
            .map(|p| p.is_some_and(|p| p >= first_own.as_str()))
            .collect();
        frame
            .with_column(Series::new("in_partition".into(), flags).into_column())
            .map_err(|e| Error::internal("reading an upstream annotation", e))?;
    }
    let read = InputRead {
        source: input.source.clone(),
        span_from: first.to_string(),
        span_to: last.next().to_string(),
        rows: views.len() as i64,
        max_seq,
    };
    Ok(Upstream::Ready(frame, read))
}

/// Stack upstream partitions' frames, whose columns may differ (a column that one
/// partition's rows lack is null there; the first type seen of a column wins).
fn concat_frames(frames: Vec<DataFrame>) -> Result<DataFrame> {
    let fail = |e: PolarsError| Error::internal("reading upstream annotations", e);
    let mut columns: Vec<(PlSmallStr, DataType)> = Vec::new();
    for frame in &frames {
        for column in frame.columns() {
            if !columns.iter().any(|(name, _)| name == column.name()) {
                columns.push((column.name().clone(), column.dtype().clone()));
            }
        }
    }
    let mut out: Option<DataFrame> = None;
    for frame in frames {
        let height = frame.height();
        let aligned: Vec<Column> = columns
            .iter()
            .map(|(name, dtype)| match frame.column(name) {
                Ok(c) => c.cast(dtype),
                Err(_) => Ok(Column::full_null(name.clone(), height, dtype)),
            })
            .collect::<PolarsResult<_>>()
            .map_err(fail)?;
        let aligned = DataFrame::new(height, aligned).map_err(fail)?;
        match &mut out {
            Some(out) => {
                out.vstack_mut(&aligned).map_err(fail)?;
            }
            None => out = Some(aligned),
        }
    }
    Ok(out.unwrap_or_default())
}

/// Add `in_partition`: whether the row's `time` column falls in the partition.
fn mark_partition_rows(frame: &mut DataFrame, time: &str, start: DateTime<Utc>) -> Result<()> {
    let start = start.timestamp_micros();
    let flags: Vec<bool> = frame
        .column(time)
        .and_then(|c| c.cast(&DataType::Int64))
        .and_then(|c| c.i64().cloned())
        .map_err(|e| Error::internal("marking lookback rows", e))?
        .iter()
        .map(|t| t.is_some_and(|t| t >= start))
        .collect();
    frame
        .with_column(Series::new("in_partition".into(), flags).into_column())
        .map_err(|e| Error::internal("marking lookback rows", e))?;
    Ok(())
}
