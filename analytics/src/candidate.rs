//! Candidates: a changed definition of a live analysis, registered beside it
//! ([`crate::Registry::put_candidate`]), built over some partitions through the normal
//! queue and workers, compared with the live annotations, then promoted
//! ([`crate::Registry::promote`]) or discarded.
//!
//! A candidate of `daily_avg` is stored as the analysis `daily_avg@candidate` (see
//! [`scholia_events::store::CANDIDATE_SUFFIX`]), and its annotations live under that name.
//! Readers, charts, lineage and invalidations never see it: the catalog leaves candidates
//! out of every question a user's request asks, and subscriptions, reads and events name
//! the live analysis only.
//!
//! This module holds what the candidate endpoints compute: which partitions to build, and
//! the per-partition diff of the candidate's annotations against the live ones.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use scholia_events::analysis::{AnalysisMeta, ColumnSpec, ColumnType};
use scholia_events::store::StoredAnnotation;
use scholia_events::{Error, PartitionKey, Result, Store};

/// The most partitions one request builds a candidate over.
pub const MAX_BUILD_PARTITIONS: usize = 10_000;
/// The largest sample of partitions a candidate is built over.
pub const MAX_SAMPLE: i64 = 1_000;
/// The most partitions one diff compares.
pub const MAX_DIFF_PARTITIONS: usize = 1_000;
/// The most rows of each list (added, removed, changed) a diff shows per partition; the
/// counts beside them are whole.
pub const MAX_DIFF_ROWS: usize = 100;

/// The partitions of a candidate build: a range, or the `sample` latest partitions the
/// live version built.
pub async fn partitions_to_build(
    store: &Store,
    live: &AnalysisMeta,
    candidate: &AnalysisMeta,
    range: Option<(DateTime<Utc>, DateTime<Utc>)>,
    sample: Option<i64>,
) -> Result<Vec<PartitionKey>> {
    match (range, sample) {
        (Some((from, to)), None) => candidate
            .partition
            .partitions_between(from, to, MAX_BUILD_PARTITIONS)
            .map_err(Error::Invalid),
        (None, Some(n)) => {
            if !(1..=MAX_SAMPLE).contains(&n) {
                return Err(Error::Invalid(format!(
                    "sample must be between 1 and {MAX_SAMPLE} partitions, not {n}"
                )));
            }
            if candidate.partition != live.partition {
                return Err(Error::Invalid(format!(
                    "the candidate partitions by {} and the live analysis by {}, so the live version's partitions are no sample of it; give from and to instead",
                    candidate.partition, live.partition
                )));
            }
            let mut keys = store
                .annotations
                .built(&live.name, live.version, n as usize)
                .await?;
            if keys.is_empty() {
                return Err(Error::Conflict(format!(
                    "the live version of {:?} has built no partition yet, so there is nothing to sample; give from and to instead",
                    live.name
                )));
            }
            keys.sort();
            Ok(keys)
        }
        _ => Err(Error::Invalid(
            "give either from and to (a range of partitions) or sample (a number of the latest partitions the live version built)".into(),
        )),
    }
}

/// One partition compared.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionDiff {
    pub partition: PartitionKey,
    /// `compared`, or `not_built` when the candidate's version has not built it.
    #[schema(pattern = "^(compared|not_built)$")]
    pub status: &'static str,
    /// Rows only the candidate has.
    pub added: u64,
    /// Rows only the live annotation has.
    pub removed: u64,
    /// Rows both have under the same key, with other values.
    pub changed: u64,
    /// The columns whose values differ in changed rows (or that one side lacks).
    pub changed_columns: Vec<String>,
    /// The columns rows are matched on: the strings, integers, booleans, dates and times
    /// both sides have (floats are measures).
    pub key_columns: Vec<String>,
    /// The live annotation's generation (null when the live analysis has none).
    pub live_generation: Option<i64>,
    pub candidate_generation: Option<i64>,
    /// At most 100 rows of each list; the counts above are whole.
    pub rows: RowChanges,
}

/// The rows that differ, at most [`MAX_DIFF_ROWS`] of each list.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RowChanges {
    #[schema(value_type = Vec<Object>)]
    pub added: Vec<Value>,
    #[schema(value_type = Vec<Object>)]
    pub removed: Vec<Value>,
    pub changed: Vec<ChangedRow>,
}

/// A row whose key both sides have, with other values.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChangedRow {
    /// The key columns' values.
    #[schema(value_type = Object)]
    pub key: Value,
    #[schema(value_type = Object)]
    pub live: Value,
    #[schema(value_type = Object)]
    pub candidate: Value,
}

/// The columns a diff matches rows on, and who named them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffKey<'a> {
    /// None named: the non-measure columns both sides have.
    Inferred,
    /// The request's `?key=`.
    Asked(&'a [String]),
    /// The key the candidate's definition declares.
    Candidate(&'a [String]),
    /// The key the live analysis declares (the candidate declaring none).
    Live(&'a [String]),
}

impl<'a> DiffKey<'a> {
    /// The request's key, else the candidate's declared key, else the live one's.
    pub fn choose(
        asked: Option<&'a [String]>,
        live: &'a AnalysisMeta,
        candidate: &'a AnalysisMeta,
    ) -> Self {
        match (asked, candidate.key.as_deref(), live.key.as_deref()) {
            (Some(key), _, _) => DiffKey::Asked(key),
            (None, Some(key), _) => DiffKey::Candidate(key),
            (None, None, Some(key)) => DiffKey::Live(key),
            (None, None, None) => DiffKey::Inferred,
        }
    }

    pub fn columns(self) -> Option<&'a [String]> {
        match self {
            DiffKey::Inferred => None,
            DiffKey::Asked(key) | DiffKey::Candidate(key) | DiffKey::Live(key) => Some(key),
        }
    }

    /// Who named the key: `query`, `candidate` or `live` (none when inferred).
    pub fn named_by(self) -> Option<&'static str> {
        match self {
            DiffKey::Inferred => None,
            DiffKey::Asked(_) => Some("query"),
            DiffKey::Candidate(_) => Some("candidate"),
            DiffKey::Live(_) => Some("live"),
        }
    }

    /// Why a key column the candidate's annotation lacks is refused, and what to do.
    fn missing(self, column: &str, partition: &PartitionKey, has: &str, live: &str) -> String {
        let lacks = format!(
            "is not a column of the candidate's annotations of {partition}, which has {has}"
        );
        match self {
            DiffKey::Candidate(_) => format!(
                "The key column {column} that the candidate declares {lacks}; declare a key of its columns in the candidate's definition, or give key= to match rows on other columns."
            ),
            DiffKey::Live(_) => format!(
                "The key column {column} that {live} declares {lacks}; declare a key of its columns in the candidate's definition, or give key= to match rows on other columns."
            ),
            DiffKey::Asked(_) | DiffKey::Inferred => format!(
                "The key column {column} {lacks}; name columns it has, or leave key out to match rows on their non-measure columns."
            ),
        }
    }
}

/// Compare the candidate's annotations of `keys` with the live ones.
pub async fn diff(
    store: &Store,
    live: &AnalysisMeta,
    candidate: &AnalysisMeta,
    keys: &[PartitionKey],
    row_key: DiffKey<'_>,
) -> Result<Vec<PartitionDiff>> {
    let declared_key = row_key.columns();
    let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
        return Ok(Vec::new());
    };
    let by_key = |stored: Vec<StoredAnnotation>| -> BTreeMap<PartitionKey, StoredAnnotation> {
        stored.into_iter().map(|a| (a.partition, a)).collect()
    };
    let live_stored = by_key(store.annotations.load(&live.name, first, last).await?);
    let mut candidate_stored = by_key(store.annotations.load(&candidate.name, first, last).await?);
    candidate_stored.retain(|_, a| a.version == candidate.version);
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let live_one = live_stored.get(key);
        let Some(candidate_one) = candidate_stored.get(key) else {
            out.push(PartitionDiff {
                partition: *key,
                status: "not_built",
                added: 0,
                removed: 0,
                changed: 0,
                changed_columns: Vec::new(),
                key_columns: Vec::new(),
                live_generation: live_one.map(|a| a.generation),
                candidate_generation: None,
                rows: RowChanges::default(),
            });
            continue;
        };
        let (live_columns, live_rows) = match live_one {
            Some(a) => (a.columns.clone(), rows_of(a)?),
            None => (Vec::new(), Vec::new()),
        };
        if let Some(missing) = declared_key
            .into_iter()
            .flatten()
            .find(|k| !candidate_one.columns.iter().any(|c| &c.name == *k))
        {
            let columns: Vec<&str> = candidate_one
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            return Err(Error::Invalid(row_key.missing(
                missing,
                key,
                &columns.join(", "),
                &live.name,
            )));
        }
        let compared = compare(
            &live_columns,
            live_rows,
            &candidate_one.columns,
            rows_of(candidate_one)?,
            declared_key,
        );
        out.push(PartitionDiff {
            partition: *key,
            status: "compared",
            live_generation: live_one.map(|a| a.generation),
            candidate_generation: Some(candidate_one.generation),
            ..compared
        });
    }
    Ok(out)
}

fn rows_of(stored: &StoredAnnotation) -> Result<Vec<Map<String, Value>>> {
    serde_json::from_str(stored.rows.get())
        .map_err(|e| Error::internal("reading an annotation's rows", e))
}

fn is_key(ty: ColumnType) -> bool {
    matches!(
        ty,
        ColumnType::String
            | ColumnType::Int
            | ColumnType::Bool
            | ColumnType::Date
            | ColumnType::Datetime
    )
}

/// The key columns: of the candidate's columns, those of key types that the live side has
/// with a key type too (all of the candidate's when the live side has no columns).
fn key_columns(live: &[ColumnSpec], candidate: &[ColumnSpec]) -> Vec<String> {
    candidate
        .iter()
        .filter(|c| is_key(c.ty))
        .filter(|c| live.is_empty() || live.iter().any(|l| l.name == c.name && is_key(l.ty)))
        .map(|c| c.name.clone())
        .collect()
}

/// Equal, floats within a relative 1e-9 (rounding of the same computation).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
            _ => x == y,
        },
        _ => a == b,
    }
}

/// The columns in which two rows differ (a column one row lacks counts as differing).
fn differing(live: &Map<String, Value>, candidate: &Map<String, Value>) -> Vec<String> {
    let names: BTreeSet<&String> = live.keys().chain(candidate.keys()).collect();
    names
        .into_iter()
        .filter(|name| match (live.get(*name), candidate.get(*name)) {
            (Some(a), Some(b)) => !same(a, b),
            _ => true,
        })
        .cloned()
        .collect()
}

/// Match rows on their key columns and sort them into added, removed and changed. Rows
/// with the same key pair up: identical ones first, the rest in their order (by their JSON
/// text), and what is left over on either side is added or removed.
fn compare(
    live_columns: &[ColumnSpec],
    live_rows: Vec<Map<String, Value>>,
    candidate_columns: &[ColumnSpec],
    candidate_rows: Vec<Map<String, Value>>,
    key: Option<&[String]>,
) -> PartitionDiff {
    let keys = match key {
        Some(declared) => declared.to_vec(),
        None => key_columns(live_columns, candidate_columns),
    };
    let key_of = |row: &Map<String, Value>| -> (String, Value) {
        let key: Map<String, Value> = keys
            .iter()
            .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
            .collect();
        let key = Value::Object(key);
        (key.to_string(), key)
    };
    type Group = (Value, Vec<Map<String, Value>>, Vec<Map<String, Value>>);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for row in live_rows {
        let (text, key) = key_of(&row);
        groups
            .entry(text)
            .or_insert_with(|| (key, Vec::new(), Vec::new()))
            .1
            .push(row);
    }
    for row in candidate_rows {
        let (text, key) = key_of(&row);
        groups
            .entry(text)
            .or_insert_with(|| (key, Vec::new(), Vec::new()))
            .2
            .push(row);
    }
    let mut diff = PartitionDiff {
        partition: PartitionKey::parse("2000-01-01").expect("a valid key"),
        status: "compared",
        added: 0,
        removed: 0,
        changed: 0,
        changed_columns: Vec::new(),
        key_columns: keys.clone(),
        live_generation: None,
        candidate_generation: None,
        rows: RowChanges::default(),
    };
    let mut changed_columns: BTreeSet<String> = BTreeSet::new();
    for (_, (key, mut live, mut candidate)) in groups {
        let by_text = |a: &Map<String, Value>, b: &Map<String, Value>| {
            Value::Object(a.clone())
                .to_string()
                .cmp(&Value::Object(b.clone()).to_string())
        };
        live.sort_by(by_text);
        candidate.sort_by(by_text);
        // Identical rows cancel out.
        let mut unmatched_live = Vec::new();
        for row in live {
            match candidate.iter().position(|c| differing(&row, c).is_empty()) {
                Some(i) => {
                    candidate.remove(i);
                }
                None => unmatched_live.push(row),
            }
        }
        let pairs = unmatched_live.len().min(candidate.len());
        let mut candidate = candidate.into_iter();
        let mut live = unmatched_live.into_iter();
        for _ in 0..pairs {
            let (l, c) = (
                live.next().expect("counted"),
                candidate.next().expect("counted"),
            );
            changed_columns.extend(differing(&l, &c));
            diff.changed += 1;
            if diff.rows.changed.len() < MAX_DIFF_ROWS {
                diff.rows.changed.push(ChangedRow {
                    key: key.clone(),
                    live: Value::Object(l),
                    candidate: Value::Object(c),
                });
            }
        }
        for row in live {
            diff.removed += 1;
            if diff.rows.removed.len() < MAX_DIFF_ROWS {
                diff.rows.removed.push(Value::Object(row));
            }
        }
        for row in candidate {
            diff.added += 1;
            if diff.rows.added.len() < MAX_DIFF_ROWS {
                diff.rows.added.push(Value::Object(row));
            }
        }
    }
    diff.changed_columns = changed_columns.into_iter().collect();
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn columns(spec: &[(&str, ColumnType)]) -> Vec<ColumnSpec> {
        spec.iter()
            .map(|(name, ty)| ColumnSpec {
                name: name.to_string(),
                ty: *ty,
            })
            .collect()
    }

    fn rows(values: Value) -> Vec<Map<String, Value>> {
        serde_json::from_value(values).unwrap()
    }

    #[test]
    fn rows_are_matched_on_their_non_float_columns_and_sorted_into_added_removed_and_changed() {
        let spec = columns(&[("source", ColumnType::String), ("avg", ColumnType::Float)]);
        let diff = compare(
            &spec,
            rows(
                json!([{"source": "a", "avg": 1.0}, {"source": "b", "avg": 2.0}, {"source": "c", "avg": 3.0}]),
            ),
            &spec,
            rows(
                json!([{"source": "a", "avg": 1.0}, {"source": "b", "avg": 2.5}, {"source": "d", "avg": 4.0}]),
            ),
            None,
        );
        assert_eq!(diff.key_columns, ["source"]);
        assert_eq!((diff.added, diff.removed, diff.changed), (1, 1, 1));
        assert_eq!(diff.changed_columns, ["avg"]);
        assert_eq!(diff.rows.added, [json!({"source": "d", "avg": 4.0})]);
        assert_eq!(diff.rows.removed, [json!({"source": "c", "avg": 3.0})]);
        assert_eq!(diff.rows.changed[0].key, json!({"source": "b"}));
        assert_eq!(diff.rows.changed[0].candidate["avg"], 2.5);
    }

    #[test]
    fn a_new_column_is_a_change_of_every_row_and_rounding_is_not() {
        let live = columns(&[("source", ColumnType::String), ("avg", ColumnType::Float)]);
        let candidate = columns(&[
            ("source", ColumnType::String),
            ("avg", ColumnType::Float),
            ("n", ColumnType::Int),
        ]);
        let diff = compare(
            &live,
            rows(json!([{"source": "a", "avg": 0.1 + 0.2}])),
            &candidate,
            rows(json!([{"source": "a", "avg": 0.3, "n": 2}])),
            None,
        );
        assert_eq!(diff.key_columns, ["source"]);
        assert_eq!(diff.changed, 1);
        assert_eq!(diff.changed_columns, ["n"]);
    }

    #[test]
    fn at_most_a_hundred_rows_are_shown_but_all_are_counted() {
        let spec = columns(&[("i", ColumnType::Int)]);
        let many: Vec<Value> = (0..250).map(|i| json!({"i": i})).collect();
        let diff = compare(&spec, Vec::new(), &spec, rows(Value::Array(many)), None);
        assert_eq!(diff.added, 250);
        assert_eq!(diff.rows.added.len(), MAX_DIFF_ROWS);
    }

    #[test]
    fn a_declared_key_matches_rows_whose_other_key_typed_columns_changed() {
        let spec = columns(&[
            ("source", ColumnType::String),
            ("avg", ColumnType::Float),
            ("high", ColumnType::Bool),
        ]);
        let live = rows(json!([{"source": "a", "avg": 280.0, "high": false}]));
        let candidate = rows(json!([{"source": "a", "avg": 280.0, "high": true}]));
        // Matched on every non-float column, the flag's change is a row removed and added.
        let inferred = compare(&spec, live.clone(), &spec, candidate.clone(), None);
        assert_eq!(inferred.key_columns, ["source", "high"]);
        assert_eq!(
            (inferred.added, inferred.removed, inferred.changed),
            (1, 1, 0)
        );
        // Matched on the declared key, it is one row changed in `high`.
        let key = ["source".to_string()];
        let declared = compare(&spec, live, &spec, candidate, Some(&key));
        assert_eq!(declared.key_columns, ["source"]);
        assert_eq!(
            (declared.added, declared.removed, declared.changed),
            (0, 0, 1)
        );
        assert_eq!(declared.changed_columns, ["high"]);
    }
}
