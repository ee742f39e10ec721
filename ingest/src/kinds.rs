//! Kinds and their declared field types. Declarations live in SQL and are cached here;
//! the cache is refreshed when this process changes one and every few seconds otherwise.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use scholia_events::Database;
use scholia_events::error::{DbContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Float,
    Int,
    String,
    Bool,
    /// An RFC 3339 time, as a string.
    Timestamp,
    /// Any JSON value.
    Json,
}

impl FieldType {
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (FieldType::Float, Value::Number(_)) => true,
            (FieldType::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (FieldType::String, Value::String(_)) => true,
            (FieldType::Bool, Value::Bool(_)) => true,
            (FieldType::Timestamp, Value::String(s)) => DateTime::parse_from_rfc3339(s).is_ok(),
            (FieldType::Json, _) => true,
            _ => false,
        }
    }

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
}

/// The declared fields of a kind. A declared field may be absent or null; when present
/// it must have its type. Undeclared fields are accepted as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindSpec {
    pub fields: BTreeMap<String, FieldType>,
}

impl KindSpec {
    pub fn check(&self, data: &Map<String, Value>) -> Result<(), String> {
        for (field, ty) in &self.fields {
            if let Some(value) = data.get(field)
                && !ty.accepts(value)
            {
                return Err(format!(
                    "field {field:?} must be a {} (or null), not {}",
                    ty.name(),
                    describe(value)
                ));
            }
        }
        Ok(())
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

#[derive(Debug, Clone, Serialize)]
pub struct KindInfo {
    pub kind: String,
    pub fields: BTreeMap<String, FieldType>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct KindRegistry {
    db: Database,
    specs: Arc<RwLock<HashMap<String, KindSpec>>>,
}

impl KindRegistry {
    pub async fn load(db: Database) -> Result<Self> {
        let registry = KindRegistry {
            db,
            specs: Arc::default(),
        };
        registry.refresh().await?;
        Ok(registry)
    }

    pub fn spec(&self, kind: &str) -> Option<KindSpec> {
        self.specs
            .read()
            .expect("kinds lock")
            .get(kind)
            .filter(|s| !s.fields.is_empty())
            .cloned()
    }

    pub async fn refresh(&self) -> Result<()> {
        let kinds = self.list().await?;
        let map = kinds
            .into_iter()
            .map(|k| (k.kind, KindSpec { fields: k.fields }))
            .collect();
        *self.specs.write().expect("kinds lock") = map;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<KindInfo>> {
        let sql = "SELECT kind, fields, updated_at FROM kinds ORDER BY kind";
        let rows: Vec<(String, String, DateTime<Utc>)> = match &self.db {
            Database::Sqlite(d) => sqlx::query_as(sql).fetch_all(&d.pool).await,
            Database::Postgres(pg) => sqlx::query_as(sql).fetch_all(&pg.pool).await,
        }
        .context("listing kinds")?;
        Ok(rows
            .into_iter()
            .map(|(kind, fields, updated_at)| KindInfo {
                kind,
                fields: serde_json::from_str(&fields).unwrap_or_default(),
                updated_at,
            })
            .collect())
    }

    /// Declare (or replace) the field types of a kind.
    pub async fn put(&self, kind: &str, spec: &KindSpec) -> Result<KindInfo> {
        let now = Utc::now();
        let fields = serde_json::to_string(&spec.fields).expect("field types serialize");
        let sql = "INSERT INTO kinds (kind, fields, updated_at) VALUES ($1, $2, $3) \
                   ON CONFLICT (kind) DO UPDATE SET fields = excluded.fields, updated_at = excluded.updated_at";
        match &self.db {
            Database::Sqlite(d) => sqlx::query(sql)
                .bind(kind)
                .bind(&fields)
                .bind(now)
                .execute(&d.pool)
                .await
                .map(|r| r.rows_affected()),
            Database::Postgres(pg) => sqlx::query(sql)
                .bind(kind)
                .bind(&fields)
                .bind(now)
                .execute(&pg.pool)
                .await
                .map(|r| r.rows_affected()),
        }
        .context("declaring a kind")?;
        self.specs
            .write()
            .expect("kinds lock")
            .insert(kind.to_string(), spec.clone());
        Ok(KindInfo {
            kind: kind.to_string(),
            fields: spec.fields.clone(),
            updated_at: now,
        })
    }

    /// Whether this process already knows the kind (declared or seen).
    pub fn knows(&self, kind: &str) -> bool {
        self.specs.read().expect("kinds lock").contains_key(kind)
    }

    pub fn remember(&self, kind: &str) {
        self.specs
            .write()
            .expect("kinds lock")
            .entry(kind.to_string())
            .or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_declared_field_must_have_its_type_or_be_null_or_absent() {
        let spec = KindSpec {
            fields: [
                ("mw".to_string(), FieldType::Float),
                ("n".to_string(), FieldType::Int),
            ]
            .into(),
        };
        let ok = |v: Value| spec.check(v.as_object().unwrap());
        assert!(ok(json!({"mw": 1.5, "n": 2})).is_ok());
        assert!(ok(json!({"mw": null})).is_ok());
        assert!(ok(json!({"other": "x"})).is_ok());
        assert!(
            ok(json!({"mw": "high"}))
                .unwrap_err()
                .contains("must be a float")
        );
        assert!(ok(json!({"n": 2.5})).unwrap_err().contains("must be a int"));
    }
}
