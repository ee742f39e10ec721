//! Analyses and the machinery that keeps their annotations current.
//!
//! - [`Analysis`]: a computation from one partition's inputs (Polars `DataFrame`s, one per
//!   input: kinds' records, other analyses' annotations) to an annotation, written in
//!   Rust ([`builtin`]) or as SQL registered at run time ([`sql::SqlAnalysis`]).
//! - [`Registry`]: turns definitions into computations, and checks and versions new ones.
//! - [`Workers`]: build loops over the build queue in SQL; the planner that turns new
//!   data and new upstream generations into rebuilds; the reconciler that does the same
//!   from SQL alone; the scheduler of preemptive rebuilds.
//! - [`candidate`]: changed definitions built beside the live ones, compared, promoted.
//! - [`dry_run`]: what an invalidation would rebuild and how long it would take.
//! - [`router`]: the endpoints of analyses (builds, candidates), invalidations (dry runs,
//!   retries) and schedules.
//!
//! Concurrency model: async tasks for I/O; every Polars computation runs on a blocking
//! thread. At most `concurrency` builds run per process; across processes the SQL lease
//! guarantees that no two workers build the same partition at the same time.

pub mod analysis;
pub mod builtin;
pub mod candidate;
pub mod dry_run;
pub mod frame;
pub mod frame_files;
mod frame_writer;
pub mod frames;
mod inputs;
pub mod invalidation;
mod planner;
pub mod registry;
mod routes;
pub mod rows;
pub mod sandbox;
pub mod schedule;
pub mod sql;
mod worker;

#[cfg(test)]
mod testing;

pub use analysis::{Analysis, Inputs};
pub use registry::Registry;
pub use routes::{AnalyticsState, router};
pub use worker::{WorkerSettings, Workers};

/// Errors of analytics are the shared layer's, classified where they are raised.
pub use scholia_events::{Error, Result};

/// A Polars failure while building frames (not while running an analysis, whose errors
/// are its own).
pub(crate) fn frame_error(error: polars::error::PolarsError) -> Error {
    Error::internal("building a frame", error)
}
