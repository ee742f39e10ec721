//! The analyses a deployment knows: the built-in ones and the SQL ones registered at run
//! time, with their versions, kept in the `analyses` table (one row per analysis: adding
//! one never changes the schema).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::Utc;

use scholia_events::{Database, EventBody, Granularity, NewEvent, log};

use crate::analysis::{Analysis, AnalysisInfo};
use crate::frame;
use crate::sql::{self, SqlAnalysis};
use crate::{Error, Result, builtin};

#[derive(Clone)]
pub struct Registry {
    db: Database,
    analyses: Arc<RwLock<HashMap<String, Arc<dyn Analysis>>>>,
}

/// A SQL analysis as an admin submits it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlDefinition {
    pub kind: String,
    #[serde(default = "default_partition")]
    pub partition: String,
    pub sql: String,
    #[serde(default)]
    pub description: String,
    /// Accepted for files that list analyses with their names.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_partition() -> String {
    "1d".into()
}

type AnalysisRow = (String, i64, String, String, Option<String>, String, String);

impl Registry {
    /// Record the built-in analyses (a new built-in version replaces the old one) and
    /// load every analysis.
    pub async fn load(db: Database) -> Result<Registry> {
        let registry = Registry {
            db,
            analyses: Arc::default(),
        };
        for analysis in builtin::all() {
            let fingerprint = format!("builtin:{}", analysis.version());
            let stored = registry.row(analysis.name()).await?;
            if stored.as_ref().map(|r| r.6.as_str()) != Some(fingerprint.as_str()) {
                registry
                    .store(&*analysis, &fingerprint, "scholia (built-in)")
                    .await?;
            }
        }
        registry.refresh().await?;
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Analysis>> {
        self.analyses
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// The analysis named `name`, reloading from SQL once if this process does not know
    /// it (another process may have registered it).
    pub async fn find(&self, name: &str) -> Result<Arc<dyn Analysis>> {
        if let Some(analysis) = self.get(name) {
            return Ok(analysis);
        }
        self.refresh().await?;
        self.get(name)
            .ok_or_else(|| Error::UnknownAnalysis(name.to_string()))
    }

    pub fn list(&self) -> Vec<AnalysisInfo> {
        let mut list: Vec<AnalysisInfo> = self
            .analyses
            .read()
            .expect("registry lock")
            .values()
            .map(|a| AnalysisInfo::of(&**a))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .analyses
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn for_kind(&self, kind: &str) -> Vec<Arc<dyn Analysis>> {
        self.analyses
            .read()
            .expect("registry lock")
            .values()
            .filter(|a| a.kind() == kind)
            .cloned()
            .collect()
    }

    /// Reload every analysis from SQL.
    pub async fn refresh(&self) -> Result<()> {
        let sql =
            "SELECT name, version, kind, partition, sql, description, fingerprint FROM analyses";
        let rows: Vec<AnalysisRow> = match &self.db {
            Database::Postgres(pg) => sqlx::query_as(sql).fetch_all(&pg.pool).await?,
            Database::Sqlite(d) => sqlx::query_as(sql).fetch_all(&d.pool).await?,
        };
        let builtins: HashMap<String, Arc<dyn Analysis>> = builtin::all()
            .into_iter()
            .map(|a| (a.name().to_string(), a))
            .collect();
        let mut map: HashMap<String, Arc<dyn Analysis>> = HashMap::new();
        for (name, version, kind, partition, sql, description, _) in rows {
            let analysis: Arc<dyn Analysis> = match sql {
                Some(sql) => Arc::new(SqlAnalysis {
                    name: name.clone(),
                    version,
                    kind,
                    partition: partition.parse().unwrap_or(Granularity::Day),
                    sql,
                    description,
                }),
                None => match builtins.get(&name) {
                    Some(a) => a.clone(),
                    None => continue,
                },
            };
            map.insert(name, analysis);
        }
        *self.analyses.write().expect("registry lock") = map;
        Ok(())
    }

    /// Register or change a SQL analysis. The SQL must run against the kind's records
    /// (checked on an empty partition shaped like recent records). A changed definition
    /// gets the next version; an unchanged one keeps its version.
    pub async fn put_sql(
        &self,
        name: &str,
        def: SqlDefinition,
        actor: &str,
    ) -> Result<(AnalysisInfo, bool)> {
        validate_name(name)?;
        if builtin::all().iter().any(|a| a.name() == name) {
            return Err(Error::Conflict(format!(
                "{name:?} is a built-in analysis and cannot be replaced; choose another name"
            )));
        }
        let partition: Granularity = def.partition.parse().map_err(Error::Invalid)?;
        if def.kind.trim().is_empty() {
            return Err(Error::Invalid(
                "kind is empty; name the kind of records the analysis reads".into(),
            ));
        }
        if def.sql.trim().is_empty() {
            return Err(Error::Invalid(
                "sql is empty; write a SELECT over the table events".into(),
            ));
        }
        self.check_compiles(&def.kind, &def.sql).await?;
        let mut analysis = SqlAnalysis {
            name: name.to_string(),
            version: 1,
            kind: def.kind.clone(),
            partition,
            sql: def.sql.trim().to_string(),
            description: def.description.clone(),
        };
        let fingerprint = analysis.fingerprint();
        let stored = self.row(name).await?;
        if let Some(row) = &stored {
            if row.6 == fingerprint {
                analysis.version = row.1;
                if row.5 != def.description {
                    self.store(&analysis, &fingerprint, actor).await?;
                }
                self.refresh().await?;
                return Ok((AnalysisInfo::of(&analysis), false));
            }
            analysis.version = row.1 + 1;
        }
        self.store(&analysis, &fingerprint, actor).await?;
        self.refresh().await?;
        Ok((AnalysisInfo::of(&analysis), true))
    }

    async fn check_compiles(&self, kind: &str, sql_text: &str) -> Result<()> {
        let declared = frame::declared_fields(&self.db, kind).await?;
        let empty = frame::empty_for_kind(&self.db, kind, &declared).await?;
        let sql_text = sql_text.to_string();
        tokio::task::spawn_blocking(move || sql::run_sql(&sql_text, empty))
            .await
            .map_err(|e| Error::Compute(e.to_string()))?
            .map_err(|e| {
                Error::Invalid(format!(
                    "the SQL does not run against the table events of kind {kind:?}: {e}. \
                     Its columns are data_id, source, kind, created, received_at and the fields of data."
                ))
            })?;
        Ok(())
    }

    async fn row(&self, name: &str) -> Result<Option<AnalysisRow>> {
        let sql = "SELECT name, version, kind, partition, sql, description, fingerprint FROM analyses WHERE name = $1";
        Ok(match &self.db {
            Database::Postgres(pg) => {
                sqlx::query_as(sql)
                    .bind(name)
                    .fetch_optional(&pg.pool)
                    .await?
            }
            Database::Sqlite(d) => {
                sqlx::query_as(sql)
                    .bind(name)
                    .fetch_optional(&d.pool)
                    .await?
            }
        })
    }

    /// Upsert the analysis row and log `analysis.registered`, in one transaction.
    async fn store(&self, analysis: &dyn Analysis, fingerprint: &str, actor: &str) -> Result<()> {
        let mut tx = self.db.begin_write().await?;
        let sql = "INSERT INTO analyses (name, version, kind, partition, sql, description, fingerprint, updated_at, updated_by) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                   ON CONFLICT (name) DO UPDATE SET version = excluded.version, kind = excluded.kind, \
                   partition = excluded.partition, sql = excluded.sql, description = excluded.description, \
                   fingerprint = excluded.fingerprint, updated_at = excluded.updated_at, updated_by = excluded.updated_by";
        macro_rules! run {
            ($tx:expr) => {
                sqlx::query(sql)
                    .bind(analysis.name())
                    .bind(analysis.version())
                    .bind(analysis.kind())
                    .bind(analysis.partition().as_str())
                    .bind(analysis.sql())
                    .bind(analysis.description())
                    .bind(fingerprint)
                    .bind(Utc::now())
                    .bind(actor)
                    .execute(&mut **$tx)
                    .await
                    .map(|r| r.rows_affected())?
            };
        }
        match &mut tx {
            scholia_events::db::WriteTx::Postgres { tx, .. } => run!(tx),
            scholia_events::db::WriteTx::Sqlite { tx, .. } => run!(tx),
        };
        log::append(
            &mut tx,
            vec![NewEvent::new(
                actor,
                EventBody::AnalysisRegistered {
                    analysis: analysis.name().to_string(),
                    version: analysis.version(),
                    kind: analysis.kind().to_string(),
                    partition: analysis.partition().as_str().to_string(),
                },
            )],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "analysis name {name:?} must start with a lowercase letter and hold only lowercase letters, digits, '_' or '-' (64 at most)"
        )))
    }
}
