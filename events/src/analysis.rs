//! What every component knows of an analysis without running it: its name, version,
//! partitioning and inputs, and the columns of its annotations. The computation itself
//! (Polars or SQL) belongs to `analytics`.

use std::fmt;

use chrono::Duration;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::duration::{max_duration, parse_duration};
use crate::partition::Granularity;

/// Where an input's rows come from: a kind's records, or another analysis' annotations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputSource {
    Kind(String),
    Analysis(String),
}

impl InputSource {
    pub fn name(&self) -> &str {
        match self {
            InputSource::Kind(name) | InputSource::Analysis(name) => name,
        }
    }

    /// `kind` or `analysis`, as stores write it.
    pub fn type_word(&self) -> &'static str {
        match self {
            InputSource::Kind(_) => "kind",
            InputSource::Analysis(_) => "analysis",
        }
    }

    pub fn from_parts(type_word: &str, name: String) -> Result<Self, String> {
        match type_word {
            "kind" => Ok(InputSource::Kind(name)),
            "analysis" => Ok(InputSource::Analysis(name)),
            other => Err(format!("{other:?} is not an input type (kind or analysis)")),
        }
    }
}

impl fmt::Display for InputSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.type_word(), self.name())
    }
}

/// How far before its partition an input reaches: an ISO 8601 duration, kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookback {
    text: String,
    duration: Duration,
}

impl Lookback {
    pub fn parse(text: &str) -> Result<Self, String> {
        let duration = parse_duration(text, "lookback", max_duration())?;
        Ok(Lookback {
            text: text.to_string(),
            duration,
        })
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Serialize for Lookback {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Lookback {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Lookback::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One input of an analysis: `{"kind": "generation", "lookback": "PT2H"}` or
/// `{"analysis": "daily_avg"}`. Its OpenAPI schema is written out in `openapi.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    #[serde(flatten)]
    pub source: InputSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookback: Option<Lookback>,
}

impl Input {
    pub fn kind(name: &str) -> Self {
        Input {
            source: InputSource::Kind(name.to_string()),
            lookback: None,
        }
    }

    pub fn lookback_duration(&self) -> Duration {
        self.lookback
            .as_ref()
            .map_or_else(Duration::zero, Lookback::duration)
    }
}

/// How an analysis is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Rust, shipped with Scholia.
    Builtin,
    Sql,
}

/// An analysis as every component sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AnalysisMeta {
    pub name: String,
    /// Changes whenever the computation (or an upstream analysis' version) changes.
    pub version: i64,
    pub partition: Granularity,
    pub inputs: Vec<Input>,
    pub language: Language,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    pub description: String,
    /// The columns that identify a row of its annotations, when it declares them: a
    /// candidate's diff matches rows on them instead of on the non-measure columns. Not
    /// part of what is built, so it never changes the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
}

impl AnalysisMeta {
    /// The first kind it reads, shown as the analysis' `kind`.
    pub fn kind(&self) -> Option<&str> {
        self.kinds().next()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().filter_map(|i| match &i.source {
            InputSource::Kind(k) => Some(k.as_str()),
            InputSource::Analysis(_) => None,
        })
    }

    /// The analyses whose annotations it reads.
    pub fn upstream(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().filter_map(|i| match &i.source {
            InputSource::Analysis(a) => Some(a.as_str()),
            InputSource::Kind(_) => None,
        })
    }

    /// The input reading `source`, if any.
    pub fn input(&self, source: &InputSource) -> Option<&Input> {
        self.inputs.iter().find(|i| &i.source == source)
    }
}

/// The type of an annotation column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Float,
    Int,
    Bool,
    String,
    Date,
    Datetime,
    Other,
}

/// A column of an annotation: its name and type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_written_as_kind_or_analysis_with_an_optional_lookback() {
        let inputs: Vec<Input> = serde_json::from_str(
            r#"[{"kind":"generation","lookback":"PT2H"},{"analysis":"daily_avg"}]"#,
        )
        .unwrap();
        assert_eq!(inputs[0].source, InputSource::Kind("generation".into()));
        assert_eq!(inputs[0].lookback_duration(), Duration::hours(2));
        assert_eq!(inputs[1].source, InputSource::Analysis("daily_avg".into()));
        assert_eq!(
            serde_json::to_string(&inputs).unwrap(),
            r#"[{"kind":"generation","lookback":"PT2H"},{"analysis":"daily_avg"}]"#
        );
        let bad = serde_json::from_str::<Vec<Input>>(r#"[{"kind":"g","lookback":"2 hours"}]"#);
        assert!(bad.unwrap_err().to_string().contains("ISO 8601"));
    }
}
