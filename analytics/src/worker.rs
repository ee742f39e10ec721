//! The worker role: build loops that claim partitions from the queue in SQL, load their
//! inputs, run the analysis on a blocking thread and commit the annotation through the
//! cache; and the tasks that keep the queue full of the right work (`planner.rs`,
//! `schedule.rs`).
//!
//! A build holds a short lease, renewed by a heartbeat while it runs, so a killed
//! worker's partition is taken over within seconds. A build that fails retries only when
//! the failure was transient (a database or bus outage); a build whose inputs are not
//! ready yet hands its partition back without counting an attempt; a partition whose
//! builds keep stopping their workers is given up on after a few attempts.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use scholia_annotation_cache::AnnotationCache;
use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::bus::{Delivery, EventFilter};
use scholia_events::status::Want;
use scholia_events::store::{BuildRequest, Claim, Committed, NewAnnotation};
use scholia_events::tasks::{OnFailure, Supervisor};
use scholia_events::{Error, EventBody, EventType, NewEvent, Result};

use crate::frames::FrameCache;
use crate::inputs::{self, Loaded};
use crate::registry::Registry;
use crate::{rows, sandbox, sql};

/// How a worker process builds.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Builds one process runs at once.
    pub concurrency: usize,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// Builds of a partition that may start (and never finish) before it is given up on.
    pub max_attempts: i32,
    /// The longest one build may run.
    pub build_timeout: Duration,
    /// The most resident memory a SQL analysis' computation may take, in megabytes.
    pub build_memory_mb: u64,
    /// How often the reconciler compares built partitions with what SQL holds.
    pub reconcile_every: Duration,
    /// How long new data waits before its partitions are rebuilt, so that bursts coalesce.
    pub debounce: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 2,
            lease: Duration::from_secs(5),
            max_attempts: 3,
            build_timeout: Duration::from_secs(600),
            build_memory_mb: 2048,
            reconcile_every: Duration::from_secs(5),
            debounce: Duration::from_millis(100),
        }
    }
}

/// How long a build whose inputs are not ready waits before it looks again.
const WAIT_FOR_INPUTS: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct Workers {
    pub(crate) cache: AnnotationCache,
    pub(crate) registry: Registry,
    frames: FrameCache,
    pub(crate) settings: WorkerSettings,
    id: String,
    /// Bumped when builds may be due: a request on the bus, a queue notification.
    wake: watch::Sender<u64>,
    /// Bumped to make the reconciler look now (the planner fell behind the bus).
    pub(crate) reconcile_now: watch::Sender<u64>,
}

/// What became of one build.
enum Outcome {
    Built(NewAnnotation),
    Waiting(Vec<(AnalysisMeta, Vec<scholia_events::PartitionKey>)>),
    Failed(Error),
    LostLease,
}

impl Workers {
    pub fn new(
        cache: AnnotationCache,
        registry: Registry,
        frames: FrameCache,
        settings: WorkerSettings,
    ) -> Self {
        Workers {
            cache,
            registry,
            frames,
            settings,
            id: format!("{}-{}", hostname(), std::process::id()),
            wake: watch::Sender::new(0),
            reconcile_now: watch::Sender::new(0),
        }
    }

    /// Start the worker role's tasks.
    pub fn spawn(&self, supervisor: &Supervisor) {
        let w = self.clone();
        supervisor.spawn("worker-wakeups", OnFailure::Restart, move |stop| {
            let w = w.clone();
            async move { w.follow_wakeups(stop).await }
        });
        for slot in 0..self.settings.concurrency {
            let w = self.clone();
            supervisor.spawn(
                format!("worker-build-{slot}"),
                OnFailure::Restart,
                move |stop| {
                    let w = w.clone();
                    async move { w.build_loop(slot, stop).await }
                },
            );
        }
        let w = self.clone();
        supervisor.spawn("planner", OnFailure::Restart, move |stop| {
            let w = w.clone();
            async move { w.plan_loop(stop).await }
        });
        let w = self.clone();
        supervisor.spawn("reconciler", OnFailure::Restart, move |stop| {
            let w = w.clone();
            async move { w.reconcile_loop(stop).await }
        });
        let w = self.clone();
        supervisor.spawn("scheduler", OnFailure::Restart, move |stop| {
            let w = w.clone();
            async move { crate::schedule::run(&w.cache, &w.registry, stop).await }
        });
        // On a graceful stop, the frame files still being written are finished, so that
        // the next process rebuilds from them rather than from the database.
        let frames = self.frames.clone();
        supervisor.spawn("frame-files", OnFailure::Restart, move |stop| {
            let frames = frames.clone();
            async move {
                stop.cancelled().await;
                if !frames.flush_files(FLUSH_FILES_LIMIT).await {
                    tracing::warn!(
                        limit_seconds = FLUSH_FILES_LIMIT.as_secs(),
                        "Some frame files were not written before stopping; those partitions will be read from the database after a restart"
                    );
                }
                Ok(())
            }
        });
    }

    /// Requests on the bus and queue notifications from SQL both wake the build loops;
    /// the work itself is in SQL, so a request message is acknowledged at once.
    async fn follow_wakeups(&self, shutdown: CancellationToken) -> Result<()> {
        let core = self.cache.core();
        let mut requests = core
            .bus
            .queue("workers", EventFilter::One(EventType::AnalysisRequested))
            .await?;
        let mut queued = core.store.queue.watch().await?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = requests.next() => match delivery {
                    Some(Delivery::Event(_, acker)) => {
                        let _ = acker.ack().await;
                    }
                    Some(Delivery::Lagged) => {}
                    None => return Err(Error::unavailable("the bus", "the work queue closed")),
                },
                _ = queued.changed() => {}
            }
            self.wake.send_modify(|n| *n += 1);
        }
    }

    async fn build_loop(&self, slot: usize, shutdown: CancellationToken) -> Result<()> {
        let owner = format!("{}#{slot}", self.id);
        let queue = self.cache.core().store.queue.clone();
        let mut wake = self.wake.subscribe();
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            wake.borrow_and_update();
            match queue
                .claim(&owner, self.settings.lease, self.settings.max_attempts)
                .await
            {
                Ok(Some(claim)) => {
                    backoff = Duration::from_millis(200);
                    self.build(claim, &shutdown).await;
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
            // Nothing due now: wait for a wake-up, or for the earliest queued build (or
            // lease) to fall due, or a second at most.
            let mut idle = Duration::from_secs(1);
            if let Ok(Some(due)) = queue.next_due().await {
                let until = (due - Utc::now()).to_std().unwrap_or_default();
                idle = idle.min(until.max(Duration::from_millis(5)));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = wake.changed() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// Build one claimed partition and commit it (or record why not), keeping the lease
    /// alive meanwhile.
    async fn build(&self, claim: Claim, shutdown: &CancellationToken) {
        let started = Instant::now();
        let _building = self.frames.building();
        let core = self.cache.core();
        // `find_any`: candidates (`name@candidate`) build through the same queue.
        let meta = match self.cache.catalog().find_any(&claim.analysis).await {
            Ok(meta) => meta,
            Err(error) => {
                self.record_failure(&claim, 0, error).await;
                return;
            }
        };
        let outcome = {
            let run = self.run(&claim, &meta, started);
            tokio::pin!(run);
            let mut heartbeat = tokio::time::interval(self.settings.lease / 5);
            heartbeat.tick().await;
            let deadline = tokio::time::sleep(self.settings.build_timeout);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    outcome = &mut run => break outcome,
                    _ = heartbeat.tick() => {
                        match core.store.queue.heartbeat(&claim, self.settings.lease).await {
                            Ok(true) => {}
                            Ok(false) => break Outcome::LostLease,
                            Err(error) => tracing::warn!(error = %error, "Cannot renew a lease; trying again"),
                        }
                    }
                    _ = &mut deadline => break Outcome::Failed(Error::Invalid(format!(
                        "the build ran longer than the limit of {} seconds (SCHOLIA_BUILD_TIMEOUT_SECONDS) and was stopped",
                        self.settings.build_timeout.as_secs()
                    ))),
                    // Shutting down: let the lease expire, another worker takes it over.
                    _ = shutdown.cancelled() => break Outcome::LostLease,
                }
            }
        };
        let m = &core.metrics;
        match outcome {
            Outcome::Built(annotation) => match self.cache.commit(&claim, &annotation).await {
                Ok(Committed::Generation { generation, again }) => {
                    m.counter(
                        "scholia_builds_completed_total",
                        "Partition builds committed.",
                    )
                    .fetch_add(1, Ordering::Relaxed);
                    m.counter(
                        "scholia_build_input_rows_total",
                        "Source rows read by committed builds.",
                    )
                    .fetch_add(annotation.input_rows() as u64, Ordering::Relaxed);
                    m.histogram("scholia_build_seconds", "Time to build one partition.")
                        .observe(started.elapsed().as_secs_f64());
                    tracing::debug!(analysis = %claim.analysis, partition = %claim.partition, generation, again, "Built");
                }
                Ok(Committed::LostLease) => {
                    tracing::warn!(analysis = %claim.analysis, partition = %claim.partition, "Lost the lease during a build; discarded its result");
                }
                Err(error) => self.record_failure(&claim, meta.version, error).await,
            },
            Outcome::Waiting(missing) => {
                for (upstream, partitions) in missing {
                    // Upstream partitions already queued keep their own priority, perhaps
                    // far behind bulk work: bring them up to this build's.
                    if let Some((from_key, to_key)) = upstream_span(&meta, &upstream, &claim)
                        && let Err(error) = core
                            .store
                            .queue
                            .hasten(&upstream.name, &from_key, &to_key, claim.priority)
                            .await
                    {
                        tracing::warn!(error = %error, "Cannot move upstream builds ahead");
                    }
                    if partitions.is_empty() {
                        continue;
                    }
                    let request = BuildRequest {
                        analysis: upstream.name.clone(),
                        version: upstream.version,
                        partitions,
                        priority: claim.priority,
                        want: Want::Present,
                        not_before: Utc::now(),
                        actor: format!("worker:{} (inputs of {})", claim.owner, claim.analysis),
                        log: true,
                    };
                    if let Err(error) = core.store.queue.request(request).await {
                        tracing::warn!(error = %error, "Cannot request upstream partitions");
                    }
                }
                let until = Utc::now()
                    + chrono::Duration::from_std(WAIT_FOR_INPUTS).expect("a short duration");
                if let Err(error) = core.store.queue.defer(&claim, until).await {
                    tracing::warn!(error = %error, "Cannot hand a partition back; its lease will expire");
                }
            }
            Outcome::Failed(error) => self.record_failure(&claim, meta.version, error).await,
            Outcome::LostLease => {}
        }
    }

    async fn run(&self, claim: &Claim, meta: &AnalysisMeta, started: Instant) -> Outcome {
        match self.try_run(claim, meta, started).await {
            Ok(outcome) => outcome,
            Err(error) => Outcome::Failed(error),
        }
    }

    async fn try_run(
        &self,
        claim: &Claim,
        meta: &AnalysisMeta,
        started: Instant,
    ) -> Result<Outcome> {
        let core = self.cache.core();
        let analysis = self.registry.analysis(meta)?;
        let (inputs, reads) =
            match inputs::load(&self.cache, &self.frames, meta, &claim.partition).await? {
                Loaded::Ready { inputs, reads } => (inputs, reads),
                Loaded::Waiting { missing } => return Ok(Outcome::Waiting(missing)),
                Loaded::UpstreamFailed(error) => return Err(Error::Invalid(error)),
            };
        // `analysis.started` is logged while the analysis runs: the append is a round trip
        // under the log lock, and the build need not wait for it. Both end before the
        // commit, which logs `analysis.completed` after it.
        let logged = core.store.log.append(vec![NewEvent::new(
            format!("worker:{}", claim.owner),
            EventBody::AnalysisStarted {
                analysis: claim.analysis.clone(),
                version: meta.version,
                partition: claim.partition,
                build: claim.build,
                worker: claim.owner.clone(),
            },
        )]);
        let computed = async {
            match &meta.sql {
                // SQL from an admin runs in a child process with a memory budget.
                Some(sql) => sandbox::run(sql, &sql::tables(meta), inputs, self.settings.build_memory_mb)
                    .await
                    .map_err(|failure| match failure {
                        sandbox::Failure::Analysis(e) => Error::Invalid(format!("the analysis failed: {e}")),
                        sandbox::Failure::Memory { limit_mb } => Error::Invalid(format!(
                            "the build needed more than the memory limit of {limit_mb} MB (SCHOLIA_BUILD_MEMORY_MB) and was stopped"
                        )),
                        sandbox::Failure::Sandbox(e) => Error::internal("running a SQL analysis", e),
                    }),
                None => {
                    let span = tracing::Span::current();
                    tokio::task::spawn_blocking(move || {
                        let _entered = span.enter();
                        analysis.compute(inputs)
                    })
                    .await
                    .map_err(|e| Error::Invalid(format!("the analysis panicked: {e}")))?
                    .map_err(|e| Error::Invalid(format!("the analysis failed: {e}")))
                }
            }
        };
        let (logged, computed) = tokio::join!(logged, computed);
        logged?;
        let output = computed?;
        let (columns, rows) = tokio::task::spawn_blocking(move || rows::frame_to_rows(&output))
            .await
            .map_err(|e| Error::internal("reading an annotation", e))?
            .map_err(|e| Error::internal("reading an annotation", e))?;
        let rows_json = serde_json::to_string(&rows).expect("rows serialize");
        Ok(Outcome::Built(NewAnnotation {
            version: meta.version,
            columns,
            row_count: rows.len() as u64,
            rows_json,
            inputs: reads,
            duration: started.elapsed(),
        }))
    }

    /// Record a failed build: transient failures are retried with a growing delay, the
    /// rest give up at once (the same input would fail the same way).
    async fn record_failure(&self, claim: &Claim, version: i64, error: Error) {
        let core = self.cache.core();
        core.metrics
            .counter(
                "scholia_builds_failed_total",
                "Partition builds that failed.",
            )
            .fetch_add(1, Ordering::Relaxed);
        let retry_in = error
            .is_transient()
            .then(|| Duration::from_millis(500 * (1u64 << claim.attempts.clamp(0, 6) as u32)));
        tracing::warn!(analysis = %claim.analysis, partition = %claim.partition, error = %error, retrying = retry_in.is_some(), "Build failed");
        if let Err(e) = core
            .store
            .queue
            .fail(claim, version, &error.to_string(), retry_in)
            .await
        {
            tracing::warn!(error = %e, "Cannot record a failed build; its lease will expire and it will be retried");
        }
    }
}

/// The keys `[from, to)` of the upstream partitions that the claimed partition of `meta`
/// reads through its input `upstream` (its lookback included), as `inputs::load` reads them.
fn upstream_span(
    meta: &AnalysisMeta,
    upstream: &AnalysisMeta,
    claim: &Claim,
) -> Option<(String, String)> {
    let input = meta
        .inputs
        .iter()
        .find(|i| i.source == InputSource::Analysis(upstream.name.clone()))?;
    let first = upstream
        .partition
        .partition_of(claim.partition.start - input.lookback_duration());
    let last = upstream
        .partition
        .partition_of(claim.partition.end() - chrono::Duration::microseconds(1));
    Some((first.to_string(), last.next().to_string()))
}

/// How long a stopping worker waits for its frame files (within the process' drain limit).
const FLUSH_FILES_LIMIT: Duration = Duration::from_secs(8);

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}
