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
use serde_json::json;

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

async fn healthz(State(core): State<Core>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "roles": *core.roles,
        "database": core.store.database.backend(),
        "bus": core.bus.name(),
        "uptime_seconds": core.started.elapsed().as_secs(),
    }))
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    /// `ok`, `degraded` (serving, but something needs a look) or `unavailable`.
    status: &'static str,
    database: bool,
    bus: bool,
    tasks: std::collections::BTreeMap<String, scholia_events::tasks::TaskHealth>,
    relay: RelayReport,
}

#[derive(Serialize)]
struct RelayReport {
    published_seq: i64,
    skipped_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_skipped: Option<String>,
}

async fn readyz(State(core): State<Core>) -> impl IntoResponse {
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

async fn metrics(State(core): State<Core>) -> impl IntoResponse {
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

async fn openapi(State(core): State<Core>) -> Response {
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
