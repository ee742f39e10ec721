//! The annotation cache service: annotations in SQL (one generic table), moka in front
//! (weighted by bytes, bounded), and the truth about every partition of a range: ready,
//! stale, missing, queued, running or failed.
//!
//! Concurrency model: reads are served from moka and from a per-analysis snapshot of the
//! build queue, both evicted by events from the bus ([`AnnotationCache::follow_bus`]),
//! so a cached read costs no query. Every process that follows the bus evicts on
//! `analysis.completed`, whichever process built it. After evicting, the follower
//! re-broadcasts the event to local listeners (readers waiting with `wait=`, the
//! websocket hub), so that what they read next is already fresh.

mod formats;
mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use moka::future::Cache;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use scholia_analytics::queue::{self, QueueState};
use scholia_analytics::rows::ColumnSpec;
use scholia_analytics::{Analysis, Registry};
use scholia_events::bus::{Delivery, EventFilter};
use scholia_events::envelope::format_time;
use scholia_events::{Database, EventBody, LoggedEvent, PartitionKey};
use scholia_ingest::Shared;

pub use routes::router;

/// The most partitions one read may cover.
pub const MAX_READ_PARTITIONS: usize = 5_000;

/// One stored annotation.
#[derive(Debug)]
pub struct Stored {
    pub version: i64,
    pub generation: i64,
    pub computed_at: DateTime<Utc>,
    pub input_rows: i64,
    pub input_seq: i64,
    pub columns: Vec<ColumnSpec>,
    /// The rows as a JSON array, served without re-serializing.
    pub rows: Box<RawValue>,
}

/// What a reader learns about one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: String,
    /// ready, stale, missing, queued, running or failed.
    pub status: &'static str,
    /// For a stale partition with a rebuild under way: queued or running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub version: Option<i64>,
    pub generation: Option<i64>,
    pub computed_at: Option<String>,
    #[serde(serialize_with = "serialize_rows")]
    pub rows: Option<Arc<Stored>>,
}

fn serialize_rows<S: serde::Serializer>(
    rows: &Option<Arc<Stored>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match rows {
        Some(stored) => stored.rows.serialize(s),
        None => s.collect_seq(std::iter::empty::<()>()),
    }
}

impl PartitionView {
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

#[derive(Clone)]
pub struct AnnotationCache {
    pub shared: Shared,
    pub registry: Registry,
    annotations: Cache<(String, String), Option<Arc<Stored>>>,
    /// Per analysis, its partitions' queue states, keyed with the `epoch` they were read in.
    queue_states: Cache<(String, u64), Arc<HashMap<String, QueueState>>>,
    /// Bumped whenever the bus says something changed. A read that started before a bump
    /// may have seen the old state, so what it loaded is never cached as current: it is
    /// filed under its old epoch (queue states) or not kept at all (annotations).
    epoch: Arc<AtomicU64>,
    changes: broadcast::Sender<Arc<LoggedEvent>>,
}

impl AnnotationCache {
    pub fn new(shared: Shared, registry: Registry, max_bytes: u64) -> Self {
        let annotations = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &(String, String), value: &Option<Arc<Stored>>| {
                let size = key.0.len()
                    + key.1.len()
                    + 64
                    + value
                        .as_ref()
                        .map(|s| s.rows.get().len() + 128)
                        .unwrap_or(0);
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            // A safety net for an eviction missed while the bus was unreachable.
            .time_to_live(Duration::from_secs(300))
            .build();
        let queue_states = Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(5))
            .build();
        let (changes, _) = broadcast::channel(4_096);
        AnnotationCache {
            shared,
            registry,
            annotations,
            queue_states,
            epoch: Arc::new(AtomicU64::new(0)),
            changes,
        }
    }

    pub fn db(&self) -> &Database {
        &self.shared.db
    }

    /// `analysis.*` events, after this cache has applied them.
    pub fn changes(&self) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.changes.subscribe()
    }

    /// Evict what the bus says changed, then tell local listeners.
    pub async fn follow_bus(self, shutdown: CancellationToken) -> scholia_events::Result<()> {
        let mut sub = self.shared.bus.subscribe(EventFilter("*".into())).await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = sub.next() => delivery,
            };
            match delivery {
                Some(Delivery::Event(event, _)) => self.apply(event).await,
                Some(Delivery::Lagged) => {
                    tracing::warn!("The cache fell behind the bus; dropping everything it held");
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    self.annotations.invalidate_all();
                    self.queue_states.invalidate_all();
                    let _ = self.registry.refresh().await;
                }
                None => return Ok(()),
            }
        }
    }

    async fn apply(&self, event: LoggedEvent) {
        let analysis = match &event.body {
            EventBody::AnalysisCompleted {
                analysis,
                partition,
                ..
            } => {
                self.epoch.fetch_add(1, Ordering::SeqCst);
                self.annotations
                    .invalidate(&(analysis.clone(), partition.to_string()))
                    .await;
                Some(analysis.clone())
            }
            EventBody::AnalysisRegistered { analysis, .. } => {
                let _ = self.registry.refresh().await;
                Some(analysis.clone())
            }
            EventBody::AnalysisInvalidated { analysis, .. }
            | EventBody::AnalysisRequested { analysis, .. }
            | EventBody::AnalysisStarted { analysis, .. }
            | EventBody::AnalysisFailed { analysis, .. } => Some(analysis.clone()),
            EventBody::AdminAction { action, .. } if action == "invalidation.cancelled" => {
                self.epoch.fetch_add(1, Ordering::SeqCst);
                None
            }
            _ => None,
        };
        if analysis.is_some() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            let _ = self.changes.send(Arc::new(event));
        }
    }

    async fn states(
        &self,
        analysis: &str,
    ) -> scholia_analytics::Result<Arc<HashMap<String, QueueState>>> {
        let db = self.shared.db.clone();
        let name = analysis.to_string();
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.queue_states
            .try_get_with((analysis.to_string(), epoch), async move {
                let states = queue::states(&db, &name, "", "\u{10FFFF}").await?;
                Ok::<_, scholia_analytics::Error>(Arc::new(
                    states
                        .into_iter()
                        .map(|s| (s.partition.clone(), s))
                        .collect(),
                ))
            })
            .await
            .map_err(|e| scholia_analytics::Error::Compute(e.to_string()))
    }

    /// Stored annotations of `keys`, from moka or, for the misses, one range query.
    async fn stored(
        &self,
        analysis: &str,
        keys: &[PartitionKey],
    ) -> scholia_analytics::Result<HashMap<String, Arc<Stored>>> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for key in keys {
            let text = key.to_string();
            match self
                .annotations
                .get(&(analysis.to_string(), text.clone()))
                .await
            {
                Some(Some(stored)) => {
                    found.insert(text, stored);
                }
                Some(None) => {}
                None => missing.push(text),
            }
        }
        if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let loaded = load_range(&self.shared.db, analysis, first, last).await?;
            // Something changed while this was read: answer with it, but do not keep it.
            let keep = self.epoch.load(Ordering::SeqCst) == epoch;
            for key in &missing {
                let value = loaded.get(key).cloned();
                if keep {
                    self.annotations
                        .insert((analysis.to_string(), key.clone()), value.clone())
                        .await;
                }
                if let Some(stored) = value {
                    found.insert(key.clone(), stored);
                }
            }
        }
        Ok(found)
    }

    /// Every partition of `[from, to)` with its status and rows.
    pub async fn read(
        &self,
        analysis: &Arc<dyn Analysis>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> scholia_analytics::Result<Vec<PartitionView>> {
        let keys = analysis.partition().partitions_between(from, to);
        if keys.len() > MAX_READ_PARTITIONS {
            return Err(scholia_analytics::Error::Invalid(format!(
                "the range covers {} partitions; ask for at most {MAX_READ_PARTITIONS} at once",
                keys.len()
            )));
        }
        let states = self.states(analysis.name()).await?;
        let stored = self.stored(analysis.name(), &keys).await?;
        let version = analysis.version();
        Ok(keys
            .iter()
            .map(|key| {
                let text = key.to_string();
                view(
                    text.clone(),
                    stored.get(&text).cloned(),
                    states.get(&text),
                    version,
                )
            })
            .collect())
    }

    /// Queue live builds for the partitions that are missing or stale (not those being
    /// built or failed). Returns the partitions requested.
    pub async fn request_missing(
        &self,
        analysis: &Arc<dyn Analysis>,
        views: &[PartitionView],
        actor: &str,
    ) -> scholia_analytics::Result<Vec<PartitionKey>> {
        let wanted: Vec<PartitionKey> = views
            .iter()
            .filter(|v| (v.status == "missing" || v.status == "stale") && v.rebuild.is_none())
            .filter_map(|v| PartitionKey::parse(&v.partition).ok())
            .collect();
        if !wanted.is_empty() {
            queue::request_now(
                &self.shared.db,
                analysis.name(),
                analysis.version(),
                &wanted,
                queue::Want::Present,
                Duration::ZERO,
                actor,
            )
            .await?;
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        Ok(wanted)
    }
}

fn view(
    partition: String,
    stored: Option<Arc<Stored>>,
    state: Option<&QueueState>,
    version: i64,
) -> PartitionView {
    let queue_state = state.map(|s| s.state.as_str());
    let (status, rebuild, error) = match (&stored, queue_state) {
        (_, Some("failed")) => ("failed", None, state.and_then(|s| s.error.clone())),
        (None, Some("queued")) => ("queued", None, None),
        (None, Some("running")) => ("running", None, None),
        (None, _) => ("missing", None, None),
        (Some(_), Some("queued")) => ("stale", Some("queued"), None),
        (Some(_), Some("running")) => ("stale", Some("running"), None),
        (Some(_), Some(_)) => ("stale", None, None),
        (Some(s), None) if s.version != version => ("stale", None, None),
        (Some(_), None) => ("ready", None, None),
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

type AnnotationRow = (String, i64, i64, DateTime<Utc>, i64, i64, String, String);

async fn load_range(
    db: &Database,
    analysis: &str,
    first: &str,
    last: &str,
) -> scholia_analytics::Result<HashMap<String, Arc<Stored>>> {
    let sql = "SELECT partition, version, generation, computed_at, input_rows, input_seq, columns, rows \
               FROM annotations WHERE analysis = $1 AND partition >= $2 AND partition <= $3";
    let rows: Vec<AnnotationRow> = match db {
        Database::Postgres(pg) => {
            sqlx::query_as(sql)
                .bind(analysis)
                .bind(first)
                .bind(last)
                .fetch_all(&pg.pool)
                .await?
        }
        Database::Sqlite(d) => {
            sqlx::query_as(sql)
                .bind(analysis)
                .bind(first)
                .bind(last)
                .fetch_all(&d.pool)
                .await?
        }
    };
    let mut out = HashMap::with_capacity(rows.len());
    for (partition, version, generation, computed_at, input_rows, input_seq, columns, rows) in rows
    {
        let rows = RawValue::from_string(rows)
            .map_err(|e| scholia_analytics::Error::Compute(e.to_string()))?;
        let columns = serde_json::from_str(&columns).unwrap_or_default();
        out.insert(
            partition,
            Arc::new(Stored {
                version,
                generation,
                computed_at,
                input_rows,
                input_seq,
                columns,
                rows,
            }),
        );
    }
    Ok(out)
}
