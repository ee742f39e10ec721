//! Loading one partition of records into a Polars `DataFrame`, column by column (never
//! row by row through `AnyValue`).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use polars::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use scholia_events::Database;

use crate::Result;

/// The envelope columns every input frame starts with.
pub const ENVELOPE_COLUMNS: [&str; 5] = ["data_id", "source", "kind", "created", "received_at"];

/// One partition's records, ready for an analysis.
#[derive(Clone)]
pub struct PartitionInput {
    pub frame: DataFrame,
    pub rows: u64,
    /// The highest log `seq` among the records (0 when there are none).
    pub max_seq: i64,
}

/// A declared field type, as kinds declare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Float,
    Int,
    String,
    Bool,
    Timestamp,
    Json,
}

impl Declared {
    fn parse(s: &str) -> Option<Declared> {
        Some(match s {
            "float" => Declared::Float,
            "int" => Declared::Int,
            "string" => Declared::String,
            "bool" => Declared::Bool,
            "timestamp" => Declared::Timestamp,
            "json" => Declared::Json,
            _ => return None,
        })
    }
}

/// The declared field types of `kind`.
pub async fn declared_fields(db: &Database, kind: &str) -> Result<BTreeMap<String, Declared>> {
    let sql = "SELECT fields FROM kinds WHERE kind = $1";
    let fields: Option<String> = match db {
        Database::Postgres(pg) => {
            sqlx::query_scalar(sql)
                .bind(kind)
                .fetch_optional(&pg.pool)
                .await?
        }
        Database::Sqlite(d) => {
            sqlx::query_scalar(sql)
                .bind(kind)
                .fetch_optional(&d.pool)
                .await?
        }
    };
    let map: BTreeMap<String, String> = fields
        .and_then(|f| serde_json::from_str(&f).ok())
        .unwrap_or_default();
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| Declared::parse(&v).map(|d| (k, d)))
        .collect())
}

type PgRecordRow = (Uuid, String, DateTime<Utc>, DateTime<Utc>, i64, String);

/// Load the records of `kind` created in `[from, to)`.
pub async fn load(
    db: &Database,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    declared: &BTreeMap<String, Declared>,
) -> Result<PartitionInput> {
    load_after(db, kind, from, to, declared, 0, 0).await
}

/// Load the records of `kind` created in `[from, to)` whose `seq` is above `after`,
/// streaming rows into the columns as they arrive. `expected` rows (a hint) are reserved
/// up front.
pub async fn load_after(
    db: &Database,
    kind: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    declared: &BTreeMap<String, Declared>,
    after: i64,
    expected: usize,
) -> Result<PartitionInput> {
    let mut builder = FrameBuilder::new(kind, declared);
    builder.reserve(expected);
    match db {
        Database::Postgres(pg) => {
            let mut rows = sqlx::query_as::<_, PgRecordRow>(
                "SELECT data_id, source, created, received_at, seq, data::text FROM records \
                 WHERE kind = $1 AND created >= $2 AND created < $3 AND seq > $4 ORDER BY created, data_id",
            )
            .bind(kind)
            .bind(from)
            .bind(to)
            .bind(after)
            .fetch(&pg.pool);
            while let Some((id, source, created, received, seq, data)) = rows.try_next().await? {
                builder.push(
                    id,
                    source,
                    created.timestamp_micros(),
                    received.timestamp_micros(),
                    seq,
                    &data,
                );
            }
        }
        Database::Sqlite(d) => {
            let mut rows = sqlx::query_as::<_, (Uuid, String, i64, i64, i64, String)>(
                "SELECT data_id, source, created, received_at, seq, data FROM records \
                 WHERE kind = $1 AND created >= $2 AND created < $3 AND seq > $4 ORDER BY created, data_id",
            )
            .bind(kind)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .bind(after)
            .fetch(&d.pool);
            while let Some((id, source, created, received, seq, data)) = rows.try_next().await? {
                builder.push(id, source, created, received, seq, &data);
            }
        }
    }
    builder.finish()
}

/// An empty input frame with the columns a kind's records would have, for checking
/// that a SQL analysis compiles. `sample` fields (from recent records) add inferred
/// columns to the declared ones.
pub fn empty_input(
    kind: &str,
    declared: &BTreeMap<String, Declared>,
    sample: &[String],
) -> Result<DataFrame> {
    let mut builder = FrameBuilder::new(kind, declared);
    for data in sample {
        builder.push(Uuid::nil(), String::new(), 0, 0, 0, data);
    }
    let frame = builder.finish()?.frame;
    Ok(frame.head(Some(0)))
}

/// An empty input frame shaped like the kind's records: its declared fields and the
/// fields of its most recent records. Used to check that a SQL analysis compiles, and
/// as the input of a partition that has no records, so that an analysis naming the
/// kind's fields makes no rows of it rather than failing.
pub async fn empty_for_kind(
    db: &Database,
    kind: &str,
    declared: &BTreeMap<String, Declared>,
) -> Result<DataFrame> {
    let sample: Vec<String> =
        match db {
            Database::Postgres(pg) => sqlx::query_scalar(
                "SELECT data::text FROM records WHERE kind = $1 ORDER BY created DESC LIMIT 200",
            )
            .bind(kind)
            .fetch_all(&pg.pool)
            .await?,
            Database::Sqlite(d) => {
                sqlx::query_scalar(
                    "SELECT data FROM records WHERE kind = $1 ORDER BY created DESC LIMIT 200",
                )
                .bind(kind)
                .fetch_all(&d.pool)
                .await?
            }
        };
    empty_input(kind, declared, &sample)
}

/// Column builders that start untyped and widen as values arrive: int → float, and
/// anything mixed → string (JSON text).
enum Col {
    Null,
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Str(Vec<Option<String>>),
    Time(Vec<Option<i64>>),
}

struct Field {
    col: Col,
    declared: Option<Declared>,
    /// Rows seen before this field first appeared, and since then through `len`.
    len: usize,
}

impl Field {
    fn pad_to(&mut self, len: usize) {
        while self.len < len {
            match &mut self.col {
                Col::Null => {}
                Col::Bool(v) => v.push(None),
                Col::Int(v) => v.push(None),
                Col::Float(v) => v.push(None),
                Col::Str(v) => v.push(None),
                Col::Time(v) => v.push(None),
            }
            self.len += 1;
        }
    }

    fn push(&mut self, value: &Value) {
        let n = self.len;
        if value.is_null() {
            self.pad_to(n + 1);
            return;
        }
        let text_only = matches!(self.declared, Some(Declared::String | Declared::Json));
        match value {
            _ if text_only => self.as_str(n).push(Some(text_of(value))),
            Value::Number(x) => {
                let integral = x.as_i64().is_some() && self.declared != Some(Declared::Float);
                match self.col {
                    Col::Null | Col::Int(_) if integral => self.as_int(n).push(x.as_i64()),
                    Col::Null | Col::Int(_) | Col::Float(_) => self.as_float(n).push(x.as_f64()),
                    _ => self.as_str(n).push(Some(x.to_string())),
                }
            }
            Value::Bool(b) => match self.col {
                Col::Null | Col::Bool(_) => self.as_bool(n).push(Some(*b)),
                _ => self.as_str(n).push(Some(b.to_string())),
            },
            Value::String(s) if self.declared == Some(Declared::Timestamp) => match self.col {
                Col::Null | Col::Time(_) => {
                    let t = DateTime::parse_from_rfc3339(s)
                        .ok()
                        .map(|t| t.timestamp_micros());
                    self.as_time(n).push(t)
                }
                _ => self.as_str(n).push(Some(s.clone())),
            },
            other => self.as_str(n).push(Some(text_of(other))),
        }
        self.len += 1;
    }

    fn as_bool(&mut self, n: usize) -> &mut Vec<Option<bool>> {
        if let Col::Null = self.col {
            self.col = Col::Bool(vec![None; n]);
        }
        match &mut self.col {
            Col::Bool(v) => v,
            _ => unreachable!("the caller checked the column is untyped or bool"),
        }
    }

    fn as_int(&mut self, n: usize) -> &mut Vec<Option<i64>> {
        if let Col::Null = self.col {
            self.col = Col::Int(vec![None; n]);
        }
        match &mut self.col {
            Col::Int(v) => v,
            _ => unreachable!("the caller checked the column is untyped or int"),
        }
    }

    fn as_float(&mut self, n: usize) -> &mut Vec<Option<f64>> {
        self.col = match std::mem::replace(&mut self.col, Col::Null) {
            Col::Null => Col::Float(vec![None; n]),
            Col::Int(v) => Col::Float(v.into_iter().map(|x| x.map(|i| i as f64)).collect()),
            Col::Float(v) => Col::Float(v),
            other => other,
        };
        match &mut self.col {
            Col::Float(v) => v,
            _ => unreachable!("the caller checked the column is untyped or numeric"),
        }
    }

    fn as_time(&mut self, n: usize) -> &mut Vec<Option<i64>> {
        if let Col::Null = self.col {
            self.col = Col::Time(vec![None; n]);
        }
        match &mut self.col {
            Col::Time(v) => v,
            _ => unreachable!("the caller checked the column is untyped or a time"),
        }
    }

    fn as_str(&mut self, n: usize) -> &mut Vec<Option<String>> {
        self.col = match std::mem::replace(&mut self.col, Col::Null) {
            Col::Null => Col::Str(vec![None; n]),
            Col::Bool(v) => Col::Str(v.into_iter().map(|x| x.map(|b| b.to_string())).collect()),
            Col::Int(v) => Col::Str(v.into_iter().map(|x| x.map(|i| i.to_string())).collect()),
            Col::Float(v) => Col::Str(v.into_iter().map(|x| x.map(|f| f.to_string())).collect()),
            Col::Time(v) => Col::Str(
                v.into_iter()
                    .map(|x| {
                        x.and_then(DateTime::from_timestamp_micros)
                            .map(|t| t.to_rfc3339())
                    })
                    .collect(),
            ),
            Col::Str(v) => Col::Str(v),
        };
        match &mut self.col {
            Col::Str(v) => v,
            _ => unreachable!("just made a string column"),
        }
    }

    fn into_column(mut self, name: &str, len: usize) -> Column {
        self.pad_to(len);
        let name = PlSmallStr::from(name);
        match self.col {
            Col::Null => Series::full_null(name, len, &DataType::Float64).into_column(),
            Col::Bool(v) => Series::new(name, v).into_column(),
            Col::Int(v) => Series::new(name, v).into_column(),
            Col::Float(v) => Series::new(name, v).into_column(),
            Col::Str(v) => Series::new(name, v).into_column(),
            Col::Time(v) => Series::new(name, v)
                .into_datetime(TimeUnit::Microseconds, None)
                .into_column(),
        }
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct FrameBuilder<'a> {
    kind: &'a str,
    declared: &'a BTreeMap<String, Declared>,
    ids: Vec<String>,
    sources: Vec<String>,
    created: Vec<i64>,
    received: Vec<i64>,
    max_seq: i64,
    fields: HashMap<String, Field>,
}

impl<'a> FrameBuilder<'a> {
    fn new(kind: &'a str, declared: &'a BTreeMap<String, Declared>) -> Self {
        let fields = declared
            .iter()
            .map(|(name, d)| {
                (
                    column_name(name),
                    Field {
                        col: Col::Null,
                        declared: Some(*d),
                        len: 0,
                    },
                )
            })
            .collect();
        FrameBuilder {
            kind,
            declared,
            ids: Vec::new(),
            sources: Vec::new(),
            created: Vec::new(),
            received: Vec::new(),
            max_seq: 0,
            fields,
        }
    }

    fn reserve(&mut self, rows: usize) {
        self.ids.reserve(rows);
        self.sources.reserve(rows);
        self.created.reserve(rows);
        self.received.reserve(rows);
    }

    fn push(
        &mut self,
        id: Uuid,
        source: String,
        created: i64,
        received: i64,
        seq: i64,
        data: &str,
    ) {
        let row = self.ids.len();
        self.ids.push(id.to_string());
        self.sources.push(source);
        self.created.push(created);
        self.received.push(received);
        self.max_seq = self.max_seq.max(seq);
        if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(data) {
            for (key, value) in map {
                let name = column_name(&key);
                let declared = self.declared.get(&key).copied();
                let field = self.fields.entry(name).or_insert_with(|| Field {
                    col: Col::Null,
                    declared,
                    len: 0,
                });
                field.pad_to(row);
                field.push(&value);
            }
        }
    }

    fn finish(self) -> Result<PartitionInput> {
        let len = self.ids.len();
        let mut columns = vec![
            Series::new("data_id".into(), self.ids).into_column(),
            Series::new("source".into(), self.sources).into_column(),
            Series::new("kind".into(), vec![self.kind.to_string(); len]).into_column(),
            Series::new("created".into(), self.created)
                .into_datetime(TimeUnit::Microseconds, None)
                .into_column(),
            Series::new("received_at".into(), self.received)
                .into_datetime(TimeUnit::Microseconds, None)
                .into_column(),
        ];
        let mut fields: Vec<(String, Field)> = self.fields.into_iter().collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, field) in fields {
            columns.push(field.into_column(&name, len));
        }
        let frame = DataFrame::new(len, columns)?;
        Ok(PartitionInput {
            frame,
            rows: len as u64,
            max_seq: self.max_seq,
        })
    }
}

/// A data field's column name; fields that collide with envelope columns get `data_`.
fn column_name(field: &str) -> String {
    if ENVELOPE_COLUMNS.contains(&field) {
        format!("data_{field}")
    } else {
        field.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(rows: &[&str], declared: &BTreeMap<String, Declared>) -> DataFrame {
        let mut b = FrameBuilder::new("k", declared);
        for (i, data) in rows.iter().enumerate() {
            b.push(
                Uuid::now_v7(),
                format!("s{i}"),
                i as i64 * 1_000_000,
                0,
                i as i64 + 1,
                data,
            );
        }
        b.finish().unwrap().frame
    }

    #[test]
    fn fields_become_typed_columns_with_nulls_where_absent() {
        let df = build(
            &[
                r#"{"mw": 1, "ok": true}"#,
                r#"{"mw": 2.5}"#,
                r#"{"mw": null, "note": "x"}"#,
            ],
            &BTreeMap::new(),
        );
        assert_eq!(df.height(), 3);
        let mw = df.column("mw").unwrap();
        assert_eq!(mw.dtype(), &DataType::Float64);
        assert_eq!(mw.null_count(), 1);
        assert_eq!(df.column("ok").unwrap().dtype(), &DataType::Boolean);
        assert_eq!(df.column("ok").unwrap().null_count(), 2);
        assert_eq!(df.column("note").unwrap().dtype(), &DataType::String);
        assert!(matches!(
            df.column("created").unwrap().dtype(),
            DataType::Datetime(TimeUnit::Microseconds, None)
        ));
    }

    #[test]
    fn mixed_values_make_a_text_column() {
        let df = build(
            &[r#"{"v": 1}"#, r#"{"v": "one"}"#, r#"{"v": {"a": 1}}"#],
            &BTreeMap::new(),
        );
        let v = df.column("v").unwrap();
        assert_eq!(v.dtype(), &DataType::String);
        assert_eq!(v.str().unwrap().get(0), Some("1"));
        assert_eq!(v.str().unwrap().get(2), Some(r#"{"a":1}"#));
    }

    #[test]
    fn declared_types_win_over_inference() {
        let declared: BTreeMap<String, Declared> = [("mw".to_string(), Declared::Float)].into();
        let df = build(&[r#"{"mw": 1}"#, r#"{"mw": 2}"#], &declared);
        assert_eq!(df.column("mw").unwrap().dtype(), &DataType::Float64);
        let empty = build(&[], &declared);
        assert_eq!(empty.column("mw").unwrap().dtype(), &DataType::Float64);
    }

    #[test]
    fn a_field_named_like_an_envelope_column_is_prefixed() {
        let df = build(&[r#"{"source": "inner"}"#], &BTreeMap::new());
        assert_eq!(
            df.column("data_source").unwrap().str().unwrap().get(0),
            Some("inner")
        );
        assert_eq!(
            df.column("source").unwrap().str().unwrap().get(0),
            Some("s0")
        );
    }
}
