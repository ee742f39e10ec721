//! Endpoints every process serves, whatever its roles, and the middleware that logs
//! failed requests.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Cause};
use crate::state::Core;

pub fn router(core: Core) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .with_state(core)
}

/// What `/healthz` says: the process is up, and what it runs on.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    #[schema(value_type = String, pattern = "^ok$")]
    status: &'static str,
    /// The roles this process runs.
    roles: Vec<String>,
    /// `sqlite` or `postgres`.
    #[schema(value_type = String)]
    database: &'static str,
    /// `in-process` or `nats`.
    #[schema(value_type = String)]
    bus: &'static str,
    uptime_seconds: u64,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is up.", body = Health))
)]
pub(crate) async fn healthz(State(core): State<Core>) -> Json<Health> {
    Json(Health {
        status: "ok",
        roles: core.roles.to_vec(),
        database: core.store.database.backend(),
        bus: core.bus.name(),
        uptime_seconds: core.started.elapsed().as_secs(),
    })
}

/// What `/readyz` says.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    ready: bool,
    /// `ok`, `degraded` (serving, but something needs a look) or `unavailable`.
    #[schema(value_type = String, pattern = "^(ok|degraded|unavailable)$")]
    status: &'static str,
    /// Whether the database answers.
    database: bool,
    /// Whether the bus answers.
    bus: bool,
    /// The long-lived tasks of this process, by name.
    tasks: std::collections::BTreeMap<String, scholia_events::tasks::TaskHealth>,
    relay: RelayReport,
}

/// How far the relay got publishing the log to the bus.
#[derive(Serialize, ToSchema)]
pub(crate) struct RelayReport {
    published_seq: i64,
    skipped_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_skipped: Option<String>,
}

/// Readiness.
///
/// 200 while the database and the bus are reachable, 503 until then.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready (`status` may still say `degraded`).", body = Readiness),
        (status = 503, description = "Not ready: the database or the bus is unreachable.", body = Readiness)
    )
)]
pub(crate) async fn readyz(State(core): State<Core>) -> impl IntoResponse {
    let database = core.store.database.ping().await.is_ok();
    let bus = core.bus.is_ready().await;
    let last_skipped = core.relay.recent_skip();
    let ready = database && bus;
    let status = if !ready {
        "unavailable"
    } else if !core.supervisor.all_running() || last_skipped.is_some() {
        "degraded"
    } else {
        "ok"
    };
    let body = Readiness {
        ready,
        status,
        database,
        bus,
        tasks: core.supervisor.health(),
        relay: RelayReport {
            published_seq: core.relay.published_seq.load(Ordering::Relaxed),
            skipped_events: core.relay.skipped.load(Ordering::Relaxed),
            last_skipped,
        },
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Counters, gauges and histograms.", body = String, content_type = "text/plain"))
)]
pub(crate) async fn metrics(State(core): State<Core>) -> impl IntoResponse {
    let m = &core.metrics;
    m.gauge(
        "scholia_relay_published_seq",
        "Highest log seq the bus has acknowledged.",
    )
    .store(
        core.relay.published_seq.load(Ordering::Relaxed).max(0) as u64,
        Ordering::Relaxed,
    );
    m.gauge(
        "scholia_relay_skipped_events",
        "Events the bus could not take, skipped by the relay (they stay in the log).",
    )
    .store(
        core.relay.skipped.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    if let Ok(head) = core.store.log.head().await {
        m.gauge("scholia_log_head_seq", "Highest committed log seq.")
            .store(head.max(0) as u64, Ordering::Relaxed);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

/// This document.
///
/// What this process serves, which depends on its roles.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object))
)]
pub(crate) async fn openapi(State(core): State<Core>) -> Response {
    match core.openapi.get() {
        Some(doc) => ([(header::CONTENT_TYPE, "application/json")], doc.clone()).into_response(),
        None => ApiError::internal("the OpenAPI document was not built").into_response(),
    }
}

/// Answer unknown paths in the same problem format as everything else.
pub async fn not_found() -> ApiError {
    ApiError::not_found("There is nothing at this path; GET /openapi.json lists what there is.")
}

/// Log each request that failed on the server's side once, with its cause, and count
/// responses by class.
pub async fn log_failures(State(core): State<Core>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() {
        let cause = response
            .extensions()
            .get::<Cause>()
            .map_or("(no cause recorded)", |c| c.0.as_str());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(%method, %path, status = status.as_u16(), cause, "Request refused for now");
        } else {
            tracing::error!(%method, %path, status = status.as_u16(), cause, "Request failed");
        }
    } else {
        tracing::debug!(%method, %path, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "Request");
    }
    let class = match status.as_u16() / 100 {
        2 => "scholia_http_responses_2xx_total",
        3 => "scholia_http_responses_3xx_total",
        4 => "scholia_http_responses_4xx_total",
        _ => "scholia_http_responses_5xx_total",
    };
    core.metrics
        .counter(class, "HTTP responses by status class.")
        .fetch_add(1, Ordering::Relaxed);
    response
}
