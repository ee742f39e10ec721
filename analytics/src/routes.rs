//! Handlers of analytics' endpoints, which a process serves with the cache role:
//! analyses, invalidations and schedules.

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
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

/// The state of analytics' endpoints.
#[derive(Clone)]
pub struct AnalyticsState {
    pub registry: Registry,
    pub cache: AnnotationCache,
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
#[derive(Serialize)]
struct AnalysisView {
    name: String,
    version: i64,
    /// The first kind it reads (null when it reads only other analyses).
    kind: Option<String>,
    partition: Granularity,
    inputs: Vec<Input>,
    /// The analyses that read this one's annotations.
    downstream: Vec<String>,
    description: String,
    language: Language,
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<String>,
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

#[derive(Serialize)]
struct AnalysisList {
    analyses: Vec<AnalysisView>,
}

async fn list_analyses(
    Reader(_): Reader,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<AnalysisList>> {
    let metas = state.registry.catalog().list();
    Ok(Json(AnalysisList {
        analyses: metas.iter().map(|m| view(&state.registry, m)).collect(),
    }))
}

async fn get_analysis(
    Reader(_): Reader,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<AnalysisView>> {
    let meta = state.registry.catalog().find(&name).await?;
    Ok(Json(view(&state.registry, &meta)))
}

async fn put_analysis(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppJson(def): AppJson<SqlDefinition>,
) -> ApiResult<Response> {
    if let Some(body_name) = &def.name
        && body_name != &name
    {
        return Err(ApiError::bad_request(format!(
            "The body names the analysis {body_name:?} but the path names {name:?}; make them agree."
        )));
    }
    let registered = state.registry.put_sql(&name, def, &token.actor()).await?;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state.registry, &registered.meta))).into_response())
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
    rebuild: Option<Rebuild>,
}

async fn create_invalidation(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppJson(request): AppJson<InvalidationRequest>,
) -> ApiResult<Response> {
    let (from, to) = parse_range(Some(&request.from), Some(&request.to))?;
    let reason = request.reason.unwrap_or_else(|| "no reason given".into());
    if reason.len() > 1_000 {
        return Err(ApiError::bad_request(
            "reason is longer than 1,000 characters.",
        ));
    }
    let request = invalidation::Request {
        analysis: request.analysis,
        from,
        to,
        reason,
        rebuild: request.rebuild.unwrap_or(Rebuild::Eager),
        actor: token.actor(),
    };
    let store = &state.cache.core().store;
    let id = invalidation::create(store, state.registry.catalog(), &request).await?;
    let progress = store.invalidations.progress(id).await?;
    Ok((StatusCode::ACCEPTED, Json(progress)).into_response())
}

#[derive(Serialize)]
struct InvalidationList {
    invalidations: Vec<Progress>,
}

async fn list_invalidations(
    Admin(_): Admin,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<InvalidationList>> {
    let invalidations = state.cache.core().store.invalidations.list(100).await?;
    Ok(Json(InvalidationList { invalidations }))
}

fn parse_id(id: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not an invalidation id.")))
}

async fn get_invalidation(
    Admin(_): Admin,
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

#[derive(Serialize)]
struct ScheduleList {
    schedules: Vec<Schedule>,
}

async fn list_schedules(
    Admin(_): Admin,
    State(state): State<AnalyticsState>,
) -> ApiResult<Json<ScheduleList>> {
    Ok(Json(ScheduleList {
        schedules: schedule::list(&state.registry).await?,
    }))
}

async fn get_schedule(
    Admin(_): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<Schedule>> {
    let found = schedule::get(&state.registry, &name).await?;
    Ok(Json(found.ok_or_else(|| {
        ApiError::not_found(format!("No schedule is named {name:?}."))
    })?))
}

async fn put_schedule(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppJson(def): AppJson<ScheduleDefinition>,
) -> ApiResult<Json<Schedule>> {
    let saved = schedule::put(&state.registry, &name, def, &token.actor()).await?;
    Ok(Json(saved))
}
