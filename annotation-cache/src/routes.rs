//! Handlers of the cache role: analyses, annotations, invalidations, schedules, lineage
//! and the event log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use scholia_analytics::registry::SqlDefinition;
use scholia_analytics::schedule::{self, ScheduleDefinition};
use scholia_analytics::{Analysis, Error as AnalyticsError, invalidation};
use scholia_events::auth::Scope;
use scholia_events::envelope::format_time;
use scholia_events::error::DbContext;
use scholia_events::partition::parse_instant;
use scholia_events::{Database, Granularity, log};
use scholia_ingest::{ApiError, ApiResult, AppJson};

use crate::{AnnotationCache, PartitionView, formats};

pub fn router(cache: AnnotationCache) -> Router {
    Router::new()
        .route("/v1/analyses", get(list_analyses))
        .route("/v1/analyses/{name}", get(get_analysis).put(put_analysis))
        .route("/v1/annotations/{analysis}", get(get_annotations))
        .route(
            "/v1/invalidations",
            post(create_invalidation).get(list_invalidations),
        )
        .route(
            "/v1/invalidations/{id}",
            get(get_invalidation).delete(cancel_invalidation),
        )
        .route("/v1/schedules", get(list_schedules))
        .route("/v1/schedules/{name}", get(get_schedule).put(put_schedule))
        .route("/v1/lineage/{data_id}", get(lineage))
        .route("/v1/log", get(read_log))
        .with_state(cache)
}

/// Map an analytics error to the problem a client sees.
pub(crate) fn problem(error: AnalyticsError) -> ApiError {
    match error {
        AnalyticsError::Events(e) => ApiError::from(e),
        AnalyticsError::Invalid(detail) => ApiError::unprocessable(capitalize(&detail)),
        AnalyticsError::UnknownAnalysis(name) => ApiError::not_found(format!(
            "No analysis is named {name:?}; GET /v1/analyses lists them."
        )),
        AnalyticsError::NotFound(detail) => ApiError::not_found(capitalize(&detail)),
        AnalyticsError::Conflict(detail) => ApiError::conflict(capitalize(&detail)),
        AnalyticsError::Compute(detail) => ApiError::internal(detail),
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default();
    out.push_str(chars.as_str());
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

async fn list_analyses(
    State(cache): State<AnnotationCache>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    Ok(Json(json!({ "analyses": cache.registry.list() })))
}

async fn get_analysis(
    State(cache): State<AnnotationCache>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let analysis = cache.registry.find(&name).await.map_err(problem)?;
    Ok(Json(json!(scholia_analytics::AnalysisInfo::of(&*analysis))))
}

async fn put_analysis(
    State(cache): State<AnnotationCache>,
    Path(name): Path<String>,
    headers: HeaderMap,
    AppJson(def): AppJson<SqlDefinition>,
) -> ApiResult<Response> {
    let token = cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    if let Some(body_name) = &def.name
        && body_name != &name
    {
        return Err(ApiError::bad_request(format!(
            "The body names the analysis {body_name:?} but the path names {name:?}; make them agree."
        )));
    }
    let existed = cache.registry.get(&name).is_some();
    let (info, _changed) = cache
        .registry
        .put_sql(&name, def, &token.actor())
        .await
        .map_err(problem)?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!(info))).into_response())
}

#[derive(Debug, Deserialize)]
struct AnnotationQuery {
    from: Option<String>,
    to: Option<String>,
    wait: Option<f64>,
    format: Option<String>,
}

/// Parse `from` and `to` (both required).
pub(crate) fn parse_range(
    from: Option<&str>,
    to: Option<&str>,
) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let from = from.ok_or_else(|| {
        ApiError::bad_request("Give the range start as from=YYYY-MM-DD (or an RFC 3339 time).")
    })?;
    let to = to.ok_or_else(|| {
        ApiError::bad_request(
            "Give the range end as to=YYYY-MM-DD (or an RFC 3339 time); ranges are half-open.",
        )
    })?;
    let from = parse_instant(from).map_err(|e| ApiError::bad_request(capitalize(&e)))?;
    let to = parse_instant(to).map_err(|e| ApiError::bad_request(capitalize(&e)))?;
    if to <= from {
        return Err(ApiError::bad_request(
            "The range is empty: \"to\" must come after \"from\" (ranges are half-open).",
        ));
    }
    Ok((from, to))
}

/// The answer of `GET /v1/annotations/{analysis}`.
#[derive(Serialize)]
struct AnnotationsBody<'a> {
    analysis: &'a str,
    version: i64,
    partitions: &'a [PartitionView],
}

/// The longest `wait=` honoured.
const MAX_WAIT: Duration = Duration::from_secs(300);

async fn get_annotations(
    State(cache): State<AnnotationCache>,
    Path(name): Path<String>,
    Query(q): Query<AnnotationQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let token = cache
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let (from, to) = parse_range(q.from.as_deref(), q.to.as_deref())?;
    let format = q.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "arrow") {
        return Err(ApiError::bad_request(format!(
            "format={format} is not offered; use json, csv or arrow."
        )));
    }
    let analysis = cache.registry.find(&name).await.map_err(problem)?;
    let mut views = cache.read(&analysis, from, to).await.map_err(problem)?;
    if let Some(wait) = q.wait.filter(|w| *w > 0.0) {
        let deadline = Instant::now() + Duration::from_secs_f64(wait).min(MAX_WAIT);
        views = wait_for(&cache, &analysis, from, to, views, deadline, &token.actor()).await?;
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
                analysis: analysis.name(),
                version: analysis.version(),
                partitions: &views,
            };
            Ok(Json(body).into_response())
        }
    }
}

/// Request what is missing, then re-read on every change until all is ready, something
/// failed for good, or the deadline passes.
async fn wait_for(
    cache: &AnnotationCache,
    analysis: &Arc<dyn Analysis>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut views: Vec<PartitionView>,
    deadline: Instant,
    actor: &str,
) -> ApiResult<Vec<PartitionView>> {
    let mut changes = cache.changes();
    cache
        .request_missing(analysis, &views, actor)
        .await
        .map_err(problem)?;
    loop {
        if views.iter().all(|v| v.is_ready() || v.status == "failed") || Instant::now() >= deadline
        {
            return Ok(views);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = changes.recv() => {}
            _ = tokio::time::sleep(remaining.min(Duration::from_millis(250))) => {}
        }
        views = cache.read(analysis, from, to).await.map_err(problem)?;
        if views
            .iter()
            .any(|v| v.status == "missing" || (v.status == "stale" && v.rebuild.is_none()))
        {
            cache
                .request_missing(analysis, &views, actor)
                .await
                .map_err(problem)?;
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidationRequest {
    analysis: String,
    from: String,
    to: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    rebuild: Option<String>,
}

async fn create_invalidation(
    State(cache): State<AnnotationCache>,
    headers: HeaderMap,
    AppJson(request): AppJson<InvalidationRequest>,
) -> ApiResult<Response> {
    let token = cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let (from, to) = parse_range(Some(&request.from), Some(&request.to))?;
    let eager = match request.rebuild.as_deref() {
        None | Some("eager") => true,
        Some("lazy") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "rebuild must be \"eager\" or \"lazy\", not {other:?}."
            )));
        }
    };
    let reason = request.reason.unwrap_or_else(|| "no reason given".into());
    let id = invalidation::create(
        cache.db(),
        &cache.registry,
        &request.analysis,
        from,
        to,
        &reason,
        eager,
        &token.actor(),
    )
    .await
    .map_err(problem)?;
    let progress = invalidation::progress(cache.db(), id)
        .await
        .map_err(problem)?;
    Ok((StatusCode::ACCEPTED, Json(json!(progress))).into_response())
}

async fn list_invalidations(
    State(cache): State<AnnotationCache>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let list = invalidation::list(cache.db(), 100).await.map_err(problem)?;
    Ok(Json(json!({ "invalidations": list })))
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not an invalidation id.")))
}

async fn get_invalidation(
    State(cache): State<AnnotationCache>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let progress = invalidation::progress(cache.db(), parse_id(&id)?)
        .await
        .map_err(problem)?;
    Ok(Json(json!(progress)))
}

async fn cancel_invalidation(
    State(cache): State<AnnotationCache>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let token = cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let progress = invalidation::cancel(cache.db(), parse_id(&id)?, &token.actor())
        .await
        .map_err(problem)?;
    Ok(Json(json!(progress)))
}

async fn list_schedules(
    State(cache): State<AnnotationCache>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    Ok(Json(
        json!({ "schedules": schedule::list(cache.db()).await.map_err(problem)? }),
    ))
}

async fn get_schedule(
    State(cache): State<AnnotationCache>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let found = schedule::get(cache.db(), &name).await.map_err(problem)?;
    Ok(Json(json!(found.ok_or_else(|| ApiError::not_found(
        format!("No schedule is named {name:?}.")
    ))?)))
}

async fn put_schedule(
    State(cache): State<AnnotationCache>,
    Path(name): Path<String>,
    headers: HeaderMap,
    AppJson(def): AppJson<ScheduleDefinition>,
) -> ApiResult<Json<Value>> {
    let token = cache
        .shared
        .auth
        .require(&headers, None, Scope::Admin)
        .await?;
    let saved = schedule::put(cache.db(), &cache.registry, &name, def, &token.actor())
        .await
        .map_err(problem)?;
    Ok(Json(json!(saved)))
}

async fn lineage(
    State(cache): State<AnnotationCache>,
    Path(data_id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let id = Uuid::parse_str(&data_id)
        .map_err(|_| ApiError::bad_request(format!("{data_id:?} is not a UUID.")))?;
    let record: Option<(String, DateTime<Utc>, i64)> = match cache.db() {
        Database::Postgres(pg) => {
            sqlx::query_as("SELECT kind, created, seq FROM records WHERE data_id = $1")
                .bind(id)
                .fetch_optional(&pg.pool)
                .await
                .context("reading a record")?
        }
        Database::Sqlite(d) => sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT kind, created, seq FROM records WHERE data_id = $1",
        )
        .bind(id)
        .fetch_optional(&d.pool)
        .await
        .context("reading a record")?
        .map(|(k, c, s)| (k, DateTime::from_timestamp_micros(c).unwrap_or_default(), s)),
    };
    let (kind, created, seq) =
        record.ok_or_else(|| ApiError::not_found(format!("No record has data_id {id}.")))?;
    let mut annotations = Vec::new();
    let mut pending = Vec::new();
    let mut analyses = cache.registry.for_kind(&kind);
    analyses.sort_by(|a, b| a.name().cmp(b.name()));
    for analysis in analyses {
        let key = analysis.partition().partition_of(created);
        let stored = cache
            .stored(analysis.name(), &[key])
            .await
            .map_err(problem)?;
        match stored.get(&key.to_string()) {
            Some(s) if s.input_seq >= seq => annotations.push(json!({
                "analysis": analysis.name(),
                "version": s.version,
                "partition": key.to_string(),
                "generation": s.generation,
                "computed_at": format_time(s.computed_at),
                "current_version": s.version == analysis.version(),
            })),
            _ => pending.push(json!({"analysis": analysis.name(), "partition": key.to_string()})),
        }
    }
    Ok(Json(json!({
        "data_id": id,
        "kind": kind,
        "created": format_time(created),
        "seq": seq,
        "partition": Granularity::Day.partition_of(created).to_string(),
        "partitions": {"1d": Granularity::Day.partition_of(created).to_string(), "1h": Granularity::Hour.partition_of(created).to_string()},
        "annotations": annotations,
        "not_yet_built": pending,
    })))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn read_log(
    State(cache): State<AnnotationCache>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    cache
        .shared
        .auth
        .require(&headers, None, Scope::Read)
        .await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let events = log::read_after(cache.db(), q.after.unwrap_or(0), limit).await?;
    let next_after = events.last().map(|e| e.seq).or(q.after);
    Ok(Json(json!({ "events": events, "next_after": next_after })))
}
