//! Handlers of analytics' endpoints, which a process serves with the cache role:
//! analyses, invalidations and schedules, and their part of the OpenAPI document
//! ([`AnalyticsState::openapi`]).

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use scholia_annotation_cache::AnnotationCache;
use scholia_events::Granularity;
use scholia_events::analysis::{AnalysisMeta, Input, Language};
use scholia_events::status::Rebuild;
use scholia_events::store::Progress;
use scholia_http::{Admin, ApiError, ApiResult, AppJson, AppPath, Core, Reader, parse_range};

use crate::invalidation;
use crate::registry::{Registry, SqlDefinition};
use crate::schedule::{self, Schedule, ScheduleDefinition};

#[derive(OpenApi)]
#[openapi(
    paths(
        list_analyses,
        get_analysis,
        put_analysis,
        create_invalidation,
        list_invalidations,
        get_invalidation,
        cancel_invalidation,
        list_schedules,
        get_schedule,
        put_schedule
    ),
    tags(
        (name = "analyses", description = "Registered analyses: built in, or SQL registered at run time."),
        (name = "invalidations", description = "Rebuilds of a date range of one analysis or all of them, and their progress."),
        (name = "schedules", description = "Preemptive rebuilds: a cron in UTC and a window ending at each firing.")
    )
)]
struct AnalyticsDoc;

/// The state of analytics' endpoints.
#[derive(Clone)]
pub struct AnalyticsState {
    pub registry: Registry,
    pub cache: AnnotationCache,
}

impl AnalyticsState {
    /// The OpenAPI document of analytics' endpoints.
    pub fn openapi() -> utoipa::openapi::OpenApi {
        AnalyticsDoc::openapi()
    }
}

impl FromRef<AnalyticsState> for Core {
    fn from_ref(state: &AnalyticsState) -> Core {
        state.cache.core().clone()
    }
}

pub fn router(state: AnalyticsState) -> Router {
    Router::new()
        .route("/v1/analyses", get(list_analyses))
        .route("/v1/analyses/{name}", get(get_analysis).put(put_analysis))
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
        .with_state(state)
}

/// An analysis as the API shows it.
#[derive(Serialize, ToSchema)]
struct AnalysisView {
    name: String,
    /// Changes whenever its computation (or an upstream analysis' version) changes.
    version: i64,
    /// The first kind it reads (null when it reads only other analyses).
    kind: Option<String>,
    partition: Granularity,
    inputs: Vec<Input>,
    /// The analyses that read this one's annotations.
    downstream: Vec<String>,
    description: String,
    language: Language,
    /// The query of a SQL analysis.
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<String>,
    #[schema(value_type = String, pattern = "^active$")]
    status: &'static str,
}

fn view(registry: &Registry, meta: &AnalysisMeta) -> AnalysisView {
    let mut downstream: Vec<String> = registry
        .downstream(&meta.name)
        .iter()
        .map(|m| m.name.clone())
        .collect();
    downstream.sort();
    AnalysisView {
        name: meta.name.clone(),
        version: meta.version,
        kind: meta.kind().map(str::to_string),
        partition: meta.partition,
        inputs: meta.inputs.clone(),
        downstream,
        description: meta.description.clone(),
        language: meta.language,
        sql: meta.sql.clone(),
        status: "active",
    }
}

#[derive(Serialize, ToSchema)]
struct AnalysisList {
    analyses: Vec<AnalysisView>,
}

/// Every registered analysis.
#[utoipa::path(
    get,
    path = "/v1/analyses",
    tag = "analyses",
    security(("bearer" = [])),
    responses((status = 200, description = "The analyses.", body = AnalysisList))
)]
async fn list_analyses(
    Reader(_reader): Reader,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<AnalysisList>> {
    let metas = state.registry.catalog().list();
    Ok(Json(AnalysisList {
        analyses: metas.iter().map(|m| view(&state.registry, m)).collect(),
    }))
}

/// One analysis.
#[utoipa::path(
    get,
    path = "/v1/analyses/{name}",
    tag = "analyses",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The analysis' name.", example = "daily_avg")),
    responses((status = 200, description = "The analysis.", body = AnalysisView))
)]
async fn get_analysis(
    Reader(_reader): Reader,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<AnalysisView>> {
    let meta = state.registry.catalog().find(&name).await?;
    Ok(Json(view(&state.registry, &meta)))
}

/// A SQL analysis as an admin submits it: one kind (`kind`), or several inputs (`inputs`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "generation", "partition": "1d", "sql": "SELECT source, AVG(output_mw) AS avg_mw FROM generation GROUP BY source", "description": "Daily average output per station"}))]
struct AnalysisDefinition {
    /// The one kind it reads (give this or `inputs`).
    #[serde(default)]
    kind: Option<String>,
    /// What it reads: kinds' records (with an optional lookback before the partition) and
    /// other analyses' annotations, each a table of the query.
    #[serde(default)]
    inputs: Option<Vec<Input>>,
    /// How it cuts time (default `1d`).
    #[serde(default)]
    #[schema(schema_with = granularity_written)]
    partition: Option<Granularity>,
    /// One SELECT over its inputs' tables; it can read nothing else.
    sql: String,
    /// At most 2,000 characters.
    #[serde(default)]
    description: String,
    /// Accepted for files that list analyses with their names; it must be the path's.
    #[serde(default)]
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    name: Option<String>,
}

/// A granularity as a definition may write it: `1d` or `1h`, or `day` or `hour`.
fn granularity_written() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::String, Type::Null]))
        .enum_values(Some([
            Some("1d"),
            Some("1h"),
            Some("day"),
            Some("hour"),
            None,
        ]))
        .description(Some(
            "`1d` (UTC days, the default) or `1h` (UTC hours); `day` and `hour` are read as those.",
        ))
        .into()
}

impl From<AnalysisDefinition> for SqlDefinition {
    fn from(def: AnalysisDefinition) -> Self {
        SqlDefinition {
            kind: def.kind,
            inputs: def.inputs,
            partition: def.partition,
            sql: def.sql,
            description: def.description,
            name: def.name,
        }
    }
}

/// Register or change a SQL analysis.
///
/// A change bumps its version, and makes downstream annotations stale. SQL that does not
/// compile, an unknown input or a cycle is refused with 422, naming the problem.
#[utoipa::path(
    put,
    path = "/v1/analyses/{name}",
    tag = "analyses",
    security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[a-z][a-z0-9_-]{0,63}$", description = "The analysis' name: a lowercase letter, then up to 63 lowercase letters, digits, '_' or '-'.", example = "hourly_max")),
    request_body = AnalysisDefinition,
    responses(
        (status = 200, description = "Changed (or already this definition).", body = AnalysisView),
        (status = 201, description = "Registered.", body = AnalysisView)
    )
)]
async fn put_analysis(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppJson(def): AppJson<AnalysisDefinition>,
) -> ApiResult<Response> {
    if let Some(body_name) = &def.name
        && body_name != &name
    {
        return Err(ApiError::invalid(format!(
            "The body names the analysis {body_name:?} but the path names {name:?}; make them agree."
        )));
    }
    let registered = state
        .registry
        .put_sql(&name, def.into(), &token.actor())
        .await?;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state.registry, &registered.meta))).into_response())
}

/// What to invalidate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"analysis": "daily_avg", "from": "2024-05-01", "to": "2024-05-08", "reason": "meter recalibrated", "rebuild": "eager"}))]
struct InvalidationRequest {
    /// An analysis, or `*` for all of them.
    analysis: String,
    /// The start of the range (inclusive).
    #[schema(schema_with = scholia_http::openapi::instant)]
    from: String,
    /// The end of the range (exclusive).
    #[schema(schema_with = scholia_http::openapi::instant)]
    to: String,
    /// Why, for the log (at most 1,000 characters).
    #[serde(default)]
    reason: Option<String>,
    /// `eager` (the default) rebuilds at once; `lazy` when someone next reads the partition.
    #[serde(default)]
    rebuild: Option<Rebuild>,
    /// Also invalidate the downstream partitions that read the invalidated ones (the
    /// default).
    #[serde(default)]
    cascade: Option<bool>,
}

/// Invalidate a range of one analysis or of all of them.
///
/// Its partitions are rebuilt (eagerly or lazily), and annotations read meanwhile are
/// `stale`.
#[utoipa::path(
    post,
    path = "/v1/invalidations",
    tag = "invalidations",
    security(("bearer" = [])),
    request_body = InvalidationRequest,
    responses((status = 202, description = "Recorded; its partitions are queued (or marked stale).", body = Progress))
)]
async fn create_invalidation(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppJson(request): AppJson<InvalidationRequest>,
) -> ApiResult<Response> {
    let (from, to) = parse_range(Some(&request.from), Some(&request.to))?;
    let reason = request.reason.unwrap_or_else(|| "no reason given".into());
    if reason.len() > 1_000 {
        return Err(ApiError::invalid(
            "reason is longer than 1,000 characters; shorten it.",
        ));
    }
    let request = invalidation::Request {
        analysis: request.analysis,
        from,
        to,
        reason,
        rebuild: request.rebuild.unwrap_or(Rebuild::Eager),
        cascade: request.cascade.unwrap_or(true),
        actor: token.actor(),
    };
    let store = &state.cache.core().store;
    let id = invalidation::create(store, state.registry.catalog(), &request).await?;
    let progress = store.invalidations.progress(id).await?;
    Ok((StatusCode::ACCEPTED, Json(progress)).into_response())
}

#[derive(Serialize, ToSchema)]
struct InvalidationList {
    invalidations: Vec<Progress>,
}

/// The most recent invalidations (100), newest first.
#[utoipa::path(
    get,
    path = "/v1/invalidations",
    tag = "invalidations",
    security(("bearer" = [])),
    responses((status = 200, description = "The invalidations and their progress.", body = InvalidationList))
)]
async fn list_invalidations(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<InvalidationList>> {
    let invalidations = state.cache.core().store.invalidations.list(100).await?;
    Ok(Json(InvalidationList { invalidations }))
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not an invalidation id.")))
}

/// An invalidation and how far it got.
#[utoipa::path(
    get,
    path = "/v1/invalidations/{id}",
    tag = "invalidations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The invalidation's id.")),
    responses((status = 200, description = "Its progress.", body = Progress))
)]
async fn get_invalidation(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
    AppPath(id): AppPath<String>,
) -> ApiResult<Json<Progress>> {
    let progress = state
        .cache
        .core()
        .store
        .invalidations
        .progress(parse_id(&id)?)
        .await?;
    Ok(Json(progress))
}

/// Cancel an invalidation.
///
/// No new build starts for it (what runs finishes). It stays listed, as `cancelled`.
#[utoipa::path(
    delete,
    path = "/v1/invalidations/{id}",
    tag = "invalidations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The invalidation's id.")),
    responses((status = 200, description = "Cancelled; its progress.", body = Progress))
)]
async fn cancel_invalidation(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(id): AppPath<String>,
) -> ApiResult<Json<Progress>> {
    let progress = state
        .cache
        .core()
        .store
        .invalidations
        .cancel(parse_id(&id)?, &token.actor())
        .await?;
    Ok(Json(progress))
}

/// A schedule as the API shows it.
#[derive(Serialize, ToSchema)]
struct ScheduleView {
    name: String,
    analysis: String,
    /// Five fields, in UTC.
    cron: String,
    /// An ISO 8601 duration ending at each firing.
    window: String,
    #[schema(format = DateTime)]
    last_fired: Option<String>,
    #[schema(format = DateTime)]
    next_firing: Option<String>,
}

impl From<Schedule> for ScheduleView {
    fn from(s: Schedule) -> Self {
        ScheduleView {
            name: s.name,
            analysis: s.analysis,
            cron: s.cron,
            window: s.window,
            last_fired: s.last_fired,
            next_firing: s.next_firing,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct ScheduleList {
    schedules: Vec<ScheduleView>,
}

/// Every schedule, with its next firing.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    security(("bearer" = [])),
    responses((status = 200, description = "The schedules.", body = ScheduleList))
)]
async fn list_schedules(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<ScheduleList>> {
    let schedules = schedule::list(&state.registry).await?;
    Ok(Json(ScheduleList {
        schedules: schedules.into_iter().map(ScheduleView::from).collect(),
    }))
}

/// One schedule.
#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The schedule's name.", example = "nightly")),
    responses((status = 200, description = "The schedule.", body = ScheduleView))
)]
async fn get_schedule(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<ScheduleView>> {
    let found = schedule::get(&state.registry, &name).await?;
    let found =
        found.ok_or_else(|| ApiError::not_found(format!("No schedule is named {name:?}.")))?;
    Ok(Json(found.into()))
}

/// A schedule to create or change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"analysis": "daily_avg", "cron": "0 1 * * *", "window": "P7D"}))]
struct ScheduleDefinitionBody {
    /// The analysis to rebuild.
    analysis: String,
    /// Five fields (minute hour day-of-month month day-of-week), in UTC.
    #[schema(example = "0 1 * * *")]
    cron: String,
    /// How far back from each firing to rebuild: an ISO 8601 duration of at most a year.
    #[schema(
        pattern = r"^P(\d+W)?(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?$",
        example = "P7D"
    )]
    window: String,
    /// Accepted for files that list schedules with their names.
    #[serde(default)]
    name: Option<String>,
}

impl From<ScheduleDefinitionBody> for ScheduleDefinition {
    fn from(def: ScheduleDefinitionBody) -> Self {
        ScheduleDefinition {
            analysis: def.analysis,
            cron: def.cron,
            window: def.window,
            name: def.name,
        }
    }
}

/// Create or change a schedule.
///
/// Each firing invalidates its window eagerly.
#[utoipa::path(
    put,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The schedule's name: 1 to 64 letters, digits, '-' or '_'.", example = "nightly")),
    request_body = ScheduleDefinitionBody,
    responses((status = 200, description = "The schedule as it is now.", body = ScheduleView))
)]
async fn put_schedule(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppJson(def): AppJson<ScheduleDefinitionBody>,
) -> ApiResult<Json<ScheduleView>> {
    let saved = schedule::put(&state.registry, &name, def.into(), &token.actor()).await?;
    Ok(Json(saved.into()))
}
