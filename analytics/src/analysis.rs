//! The `Analysis` trait: a computation from one partition's inputs to an annotation.

use std::collections::BTreeMap;

use polars::prelude::{DataFrame, PolarsError, PolarsResult};

use scholia_events::analysis::{AnalysisMeta, InputSource};

/// The input frames of one partition, one per input of the analysis.
///
/// A kind's frame has the columns `data_id`, `source`, `kind`, `created` and
/// `received_at` (UTC, microseconds), then one column per field of `data`, typed by the
/// kind's schema. An analysis' frame has its annotation's columns and `partition`, the
/// upstream partition's key. An input with a lookback also has `in_partition`, false for
/// the rows of the lookback span.
#[derive(Clone, Default)]
pub struct Inputs {
    frames: BTreeMap<InputSource, DataFrame>,
}

impl Inputs {
    pub fn new() -> Self {
        Inputs::default()
    }

    pub fn insert(&mut self, source: InputSource, frame: DataFrame) {
        self.frames.insert(source, frame);
    }

    /// The frame of `source`.
    pub fn get(&self, source: &InputSource) -> PolarsResult<&DataFrame> {
        self.frames.get(source).ok_or_else(|| {
            PolarsError::ComputeError(format!("the analysis reads no input {source}").into())
        })
    }

    /// The frame of the kind `kind`.
    pub fn kind(&self, kind: &str) -> PolarsResult<DataFrame> {
        self.get(&InputSource::Kind(kind.to_string())).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&InputSource, &DataFrame)> {
        self.frames.iter()
    }

    pub fn into_frames(self) -> BTreeMap<InputSource, DataFrame> {
        self.frames
    }
}

/// A computation from one partition's inputs to an annotation.
pub trait Analysis: Send + Sync + 'static {
    /// Its name, partitioning, inputs and description. A built-in's `version` here is its
    /// code's revision; the version its annotations carry is the deployment's (in the
    /// catalog), which counts the revisions this deployment has run.
    fn meta(&self) -> &AnalysisMeta;

    /// Compute the annotation of one partition. Runs on a blocking thread.
    fn compute(&self, inputs: Inputs) -> PolarsResult<DataFrame>;
}
