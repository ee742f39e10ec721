//! Handlers of the cache role: annotations, lineage and the event log, and their part of
//! the OpenAPI document ([`AnnotationCache::openapi`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::envelope::format_time;
use scholia_events::status::{BuildState, PartitionStatus};
use scholia_events::{Granularity, LoggedEvent, PartitionKey};
use scholia_http::{ApiError, ApiResult, AppJson, AppPath, AppQuery, Reader, parse_range};

use crate::{AnnotationCache, PartitionView, Rendered, formats};

pub fn router(cache: AnnotationCache) -> Router {
    Router::new()
        .route("/v1/annotations/{analysis}", get(get_annotations))
        .route("/v1/lineage/{data_id}", get(lineage))
        .route("/v1/log", get(read_log))
        .with_state(cache)
}

#[derive(OpenApi)]
#[openapi(
    paths(get_annotations, lineage, read_log),
    tags(
        (name = "annotations", description = "What analyses computed, per partition, with the truth about each: ready, stale, missing, queued, running or failed."),
        (name = "lineage", description = "Which annotations a record went into."),
        (name = "log", description = "The event log, for replay and audit.")
    )
)]
struct CacheDoc;

impl AnnotationCache {
    /// The OpenAPI document of the cache role's own endpoints (analytics adds the others).
    pub fn openapi() -> utoipa::openapi::OpenApi {
        CacheDoc::openapi()
    }
}

#[derive(Debug, Deserialize)]
struct AnnotationQuery {
    from: Option<String>,
    to: Option<String>,
    wait: Option<String>,
    format: Option<String>,
}

/// Written out: `from` and `to` are read as text but are dates or times, and the derive
/// drops the descriptions and `required` of fields whose schema it is given.
impl IntoParams for AnnotationQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        use scholia_http::openapi::instant_parameter;
        let query = |name: &str, description: &str, schema: ObjectBuilder| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(schema))
                .build()
        };
        vec![
            instant_parameter("from", "The start of the range (inclusive)."),
            instant_parameter("to", "The end of the range (exclusive)."),
            query(
                "wait",
                "Request what is missing, and answer when every partition is ready (or failed) or after this many seconds, from 0 to 300.",
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(0))
                    .maximum(Some(MAX_WAIT_SECONDS)),
            ),
            query(
                "format",
                "How to answer: `json` (the default), `csv` (a header, then one line per row with its partition and generation) or `arrow` (an Arrow IPC stream of the same columns).",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["json", "csv", "arrow"]))
                    .default(Some("json".into())),
            ),
        ]
    }
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
#[derive(Serialize, ToSchema)]
struct AnnotationsBody<'a> {
    analysis: &'a str,
    /// The analysis' current version.
    version: i64,
    /// Every partition of the range, in order.
    #[schema(value_type = Vec<PartitionDoc>)]
    partitions: &'a [PartitionView],
}

/// One partition of an analysis, as [`PartitionView`] serializes it.
// Only a schema: `PartitionView` lives in `lib.rs`; tests/e2e/openapi.rs checks real answers
// against this.
#[derive(ToSchema)]
#[schema(as = Partition)]
#[allow(dead_code)]
struct PartitionDoc {
    partition: PartitionKey,
    status: PartitionStatus,
    /// For a stale partition with a rebuild under way: queued or running.
    rebuild: Option<BuildState>,
    /// Why its builds failed (status `failed`).
    error: Option<String>,
    /// The version that built the rows (null when never built).
    version: Option<i64>,
    /// Which build of the partition this is, counting from 1.
    generation: Option<i64>,
    #[schema(value_type = Option<String>, format = DateTime)]
    computed_at: Option<String>,
    /// The rows, one object per row, column to value; empty when never built.
    #[schema(value_type = Vec<Object>)]
    rows: Vec<serde_json::Value>,
}

/// Annotations of a range.
///
/// Every partition of `[from, to)`, with its status and rows.
#[utoipa::path(
    get,
    path = "/v1/annotations/{analysis}",
    tag = "annotations",
    security(("bearer" = [])),
    params(
        ("analysis" = String, Path, description = "The analysis' name.", example = "daily_avg"),
        AnnotationQuery
    ),
    responses(
        (status = 200, description = "The partitions, in the format asked for.", content(
            (AnnotationsBody = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream")
        ))
    )
)]
async fn get_annotations(
    Reader(token): Reader,
    State(cache): State<AnnotationCache>,
    AppPath(name): AppPath<String>,
    AppQuery(q): AppQuery<AnnotationQuery>,
) -> ApiResult<Response> {
    let (from, to) = parse_range(q.from.as_deref(), q.to.as_deref())?;
    let format = match q.format.as_deref().unwrap_or("json") {
        "json" => "json",
        "csv" => "csv",
        "arrow" => "arrow",
        other => {
            return Err(ApiError::bad_request(format!(
                "format={other} is not offered; use json, csv or arrow."
            )));
        }
    };
    let wait = parse_wait(q.wait.as_deref())?;
    let meta = cache.catalog().find(&name).await?;
    // The same read answered again while nothing changed costs no rendering.
    let shape = cache.read_shape(&meta.name, from, to, format);
    if let Some(rendered) = cache.rendered(&shape).await
        && (wait.is_none() || rendered.settled)
    {
        return Ok(respond(rendered));
    }
    let mut views = cache.read(&meta, from, to).await?;
    let mut keep = true;
    if let Some(wait) = wait
        && !settled(&views)
    {
        // What a wait ends with was read under a later epoch than `shape`'s.
        keep = false;
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
    let rendered = render(&meta, format, views).await?;
    if keep {
        cache.keep_rendered(shape, rendered.clone()).await;
    }
    Ok(respond(rendered))
}

fn respond(rendered: Rendered) -> Response {
    (
        [(header::CONTENT_TYPE, rendered.content_type)],
        Body::from(rendered.body),
    )
        .into_response()
}

/// Whether every partition is ready or failed for good: nothing left to wait for.
fn settled(views: &[PartitionView]) -> bool {
    views
        .iter()
        .all(|v| v.is_ready() || v.status == PartitionStatus::Failed)
}

async fn render(
    meta: &AnalysisMeta,
    format: &'static str,
    views: Vec<PartitionView>,
) -> ApiResult<Rendered> {
    let settled = settled(&views);
    let (body, content_type) = match format {
        "csv" => (Bytes::from(formats::csv(&views)), "text/csv; charset=utf-8"),
        "arrow" => {
            let bytes = tokio::task::spawn_blocking(move || formats::arrow(&views))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
            (Bytes::from(bytes), "application/vnd.apache.arrow.stream")
        }
        _ => {
            // Serialized straight from the views: stored rows are raw JSON, copied as is.
            let body = AnnotationsBody {
                analysis: &meta.name,
                version: meta.version,
                partitions: &views,
            };
            let json = serde_json::to_vec(&body).map_err(ApiError::internal)?;
            (Bytes::from(json), "application/json")
        }
    };
    Ok(Rendered {
        body,
        content_type,
        settled,
    })
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
    let shutdown = cache.core().supervisor.shutdown().clone();
    cache.request_missing(meta, &views, actor).await?;
    loop {
        if settled(&views) || Instant::now() >= deadline || shutdown.is_cancelled() {
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
#[derive(Serialize, ToSchema)]
struct LineageEntry {
    analysis: String,
    version: i64,
    partition: PartitionKey,
    generation: i64,
    #[schema(format = DateTime)]
    computed_at: String,
    /// Whether it was built by the analysis' current version.
    current_version: bool,
    /// The upstream analysis it was built through; absent when built from the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
}

/// An analysis that reads the record's kind but has not built its partition yet.
#[derive(Serialize, ToSchema)]
struct Pending {
    analysis: String,
    partition: PartitionKey,
}

/// Where a record went: its partitions, and the annotations built from it.
#[derive(Serialize, ToSchema)]
struct Lineage {
    data_id: Uuid,
    kind: String,
    #[schema(format = DateTime)]
    created: String,
    seq: i64,
    /// Its day.
    partition: PartitionKey,
    partitions: Partitions,
    /// Every annotation built from it, directly or through upstream analyses.
    annotations: Vec<LineageEntry>,
    not_yet_built: Vec<Pending>,
}

/// The partitions a record falls in, by granularity.
#[derive(Serialize, ToSchema)]
struct Partitions {
    #[serde(rename = "1d")]
    day: PartitionKey,
    #[serde(rename = "1h")]
    hour: PartitionKey,
}

/// How many analyses deep lineage follows the graph.
const MAX_LINEAGE_DEPTH: usize = 8;

/// Lineage of a record.
///
/// Its partitions, and every annotation (analysis, version, generation) built from it,
/// directly or through upstream analyses (with `via`).
#[utoipa::path(
    get,
    path = "/v1/lineage/{data_id}",
    tag = "lineage",
    security(("bearer" = [])),
    params(("data_id" = Uuid, Path, description = "The record's id.")),
    responses((status = 200, description = "The record's lineage.", body = Lineage))
)]
async fn lineage(
    Reader(_reader): Reader,
    State(cache): State<AnnotationCache>,
    AppPath(data_id): AppPath<String>,
) -> ApiResult<axum::Json<Lineage>> {
    let id = Uuid::parse_str(&data_id)
        .map_err(|_| ApiError::bad_request(format!("{data_id:?} is not a UUID.")))?;
    let store = &cache.core().store;
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
                let Some(meta) = cache.catalog().get(&found.analysis) else {
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
        .catalog()
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Events after this seq (0, the default, for the start).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// How many events, from 1 to 10000 (100 when left out).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// A page of the event log.
#[derive(Serialize, ToSchema)]
struct LogPage {
    events: Vec<LoggedEvent>,
    /// Pass as `after` for the next page.
    next_after: Option<i64>,
}

/// The event log, in seq order.
#[utoipa::path(
    get,
    path = "/v1/log",
    tag = "log",
    security(("bearer" = [])),
    params(LogQuery),
    responses((status = 200, description = "A page of events.", body = LogPage))
)]
async fn read_log(
    Reader(_reader): Reader,
    State(cache): State<AnnotationCache>,
    AppQuery(q): AppQuery<LogQuery>,
) -> ApiResult<AppJson<LogPage>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request(
            "Give limit as a number from 1 to 10000.",
        ));
    }
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("Give after as a seq, 0 or more."));
    }
    let events = cache
        .core()
        .store
        .log
        .read_after(after, limit as usize)
        .await?;
    let next_after = events.last().map(|e| e.seq).or(q.after);
    Ok(AppJson(LogPage { events, next_after }))
}
