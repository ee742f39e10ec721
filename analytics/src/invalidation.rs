//! Invalidations: "rewind history" for a date range of one analysis or all of them. This
//! plans the partitions — counted before anything is listed, so an absurd range costs
//! nothing to refuse — and, with `cascade` (the default), every downstream partition that
//! reads one of them, upstream before downstream. The store queues them, records one item
//! per partition and logs `analysis.invalidated`, in one transaction. A downstream build
//! waits for its upstream partitions to be current (see `inputs.rs`), so each partition of
//! the plan is built once, in dependency order.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use scholia_annotation_cache::Catalog;
use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::envelope::end_of_time;
use scholia_events::status::Rebuild;
use scholia_events::store::{InvalidationPlan, Store};
use scholia_events::{Error, Result};

use crate::registry::MAX_DEPTH;

/// More partitions than this in one invalidation is almost surely a mistake.
pub const MAX_PARTITIONS: usize = 200_000;

/// What to invalidate.
#[derive(Debug, Clone)]
pub struct Request {
    /// An analysis, or `*` for all of them.
    pub analysis: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub reason: String,
    pub rebuild: Rebuild,
    /// Also the downstream partitions that read the invalidated ones.
    pub cascade: bool,
    pub actor: String,
}

/// What a request reaches of one analysis.
#[derive(Clone)]
struct Reach {
    meta: Arc<AnalysisMeta>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// The longest path from a target down to it (0 for a target).
    depth: usize,
}

/// The range of each analysis the request reaches, upstream first.
fn ranges(
    catalog: &Catalog,
    targets: Vec<Arc<AnalysisMeta>>,
    request: &Request,
) -> Vec<(Arc<AnalysisMeta>, DateTime<Utc>, DateTime<Utc>)> {
    let mut reached: BTreeMap<String, Reach> = targets
        .into_iter()
        .map(|meta| {
            let reach = Reach {
                meta: meta.clone(),
                from: request.from,
                to: request.to,
                depth: 0,
            };
            (meta.name.clone(), reach)
        })
        .collect();
    if request.cascade {
        let mut frontier: Vec<String> = reached.keys().cloned().collect();
        for depth in 1..=MAX_DEPTH {
            let mut next = Vec::new();
            for name in frontier {
                let Reach { from, to, .. } = reached[&name].clone();
                for down in catalog.readers(&InputSource::Analysis(name.clone())) {
                    let lookback = down
                        .input(&InputSource::Analysis(name.clone()))
                        .map_or_else(Duration::zero, |i| i.lookback_duration());
                    // A downstream partition reads its span and the lookback before it, so
                    // upstream partitions in [from, to) are read by those starting before
                    // to + lookback.
                    let reach = (to + lookback).min(end_of_time());
                    let entry = reached.entry(down.name.clone()).or_insert_with(|| Reach {
                        meta: down.clone(),
                        from,
                        to: reach,
                        depth,
                    });
                    entry.from = entry.from.min(from);
                    entry.to = entry.to.max(reach);
                    entry.depth = entry.depth.max(depth);
                    next.push(down.name.clone());
                }
            }
            next.sort();
            next.dedup();
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
    }
    let mut out: Vec<Reach> = reached.into_values().collect();
    out.sort_by(|a, b| (a.depth, &a.meta.name).cmp(&(b.depth, &b.meta.name)));
    out.into_iter().map(|r| (r.meta, r.from, r.to)).collect()
}

/// The partitions `request` covers, per analysis, upstream before downstream.
pub async fn plan(catalog: &Catalog, request: &Request) -> Result<InvalidationPlan> {
    if request.to <= request.from {
        return Err(Error::Invalid(
            "the range is empty: \"to\" must come after \"from\" (ranges are half-open)".into(),
        ));
    }
    let targets = if request.analysis == "*" {
        catalog.refresh().await?;
        catalog.list()
    } else {
        vec![catalog.find(&request.analysis).await?]
    };
    let reached = ranges(catalog, targets, request);
    let total: u64 = reached
        .iter()
        .map(|(meta, from, to)| meta.partition.count_between(*from, *to))
        .sum();
    if total > MAX_PARTITIONS as u64 {
        return Err(Error::Invalid(format!(
            "the range covers {total} partitions (downstream ones included), more than the {MAX_PARTITIONS} one invalidation may; split it"
        )));
    }
    let mut planned = Vec::with_capacity(reached.len());
    for (meta, from, to) in reached {
        let partitions = meta
            .partition
            .partitions_between(from, to, MAX_PARTITIONS)
            .map_err(Error::Invalid)?;
        planned.push((meta.name.clone(), meta.version, partitions));
    }
    Ok(InvalidationPlan {
        target: request.analysis.clone(),
        from: request.from,
        to: request.to,
        reason: request.reason.clone(),
        rebuild: request.rebuild,
        actor: request.actor.clone(),
        analyses: planned,
    })
}

/// Invalidate: plan and record.
pub async fn create(store: &Store, catalog: &Catalog, request: &Request) -> Result<Uuid> {
    let plan = plan(catalog, request).await?;
    store.invalidations.create(plan).await
}
