//! The `Analysis` trait and what the API shows of an analysis.

use polars::prelude::DataFrame;
use serde::Serialize;

use scholia_events::Granularity;

/// A computation from one partition of records of one kind to an annotation.
///
/// The input frame has the columns `data_id`, `source`, `kind`, `created` and
/// `received_at` (UTC, microseconds), then one column per top-level field of `data`,
/// typed (declared kind types first, else inferred; JSON nulls are nulls).
pub trait Analysis: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Changes whenever the computation changes; annotations of older versions are stale.
    fn version(&self) -> i64;
    /// The kind of records it reads.
    fn kind(&self) -> &str;
    fn partition(&self) -> Granularity;
    fn description(&self) -> &str;
    /// The SQL, for a SQL analysis.
    fn sql(&self) -> Option<&str> {
        None
    }
    /// Compute the annotation of one partition. Runs on a blocking thread.
    fn compute(&self, input: DataFrame) -> polars::error::PolarsResult<DataFrame>;
}

#[derive(Debug, Clone, Serialize)]
pub struct AnalysisInfo {
    pub name: String,
    pub version: i64,
    pub kind: String,
    pub partition: String,
    pub description: String,
    /// `builtin` (Rust) or `sql`.
    pub language: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    pub status: &'static str,
}

impl AnalysisInfo {
    pub fn of(analysis: &dyn Analysis) -> Self {
        AnalysisInfo {
            name: analysis.name().to_string(),
            version: analysis.version(),
            kind: analysis.kind().to_string(),
            partition: analysis.partition().as_str().to_string(),
            description: analysis.description().to_string(),
            language: if analysis.sql().is_some() {
                "sql"
            } else {
                "builtin"
            },
            sql: analysis.sql().map(str::to_string),
            status: "active",
        }
    }
}
