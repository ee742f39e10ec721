//! Loading one partition of a kind's records into a Polars `DataFrame`, column by
//! column: each row's `data` is parsed straight into the column builders (no JSON value
//! tree per row), and the envelope's strings go into Arrow string views. Columns follow
//! the kind's schema: a field has its schema's type in every partition, present or not,
//! so an analysis that names a field works on an empty partition too (it makes no rows of
//! it). Rows come in any order and leave ordered by `created`, then `data_id`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use chrono::DateTime;
use polars::prelude::*;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};
use uuid::Uuid;

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
    FrameBuilder::new(kind, schema)
        .finish(Summary::default())
        .map(|input| input.frame)
}

/// One value of a row's `data`, borrowed from the row where it can be.
enum Datum<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    /// An object or array, kept as its JSON text.
    Nested(Value),
}

impl Datum<'_> {
    /// The value as text, for a text column: strings as they are, the rest as JSON.
    fn text(&self) -> Cow<'_, str> {
        match self {
            Datum::Null => Cow::Borrowed("null"),
            Datum::Bool(b) => Cow::Owned(b.to_string()),
            Datum::Number(n) => Cow::Owned(n.to_string()),
            Datum::Str(s) => Cow::Borrowed(s),
            Datum::Nested(v) => Cow::Owned(v.to_string()),
        }
    }
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
    /// The frame's column name for this field (see `column_name`).
    column: String,
    col: Col,
    declared: Option<FieldType>,
    /// Rows seen before this field first appeared, and since then through `len`.
    len: usize,
    /// The rows the load expects: a typed column is made this large at once, not grown
    /// by doubling (each doubling of a large column is fresh pages for the kernel to zero,
    /// and a copy).
    capacity: usize,
}

/// `n` nulls, with room for `capacity` values.
fn nulls<T: Clone>(n: usize, capacity: usize) -> Vec<Option<T>> {
    let mut v = Vec::with_capacity(capacity.max(n));
    v.resize(n, None);
    v
}

impl Field {
    fn new(name: &str, declared: Option<FieldType>, capacity: usize) -> Field {
        Field {
            column: column_name(name),
            col: Col::Null,
            declared,
            len: 0,
            capacity,
        }
    }

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

    fn push(&mut self, value: Datum<'_>) {
        let n = self.len;
        if let Datum::Null = value {
            self.pad_to(n + 1);
            return;
        }
        let text_only = matches!(self.declared, Some(FieldType::String | FieldType::Json));
        match value {
            _ if text_only => self.as_str(n).push(Some(value.text().into_owned())),
            Datum::Number(x) => {
                let integral = x.as_i64().is_some() && self.declared != Some(FieldType::Float);
                match self.col {
                    Col::Null | Col::Int(_) if integral => self.as_int(n).push(x.as_i64()),
                    Col::Null | Col::Int(_) | Col::Float(_) => self.as_float(n).push(x.as_f64()),
                    _ => self.as_str(n).push(Some(x.to_string())),
                }
            }
            Datum::Bool(b) => match self.col {
                Col::Null | Col::Bool(_) => self.as_bool(n).push(Some(b)),
                _ => self.as_str(n).push(Some(b.to_string())),
            },
            Datum::Str(s) if self.declared == Some(FieldType::Timestamp) => match self.col {
                Col::Null | Col::Time(_) => {
                    let t = DateTime::parse_from_rfc3339(&s)
                        .ok()
                        .map(|t| t.timestamp_micros());
                    self.as_time(n).push(t)
                }
                _ => self.as_str(n).push(Some(s.into_owned())),
            },
            other => {
                let text = other.text().into_owned();
                self.as_str(n).push(Some(text))
            }
        }
        self.len += 1;
    }

    fn as_bool(&mut self, n: usize) -> &mut Vec<Option<bool>> {
        if let Col::Null = self.col {
            self.col = Col::Bool(nulls(n, self.capacity));
        }
        match &mut self.col {
            Col::Bool(v) => v,
            _ => unreachable!("the caller checked the column is untyped or bool"),
        }
    }

    fn as_int(&mut self, n: usize) -> &mut Vec<Option<i64>> {
        if let Col::Null = self.col {
            self.col = Col::Int(nulls(n, self.capacity));
        }
        match &mut self.col {
            Col::Int(v) => v,
            _ => unreachable!("the caller checked the column is untyped or int"),
        }
    }

    fn as_float(&mut self, n: usize) -> &mut Vec<Option<f64>> {
        self.col = match std::mem::replace(&mut self.col, Col::Null) {
            Col::Null => Col::Float(nulls(n, self.capacity)),
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
            self.col = Col::Time(nulls(n, self.capacity));
        }
        match &mut self.col {
            Col::Time(v) => v,
            _ => unreachable!("the caller checked the column is untyped or a time"),
        }
    }

    fn as_str(&mut self, n: usize) -> &mut Vec<Option<String>> {
        self.col = match std::mem::replace(&mut self.col, Col::Null) {
            Col::Null => Col::Str(nulls(n, self.capacity)),
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

    fn into_column(mut self, len: usize) -> Column {
        self.pad_to(len);
        let name = PlSmallStr::from(self.column.as_str());
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

/// Builds a kind's frame from loaded rows.
pub struct FrameBuilder {
    kind: String,
    ids: Vec<Uuid>,
    sources: StringChunkedBuilder,
    created: Vec<i64>,
    received: Vec<i64>,
    /// By field name.
    fields: HashMap<String, Field>,
}

impl FrameBuilder {
    pub fn new(kind: &str, schema: &KindSchema) -> Self {
        let fields = schema
            .fields
            .iter()
            .map(|(name, spec)| (name.clone(), Field::new(name, Some(spec.ty), 0)))
            .collect();
        FrameBuilder {
            kind: kind.to_string(),
            ids: Vec::new(),
            sources: StringChunkedBuilder::new("source".into(), 0),
            created: Vec::new(),
            received: Vec::new(),
            fields,
        }
    }

    /// The frame of the rows pushed, ordered by `created` then `data_id`; `summary` is what
    /// the load says they are.
    pub fn finish(self, summary: Summary) -> PolarsResult<PartitionInput> {
        let len = self.ids.len();
        let mut ids = StringChunkedBuilder::new("data_id".into(), len);
        let mut text = Uuid::encode_buffer();
        for id in &self.ids {
            ids.append_value(id.hyphenated().encode_lower(&mut text));
        }
        let order = order_of(&self.created, &self.ids);
        let mut columns = vec![
            ids.finish().into_series().into_column(),
            self.sources.finish().into_series().into_column(),
            Column::new_scalar(
                "kind".into(),
                polars::prelude::Scalar::new(
                    DataType::String,
                    AnyValue::StringOwned(self.kind.into()),
                ),
                len,
            ),
            Series::new("created".into(), self.created)
                .into_datetime(TimeUnit::Microseconds, None)
                .into_column(),
            Series::new("received_at".into(), self.received)
                .into_datetime(TimeUnit::Microseconds, None)
                .into_column(),
        ];
        let mut fields: Vec<Field> = self.fields.into_values().collect();
        fields.sort_by(|a, b| a.column.cmp(&b.column));
        for field in fields {
            columns.push(field.into_column(len));
        }
        let mut frame = DataFrame::new(len, columns)?;
        if let Some(order) = order {
            frame = frame.take(&IdxCa::from_vec("order".into(), order))?;
        }
        Ok(PartitionInput { frame, summary })
    }
}

/// The permutation that orders rows by (`created`, `data_id`), or `None` when they are in
/// order already (a load through the `(kind, created)` index mostly is).
fn order_of(created: &[i64], ids: &[Uuid]) -> Option<Vec<IdxSize>> {
    let key = |i: usize| (created[i], ids[i]);
    if (1..created.len()).all(|i| key(i - 1) <= key(i)) {
        return None;
    }
    let mut order: Vec<IdxSize> = (0..created.len() as IdxSize).collect();
    order.sort_unstable_by_key(|&i| key(i as usize));
    Some(order)
}

impl RecordSink for FrameBuilder {
    fn reserve(&mut self, rows: usize) {
        self.ids.reserve(rows);
        self.created.reserve(rows);
        self.received.reserve(rows);
        if rows > 0 && self.created.is_empty() {
            self.sources = StringChunkedBuilder::new("source".into(), rows);
        }
        let total = self.ids.len() + rows;
        for field in self.fields.values_mut() {
            field.capacity = total;
        }
    }

    fn push(&mut self, row: RecordRow<'_>) {
        let index = self.ids.len();
        self.ids.push(row.data_id);
        self.sources.append_value(row.source);
        self.created.push(row.created);
        self.received.push(row.received_at);
        let mut parser = serde_json::Deserializer::from_str(row.data);
        // `data` was checked to be a JSON object at ingest; should a row not parse, the
        // fields it did not reach stay null.
        let _ = parser.deserialize_map(RowVisitor {
            fields: &mut self.fields,
            index,
            capacity: self.created.capacity(),
        });
    }
}

/// Visits one row's `data` object, pushing each value into its field's column.
struct RowVisitor<'b> {
    fields: &'b mut HashMap<String, Field>,
    index: usize,
    /// What a field first seen now makes room for.
    capacity: usize,
}

impl<'de> Visitor<'de> for RowVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if !self.fields.contains_key(key.as_ref()) {
                self.fields
                    .insert(key.to_string(), Field::new(&key, None, self.capacity));
            }
            let field = self
                .fields
                .get_mut(key.as_ref())
                .expect("inserted just above");
            field.pad_to(self.index);
            let value = map.next_value_seed(ValueSeed)?;
            field.push(value);
        }
        Ok(())
    }
}

/// A key, borrowed from the row unless it holds escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// A field's value as a `Datum`.
struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Datum<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Datum<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Datum::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Datum::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Datum::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Datum::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Datum::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(v).map_or(Datum::Null, Datum::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Datum::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Datum::Str(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Datum::Str(Cow::Owned(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let value =
            serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Datum::Nested(value))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let value =
            serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Datum::Nested(value))
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
                data,
            });
        }
        b.finish(Summary::default()).unwrap().frame
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

    #[test]
    fn rows_arriving_out_of_order_leave_ordered_by_created_then_id() {
        let mut b = FrameBuilder::new("k", &KindSchema::default());
        let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
        for (created, id, data) in [
            (5, ids[1], r#"{"v": 2}"#),
            (1, ids[2], r#"{"v": 1}"#),
            (5, ids[0], r#"{"v": 3}"#),
        ] {
            b.push(RecordRow {
                data_id: id,
                source: "s",
                created,
                received_at: 0,
                data,
            });
        }
        let df = b.finish(Summary::default()).unwrap().frame;
        let v: Vec<Option<i64>> = df.column("v").unwrap().i64().unwrap().iter().collect();
        assert_eq!(v, [Some(1), Some(3), Some(2)]);
        let first = df
            .column("data_id")
            .unwrap()
            .str()
            .unwrap()
            .get(0)
            .unwrap()
            .to_string();
        assert_eq!(first, ids[2].to_string());
    }

    #[test]
    fn escaped_keys_and_nested_values_are_read_like_any_other() {
        let df = build(
            &[r#"{"caf\u00e9": 1, "tags": ["a", {"b": null}], "s": "line\nbreak"}"#],
            &KindSchema::default(),
        );
        assert_eq!(df.column("café").unwrap().i64().unwrap().get(0), Some(1));
        assert_eq!(
            df.column("tags").unwrap().str().unwrap().get(0),
            Some(r#"["a",{"b":null}]"#)
        );
        assert_eq!(
            df.column("s").unwrap().str().unwrap().get(0),
            Some("line\nbreak")
        );
    }
}
