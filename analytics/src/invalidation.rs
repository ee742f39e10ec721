//! Invalidations: "rewind history" for a date range of one analysis or all of them. This
//! plans the partitions (counted before anything is listed, so an absurd range costs
//! nothing to refuse); the store queues them, records one item per partition and logs
//! `analysis.invalidated`, in one transaction.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use scholia_annotation_cache::Catalog;
use scholia_events::status::Rebuild;
use scholia_events::store::{InvalidationPlan, Store};
use scholia_events::{Error, Result};

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
    pub actor: String,
}

/// The partitions `request` covers, per analysis.
pub async fn plan(catalog: &Catalog, request: &Request) -> Result<InvalidationPlan> {
    if request.to <= request.from {
        return Err(Error::Invalid(
            "the range is empty: \"to\" must come after \"from\" (ranges are half-open)".into(),
        ));
    }
    let analyses = if request.analysis == "*" {
        catalog.refresh().await?;
        catalog.list()
    } else {
        vec![catalog.find(&request.analysis).await?]
    };
    let total: u64 = analyses
        .iter()
        .map(|a| a.partition.count_between(request.from, request.to))
        .sum();
    if total > MAX_PARTITIONS as u64 {
        return Err(Error::Invalid(format!(
            "the range covers {total} partitions, more than the {MAX_PARTITIONS} one invalidation may; split it"
        )));
    }
    let mut planned = Vec::with_capacity(analyses.len());
    for meta in analyses {
        let partitions = meta
            .partition
            .partitions_between(request.from, request.to, MAX_PARTITIONS)
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
