//! Endpoints every process serves, whatever its roles.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::Shared;

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .with_state(shared)
}

async fn healthz(State(shared): State<Shared>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "roles": shared.roles,
        "database": shared.db.backend_name(),
        "bus": shared.bus.name(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
    }))
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    let database = shared.db.ping().await.is_ok();
    let bus = shared.bus.is_ready().await;
    let status = if database && bus {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": database && bus, "database": database, "bus": bus})),
    )
}

async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
