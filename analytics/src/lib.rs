//! Analyses and the machinery that keeps their annotations current.
//!
//! - [`Analysis`]: a computation from one partition of records (a Polars `DataFrame`)
//!   to an annotation (another `DataFrame`), written in Rust ([`builtin`]) or as SQL
//!   registered at run time ([`sql::SqlAnalysis`]).
//! - [`Registry`]: the analyses this deployment knows, with their versions, kept in SQL.
//! - [`queue`]: the build queue in SQL (`partition_state`): requests coalesce per
//!   partition, a claim is a lease, and the commit of a build settles exactly the
//!   requests it started from.
//! - [`Workers`]: build loops woken by `analysis.requested` on the bus (a shared work
//!   group), the planner that turns new source data into rebuilds of stale partitions,
//!   and the scheduler of preemptive rebuilds.
//!
//! Concurrency model: async tasks for I/O; every Polars computation runs on a blocking
//! thread. At most `concurrency` builds run per process; across processes the SQL lease
//! guarantees that no two workers build the same partition at the same time.

pub mod analysis;
pub mod builtin;
pub mod frame;
pub mod frames;
pub mod invalidation;
pub mod queue;
pub mod registry;
pub mod rows;
pub mod schedule;
pub mod sql;
mod worker;
pub use worker::follow_registrations;

pub use analysis::{Analysis, AnalysisInfo};
pub use registry::Registry;
pub use worker::Workers;

/// Errors of analyses and their machinery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Events(#[from] scholia_events::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("no analysis is named {0:?}")]
    UnknownAnalysis(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the analysis failed: {0}")]
    Compute(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Self {
        Error::Events(scholia_events::Error::Database {
            context: "running an analytics query",
            source,
        })
    }
}

impl From<polars::error::PolarsError> for Error {
    fn from(error: polars::error::PolarsError) -> Self {
        Error::Compute(error.to_string())
    }
}
