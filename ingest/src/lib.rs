//! The HTTP front end of Scholia: authentication, validation, routing by kind, the
//! durable write of batches, and quarantine; plus the pieces every process serves
//! (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`) and the error type all routers
//! share.
//!
//! Concurrency model: each request runs on the tokio workers; parsing and gzip run on
//! blocking threads; at most `max_inflight` batches are being written at once, and
//! beyond that requests get 503 with `Retry-After` instead of queueing without bound.
//! Batches serialize on the event log lock only for their commit.

pub mod auth;
mod common;
pub mod kinds;
pub mod parse;
pub mod problem;
mod routes;
pub mod store;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use scholia_events::metrics::Metrics;
use scholia_events::{Bus, Database};
use tokio::sync::Semaphore;

pub use auth::Authenticator;
pub use common::router as common_router;
pub use kinds::KindRegistry;
pub use problem::{ApiError, ApiResult, AppJson};

#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// The largest body accepted, after gzip inflation too.
    pub max_body_bytes: usize,
    /// How many batches may be in flight before new ones get 503.
    pub max_inflight: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight: 32,
        }
    }
}

/// What every router of a process shares.
#[derive(Clone)]
pub struct Shared {
    pub db: Database,
    pub bus: Arc<dyn Bus>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// The roles this process runs, for `/healthz`.
    pub roles: Vec<String>,
}

/// The ingest role's state.
#[derive(Clone)]
pub struct IngestState {
    pub shared: Shared,
    pub kinds: KindRegistry,
    pub limits: IngestLimits,
    inflight: Arc<Semaphore>,
    /// Bodies parsed at once: one core fewer than the machine has, so that on a machine
    /// shared with the database, parsing the next batches never starves the write (the
    /// database's `COPY`) that everything else waits behind.
    parsers: Arc<Semaphore>,
}

impl IngestState {
    pub async fn new(shared: Shared, limits: IngestLimits) -> scholia_events::Result<Self> {
        let kinds = KindRegistry::load(shared.db.clone()).await?;
        Ok(IngestState {
            inflight: Arc::new(Semaphore::new(limits.max_inflight)),
            parsers: Arc::new(Semaphore::new(
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get().saturating_sub(1))
                    .max(1),
            )),
            shared,
            kinds,
            limits,
        })
    }
}

/// The endpoints of the ingest role: events, kinds, quarantine and tokens.
pub fn router(state: IngestState) -> Router {
    routes::router(state)
}
