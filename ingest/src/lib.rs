//! The ingest role: the HTTP front end producers talk to. Authentication, parsing and
//! validation of bodies (JSON, arrays, NDJSON, gzip), kinds' schemas, the durable write
//! of batches, quarantine, and tokens.
//!
//! Concurrency model: each request runs on the tokio workers; parsing and gzip run on
//! blocking threads, one core fewer than the machine has. A body is received under one
//! of a bounded number of slots and within a time limit (408 past it); at most
//! `max_inflight` received batches are parsed and written at once, and beyond that
//! requests get 503 with `Retry-After` instead of queueing without bound.

pub mod kinds;
pub mod parse;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use tokio::sync::Semaphore;

use scholia_http::Core;

pub use kinds::KindCache;
pub use routes::router;

#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// The largest body accepted, after gzip inflation too.
    pub max_body_bytes: usize,
    /// How many batches may be parsed and written at once before new ones get 503.
    pub max_inflight: usize,
    /// How long a body may take to arrive.
    pub body_timeout: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight: 32,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The ingest role's state.
#[derive(Clone, FromRef)]
pub struct IngestState {
    pub core: Core,
    pub kinds: KindCache,
    #[from_ref(skip)]
    pub limits: IngestLimits,
    /// Bodies being received.
    #[from_ref(skip)]
    receiving: Arc<Semaphore>,
    /// Batches being parsed and written.
    #[from_ref(skip)]
    inflight: Arc<Semaphore>,
    /// Bodies parsed at once: one core fewer than the machine has, so that on a machine
    /// shared with the database, parsing the next batches never starves the writes.
    #[from_ref(skip)]
    parsers: Arc<Semaphore>,
}

impl IngestState {
    pub async fn new(core: Core, limits: IngestLimits) -> scholia_events::Result<Self> {
        let kinds = KindCache::load(core.store.kinds.clone()).await?;
        Ok(IngestState {
            receiving: Arc::new(Semaphore::new(limits.max_inflight * 2)),
            inflight: Arc::new(Semaphore::new(limits.max_inflight)),
            parsers: Arc::new(Semaphore::new(
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get().saturating_sub(1))
                    .max(1),
            )),
            core,
            kinds,
            limits,
        })
    }
}
