//! The worker role: build loops, the planner that turns new data into rebuilds, the
//! registry follower, and the scheduler.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use scholia_events::bus::{Delivery, EventFilter};
use scholia_events::error::DbContext;
use scholia_events::metrics::Metrics;
use scholia_events::{Bus, Database, EventBody, LoggedEvent, NewEvent, PartitionKey, log};

use crate::frames::{FrameCache, Source};
use crate::queue::{self, BuildResult, Claim, Committed, on_db};
use crate::registry::Registry;
use crate::{Error, Result, frame, rows, schedule};

/// How long new data waits before its partition is rebuilt, so that a burst of records
/// into one partition coalesces into one build.
pub(crate) const STALENESS_DEBOUNCE: Duration = Duration::from_millis(100);

type Task = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

#[derive(Clone)]
pub struct Workers {
    db: Database,
    bus: Arc<dyn Bus>,
    registry: Registry,
    metrics: Arc<Metrics>,
    concurrency: usize,
    frames: FrameCache,
    wake: Arc<Notify>,
    id: String,
}

impl Workers {
    pub fn new(
        db: Database,
        bus: Arc<dyn Bus>,
        registry: Registry,
        metrics: Arc<Metrics>,
        concurrency: usize,
        frames: FrameCache,
    ) -> Self {
        let id = format!("{}-{}", hostname(), std::process::id());
        Workers {
            db,
            bus,
            registry,
            metrics,
            concurrency,
            frames,
            wake: Arc::new(Notify::new()),
            id,
        }
    }

    /// The named long-running tasks of the worker role.
    pub fn tasks(&self, shutdown: CancellationToken) -> Vec<(&'static str, Task)> {
        let mut tasks: Vec<(&'static str, Task)> = Vec::new();
        let w = self.clone();
        let s = shutdown.clone();
        tasks.push((
            "worker-wakeups",
            Box::pin(async move { w.follow_requests(s).await }),
        ));
        for slot in 0..self.concurrency {
            let w = self.clone();
            let s = shutdown.clone();
            tasks.push((
                "worker-builds",
                Box::pin(async move { w.build_loop(slot, s).await }),
            ));
        }
        let w = self.clone();
        let s = shutdown.clone();
        tasks.push(("planner", Box::pin(async move { w.plan_loop(s).await })));
        let w = self.clone();
        let s = shutdown.clone();
        tasks.push((
            "registry-follower",
            Box::pin(async move { follow_registrations(w.bus, w.registry, s).await }),
        ));
        let (db, registry) = (self.db.clone(), self.registry.clone());
        tasks.push((
            "scheduler",
            Box::pin(async move { schedule::run(db, registry, shutdown).await }),
        ));
        tasks
    }

    /// `analysis.requested` wakes the build loops; the work itself is in SQL, so the
    /// message is acknowledged at once.
    async fn follow_requests(self, shutdown: CancellationToken) -> Result<()> {
        let mut sub = self
            .bus
            .queue("workers", EventFilter("analysis.requested".into()))
            .await?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = sub.next() => match delivery {
                    Some(Delivery::Event(_, acker)) => {
                        self.wake.notify_waiters();
                        let _ = acker.ack().await;
                    }
                    Some(Delivery::Lagged) => self.wake.notify_waiters(),
                    None => return Ok(()),
                },
            }
        }
    }

    async fn build_loop(self, slot: usize, shutdown: CancellationToken) -> Result<()> {
        let owner = format!("{}#{slot}", self.id);
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match queue::claim(&self.db, &owner).await {
                Ok(Some(claim)) => {
                    backoff = Duration::from_millis(200);
                    self.build(claim).await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "Cannot claim builds; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            // Nothing due now: wait for a request, for the earliest queued build to become
            // due (requests for new data are debounced), or at most half a second (retries
            // become due, and leases expire, without any message).
            let mut idle = Duration::from_millis(500);
            if let Ok(Some(due)) = queue::next_due(&self.db).await {
                let until = (due - chrono::Utc::now()).to_std().unwrap_or_default();
                idle = idle.min(until.max(Duration::from_millis(5)));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = &mut notified => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Build one claimed partition and commit (or record the failure).
    async fn build(&self, claim: Claim) {
        let started = Instant::now();
        let outcome = self.try_build(&claim, started).await;
        let m = &self.metrics;
        match outcome {
            Ok((version, result)) => match queue::complete(&self.db, &claim, &result).await {
                Ok(Committed::Generation(generation)) => {
                    m.counter(
                        "scholia_builds_completed_total",
                        "Partition builds committed.",
                    )
                    .fetch_add(1, Ordering::Relaxed);
                    m.counter(
                        "scholia_build_input_rows_total",
                        "Source rows read by committed builds.",
                    )
                    .fetch_add(result.input_rows, Ordering::Relaxed);
                    m.histogram("scholia_build_seconds", "Time to build one partition.")
                        .observe(started.elapsed().as_secs_f64());
                    tracing::debug!(analysis = %claim.analysis, partition = %claim.partition, version, generation, "Built");
                }
                Ok(Committed::LostLease) => {
                    tracing::warn!(analysis = %claim.analysis, partition = %claim.partition, "Lost the lease during a build; discarded its result");
                }
                Err(error) => {
                    self.record_failure(&claim, version, &error.to_string(), true)
                        .await
                }
            },
            Err((version, error)) => {
                let retryable = !matches!(error, Error::UnknownAnalysis(_) | Error::Invalid(_));
                self.record_failure(&claim, version, &error.to_string(), retryable)
                    .await;
            }
        }
    }

    async fn record_failure(&self, claim: &Claim, version: i64, error: &str, retryable: bool) {
        self.metrics
            .counter(
                "scholia_builds_failed_total",
                "Partition builds that failed.",
            )
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(analysis = %claim.analysis, partition = %claim.partition, error = %error, "Build failed");
        if let Err(e) = queue::fail(&self.db, claim, version, error, retryable).await {
            tracing::warn!(error = %e, "Cannot record a failed build; its lease will expire and it will be retried");
        }
    }

    async fn try_build(
        &self,
        claim: &Claim,
        started: Instant,
    ) -> Result<(i64, BuildResult), (i64, Error)> {
        let analysis = self
            .registry
            .find(&claim.analysis)
            .await
            .map_err(|e| (0, e))?;
        let version = analysis.version();
        let fail = |e: Error| (version, e);
        let partition =
            PartitionKey::parse(&claim.partition).map_err(|e| fail(Error::Invalid(e)))?;
        log::append_now(
            &self.db,
            vec![NewEvent::new(
                format!("worker:{}", claim.owner),
                EventBody::AnalysisStarted {
                    analysis: claim.analysis.clone(),
                    version,
                    partition,
                    build: claim.build,
                    worker: claim.owner.clone(),
                },
            )],
        )
        .await
        .map_err(|e| fail(e.into()))?;

        // Keep the lease while the build runs.
        let heartbeat = {
            let db = self.db.clone();
            let claim = claim.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(queue::LEASE / 3).await;
                    if !matches!(queue::heartbeat(&db, &claim).await, Ok(true)) {
                        return;
                    }
                }
            })
        };
        let result = async {
            let declared = frame::declared_fields(&self.db, analysis.kind()).await?;
            let (mut input, source) = self
                .frames
                .load(
                    &self.db,
                    analysis.kind(),
                    partition.start,
                    partition.end(),
                    &declared,
                )
                .await?;
            let counter = match source {
                Source::Memory => "scholia_build_frames_reused_total",
                Source::Extended => "scholia_build_frames_extended_total",
                Source::Database => "scholia_build_frames_loaded_total",
            };
            self.metrics
                .counter(
                    counter,
                    "Partition inputs reused from memory or read from the database.",
                )
                .fetch_add(1, Ordering::Relaxed);
            if input.rows == 0 {
                // No records: give the analysis the kind's columns, so that it makes no rows
                // of them (rather than failing on a field it names).
                input.frame = frame::empty_for_kind(&self.db, analysis.kind(), &declared).await?;
            }
            let (input_rows, input_seq) = (input.rows, input.max_seq);
            let analysis = analysis.clone();
            let span = tracing::Span::current();
            let (columns, rows) = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                let output = analysis.compute(input.frame)?;
                rows::frame_to_rows(&output)
            })
            .await
            .map_err(|e| Error::Compute(format!("the analysis panicked: {e}")))??;
            let rows_json = serde_json::to_string(&rows).expect("rows serialize");
            Ok::<_, Error>(BuildResult {
                version,
                columns,
                row_count: rows.len() as u64,
                rows_json,
                input_rows,
                input_seq,
                duration: started.elapsed(),
            })
        }
        .await;
        heartbeat.abort();
        result.map(|r| (version, r)).map_err(fail)
    }

    /// New records in a partition that was built make it stale: rebuild it soon.
    async fn plan_loop(self, shutdown: CancellationToken) -> Result<()> {
        let mut sub = self
            .bus
            .queue("planner", EventFilter("source.ingested".into()))
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = sub.next() => delivery,
            };
            match delivery {
                Some(Delivery::Event(event, acker)) => match self.plan(&event).await {
                    Ok(()) => {
                        let _ = acker.ack().await;
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, seq = event.seq, "Planning rebuilds failed; will retry");
                        let _ = acker.retry_after(Duration::from_secs(1)).await;
                    }
                },
                Some(Delivery::Lagged) => {}
                None => return Ok(()),
            }
        }
    }

    async fn plan(&self, event: &LoggedEvent) -> Result<()> {
        let EventBody::SourceIngested { kind, hours, .. } = &event.body else {
            return Ok(());
        };
        for analysis in self.registry.for_kind(kind) {
            let keys: BTreeSet<PartitionKey> = hours
                .iter()
                .map(|h| analysis.partition().partition_of(h.start))
                .collect();
            let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
                continue;
            };
            // Built partitions whose annotation did not see this batch yet: a build that
            // ran after the batch committed already read it (its input reached this seq).
            let sql = "SELECT partition FROM annotations \
                       WHERE analysis = $1 AND partition >= $2 AND partition <= $3 AND input_seq < $4";
            let stale_keys: Vec<String> = on_db!(&self.db, |p| sqlx::query_scalar(sql)
                .bind(analysis.name())
                .bind(first.to_string())
                .bind(last.to_string())
                .bind(event.seq)
                .fetch_all(p)
                .await
                .context("finding built partitions")?);
            let stale: Vec<PartitionKey> = keys
                .into_iter()
                .filter(|k| stale_keys.contains(&k.to_string()))
                .collect();
            queue::request_now(
                &self.db,
                analysis.name(),
                analysis.version(),
                &stale,
                queue::Want::Rebuild,
                STALENESS_DEBOUNCE,
                "planner (new source data)",
            )
            .await?;
        }
        Ok(())
    }
}

/// Keep a registry current with analyses registered by other processes.
pub async fn follow_registrations(
    bus: Arc<dyn Bus>,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut sub = bus
        .subscribe(EventFilter("analysis.registered".into()))
        .await?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            delivery = sub.next() => match delivery {
                Some(_) => {
                    if let Err(error) = registry.refresh().await {
                        tracing::warn!(error = %error, "Cannot reload analyses");
                    }
                }
                None => return Ok(()),
            },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                let _ = registry.refresh().await;
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}
