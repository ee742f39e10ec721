//! Keeping annotations current: the planner reacts to the bus, the reconciler to SQL.
//!
//! - The planner hears `source.ingested` (new records) and `analysis.completed` (a new
//!   upstream generation) and queues rebuilds of exactly the built partitions that read
//!   them and did not see them yet (their own partitions, and those whose lookback covers
//!   them), a moment later so that a burst coalesces into one build.
//! - The reconciler does the same from SQL alone: at start it compares every built
//!   partition's recorded input with what SQL holds now, then every few seconds it
//!   compares those that read an hour that gained records since it last looked, and every
//!   partition reading an upstream analysis. So a lost, dropped or never-published bus
//!   message costs at most one period (`SCHOLIA_RECONCILE_SECONDS`), never correctness.
//!   It also gives up on partitions whose builds keep stopping their workers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use scholia_events::analysis::InputSource;
use scholia_events::bus::{Acker, Delivery, EventFilter};
use scholia_events::status::{PRIORITY_LIVE, Want};
use scholia_events::store::{AnnotationKey, BuildRequest};
use scholia_events::{
    Error, EventBody, EventType, LoggedEvent, PartitionKey, PartitionRun, Result,
};

use crate::worker::Workers;

/// At most this many changed hours are compared in one pass; more make a full pass.
const MAX_HOURS_PER_PASS: usize = 10_000;
/// A full comparison every this many passes, whatever else happens.
const FULL_PASS_EVERY: u32 = 120;
/// The most partitions one planning step asks for.
const MAX_PLANNED: usize = 200_000;

impl Workers {
    pub(crate) async fn plan_loop(&self, shutdown: CancellationToken) -> Result<()> {
        let bus = &self.cache.core().bus;
        let mut ingested = bus
            .queue("planner", EventFilter::One(EventType::SourceIngested))
            .await?;
        let mut completed = bus
            .queue(
                "planner-upstream",
                EventFilter::One(EventType::AnalysisCompleted),
            )
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = ingested.next() => delivery,
                delivery = completed.next() => delivery,
            };
            match delivery {
                Some(Delivery::Event(event, acker)) => self.handle(&event, acker).await,
                Some(Delivery::Lagged) => {
                    tracing::warn!(
                        "The planner fell behind the bus; the reconciler looks in SQL now"
                    );
                    self.reconcile_now.send_modify(|n| *n += 1);
                }
                None => return Err(Error::unavailable("the bus", "a planner queue closed")),
            }
        }
    }

    async fn handle(&self, event: &LoggedEvent, acker: Acker) {
        match self.plan(event).await {
            Ok(()) => {
                let _ = acker.ack().await;
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(error = %error, seq = event.seq, "Planning rebuilds failed; will retry");
                let _ = acker.retry_after(Duration::from_secs(1)).await;
            }
            Err(error) => {
                // The reconciler will find whatever this would have queued.
                tracing::error!(error = %error, seq = event.seq, "Cannot plan rebuilds for an event");
                let _ = acker.ack().await;
            }
        }
    }

    async fn plan(&self, event: &LoggedEvent) -> Result<()> {
        let (source, runs): (InputSource, Vec<PartitionRun>) = match &event.body {
            EventBody::SourceIngested { kind, hours, .. } => {
                (InputSource::Kind(kind.clone()), hours.clone())
            }
            EventBody::AnalysisCompleted {
                analysis,
                partition,
                ..
            } => (
                InputSource::Analysis(analysis.clone()),
                vec![PartitionRun {
                    first: *partition,
                    last: *partition,
                }],
            ),
            _ => return Ok(()),
        };
        for meta in self.cache.catalog().readers(&source) {
            let Some(input) = meta.input(&source) else {
                continue;
            };
            let lookback = input.lookback_duration();
            let mut keys: Vec<PartitionKey> = Vec::new();
            for run in &runs {
                let (from, to) = run.span();
                let reach = to + lookback;
                keys.extend(
                    meta.partition
                        .partitions_between(
                            from,
                            reach.min(scholia_events::envelope::end_of_time()),
                            MAX_PLANNED,
                        )
                        .map_err(Error::Invalid)?,
                );
            }
            keys.sort();
            keys.dedup();
            let behind = self
                .cache
                .core()
                .store
                .annotations
                .behind(&meta.name, &source, &keys, event.seq)
                .await?;
            self.request(&meta.name, meta.version, behind, "planner (new input)")
                .await?;
        }
        Ok(())
    }

    /// Queue live rebuilds of `partitions`, whose inputs moved, a debounce from now, and log
    /// the request.
    async fn request(
        &self,
        analysis: &str,
        version: i64,
        partitions: Vec<PartitionKey>,
        actor: &str,
    ) -> Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let debounce = chrono::Duration::from_std(self.settings.debounce).unwrap_or_default();
        self.cache
            .core()
            .store
            .queue
            .request(BuildRequest {
                analysis: analysis.to_string(),
                version,
                partitions,
                priority: PRIORITY_LIVE,
                want: Want::InputsMoved,
                not_before: Utc::now() + debounce,
                actor: actor.to_string(),
                log: true,
            })
            .await?;
        Ok(())
    }

    pub(crate) async fn reconcile_loop(&self, shutdown: CancellationToken) -> Result<()> {
        let mut now = self.reconcile_now.subscribe();
        let mut watermark = None;
        let mut passes = 0_u32;
        loop {
            let full = watermark.is_none() || passes.is_multiple_of(FULL_PASS_EVERY);
            watermark = Some(self.reconcile(watermark.filter(|_| !full)).await?);
            passes = passes.wrapping_add(1);
            self.abandon_poisoned().await?;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.settings.reconcile_every) => {}
                _ = now.changed() => {}
            }
        }
    }

    /// One pass: compare built partitions with SQL (all of them without a `watermark`,
    /// else those reading hours that gained records after it), and request the ones whose
    /// input moved. Returns the next watermark.
    async fn reconcile(&self, watermark: Option<i64>) -> Result<i64> {
        let store = &self.cache.core().store;
        // Everything up to the head is committed (commits are in seq order), so the next
        // pass need only look after it.
        let head = store.log.head().await?;
        let moved = match watermark {
            None => store.annotations.moved(None).await?,
            Some(after) => {
                let hours = store
                    .records
                    .hours_changed_after(after, MAX_HOURS_PER_PASS)
                    .await?;
                if hours.len() >= MAX_HOURS_PER_PASS {
                    store.annotations.moved(None).await?
                } else {
                    store.annotations.moved(Some(&hours)).await?
                }
            }
        };
        if !moved.is_empty() {
            tracing::info!(
                partitions = moved.len(),
                full = watermark.is_none(),
                "The reconciler found partitions whose input moved; rebuilding them"
            );
            self.cache
                .core()
                .metrics
                .counter(
                    "scholia_reconciler_requested_total",
                    "Partitions the reconciler found behind their input and queued.",
                )
                .fetch_add(moved.len() as u64, Ordering::Relaxed);
        }
        let mut by_analysis: BTreeMap<String, Vec<PartitionKey>> = BTreeMap::new();
        for AnnotationKey {
            analysis,
            partition,
        } in moved
        {
            by_analysis.entry(analysis).or_default().push(partition);
        }
        for (analysis, partitions) in by_analysis {
            // Candidates' built partitions are kept current too.
            let Some(meta) = self.cache.catalog().get_any(&analysis) else {
                continue;
            };
            self.request(
                &analysis,
                meta.version,
                partitions,
                "reconciler (input moved)",
            )
            .await?;
        }
        Ok(head)
    }

    async fn abandon_poisoned(&self) -> Result<()> {
        let error = format!(
            "{} builds of this partition started and never finished: each stopped its worker (out of memory, a crash, or a kill). It is left failed; fix the cause and invalidate it to try again",
            self.settings.max_attempts
        );
        let abandoned = self
            .cache
            .core()
            .store
            .queue
            .abandon_poisoned(self.settings.max_attempts, &error)
            .await?;
        for a in abandoned {
            tracing::error!(analysis = %a.analysis, partition = %a.partition, attempts = a.attempts, "Gave up on a partition whose builds kept stopping their workers");
        }
        Ok(())
    }
}
