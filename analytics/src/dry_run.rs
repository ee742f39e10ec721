//! The plan of an invalidation without making it (`"dry_run": true`): the partitions the
//! real request would queue — planned by [`invalidation::plan`], the very function the real
//! request uses, downstream included with `cascade` — with the source rows they read, an
//! estimate of how long rebuilding them takes, and what is already queued or running.
//! Nothing is written: every question here is a read.
//!
//! **Source rows** of a partition are what its build reads: for a kind input, the records
//! of the input's span (the partition and its lookback, in whole hours) as `record_hours`
//! counts them; for an upstream analysis input, the *row counts of the upstream
//! annotations* in that span as they are stored now (the rows the downstream build reads;
//! an upstream partition that is itself being rebuilt may end up with another count).
//!
//! **The estimate** comes from the analysis' recent build history (its newest
//! [`HISTORY_BUILDS`] builds, of which the completed ones count). Each build of a partition
//! reading `r` rows is taken to cost `max(overhead, r × per_row)` seconds:
//! - `overhead` is the median duration of the completed builds that read fewer than
//!   [`SMALL_BUILD_ROWS`] rows (what a build costs whatever it reads: claiming, loading,
//!   starting the SQL child process, committing); with none, the shortest completed build;
//! - `per_row` is the median of duration ÷ rows read over the completed builds that read at
//!   least [`SMALL_BUILD_ROWS`] rows; with none, [`DEFAULT_SECONDS_PER_ROW`];
//! - with no completed build at all, [`DEFAULT_OVERHEAD_SECONDS`] and
//!   [`DEFAULT_SECONDS_PER_ROW`].
//!
//! The work is shared by the build slots of the live workers, `workers`: no process
//! publishes its concurrency in SQL, so it is counted from the slots seen in the last
//! [`WORKERS_SEEN_MINUTES`] minutes — those that finished a build of any analysis or hold
//! a lease now; a process seen with slot `n` (`host-pid#n`) runs at least `n + 1` — and is
//! 1 when none was seen. An analysis' estimate is `max(work ÷ workers, its longest build)`;
//! the whole plan's is `max(all work ÷ workers, the sum over analyses of their longest
//! build)` (downstream builds wait for their upstream ones). The e2e test
//! `plan::the_estimate_is_within_five_times_the_real_run` holds it to within 5× of the real
//! run, either way, once there is history.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use scholia_annotation_cache::Catalog;
use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::partition::runs;
use scholia_events::status::BuildState;
use scholia_events::store::BuildRecord;
use scholia_events::{Granularity, PartitionKey, PartitionRun, Result, Store};

use crate::invalidation::{self, Request};

/// How many of an analysis' newest builds the estimate looks at.
pub const HISTORY_BUILDS: usize = 100;
/// Builds that read fewer rows than this cost their overhead; larger ones, their rows.
pub const SMALL_BUILD_ROWS: i64 = 1_000;
/// What a build is taken to cost with no history: 50 ms…
pub const DEFAULT_OVERHEAD_SECONDS: f64 = 0.05;
/// …or 1 µs per source row when that is more.
pub const DEFAULT_SECONDS_PER_ROW: f64 = 1e-6;
/// How far back build slots count as live workers.
pub const WORKERS_SEEN_MINUTES: i64 = 10;

/// What an invalidation would do, and an estimate of how long it would take.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DryRun {
    /// Always true: nothing was changed.
    pub dry_run: bool,
    pub partitions_total: u64,
    /// Source rows the rebuilds read, over every analysis.
    pub source_rows: i64,
    /// Seconds until every partition is rebuilt, estimated from build history.
    pub estimated_seconds: f64,
    /// The build slots the estimate shares the work among.
    pub workers: u32,
    /// Per analysis, upstream first.
    pub analyses: Vec<AnalysisPlan>,
}

/// What an invalidation would do to one analysis.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnalysisPlan {
    pub analysis: String,
    pub version: i64,
    /// How many partitions it would rebuild.
    pub partitions: u64,
    /// Those partitions, as runs of consecutive keys.
    pub runs: Vec<PartitionRun>,
    /// What their builds read: records of kind inputs, rows of upstream annotations.
    pub source_rows: i64,
    /// Seconds to rebuild them, shared among the workers.
    pub estimated_seconds: f64,
    /// Of those partitions, how many are queued now.
    pub already_queued: u64,
    /// Of those partitions, how many are being built now.
    pub already_running: u64,
    /// The completed builds of the history the estimate is drawn from (0: defaults).
    pub history_builds: u64,
}

/// The cost of one build, from the analysis' history.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Model {
    overhead: f64,
    per_row: f64,
    builds: u64,
}

impl Model {
    fn from_history(history: &[BuildRecord]) -> Model {
        let completed: Vec<(f64, i64)> = history
            .iter()
            .filter(|b| b.outcome == "completed")
            .map(|b| (b.duration_ms.max(0) as f64 / 1000.0, b.rows_read.max(0)))
            .collect();
        if completed.is_empty() {
            return Model {
                overhead: DEFAULT_OVERHEAD_SECONDS,
                per_row: DEFAULT_SECONDS_PER_ROW,
                builds: 0,
            };
        }
        let small: Vec<f64> = completed
            .iter()
            .filter(|(_, rows)| *rows < SMALL_BUILD_ROWS)
            .map(|(seconds, _)| *seconds)
            .collect();
        let rates: Vec<f64> = completed
            .iter()
            .filter(|(_, rows)| *rows >= SMALL_BUILD_ROWS)
            .map(|(seconds, rows)| seconds / *rows as f64)
            .collect();
        let overhead = median(small).unwrap_or_else(|| {
            completed
                .iter()
                .map(|(seconds, _)| *seconds)
                .fold(f64::INFINITY, f64::min)
        });
        Model {
            overhead,
            per_row: median(rates).unwrap_or(DEFAULT_SECONDS_PER_ROW),
            builds: completed.len() as u64,
        }
    }

    fn seconds(&self, rows: i64) -> f64 {
        self.overhead.max(rows.max(0) as f64 * self.per_row)
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Seconds, to the millisecond.
fn rounded(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// The plan of `request`, changing nothing.
pub async fn dry_run(store: &Store, catalog: &Catalog, request: &Request) -> Result<DryRun> {
    let plan = invalidation::plan(catalog, request).await?;
    let mut known: Vec<String> = catalog.list().iter().map(|m| m.name.clone()).collect();
    known.extend(plan.analyses.iter().map(|(name, _, _)| name.clone()));
    known.sort();
    known.dedup();
    let workers = workers(store, &known).await?;
    let mut analyses = Vec::with_capacity(plan.analyses.len());
    let (mut work, mut chain) = (0.0_f64, 0.0_f64);
    for (name, version, partitions) in &plan.analyses {
        let meta = catalog.find(name).await?;
        let rows = source_rows(store, catalog, &meta, partitions).await?;
        let history = store.annotations.builds(name, None, HISTORY_BUILDS).await?;
        let model = Model::from_history(&history);
        let costs: Vec<f64> = rows.iter().map(|r| model.seconds(*r)).collect();
        let analysis_work: f64 = costs.iter().sum();
        let longest = costs.iter().copied().fold(0.0, f64::max);
        work += analysis_work;
        chain += longest;
        let (queued, running) = under_way(store, name, meta.partition, partitions).await?;
        analyses.push(AnalysisPlan {
            analysis: name.clone(),
            version: *version,
            partitions: partitions.len() as u64,
            runs: runs(partitions.iter().copied()),
            source_rows: rows.iter().sum(),
            estimated_seconds: rounded((analysis_work / f64::from(workers)).max(longest)),
            already_queued: queued,
            already_running: running,
            history_builds: model.builds,
        });
    }
    Ok(DryRun {
        dry_run: true,
        partitions_total: analyses.iter().map(|a| a.partitions).sum(),
        source_rows: analyses.iter().map(|a| a.source_rows).sum(),
        estimated_seconds: rounded((work / f64::from(workers)).max(chain)),
        workers,
        analyses,
    })
}

/// The build slots of the live workers (see the module's documentation).
async fn workers(store: &Store, analyses: &[String]) -> Result<u32> {
    let since = Utc::now() - Duration::minutes(WORKERS_SEEN_MINUTES);
    let seen = store.annotations.workers_seen(analyses, since).await?;
    Ok(slots(&seen))
}

/// `host-pid#slot` names to a count of slots: each process has at least its highest slot
/// seen plus one.
fn slots(seen: &[String]) -> u32 {
    let mut per_process: BTreeMap<&str, u32> = BTreeMap::new();
    for name in seen {
        let (process, slots) = match name.rsplit_once('#') {
            Some((process, slot)) => (process, slot.parse::<u32>().map_or(1, |n| n + 1)),
            None => (name.as_str(), 1),
        };
        let entry = per_process.entry(process).or_insert(0);
        *entry = (*entry).max(slots);
    }
    per_process.values().sum::<u32>().max(1)
}

/// Of `partitions` (consecutive, of `granularity`), how many are queued and running now.
async fn under_way(
    store: &Store,
    analysis: &str,
    granularity: Granularity,
    partitions: &[PartitionKey],
) -> Result<(u64, u64)> {
    let (Some(first), Some(last)) = (partitions.first(), partitions.last()) else {
        return Ok((0, 0));
    };
    let states = store
        .queue
        .states(analysis, &first.to_string(), &last.next().to_string())
        .await?;
    let (mut queued, mut running) = (0, 0);
    for state in states {
        if state.partition.granularity != granularity {
            continue;
        }
        match state.state {
            BuildState::Queued => queued += 1,
            BuildState::Running => running += 1,
            BuildState::Stale | BuildState::Failed => {}
        }
    }
    Ok((queued, running))
}

/// Counts keyed by the start of what they count, summed over half-open time spans.
struct Prefix {
    starts: Vec<DateTime<Utc>>,
    sums: Vec<i64>,
}

impl Prefix {
    fn new(counts: Vec<(PartitionKey, i64)>) -> Prefix {
        let mut starts = Vec::with_capacity(counts.len());
        let mut sums = Vec::with_capacity(counts.len() + 1);
        sums.push(0);
        for (key, count) in counts {
            starts.push(key.start);
            sums.push(sums.last().copied().unwrap_or(0) + count);
        }
        Prefix { starts, sums }
    }

    /// The counts of what starts in `[from, to)`.
    fn between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        let lo = self.starts.partition_point(|s| *s < from);
        let hi = self.starts.partition_point(|s| *s < to);
        self.sums[hi.max(lo)] - self.sums[lo]
    }
}

/// The source rows each of `partitions` (consecutive) reads, in order.
async fn source_rows(
    store: &Store,
    catalog: &Catalog,
    meta: &AnalysisMeta,
    partitions: &[PartitionKey],
) -> Result<Vec<i64>> {
    let mut rows = vec![0_i64; partitions.len()];
    let (Some(first), Some(last)) = (partitions.first(), partitions.last()) else {
        return Ok(rows);
    };
    for input in &meta.inputs {
        let lookback = input.lookback_duration();
        match &input.source {
            InputSource::Kind(kind) => {
                // A build reads the whole hours of its partition and its lookback.
                let span_from =
                    |p: &PartitionKey| Granularity::Hour.partition_of(p.start - lookback).start;
                let hours = store
                    .invalidations
                    .hour_rows(kind, span_from(first), last.end())
                    .await?;
                let prefix = Prefix::new(hours);
                for (n, p) in rows.iter_mut().zip(partitions) {
                    *n += prefix.between(span_from(p), p.end());
                }
            }
            InputSource::Analysis(upstream) => {
                let Some(up) = catalog.get(upstream) else {
                    continue;
                };
                let span_from = |p: &PartitionKey| up.partition.partition_of(p.start - lookback);
                let first_key = span_from(first);
                let last_key = up
                    .partition
                    .partition_of(last.end() - Duration::microseconds(1));
                let counts = store
                    .annotations
                    .row_counts(upstream, &first_key, &last_key)
                    .await?;
                let prefix = Prefix::new(counts);
                for (n, p) in rows.iter_mut().zip(partitions) {
                    *n += prefix.between(span_from(p).start, p.end());
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn build(outcome: &str, duration_ms: i64, rows_read: i64) -> BuildRecord {
        BuildRecord {
            id: Uuid::nil(),
            partition: PartitionKey::parse("2024-05-05").unwrap(),
            version: 1,
            generation: Some(1),
            rows_read,
            rows_written: 1,
            duration_ms,
            attempt: 1,
            worker: "w#0".into(),
            outcome: outcome.into(),
            error: None,
            started_at: String::new(),
            finished_at: String::new(),
        }
    }

    #[test]
    fn with_no_history_a_build_costs_the_stated_defaults() {
        let model = Model::from_history(&[build("failed", 10_000, 0)]);
        assert_eq!(model.builds, 0);
        assert_eq!(model.seconds(10), DEFAULT_OVERHEAD_SECONDS);
        assert!((model.seconds(1_000_000) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn small_builds_cost_their_median_and_large_ones_their_rows() {
        let history = [
            build("completed", 10, 5),
            build("completed", 30, 50),
            build("completed", 20, 10),
            build("completed", 200, 100_000),
            build("completed", 400, 100_000),
            build("failed", 99_999, 0),
        ];
        let model = Model::from_history(&history);
        assert_eq!(model.builds, 5);
        assert!((model.seconds(0) - 0.02).abs() < 1e-9);
        // Median of 2 µs and 4 µs per row.
        assert!((model.seconds(1_000_000) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_process_seen_with_slot_n_has_n_plus_one_slots() {
        let seen = ["a-1#0".to_string(), "a-1#3".into(), "b-2#0".into()];
        assert_eq!(slots(&seen), 5);
        assert_eq!(slots(&[]), 1);
    }

    #[test]
    fn spans_sum_the_counts_that_start_inside_them() {
        let hour = |h: u32| PartitionKey::parse(&format!("2024-05-05T{h:02}")).unwrap();
        let prefix = Prefix::new(vec![(hour(1), 3), (hour(2), 4), (hour(5), 10)]);
        assert_eq!(prefix.between(hour(0).start, hour(3).start), 7);
        assert_eq!(prefix.between(hour(2).start, hour(6).start), 14);
        assert_eq!(prefix.between(hour(6).start, hour(9).start), 0);
    }
}
