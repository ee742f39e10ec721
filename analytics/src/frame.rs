//! Loading one partition of a kind's records into a Polars `DataFrame`, column by
//! column (never row by row through `AnyValue`). Columns follow the kind's schema: a field
//! has its schema's type in every partition, present or not, so an analysis that names a
//! field works on an empty partition too (it makes no rows of it).

use std::collections::HashMap;

use chrono::DateTime;
use polars::prelude::*;
use serde_json::Value;

use scholia_events::schema::{FieldType, KindSchema, column_name};
use scholia_events::store::{RecordRow, RecordSink, Summary};

/// The envelope columns every kind's frame starts with.
pub const ENVELOPE_COLUMNS: [&str; 5] = ["data_id", "source", "kind", "created", "received_at"];

/// One partition's records (or a span of them), ready for an analysis.
#[derive(Clone)]
pub struct PartitionInput {
    pub frame: DataFrame,
    /// What the frame holds: its rows and the highest `seq` among them (0 when empty).
    pub summary: Summary,
}

/// The Polars type of a schema's field type.
fn dtype_of(ty: Option<FieldType>) -> DataType {
    match ty {
        Some(FieldType::Int) => DataType::Int64,
        Some(FieldType::String | FieldType::Json) => DataType::String,
        Some(FieldType::Bool) => DataType::Boolean,
        Some(FieldType::Timestamp) => DataType::Datetime(TimeUnit::Microseconds, None),
        Some(FieldType::Float) | None => DataType::Float64,
    }
}

/// An empty frame with the columns the kind's records have.
pub fn empty(kind: &str, schema: &KindSchema) -> PolarsResult<DataFrame> {
    Ok(FrameBuilder::new(kind, schema).finish()?.frame)
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
    declared: Option<FieldType>,
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
        let text_only = matches!(self.declared, Some(FieldType::String | FieldType::Json));
        match value {
            _ if text_only => self.as_str(n).push(Some(text_of(value))),
            Value::Number(x) => {
                let integral = x.as_i64().is_some() && self.declared != Some(FieldType::Float);
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
            Value::String(s) if self.declared == Some(FieldType::Timestamp) => match self.col {
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
            Col::Null => Series::full_null(name, len, &dtype_of(self.declared)).into_column(),
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

/// Builds a kind's frame from scanned rows.
pub struct FrameBuilder {
    kind: String,
    ids: Vec<String>,
    sources: Vec<String>,
    created: Vec<i64>,
    received: Vec<i64>,
    max_seq: i64,
    /// By column name.
    fields: HashMap<String, Field>,
    /// Field name → column name, for the fields seen.
    columns: HashMap<String, String>,
    schema: KindSchema,
}

impl FrameBuilder {
    pub fn new(kind: &str, schema: &KindSchema) -> Self {
        let mut builder = FrameBuilder {
            kind: kind.to_string(),
            ids: Vec::new(),
            sources: Vec::new(),
            created: Vec::new(),
            received: Vec::new(),
            max_seq: 0,
            fields: HashMap::new(),
            columns: HashMap::new(),
            schema: schema.clone(),
        };
        for (name, spec) in &schema.fields {
            let column = column_name(name);
            builder.columns.insert(name.clone(), column.clone());
            builder.fields.insert(
                column,
                Field {
                    col: Col::Null,
                    declared: Some(spec.ty),
                    len: 0,
                },
            );
        }
        builder
    }

    pub fn reserve(&mut self, rows: usize) {
        self.ids.reserve(rows);
        self.sources.reserve(rows);
        self.created.reserve(rows);
        self.received.reserve(rows);
    }

    pub fn finish(self) -> PolarsResult<PartitionInput> {
        let len = self.ids.len();
        let mut columns = vec![
            Series::new("data_id".into(), self.ids).into_column(),
            Series::new("source".into(), self.sources).into_column(),
            Series::new("kind".into(), vec![self.kind.clone(); len]).into_column(),
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
            summary: Summary {
                rows: len as i64,
                max_seq: self.max_seq,
            },
        })
    }
}

impl RecordSink for FrameBuilder {
    fn push(&mut self, row: RecordRow<'_>) {
        let index = self.ids.len();
        self.ids.push(row.data_id.to_string());
        self.sources.push(row.source.to_string());
        self.created.push(row.created);
        self.received.push(row.received_at);
        self.max_seq = self.max_seq.max(row.seq);
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(row.data) else {
            return;
        };
        for (key, value) in map {
            let column = match self.columns.get(&key) {
                Some(column) => column.clone(),
                None => {
                    let column = column_name(&key);
                    self.columns.insert(key.clone(), column.clone());
                    column
                }
            };
            let declared = self.schema.fields.get(&key).map(|spec| spec.ty);
            let field = self.fields.entry(column).or_insert_with(|| Field {
                col: Col::Null,
                declared,
                len: 0,
            });
            field.pad_to(index);
            field.push(&value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scholia_events::schema::FieldSpec;
    use uuid::Uuid;

    fn build(rows: &[&str], schema: &KindSchema) -> DataFrame {
        let mut b = FrameBuilder::new("k", schema);
        for (i, data) in rows.iter().enumerate() {
            let source = format!("s{i}");
            b.push(RecordRow {
                data_id: Uuid::now_v7(),
                source: &source,
                created: i as i64 * 1_000_000,
                received_at: 0,
                seq: i as i64 + 1,
                data,
            });
        }
        b.finish().unwrap().frame
    }

    fn schema(fields: &[(&str, FieldType)]) -> KindSchema {
        KindSchema {
            fields: fields
                .iter()
                .map(|(n, ty)| {
                    (
                        n.to_string(),
                        FieldSpec {
                            ty: *ty,
                            declared: false,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn fields_become_typed_columns_with_nulls_where_absent() {
        let df = build(
            &[
                r#"{"mw": 1, "ok": true}"#,
                r#"{"mw": 2.5}"#,
                r#"{"mw": null, "note": "x"}"#,
            ],
            &KindSchema::default(),
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
            &KindSchema::default(),
        );
        let v = df.column("v").unwrap();
        assert_eq!(v.dtype(), &DataType::String);
        assert_eq!(v.str().unwrap().get(0), Some("1"));
        assert_eq!(v.str().unwrap().get(2), Some(r#"{"a":1}"#));
    }

    #[test]
    fn the_schema_types_every_partition_alike_even_an_empty_one() {
        let schema = schema(&[("mw", FieldType::Float), ("n", FieldType::Int)]);
        let df = build(&[r#"{"mw": 1}"#, r#"{"mw": 2}"#], &schema);
        assert_eq!(df.column("mw").unwrap().dtype(), &DataType::Float64);
        let empty = empty("k", &schema).unwrap();
        assert_eq!(empty.height(), 0);
        assert_eq!(empty.column("mw").unwrap().dtype(), &DataType::Float64);
        assert_eq!(empty.column("n").unwrap().dtype(), &DataType::Int64);
    }

    #[test]
    fn a_field_named_like_an_envelope_column_is_prefixed_and_never_collides() {
        let df = build(
            &[r#"{"source": "inner", "data_source": "other"}"#],
            &KindSchema::default(),
        );
        assert_eq!(
            df.column("data_source").unwrap().str().unwrap().get(0),
            Some("inner")
        );
        assert_eq!(
            df.column("data_data_source").unwrap().str().unwrap().get(0),
            Some("other")
        );
        assert_eq!(
            df.column("source").unwrap().str().unwrap().get(0),
            Some("s0")
        );
    }
}
