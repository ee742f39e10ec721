//! Handlers of the cache role: annotations, lineage and the event log.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::envelope::format_time;
use scholia_events::status::PartitionStatus;
use scholia_events::{Granularity, LoggedEvent, PartitionKey};
use scholia_http::{ApiError, ApiResult, AppJson, AppPath, AppQuery, Reader, parse_range};

use crate::{AnnotationCache, PartitionView, formats};

pub fn router(cache: AnnotationCache) -> Router {
    Router::new()
        .route("/v1/annotations/{analysis}", get(get_annotations))
        .route("/v1/lineage/{data_id}", get(lineage))
        .route("/v1/log", get(read_log))
        .with_state(cache)
}

#[derive(Debug, Deserialize)]
struct AnnotationQuery {
    from: Option<String>,
    to: Option<String>,
    wait: Option<String>,
    format: Option<String>,
}

/// The longest `wait=` honoured.
const MAX_WAIT_SECONDS: f64 = 300.0;

/// Parse `wait=SECONDS`: a number from 0 to 300.
fn parse_wait(text: Option<&str>) -> ApiResult<Option<Duration>> {
    let Some(text) = text else { return Ok(None) };
    match text.parse::<f64>() {
        Ok(seconds) if (0.0..=MAX_WAIT_SECONDS).contains(&seconds) => {
            Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds)))
        }
        _ => Err(ApiError::bad_request(format!(
            "wait={text} is not a number of seconds from 0 to {MAX_WAIT_SECONDS}."
        ))),
    }
}

/// The answer of `GET /v1/annotations/{analysis}`.
#[derive(Serialize)]
struct AnnotationsBody<'a> {
    analysis: &'a str,
    version: i64,
    partitions: &'a [PartitionView],
}

async fn get_annotations(
    Reader(token): Reader,
    State(cache): State<AnnotationCache>,
    AppPath(name): AppPath<String>,
    AppQuery(q): AppQuery<AnnotationQuery>,
) -> ApiResult<Response> {
    let (from, to) = parse_range(q.from.as_deref(), q.to.as_deref())?;
    let format = q.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "arrow") {
        return Err(ApiError::bad_request(format!(
            "format={format} is not offered; use json, csv or arrow."
        )));
    }
    let wait = parse_wait(q.wait.as_deref())?;
    let meta = cache.catalog.find(&name).await?;
    let mut views = cache.read(&meta, from, to).await?;
    if let Some(wait) = wait {
        views = wait_for(
            &cache,
            &meta,
            from,
            to,
            views,
            Instant::now() + wait,
            &token.actor(),
        )
        .await?;
    }
    match format {
        "csv" => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            formats::csv(&views),
        )
            .into_response()),
        "arrow" => {
            let bytes = tokio::task::spawn_blocking(move || formats::arrow(&views))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
            Ok((
                [(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")],
                Body::from(bytes),
            )
                .into_response())
        }
        _ => {
            // Serialized straight from the views: stored rows are raw JSON, copied as is.
            let body = AnnotationsBody {
                analysis: &meta.name,
                version: meta.version,
                partitions: &views,
            };
            Ok(axum::Json(body).into_response())
        }
    }
}

/// Request what is missing, then read again on every change until all is ready,
/// something failed for good, the deadline passes, or the process stops.
async fn wait_for(
    cache: &AnnotationCache,
    meta: &AnalysisMeta,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut views: Vec<PartitionView>,
    deadline: Instant,
    actor: &str,
) -> ApiResult<Vec<PartitionView>> {
    let mut changes = cache.changes();
    let shutdown = cache.core.supervisor.shutdown().clone();
    cache.request_missing(meta, &views, actor).await?;
    loop {
        let settled = views
            .iter()
            .all(|v| v.is_ready() || v.status == PartitionStatus::Failed);
        if settled || Instant::now() >= deadline || shutdown.is_cancelled() {
            return Ok(views);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = changes.recv() => {}
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(remaining.min(Duration::from_millis(250))) => {}
        }
        views = cache.read(meta, from, to).await?;
        if views.iter().any(PartitionView::needs_request) {
            cache.request_missing(meta, &views, actor).await?;
        }
    }
}

/// One annotation built from a record.
#[derive(Serialize)]
struct LineageEntry {
    analysis: String,
    version: i64,
    partition: PartitionKey,
    generation: i64,
    computed_at: String,
    current_version: bool,
    /// The upstream analysis it was built through; absent when built from the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
}

#[derive(Serialize)]
struct Pending {
    analysis: String,
    partition: PartitionKey,
}

#[derive(Serialize)]
struct Lineage {
    data_id: Uuid,
    kind: String,
    created: String,
    seq: i64,
    partition: PartitionKey,
    partitions: Partitions,
    annotations: Vec<LineageEntry>,
    not_yet_built: Vec<Pending>,
}

#[derive(Serialize)]
struct Partitions {
    #[serde(rename = "1d")]
    day: PartitionKey,
    #[serde(rename = "1h")]
    hour: PartitionKey,
}

/// How many analyses deep lineage follows the graph.
const MAX_LINEAGE_DEPTH: usize = 8;

async fn lineage(
    Reader(_): Reader,
    State(cache): State<AnnotationCache>,
    AppPath(data_id): AppPath<String>,
) -> ApiResult<axum::Json<Lineage>> {
    let id = Uuid::parse_str(&data_id)
        .map_err(|_| ApiError::bad_request(format!("{data_id:?} is not a UUID.")))?;
    let store = &cache.core.store;
    let record = store
        .records
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No record has data_id {id}.")))?;
    let kind = record.envelope.kind.clone();
    let created = record.envelope.created;
    let hour = Granularity::Hour.partition_of(created);

    // Built from the record directly, then through every analysis downstream of those.
    let mut annotations = Vec::new();
    let mut seen = BTreeSet::new();
    let mut frontier: Vec<(InputSource, String, i64, Option<String>)> = vec![(
        InputSource::Kind(kind.clone()),
        hour.to_string(),
        record.seq,
        None,
    )];
    for _ in 0..MAX_LINEAGE_DEPTH {
        let mut next = Vec::new();
        for (input, key, seq, via) in frontier {
            for found in store.annotations.readers(&input, &key, seq).await? {
                if !seen.insert(found.clone()) {
                    continue;
                }
                let Some(meta) = cache.catalog.get(&found.analysis) else {
                    continue;
                };
                let stored = cache.stored(&found.analysis, &[found.partition]).await?;
                let Some(stored) = stored.get(&found.partition) else {
                    continue;
                };
                annotations.push(LineageEntry {
                    analysis: found.analysis.clone(),
                    version: stored.version,
                    partition: found.partition,
                    generation: stored.generation,
                    computed_at: format_time(stored.computed_at),
                    current_version: stored.version == meta.version,
                    via: via.clone(),
                });
                next.push((
                    InputSource::Analysis(found.analysis.clone()),
                    found.partition.to_string(),
                    stored.committed_seq,
                    Some(found.analysis.clone()),
                ));
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    annotations.sort_by(|a, b| (&a.analysis, a.partition).cmp(&(&b.analysis, b.partition)));

    let built: BTreeSet<&str> = annotations.iter().map(|a| a.analysis.as_str()).collect();
    let mut not_yet_built: Vec<Pending> = cache
        .catalog
        .readers(&InputSource::Kind(kind.clone()))
        .iter()
        .filter(|meta| !built.contains(meta.name.as_str()))
        .map(|meta| Pending {
            analysis: meta.name.clone(),
            partition: meta.partition.partition_of(created),
        })
        .collect();
    not_yet_built.sort_by(|a, b| a.analysis.cmp(&b.analysis));
    Ok(axum::Json(Lineage {
        data_id: id,
        kind,
        created: format_time(created),
        seq: record.seq,
        partition: Granularity::Day.partition_of(created),
        partitions: Partitions {
            day: Granularity::Day.partition_of(created),
            hour,
        },
        annotations,
        not_yet_built,
    }))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct LogPage {
    events: Vec<LoggedEvent>,
    next_after: Option<i64>,
}

async fn read_log(
    Reader(_): Reader,
    State(cache): State<AnnotationCache>,
    AppQuery(q): AppQuery<LogQuery>,
) -> ApiResult<AppJson<LogPage>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be from 1 to 10000."));
    }
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("after must be a seq, 0 or more."));
    }
    let events = cache
        .core
        .store
        .log
        .read_after(after, limit as usize)
        .await?;
    let next_after = events.last().map(|e| e.seq).or(q.after);
    Ok(AppJson(LogPage { events, next_after }))
}
