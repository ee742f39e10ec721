//! The HTTP plumbing every component serves with: one error type ([`ApiError`], rendered
//! as `application/problem+json`), extractors whose rejections use it ([`AppJson`],
//! [`AppQuery`], [`AppPath`]), scope extractors that check the bearer token before
//! anything else of a request is read ([`Admin`], [`Reader`], [`Ingester`]), the state
//! every router shares ([`Core`]), and the endpoints every process serves (`/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json`).
//!
//! Concurrency model: none of its own; handlers run on the tokio workers, and token
//! lookups are cached for a few seconds.

mod auth;
mod common;
mod error;
pub mod openapi;
mod state;

pub use auth::{Admin, Auth, Ingester, QueryReader, Reader};
pub use common::{log_failures, not_found, router as common_router};
pub use error::{
    ApiError, ApiResult, AppJson, AppPath, AppQuery, Problem, ProblemBody, parse_range, sentence,
};
pub use state::{Core, CoreParts};
