//! The annotation cache service: annotations in SQL (one generic table), moka in front
//! (weighted by bytes, bounded), and the truth about every partition of a range: ready,
//! stale, missing, queued, running or failed. It owns the annotations: analytics stores
//! a build's result through [`AnnotationCache::commit`], readers and the websocket hub
//! read through [`AnnotationCache::read`].
//!
//! Concurrency model: reads are served from moka and from snapshots of the build queue,
//! both filed under a per-analysis epoch that every change bumps, so a cached read costs
//! no query. Every process that follows the bus evicts on `analysis.completed`, whichever
//! process built it; then it re-broadcasts the event to local listeners (readers waiting
//! with `wait=`, the websocket hub), so that what they read next is already fresh. A read
//! that overlapped a change is answered but never kept as current.

mod catalog;
mod formats;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use moka::future::Cache;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use scholia_events::analysis::AnalysisMeta;
use scholia_events::bus::{Delivery, EventFilter};
use scholia_events::envelope::format_time;
use scholia_events::status::{BuildState, PRIORITY_LIVE, PartitionStatus, Want};
use scholia_events::store::{
    BuildRequest, Claim, Committed, NewAnnotation, QueueState, StoredAnnotation,
};
use scholia_events::{EventBody, LoggedEvent, PartitionKey, Result};
use scholia_http::Core;

pub use catalog::Catalog;
pub use formats::rows_to_frame;
pub use routes::router;

/// The most partitions one read may cover.
pub const MAX_READ_PARTITIONS: usize = 5_000;

/// What a reader learns about one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: PartitionKey,
    pub status: PartitionStatus,
    /// For a stale partition with a rebuild under way: queued or running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<BuildState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub version: Option<i64>,
    pub generation: Option<i64>,
    pub computed_at: Option<String>,
    #[serde(serialize_with = "serialize_rows")]
    pub rows: Option<Arc<StoredAnnotation>>,
}

fn serialize_rows<S: serde::Serializer>(
    rows: &Option<Arc<StoredAnnotation>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match rows {
        Some(stored) => stored.rows.serialize(s),
        None => s.collect_seq(std::iter::empty::<()>()),
    }
}

impl PartitionView {
    pub fn is_ready(&self) -> bool {
        self.status == PartitionStatus::Ready
    }

    /// Whether nothing is under way that would make it ready: missing, or stale with no
    /// rebuild queued.
    pub fn needs_request(&self) -> bool {
        self.status == PartitionStatus::Missing
            || (self.status == PartitionStatus::Stale && self.rebuild.is_none())
    }
}

type StateSnapshot = Arc<HashMap<PartitionKey, QueueState>>;

/// One read's answer, rendered: what `GET /v1/annotations` sends again, unchanged, while
/// nothing about the analysis changes.
#[derive(Clone)]
pub(crate) struct Rendered {
    pub(crate) body: axum::body::Bytes,
    pub(crate) content_type: &'static str,
    /// Every partition was ready or failed: a `wait=` has nothing to wait for.
    pub(crate) settled: bool,
}

/// A read's shape: the analysis, the range, the format, and the analysis' epoch when the
/// read began.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ReadShape {
    pub(crate) analysis: String,
    pub(crate) from: DateTime<Utc>,
    pub(crate) to: DateTime<Utc>,
    pub(crate) format: &'static str,
    pub(crate) epoch: u64,
}

/// Cloned by every request that reads annotations: a clone is one reference count.
#[derive(Clone)]
pub struct AnnotationCache {
    inner: Arc<Inner>,
}

struct Inner {
    core: Core,
    catalog: Catalog,
    annotations: Cache<(String, PartitionKey), Option<Arc<StoredAnnotation>>>,
    /// Queue states of a range of an analysis, filed under the analysis' epoch.
    queue_states: Cache<(String, PartitionKey, PartitionKey, u64), StateSnapshot>,
    /// Per analysis, bumped whenever something about it changes. A read that started
    /// before a bump may have seen the old state, so what it loaded is filed under its old
    /// epoch (queue states) or not kept at all (annotations).
    epochs: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Rendered answers, filed under the epoch their read began in; like queue states,
    /// they live 5 seconds at most, in case a change's event never arrived.
    rendered: Cache<ReadShape, Rendered>,
    /// Ranges of an analysis whose queued builds this process raised to live priority in
    /// the last second: ten thousand subscribers to one queued day raise it once, not
    /// with ten thousand updates.
    hastened: Cache<(String, PartitionKey, PartitionKey), ()>,
    changes: broadcast::Sender<Arc<LoggedEvent>>,
}

impl AnnotationCache {
    pub fn new(core: Core, catalog: Catalog, max_bytes: u64) -> Self {
        let annotations = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(
                |key: &(String, PartitionKey), value: &Option<Arc<StoredAnnotation>>| {
                    let size =
                        key.0.len() + 96 + value.as_ref().map_or(0, |s| s.rows.get().len() + 128);
                    u32::try_from(size).unwrap_or(u32::MAX)
                },
            )
            // A safety net for an eviction missed while the bus was unreachable.
            .time_to_live(Duration::from_secs(300))
            .build();
        let queue_states = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(5))
            .build();
        let rendered = Cache::builder()
            .max_capacity(max_bytes / 4)
            .weigher(|key: &ReadShape, value: &Rendered| {
                u32::try_from(key.analysis.len() + 96 + value.body.len()).unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_secs(5))
            .build();
        let hastened = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(1))
            .build();
        let (changes, _) = broadcast::channel(4_096);
        AnnotationCache {
            inner: Arc::new(Inner {
                core,
                catalog,
                annotations,
                queue_states,
                epochs: Mutex::default(),
                rendered,
                hastened,
                changes,
            }),
        }
    }

    pub fn core(&self) -> &Core {
        &self.inner.core
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// `analysis.*` events, after this cache has applied them.
    pub fn changes(&self) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.inner.changes.subscribe()
    }

    /// Every cached read asks: an analysis already known costs no allocation.
    fn epoch(&self, analysis: &str) -> Arc<AtomicU64> {
        let mut epochs = self.inner.epochs.lock().expect("epochs lock");
        if let Some(epoch) = epochs.get(analysis) {
            return epoch.clone();
        }
        epochs.entry(analysis.to_string()).or_default().clone()
    }

    /// The shape of a read of `analysis` beginning now.
    pub(crate) fn read_shape(
        &self,
        analysis: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        format: &'static str,
    ) -> ReadShape {
        ReadShape {
            analysis: analysis.to_string(),
            from,
            to,
            format,
            epoch: self.epoch(analysis).load(Ordering::SeqCst),
        }
    }

    pub(crate) async fn rendered(&self, shape: &ReadShape) -> Option<Rendered> {
        self.inner.rendered.get(shape).await
    }

    /// Keep a read's answer, unless something changed since the read began.
    pub(crate) async fn keep_rendered(&self, shape: ReadShape, rendered: Rendered) {
        if self.epoch(&shape.analysis).load(Ordering::SeqCst) == shape.epoch {
            self.inner.rendered.insert(shape, rendered).await;
        }
    }

    fn bump(&self, analysis: &str) {
        self.epoch(analysis).fetch_add(1, Ordering::SeqCst);
    }

    fn bump_all(&self) {
        for epoch in self.inner.epochs.lock().expect("epochs lock").values() {
            epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Evict what the bus says changed, then tell local listeners.
    pub async fn follow_bus(self, shutdown: CancellationToken) -> Result<()> {
        let mut sub = self.inner.core.bus.subscribe(EventFilter::All).await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = sub.next() => delivery,
            };
            match delivery {
                Some(Delivery::Event(event, _)) => self.apply(event).await,
                Some(Delivery::Lagged) => {
                    tracing::warn!("The cache fell behind the bus; dropping everything it held");
                    self.bump_all();
                    self.inner.annotations.invalidate_all();
                    self.inner.queue_states.invalidate_all();
                    self.inner.rendered.invalidate_all();
                    if let Err(error) = self.inner.catalog.refresh().await {
                        tracing::warn!(error = %error, "Cannot reload analyses");
                    }
                }
                None => return Ok(()),
            }
        }
    }

    /// Refresh the catalog every half minute, in case a registration's event was missed.
    pub async fn follow_catalog(self, shutdown: CancellationToken) -> Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            if let Err(error) = self.inner.catalog.refresh().await {
                tracing::warn!(error = %error, "Cannot reload analyses");
            }
        }
    }

    async fn apply(&self, event: Arc<LoggedEvent>) {
        let Some(analysis) = event.body.analysis() else {
            if let EventBody::AdminAction { action, .. } = &event.body
                && action == "invalidation.cancelled"
            {
                self.bump_all();
            }
            return;
        };
        self.bump(analysis);
        match &event.body {
            EventBody::AnalysisCompleted { partition, .. } => {
                self.inner
                    .annotations
                    .invalidate(&(analysis.to_string(), *partition))
                    .await;
            }
            EventBody::AnalysisRegistered { .. } => {
                if let Err(error) = self.inner.catalog.refresh().await {
                    tracing::warn!(error = %error, "Cannot reload analyses");
                }
            }
            _ => {}
        }
        let _ = self.inner.changes.send(event);
    }

    async fn states(
        &self,
        analysis: &str,
        first: PartitionKey,
        last: PartitionKey,
    ) -> Result<StateSnapshot> {
        let epoch = self.epoch(analysis).load(Ordering::SeqCst);
        let queue = self.inner.core.store.queue.clone();
        let name = analysis.to_string();
        self.inner
            .queue_states
            .try_get_with((analysis.to_string(), first, last, epoch), async move {
                let states = queue
                    .states(&name, &first.to_string(), &last.next().to_string())
                    .await?;
                Ok::<_, scholia_events::Error>(Arc::new(
                    states.into_iter().map(|s| (s.partition, s)).collect(),
                ))
            })
            .await
            .map_err(shared_error)
    }

    /// Stored annotations of `keys`, from moka or, for the misses, one range query.
    pub async fn stored(
        &self,
        analysis: &str,
        keys: &[PartitionKey],
    ) -> Result<BTreeMap<PartitionKey, Arc<StoredAnnotation>>> {
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        for key in keys {
            match self
                .inner
                .annotations
                .get(&(analysis.to_string(), *key))
                .await
            {
                Some(Some(stored)) => {
                    found.insert(*key, stored);
                }
                Some(None) => {}
                None => missing.push(*key),
            }
        }
        if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
            let epoch = self.epoch(analysis);
            let before = epoch.load(Ordering::SeqCst);
            let loaded: HashMap<PartitionKey, Arc<StoredAnnotation>> = self
                .inner
                .core
                .store
                .annotations
                .load(analysis, first, last)
                .await?
                .into_iter()
                .map(|a| (a.partition, Arc::new(a)))
                .collect();
            // Something changed while this was read: answer with it, but do not keep it.
            let keep = epoch.load(Ordering::SeqCst) == before;
            for key in &missing {
                let value = loaded.get(key).cloned();
                if keep {
                    self.inner
                        .annotations
                        .insert((analysis.to_string(), *key), value.clone())
                        .await;
                }
                if let Some(stored) = value {
                    found.insert(*key, stored);
                }
            }
        }
        Ok(found)
    }

    /// Every partition of `[from, to)` with its status and rows.
    pub async fn read(
        &self,
        meta: &AnalysisMeta,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<PartitionView>> {
        let keys = meta
            .partition
            .partitions_between(from, to, MAX_READ_PARTITIONS)
            .map_err(scholia_events::Error::Invalid)?;
        let (Some(first), Some(last)) = (keys.first().copied(), keys.last().copied()) else {
            return Ok(Vec::new());
        };
        let states = self.states(&meta.name, first, last).await?;
        let stored = self.stored(&meta.name, &keys).await?;
        Ok(keys
            .iter()
            .map(|key| {
                view(
                    *key,
                    stored.get(key).cloned(),
                    states.get(key),
                    meta.version,
                )
            })
            .collect())
    }

    /// Queue live builds for the partitions that are missing or stale with nothing under
    /// way. Returns the partitions requested. Does not take the log lock.
    pub async fn request_missing(
        &self,
        meta: &AnalysisMeta,
        views: &[PartitionView],
        actor: &str,
    ) -> Result<Vec<PartitionKey>> {
        // What is already queued may be queued as bulk work, far behind the rest of a
        // rewind: someone waits for it now, so it goes ahead.
        let queued = views
            .iter()
            .filter(|v| {
                v.status == PartitionStatus::Queued || v.rebuild == Some(BuildState::Queued)
            })
            .map(|v| v.partition);
        if let (Some(first), Some(last)) = (queued.clone().min(), queued.max()) {
            let range = (meta.name.clone(), first, last);
            if !self.inner.hastened.contains_key(&range) {
                self.inner.hastened.insert(range, ()).await;
                self.inner
                    .core
                    .store
                    .queue
                    .hasten(
                        &meta.name,
                        &first.to_string(),
                        &last.next().to_string(),
                        PRIORITY_LIVE,
                    )
                    .await?;
            }
        }
        let wanted: Vec<PartitionKey> = views
            .iter()
            .filter(|v| v.needs_request())
            .map(|v| v.partition)
            .collect();
        if wanted.is_empty() {
            return Ok(wanted);
        }
        let requested = self
            .inner
            .core
            .store
            .queue
            .request(BuildRequest {
                analysis: meta.name.clone(),
                version: meta.version,
                partitions: wanted,
                priority: PRIORITY_LIVE,
                want: Want::Present,
                not_before: Utc::now(),
                actor: actor.to_string(),
                log: false,
            })
            .await?;
        self.bump(&meta.name);
        Ok(requested)
    }

    /// Store a build's annotation (analytics calls this), and forget what this process
    /// had cached of the partition at once, before the bus says so.
    pub async fn commit(&self, claim: &Claim, annotation: &NewAnnotation) -> Result<Committed> {
        let committed = self
            .inner
            .core
            .store
            .annotations
            .commit(claim, annotation)
            .await?;
        self.bump(&claim.analysis);
        self.inner
            .annotations
            .invalidate(&(claim.analysis.clone(), claim.partition))
            .await;
        Ok(committed)
    }
}

impl axum::extract::FromRef<AnnotationCache> for Core {
    fn from_ref(cache: &AnnotationCache) -> Core {
        cache.inner.core.clone()
    }
}

/// moka shares the error of a failed load among the waiters: keep its classification.
fn shared_error(error: Arc<scholia_events::Error>) -> scholia_events::Error {
    match Arc::try_unwrap(error) {
        Ok(error) => error,
        Err(shared) if shared.is_transient() => {
            scholia_events::Error::unavailable("the database", shared.to_string())
        }
        Err(shared) => scholia_events::Error::internal("reading the cache", shared),
    }
}

fn view(
    partition: PartitionKey,
    stored: Option<Arc<StoredAnnotation>>,
    state: Option<&QueueState>,
    version: i64,
) -> PartitionView {
    use PartitionStatus as S;
    let queue_state = state.map(|s| s.state);
    let (status, rebuild, error) = match (&stored, queue_state) {
        (_, Some(BuildState::Failed)) => (S::Failed, None, state.and_then(|s| s.error.clone())),
        (None, Some(BuildState::Queued)) => (S::Queued, None, None),
        (None, Some(BuildState::Running)) => (S::Running, None, None),
        (None, _) => (S::Missing, None, None),
        (Some(_), Some(BuildState::Queued)) => (S::Stale, Some(BuildState::Queued), None),
        (Some(_), Some(BuildState::Running)) => (S::Stale, Some(BuildState::Running), None),
        (Some(_), Some(BuildState::Stale)) => (S::Stale, None, None),
        (Some(s), None) if s.version != version => (S::Stale, None, None),
        (Some(_), None) => (S::Ready, None, None),
    };
    PartitionView {
        partition,
        status,
        rebuild,
        error,
        version: stored.as_ref().map(|s| s.version),
        generation: stored.as_ref().map(|s| s.generation),
        computed_at: stored.as_ref().map(|s| format_time(s.computed_at)),
        rows: stored,
    }
}
