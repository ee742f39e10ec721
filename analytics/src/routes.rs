//! Handlers of analytics' endpoints, which a process serves with the cache role:
//! analyses (with their build history and candidates), invalidations (with dry runs and
//! retries) and schedules, and their part of the OpenAPI document
//! ([`AnalyticsState::openapi`]).

use std::collections::BTreeMap;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{IntoParams, OpenApi, ToSchema};
use uuid::Uuid;

use scholia_annotation_cache::AnnotationCache;
use scholia_events::analysis::{AnalysisMeta, Input, Language};
use scholia_events::envelope::format_time;
use scholia_events::partition::runs;
use scholia_events::status::{BuildState, PRIORITY_BULK, Rebuild, Want};
use scholia_events::store::{
    AnalysisRecord, BuildRecord, BuildRequest, CandidateSummary, Progress, candidate_name,
};
use scholia_events::{Granularity, PartitionKey, PartitionRun};
use scholia_http::{
    Admin, ApiError, ApiResult, AppJson, AppPath, AppQuery, Core, Reader, parse_range,
};

use crate::candidate::{self, DiffKey, PartitionDiff};
use crate::dry_run::{self, DryRun};
use crate::invalidation;
use crate::registry::{Registry, SqlDefinition};
use crate::schedule::{self, Schedule, ScheduleDefinition};

#[derive(OpenApi)]
#[openapi(
    paths(
        list_analyses,
        get_analysis,
        put_analysis,
        list_builds,
        get_candidate,
        build_candidate,
        diff_candidate,
        promote_candidate,
        discard_candidate,
        create_invalidation,
        list_invalidations,
        get_invalidation,
        cancel_invalidation,
        retry_invalidation,
        list_schedules,
        get_schedule,
        put_schedule
    ),
    tags(
        (name = "analyses", description = "Registered analyses: built in, or SQL registered at run time; their build history."),
        (name = "candidates", description = "A changed definition of an analysis beside the live one: built over some partitions, compared with the live annotations, then promoted or discarded. Readers and charts see the live analysis only."),
        (name = "invalidations", description = "Rebuilds of a date range of one analysis or all of them, their dry runs and progress, and retries of what failed."),
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
        .route("/v1/analyses/{name}/builds", get(list_builds))
        .route(
            "/v1/analyses/{name}/candidate",
            get(get_candidate).delete(discard_candidate),
        )
        .route(
            "/v1/analyses/{name}/candidate/builds",
            post(build_candidate),
        )
        .route("/v1/analyses/{name}/candidate/diff", get(diff_candidate))
        .route(
            "/v1/analyses/{name}/candidate/promote",
            post(promote_candidate),
        )
        .route(
            "/v1/invalidations",
            post(create_invalidation).get(list_invalidations),
        )
        .route(
            "/v1/invalidations/{id}",
            get(get_invalidation).delete(cancel_invalidation),
        )
        .route("/v1/invalidations/{id}/retry", post(retry_invalidation))
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
    /// The columns that identify a row, as it declares them (a candidate's diff matches
    /// rows on them), or null.
    key: Option<Vec<String>>,
    #[schema(value_type = String, pattern = "^active$")]
    status: &'static str,
    /// Its candidate, registered beside it (`GET /v1/analyses/{name}/candidate`), or null.
    candidate: Option<CandidateBrief>,
}

/// A candidate as an analysis' view mentions it.
#[derive(Serialize, ToSchema)]
struct CandidateBrief {
    version: i64,
    /// Partitions the candidate's version has built.
    built: i64,
}

/// Every candidate, by the live analysis' name.
async fn candidates(state: &AnalyticsState) -> ApiResult<BTreeMap<String, CandidateSummary>> {
    let found = state.cache.core().store.analyses.candidates().await?;
    Ok(found.into_iter().map(|c| (c.analysis.clone(), c)).collect())
}

fn view(
    registry: &Registry,
    meta: &AnalysisMeta,
    candidates: &BTreeMap<String, CandidateSummary>,
) -> AnalysisView {
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
        key: meta.key.clone(),
        status: "active",
        candidate: candidates.get(&meta.name).map(|c| CandidateBrief {
            version: c.version,
            built: c.built,
        }),
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
    let candidates = candidates(&state).await?;
    Ok(Json(AnalysisList {
        analyses: metas
            .iter()
            .map(|m| view(&state.registry, m, &candidates))
            .collect(),
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
    let candidates = candidates(&state).await?;
    Ok(Json(view(&state.registry, &meta, &candidates)))
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
    /// The columns that identify a row of its result (at most 64, each once): a
    /// candidate's diff matches rows on them instead of on the non-measure columns.
    /// Changing it keeps the version.
    #[serde(default)]
    #[schema(min_items = 1, max_items = 64, example = json!(["source"]))]
    key: Option<Vec<String>>,
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
            key: def.key,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PutQuery {
    /// Register the definition as the analysis' candidate, beside the live one, instead of
    /// changing the live one (which must exist).
    candidate: Option<bool>,
}

/// What registering answers: the analysis, or its candidate.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum Registration {
    Live(AnalysisView),
    Candidate(CandidateView),
}

/// Register or change a SQL analysis, or register a candidate of it.
///
/// A change bumps its version, and makes downstream annotations stale; a change of only
/// its description or `key` is saved under the same version. SQL that does not compile,
/// an unknown input, a cycle or a bad `key` is refused with 422, naming the problem. With
/// `?candidate=true` the definition is registered as the analysis' candidate, beside the
/// live version, which is not touched (a candidate equal to the live definition is a
/// conflict); it answers with the candidate.
#[utoipa::path(
    put,
    path = "/v1/analyses/{name}",
    tag = "analyses",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, pattern = "^[a-z][a-z0-9_-]{0,63}$", description = "The analysis' name: a lowercase letter, then up to 63 lowercase letters, digits, '_' or '-'.", example = "hourly_max"),
        PutQuery
    ),
    request_body = AnalysisDefinition,
    responses(
        (status = 200, description = "Changed (or already this definition).", body = Registration),
        (status = 201, description = "Registered (a candidate: registered or changed).", body = Registration)
    )
)]
async fn put_analysis(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppQuery(query): AppQuery<PutQuery>,
    AppJson(def): AppJson<AnalysisDefinition>,
) -> ApiResult<Response> {
    if let Some(body_name) = &def.name
        && body_name != &name
    {
        return Err(ApiError::invalid(format!(
            "The body names the analysis {body_name:?} but the path names {name:?}; make them agree."
        )));
    }
    if query.candidate == Some(true) {
        let registered = state
            .registry
            .put_candidate(&name, def.into(), &token.actor())
            .await?;
        let status = if registered.changed {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let view = candidate_view(&state, &name).await?;
        return Ok((status, Json(Registration::Candidate(view))).into_response());
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
    let candidates = candidates(&state).await?;
    let view = view(&state.registry, &registered.meta, &candidates);
    Ok((status, Json(Registration::Live(view))).into_response())
}

/// The most builds one page of history holds.
const MAX_BUILDS_PAGE: i64 = 1_000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct BuildsQuery {
    /// How many builds, from 1 to 1000 (100 when left out).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only the builds of this partition (`2024-05-05` or `2024-05-05T13`).
    #[param(pattern = r"^\d{4}-\d{2}-\d{2}(T\d{2})?$", example = "2024-05-05")]
    partition: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct BuildList {
    /// Newest first.
    builds: Vec<BuildRecord>,
}

/// An analysis' recent builds, newest first.
///
/// Each with its partition, version, generation, rows read and written, duration, attempt,
/// worker, outcome and error. The history keeps the newest 50 builds of each partition, and
/// none older than 30 days.
#[utoipa::path(
    get,
    path = "/v1/analyses/{name}/builds",
    tag = "analyses",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "The analysis' name.", example = "daily_avg"),
        BuildsQuery
    ),
    responses((status = 200, description = "Its builds.", body = BuildList))
)]
async fn list_builds(
    Reader(_reader): Reader,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppQuery(query): AppQuery<BuildsQuery>,
) -> ApiResult<Json<BuildList>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_BUILDS_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "Give limit as a number from 1 to {MAX_BUILDS_PAGE}, not {limit}."
        )));
    }
    let partition = query
        .partition
        .as_deref()
        .map(PartitionKey::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("partition: {e}.")))?;
    let meta = state.registry.catalog().find(&name).await?;
    let builds = state
        .cache
        .core()
        .store
        .annotations
        .builds(&meta.name, partition.as_ref(), limit as usize)
        .await?;
    Ok(Json(BuildList { builds }))
}

/// A candidate: its definition beside the live version, and what it built.
#[derive(Serialize, ToSchema)]
struct CandidateView {
    /// The live analysis' name.
    name: String,
    /// Always true: this is a candidate, not the live analysis.
    candidate: bool,
    /// The candidate's version (the live version it would become, unless the live one
    /// changes first).
    version: i64,
    /// The live analysis' version now.
    live_version: i64,
    kind: Option<String>,
    partition: Granularity,
    inputs: Vec<Input>,
    description: String,
    language: Language,
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<String>,
    /// The columns that identify a row, as the candidate declares them, or null (its diff
    /// then matches rows on the live analysis' key, if that declares one).
    key: Option<Vec<String>>,
    /// How many partitions the candidate's version has built.
    built: u64,
    /// Those partitions, as runs of consecutive keys.
    partitions: Vec<PartitionRun>,
    /// Its builds queued now.
    queued: u64,
    /// Its builds running now.
    running: u64,
    /// Partitions whose build failed, with why (at most 100).
    failed: Vec<FailedPartition>,
    updated_by: String,
    #[schema(format = DateTime)]
    updated_at: String,
}

#[derive(Serialize, ToSchema)]
struct FailedPartition {
    partition: PartitionKey,
    error: Option<String>,
}

/// The live analysis `name` and its candidate as stored, or not found.
async fn live_and_candidate(
    state: &AnalyticsState,
    name: &str,
) -> ApiResult<(std::sync::Arc<AnalysisMeta>, AnalysisRecord)> {
    let live = state.registry.catalog().find(name).await?;
    let stored = state
        .cache
        .core()
        .store
        .analyses
        .get(&candidate_name(name))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "{name:?} has no candidate; register one with PUT /v1/analyses/{name}?candidate=true."
            ))
        })?;
    Ok((live, stored))
}

/// Partitions one candidate view lists at most.
const MAX_LISTED: usize = 200_000;

async fn candidate_view(state: &AnalyticsState, name: &str) -> ApiResult<CandidateView> {
    let (live, stored) = live_and_candidate(state, name).await?;
    let store = &state.cache.core().store;
    let meta = &stored.meta;
    let built = store
        .annotations
        .built(&meta.name, meta.version, MAX_LISTED)
        .await?;
    let states = store.queue.states(&meta.name, "", "~").await?;
    let count = |wanted: BuildState| states.iter().filter(|s| s.state == wanted).count() as u64;
    Ok(CandidateView {
        name: name.to_string(),
        candidate: true,
        version: meta.version,
        live_version: live.version,
        kind: meta.kind().map(str::to_string),
        partition: meta.partition,
        inputs: meta.inputs.clone(),
        description: meta.description.clone(),
        language: meta.language,
        sql: meta.sql.clone(),
        key: meta.key.clone(),
        built: built.len() as u64,
        partitions: runs(built),
        queued: count(BuildState::Queued),
        running: count(BuildState::Running),
        failed: states
            .iter()
            .filter(|s| s.state == BuildState::Failed)
            .take(100)
            .map(|s| FailedPartition {
                partition: s.partition,
                error: s.error.clone(),
            })
            .collect(),
        updated_by: stored.updated_by.clone(),
        updated_at: format_time(stored.updated_at),
    })
}

const NAME_PARAMETER: &str = "The live analysis' name.";

/// An analysis' candidate: its definition and the partitions it built.
#[utoipa::path(
    get,
    path = "/v1/analyses/{name}/candidate",
    tag = "candidates",
    security(("bearer" = [])),
    params(("name" = String, Path, description = NAME_PARAMETER, example = "daily_avg")),
    responses((status = 200, description = "The candidate.", body = CandidateView))
)]
async fn get_candidate(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<CandidateView>> {
    Ok(Json(candidate_view(&state, &name).await?))
}

/// Which partitions to build a candidate over: a range, or a sample.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"sample": 7}))]
struct CandidateBuildRequest {
    /// The start of the range (inclusive); with `to`.
    #[serde(default)]
    #[schema(schema_with = scholia_http::openapi::instant)]
    from: Option<String>,
    /// The end of the range (exclusive); with `from`.
    #[serde(default)]
    #[schema(schema_with = scholia_http::openapi::instant)]
    to: Option<String>,
    /// Instead of a range: this many of the latest partitions the live version built.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    sample: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct CandidateBuilds {
    /// The partitions asked for.
    partitions: Vec<PartitionKey>,
    /// Of those, how many were queued (the others are built by this version already, or
    /// under way).
    queued: u64,
}

/// Build the candidate over a range of partitions, or over a sample of those the live
/// version built.
///
/// The builds go through the normal queue and workers, after what readers wait for;
/// readers and charts still see the live version. At most 10,000 partitions at a time.
#[utoipa::path(
    post,
    path = "/v1/analyses/{name}/candidate/builds",
    tag = "candidates",
    security(("bearer" = [])),
    params(("name" = String, Path, description = NAME_PARAMETER, example = "daily_avg")),
    request_body = CandidateBuildRequest,
    responses((status = 202, description = "Queued.", body = CandidateBuilds))
)]
async fn build_candidate(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppJson(request): AppJson<CandidateBuildRequest>,
) -> ApiResult<Response> {
    let (live, stored) = live_and_candidate(&state, &name).await?;
    let range = match (request.from.as_deref(), request.to.as_deref()) {
        (None, None) => None,
        (Some(from), Some(to)) => Some(parse_range(Some(from), Some(to))?),
        _ => {
            return Err(ApiError::invalid(
                "Give both from and to (a range of partitions), or sample alone.",
            ));
        }
    };
    let store = &state.cache.core().store;
    let partitions =
        candidate::partitions_to_build(store, &live, &stored.meta, range, request.sample).await?;
    let queued = store
        .queue
        .request(BuildRequest {
            analysis: stored.meta.name.clone(),
            version: stored.meta.version,
            partitions: partitions.clone(),
            priority: PRIORITY_BULK,
            want: Want::Present,
            not_before: Utc::now(),
            actor: token.actor(),
            log: true,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CandidateBuilds {
            partitions,
            queued: queued.len() as u64,
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
    key: Option<String>,
}

/// Written out: `from` and `to` are read as text but are dates or times.
impl IntoParams for DiffQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        use scholia_http::openapi::instant_parameter;
        vec![
            instant_parameter("from", "The start of the range (inclusive)."),
            instant_parameter("to", "The end of the range (exclusive)."),
            ParameterBuilder::new()
                .name("key")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(
                    "The columns that identify a row, comma-separated (e.g. `source,region`); without it rows are matched on the key the candidate declares, else on the live analysis' key, else on their non-measure columns.",
                ))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(r"^[^,]+(,[^,]+)*$"))
                        .max_length(Some(1000)),
                ))
                .build(),
        ]
    }
}

#[derive(Serialize, ToSchema)]
struct CandidateDiff {
    analysis: String,
    live_version: i64,
    candidate_version: i64,
    /// The key rows were matched on: `?key=`, else the candidate's declared key, else the
    /// live analysis'; null when none is named (rows were matched on each partition's
    /// `key_columns`, the non-measure columns).
    key: Option<Vec<String>>,
    /// Who named `key`: `query`, `candidate` or `live` (null with no key).
    #[schema(value_type = Option<String>, pattern = "^(query|candidate|live)$")]
    key_from: Option<&'static str>,
    /// Per partition of the range, in order.
    partitions: Vec<PartitionDiff>,
}

/// The candidate's annotations against the live ones, per partition.
///
/// Rows are matched on the columns named in `key`, else on the key the candidate's
/// definition declares, else on the live analysis' declared key, or else on their
/// non-measure columns (strings, integers, booleans, dates and times; floats are
/// measures); a named key column the candidate's annotations lack is refused with 422,
/// naming it. Rows are sorted into
/// added, removed and changed, with the
/// columns that changed; at most 100 rows of each list per partition are shown, the counts
/// are whole. At most 1,000 partitions at a time.
#[utoipa::path(
    get,
    path = "/v1/analyses/{name}/candidate/diff",
    tag = "candidates",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = NAME_PARAMETER, example = "daily_avg"),
        DiffQuery
    ),
    responses((status = 200, description = "The differences.", body = CandidateDiff))
)]
async fn diff_candidate(
    Admin(_admin): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
    AppQuery(query): AppQuery<DiffQuery>,
) -> ApiResult<Json<CandidateDiff>> {
    let (from, to) = parse_range(query.from.as_deref(), query.to.as_deref())?;
    let (live, stored) = live_and_candidate(&state, &name).await?;
    if stored.meta.partition != live.partition {
        return Err(ApiError::invalid(format!(
            "The candidate partitions by {} and the live analysis by {}, so their partitions cannot be compared one by one.",
            stored.meta.partition, live.partition
        )));
    }
    let keys = stored
        .meta
        .partition
        .partitions_between(from, to, candidate::MAX_DIFF_PARTITIONS)
        .map_err(|e| ApiError::invalid(scholia_http::sentence(&e)))?;
    let store = &state.cache.core().store;
    let asked = query.key.as_deref().map(diff_key).transpose()?;
    let row_key = DiffKey::choose(asked.as_deref(), &live, &stored.meta);
    let partitions = candidate::diff(store, &live, &stored.meta, &keys, row_key).await?;
    Ok(Json(CandidateDiff {
        analysis: name,
        live_version: live.version,
        candidate_version: stored.meta.version,
        key: row_key.columns().map(<[String]>::to_vec),
        key_from: row_key.named_by(),
        partitions,
    }))
}

/// The columns of a diff's `key`: comma-separated names, none empty (one named twice
/// counts once).
fn diff_key(text: &str) -> ApiResult<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for name in text.split(',') {
        if name.is_empty() || text.len() > 1000 {
            return Err(ApiError::invalid(
                "key must name the columns that identify a row, comma-separated, as in key=source,region.",
            ));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

#[derive(Serialize, ToSchema)]
struct PromotedView {
    /// The live analysis now.
    analysis: AnalysisView,
    /// How many of its partitions the candidate's annotations became, without a rebuild.
    promoted: u64,
    /// Those partitions, as runs; the others are stale, as after any change.
    partitions: Vec<PartitionRun>,
}

/// Make the candidate live.
///
/// The live analysis takes the candidate's definition and a new version; the partitions
/// the candidate built become its annotations of that version without a rebuild (their
/// generation continues the live partition's count); the others become stale, as with any
/// change, and downstream analyses follow as after any upstream change.
#[utoipa::path(
    post,
    path = "/v1/analyses/{name}/candidate/promote",
    tag = "candidates",
    security(("bearer" = [])),
    params(("name" = String, Path, description = NAME_PARAMETER, example = "daily_avg")),
    responses((status = 200, description = "Promoted; the live analysis.", body = PromotedView))
)]
async fn promote_candidate(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<PromotedView>> {
    let (meta, partitions) = state.registry.promote(&name, &token.actor()).await?;
    let candidates = candidates(&state).await?;
    Ok(Json(PromotedView {
        analysis: view(&state.registry, &meta, &candidates),
        promoted: partitions.len() as u64,
        partitions: runs(partitions),
    }))
}

#[derive(Serialize, ToSchema)]
struct DiscardedView {
    /// The live analysis' name.
    name: String,
    /// The candidate's version that was discarded.
    version: i64,
    /// Its annotations, deleted.
    partitions: i64,
    /// Its queued or running builds, dropped.
    queued: i64,
}

/// Discard the candidate, its annotations and its queued builds.
#[utoipa::path(
    delete,
    path = "/v1/analyses/{name}/candidate",
    tag = "candidates",
    security(("bearer" = [])),
    params(("name" = String, Path, description = NAME_PARAMETER, example = "daily_avg")),
    responses((status = 200, description = "Discarded.", body = DiscardedView))
)]
async fn discard_candidate(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(name): AppPath<String>,
) -> ApiResult<Json<DiscardedView>> {
    let discarded = state
        .registry
        .discard_candidate(&name, &token.actor())
        .await?;
    Ok(Json(DiscardedView {
        name,
        version: discarded.version,
        partitions: discarded.partitions,
        queued: discarded.queued,
    }))
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
    /// Change nothing: answer 200 with the plan (per analysis the partitions it would
    /// rebuild, the source rows they read, an estimate of the time from build history, what
    /// is queued or running already).
    #[serde(default)]
    dry_run: Option<bool>,
}

/// Invalidate a range of one analysis or of all of them, or plan it.
///
/// Its partitions are rebuilt (eagerly or lazily), and annotations read meanwhile are
/// `stale`. With `"dry_run": true` nothing changes and the answer is the plan: the same
/// partitions, downstream included, with the source rows they read, an estimate of the
/// time from build history (shared among the workers seen lately) and what is already
/// queued or running.
#[utoipa::path(
    post,
    path = "/v1/invalidations",
    tag = "invalidations",
    security(("bearer" = [])),
    request_body = InvalidationRequest,
    responses(
        (status = 200, description = "A dry run: the plan; nothing changed.", body = DryRun),
        (status = 202, description = "Recorded; its partitions are queued (or marked stale).", body = Progress)
    )
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
    let dry = request.dry_run.unwrap_or(false);
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
    if dry {
        let plan = dry_run::dry_run(store, state.registry.catalog(), &request).await?;
        return Ok((StatusCode::OK, Json(plan)).into_response());
    }
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

/// A retry: the new invalidation.
#[derive(Serialize, ToSchema)]
struct RetryAnswer {
    /// The new invalidation's id.
    id: Uuid,
    /// The invalidation it retries.
    retry_of: Uuid,
    /// How many partitions it rebuilds: those of `retry_of` that failed.
    partitions: i64,
}

/// Rebuild only the partitions of an invalidation that failed.
///
/// A new invalidation of exactly those partitions, logged like any other; 409 while the
/// invalidation still has partitions pending, or when none failed.
#[utoipa::path(
    post,
    path = "/v1/invalidations/{id}/retry",
    tag = "invalidations",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The invalidation's id.")),
    responses((status = 202, description = "The retry is recorded and its partitions queued.", body = RetryAnswer))
)]
async fn retry_invalidation(
    Admin(token): Admin,
    State(state): State<AnalyticsState>,
    AppPath(id): AppPath<String>,
) -> ApiResult<Response> {
    let retried = state
        .cache
        .core()
        .store
        .invalidations
        .retry(parse_id(&id)?, &token.actor())
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RetryAnswer {
            id: retried.id,
            retry_of: retried.retry_of,
            partitions: retried.partitions,
        }),
    )
        .into_response())
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
