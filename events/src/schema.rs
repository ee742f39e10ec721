//! A kind's schema: the type of each field of `data`, declared by an admin or learned
//! from the kind's first records, and the column each field becomes in an analysis'
//! input. One odd record can neither change a kind's schema nor break its analyses: a
//! record whose field has another type than the schema says is quarantined.

use std::collections::BTreeMap;

use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The type of a field of `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Any JSON number.
    Float,
    /// A whole JSON number.
    Int,
    String,
    Bool,
    /// An RFC 3339 time, as a string (declared only: a string is never guessed to be one).
    Timestamp,
    /// Any JSON value when declared; an object or array when learned.
    Json,
}

impl FieldType {
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Float => "float",
            FieldType::Int => "int",
            FieldType::String => "string",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Json => "json",
        }
    }

    /// "a float", "an int": the type's name as a sentence needs it.
    pub fn with_article(self) -> String {
        match self {
            FieldType::Int => "an int".into(),
            other => format!("a {}", other.name()),
        }
    }

    /// The type a field gets from its first value, or `None` for null (which says
    /// nothing about the type).
    pub fn of(value: &Value) -> Option<FieldType> {
        Some(match value {
            Value::Null => return None,
            Value::Bool(_) => FieldType::Bool,
            Value::Number(n) if n.is_i64() || n.is_u64() => FieldType::Int,
            Value::Number(_) => FieldType::Float,
            Value::String(_) => FieldType::String,
            Value::Array(_) | Value::Object(_) => FieldType::Json,
        })
    }

    /// Whether a declared field of this type takes `value` (null always fits).
    fn takes_declared(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) | (FieldType::Json, _) => true,
            (FieldType::Float, Value::Number(_)) => true,
            (FieldType::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (FieldType::String, Value::String(_)) => true,
            (FieldType::Bool, Value::Bool(_)) => true,
            (FieldType::Timestamp, Value::String(s)) => DateTime::parse_from_rfc3339(s).is_ok(),
            _ => false,
        }
    }
}

/// One field of a kind's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Declared by an admin (`PUT /v1/kinds/{kind}`), or learned from records.
    pub declared: bool,
}

/// The most fields a kind may have, learned and declared together. A kind's fields
/// become columns of every analysis that reads it, and a declaration of them travels as
/// one event, so a record that would bring its kind past this is quarantined and a
/// declaration past it refused. Field names are at most 256 bytes, so a declaration of
/// this many fields is an event of at most about 530 KB, inside the bus's 1 MiB.
pub const MAX_FIELDS: usize = 1_000;

/// The fields of a kind, by name. Stored and shown as a map from field name to spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct KindSchema {
    pub fields: BTreeMap<String, FieldSpec>,
}

impl<'de> Deserialize<'de> for KindSchema {
    /// Reads `{"f": {"type": "float", "declared": true}}`, and also the older form
    /// `{"f": "float"}` (fields declared before schemas were learned).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Spec(FieldSpec),
            Declared(FieldType),
        }
        let map = BTreeMap::<String, Stored>::deserialize(d)?;
        Ok(KindSchema {
            fields: map
                .into_iter()
                .map(|(name, stored)| {
                    let spec = match stored {
                        Stored::Spec(spec) => spec,
                        Stored::Declared(ty) => FieldSpec { ty, declared: true },
                    };
                    (name, spec)
                })
                .collect(),
        })
    }
}

impl KindSchema {
    /// Whether `data` fits the schema; the error names the field and both types, or says
    /// that the fields `data` would add bring the kind past [`MAX_FIELDS`].
    pub fn check(&self, data: &Map<String, Value>) -> Result<(), String> {
        // Only non-null values teach a field (see `learn`).
        let new = data
            .iter()
            .filter(|(field, value)| !value.is_null() && !self.fields.contains_key(*field))
            .count();
        if new > 0 && self.fields.len() + new > MAX_FIELDS {
            return Err(format!(
                "this record would give its kind {} fields, more than the {MAX_FIELDS} a kind may have; put related values in one field holding an object or array, or send them as another kind",
                self.fields.len() + new
            ));
        }
        for (field, value) in data {
            let Some(spec) = self.fields.get(field) else {
                continue;
            };
            let fits = if spec.declared {
                spec.ty.takes_declared(value)
            } else {
                match (spec.ty, FieldType::of(value)) {
                    (_, None) => true,
                    // A learned int widens to float when a fraction arrives.
                    (
                        FieldType::Int | FieldType::Float,
                        Some(FieldType::Int | FieldType::Float),
                    ) => true,
                    (learned, Some(seen)) => learned == seen,
                }
            };
            if !fits {
                let origin = if spec.declared {
                    "declared"
                } else {
                    "learned from its first records"
                };
                return Err(format!(
                    "field {field:?} must be {} ({origin}), not {}",
                    spec.ty.with_article(),
                    describe(value)
                ));
            }
        }
        Ok(())
    }

    /// Learn the types of fields this schema does not have yet (and widen learned ints
    /// that meet a fraction). Returns whether anything changed. Call after [`check`].
    ///
    /// [`check`]: KindSchema::check
    pub fn learn(&mut self, data: &Map<String, Value>) -> bool {
        let mut changed = false;
        for (field, value) in data {
            let Some(seen) = FieldType::of(value) else {
                continue;
            };
            match self.fields.get_mut(field) {
                None => {
                    self.fields.insert(
                        field.clone(),
                        FieldSpec {
                            ty: seen,
                            declared: false,
                        },
                    );
                    changed = true;
                }
                Some(spec)
                    if !spec.declared && spec.ty == FieldType::Int && seen == FieldType::Float =>
                {
                    spec.ty = FieldType::Float;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        changed
    }

    /// How many fields the kind would have with `names` declared too.
    pub fn fields_with<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> usize {
        self.fields.len()
            + names
                .into_iter()
                .filter(|name| !self.fields.contains_key(*name))
                .count()
    }

    /// Declare field types; a declaration replaces what was learned or declared before.
    pub fn declare(&mut self, fields: &BTreeMap<String, FieldType>) {
        for (name, ty) in fields {
            self.fields.insert(
                name.clone(),
                FieldSpec {
                    ty: *ty,
                    declared: true,
                },
            );
        }
    }
}

fn describe(value: &Value) -> String {
    let text = value.to_string();
    let shown = if text.len() > 40 {
        format!("{}…", &text[..text.floor_char_boundary(40)])
    } else {
        text
    };
    let what = match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{what} ({shown})")
}

/// Columns an analysis' input has besides the fields of `data`.
pub const RESERVED_COLUMNS: [&str; 7] = [
    "data_id",
    "source",
    "kind",
    "created",
    "received_at",
    "partition",
    "in_partition",
];

/// The column a field of `data` becomes. A field named like a reserved column, or
/// starting with `data_`, gets `data_` in front: `source` becomes `data_source`, and a
/// field really named `data_source` becomes `data_data_source`. No two fields ever share
/// a column, and no field hides an envelope column, on either backend.
pub fn column_name(field: &str) -> String {
    if RESERVED_COLUMNS.contains(&field) || field.starts_with("data_") {
        format!("data_{field}")
    } else {
        field.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_declared_field_must_have_its_type_or_be_null_or_absent() {
        let mut schema = KindSchema::default();
        schema.declare(
            &[
                ("mw".into(), FieldType::Float),
                ("n".into(), FieldType::Int),
            ]
            .into(),
        );
        assert!(schema.check(&data(json!({"mw": 1.5, "n": 2}))).is_ok());
        assert!(schema.check(&data(json!({"mw": null}))).is_ok());
        assert!(schema.check(&data(json!({"other": "x"}))).is_ok());
        let error = schema.check(&data(json!({"mw": "high"}))).unwrap_err();
        assert!(
            error.contains("\"mw\" must be a float (declared)"),
            "{error}"
        );
        assert!(
            schema
                .check(&data(json!({"n": 2.5})))
                .unwrap_err()
                .contains("must be an int")
        );
    }

    #[test]
    fn a_learned_field_refuses_another_type_but_widens_ints() {
        let mut schema = KindSchema::default();
        assert!(schema.learn(&data(json!({"v": 3, "on": true, "note": null}))));
        assert_eq!(schema.fields.len(), 2, "null teaches nothing");
        assert!(schema.check(&data(json!({"v": 3.5}))).is_ok());
        assert!(schema.learn(&data(json!({"v": 3.5}))));
        assert_eq!(schema.fields["v"].ty, FieldType::Float);
        let error = schema.check(&data(json!({"v": "three"}))).unwrap_err();
        assert!(error.contains("\"v\" must be a float (learned"), "{error}");
        assert!(error.contains("a string (\"three\")"), "{error}");
        assert!(!schema.learn(&data(json!({"v": 1}))));
    }

    #[test]
    fn a_record_that_would_bring_its_kind_past_the_field_limit_does_not_fit() {
        let wide = |from: usize, to: usize| -> Map<String, Value> {
            (from..to).map(|i| (format!("f{i}"), json!(1))).collect()
        };
        let mut schema = KindSchema::default();
        let error = schema.check(&wide(0, MAX_FIELDS + 1)).unwrap_err();
        assert!(
            error.contains("1001 fields, more than the 1000 a kind may have"),
            "{error}"
        );
        assert!(schema.check(&wide(0, MAX_FIELDS)).is_ok());
        schema.learn(&wide(0, MAX_FIELDS - 1));
        assert!(schema.check(&wide(0, MAX_FIELDS)).is_ok(), "one more fits");
        assert!(schema.check(&wide(MAX_FIELDS, MAX_FIELDS + 2)).is_err());
        // Known fields and nulls add nothing.
        let mut known = wide(0, 10);
        known.insert("later".into(), Value::Null);
        known.insert("more".into(), Value::Null);
        assert!(schema.check(&known).is_ok());
        assert_eq!(
            schema.fields_with(&["f1".to_string(), "g".to_string()]),
            1_000
        );
    }

    #[test]
    fn the_older_stored_form_reads_as_declared() {
        let schema: KindSchema = serde_json::from_str(r#"{"mw": "float"}"#).unwrap();
        assert!(schema.fields["mw"].declared);
        let schema: KindSchema =
            serde_json::from_str(r#"{"mw": {"type": "int", "declared": false}}"#).unwrap();
        assert_eq!(schema.fields["mw"].ty, FieldType::Int);
    }

    #[test]
    fn field_columns_never_collide() {
        assert_eq!(column_name("mw"), "mw");
        assert_eq!(column_name("source"), "data_source");
        assert_eq!(column_name("data_source"), "data_data_source");
        assert_eq!(column_name("in_partition"), "data_in_partition");
    }
}
