//! The analyses a deployment knows, as computations: the built-in ones and the SQL ones
//! registered at run time. Definitions live in SQL (one row per analysis, so adding one
//! never changes the schema) and every component sees them through the cache's
//! [`Catalog`]; this registry turns a definition into something that runs, checks new
//! ones (compiles, inputs exist, no cycle) and versions them: a changed definition, or a
//! changed upstream, gets the next version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use polars::prelude::*;
use serde::Deserialize;

use scholia_annotation_cache::Catalog;
use scholia_events::analysis::{AnalysisMeta, Input, InputSource, Language};
use scholia_events::store::{AnalysisRecord, Discarded, Promotion, candidate_name};
use scholia_events::{Error, Granularity, Result, Store};

use crate::analysis::{Analysis, Inputs};
use crate::builtin;
use crate::frame;
use crate::sql::{self, SqlAnalysis, check_statement, fingerprint};

/// How deep the analysis graph may go.
pub const MAX_DEPTH: usize = 16;

/// A SQL analysis as an admin submits it: one kind (`kind`), or several inputs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlDefinition {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub inputs: Option<Vec<Input>>,
    #[serde(default)]
    pub partition: Option<Granularity>,
    pub sql: String,
    #[serde(default)]
    pub description: String,
    /// Accepted for files that list analyses with their names.
    #[serde(default)]
    pub name: Option<String>,
    /// The columns that identify a row, for a candidate's diff.
    #[serde(default)]
    pub key: Option<Vec<String>>,
}

/// The most columns a declared key names.
pub const MAX_KEY_COLUMNS: usize = 64;

/// SQL analyses by (name, version).
type Compiled = Arc<Mutex<HashMap<(String, i64), Arc<dyn Analysis>>>>;

#[derive(Clone)]
pub struct Registry {
    store: Store,
    catalog: Catalog,
    sql: Compiled,
    builtins: Arc<BTreeMap<String, Arc<dyn Analysis>>>,
}

/// What registering did.
#[derive(Debug, Clone)]
pub struct Registered {
    pub meta: AnalysisMeta,
    /// False when the definition was already this one.
    pub changed: bool,
    pub created: bool,
}

impl Registry {
    /// Record the built-in analyses (a new built-in version replaces the old one).
    pub async fn load(store: Store, catalog: Catalog) -> Result<Registry> {
        let builtins: BTreeMap<String, Arc<dyn Analysis>> = builtin::all()
            .into_iter()
            .map(|a| (a.meta().name.clone(), a))
            .collect();
        let registry = Registry {
            store,
            catalog,
            sql: Arc::default(),
            builtins: Arc::new(builtins),
        };
        // A built-in's version counts the changes of its code in this deployment, as a SQL
        // analysis' counts the changes of its definition: the code's own revision only
        // decides whether it changed.
        let stored: HashMap<String, (i64, String)> = registry
            .store
            .analyses
            .list()
            .await?
            .into_iter()
            .map(|r| (r.meta.name, (r.meta.version, r.fingerprint)))
            .collect();
        let mut changed = Vec::new();
        for analysis in registry.builtins.values() {
            let mut meta = analysis.meta().clone();
            let print = format!("builtin:{}", meta.version);
            meta.version = match stored.get(&meta.name) {
                Some((_, fp)) if *fp == print => continue,
                Some((version, _)) => version + 1,
                None => 1,
            };
            changed.push((meta, print));
        }
        if !changed.is_empty() {
            registry
                .store
                .analyses
                .put(changed, "scholia (built-in)")
                .await?;
        }
        registry.catalog.refresh().await?;
        Ok(registry)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The computation of `meta`'s version.
    pub fn analysis(&self, meta: &AnalysisMeta) -> Result<Arc<dyn Analysis>> {
        match meta.language {
            Language::Builtin => self.builtins.get(&meta.name).cloned().ok_or_else(|| {
                Error::Invalid(format!(
                    "{:?} is a built-in analysis this version of Scholia does not have",
                    meta.name
                ))
            }),
            Language::Sql => {
                let key = (meta.name.clone(), meta.version);
                let mut sql = self.sql.lock().expect("registry lock");
                // A discarded candidate's version number may come back with another
                // definition: what is kept must be this very one.
                if let Some(kept) = sql.get(&key)
                    && kept.meta() == meta
                {
                    return Ok(kept.clone());
                }
                let analysis: Arc<dyn Analysis> = Arc::new(SqlAnalysis { meta: meta.clone() });
                sql.insert(key, analysis.clone());
                Ok(analysis)
            }
        }
    }

    /// The analyses that read `name`'s annotations, directly.
    pub fn downstream(&self, name: &str) -> Vec<Arc<AnalysisMeta>> {
        self.catalog
            .readers(&InputSource::Analysis(name.to_string()))
    }

    /// Check a SQL definition for `name` and make it an analysis (version 1, to be set by
    /// the caller) with its fingerprint. The SQL must run against its inputs (checked on
    /// empty inputs shaped by the kinds' schemas and the upstream analyses' columns); its
    /// inputs must exist and form no cycle with `name`.
    async fn prepare_sql(&self, name: &str, def: SqlDefinition) -> Result<(AnalysisMeta, String)> {
        validate_name(name)?;
        if self.builtins.contains_key(name) {
            return Err(Error::Conflict(format!(
                "{name:?} is a built-in analysis and cannot be replaced; choose another name"
            )));
        }
        let inputs = match (def.kind, def.inputs) {
            (Some(_), Some(_)) => {
                return Err(Error::Invalid(
                    "give either kind (one input) or inputs (several), not both".into(),
                ));
            }
            (Some(kind), None) => vec![Input::kind(kind.trim())],
            (None, Some(inputs)) => inputs,
            (None, None) => {
                return Err(Error::Invalid(
                    "name what the analysis reads: kind, or inputs such as [{\"kind\": \"generation\"}]".into(),
                ));
            }
        };
        self.check_inputs(name, &inputs).await?;
        let sql = def.sql.trim().to_string();
        if sql.is_empty() {
            return Err(Error::Invalid(
                "sql is empty; write a SELECT over the analysis' input tables".into(),
            ));
        }
        if def.description.len() > 2_000 {
            return Err(Error::Invalid(
                "description is longer than 2,000 characters".into(),
            ));
        }
        check_statement(&sql).map_err(Error::Invalid)?;
        let key = def.key.map(check_key).transpose()?;
        let meta = AnalysisMeta {
            name: name.to_string(),
            version: 1,
            partition: def.partition.unwrap_or(Granularity::Day),
            inputs,
            language: Language::Sql,
            sql: Some(sql),
            description: def.description,
            key,
        };
        let columns = self.check_compiles(&meta).await?;
        if let Some(missing) = meta.key.iter().flatten().find(|k| !columns.contains(k)) {
            return Err(Error::Invalid(format!(
                "the key column {missing:?} is not a column of the SQL's result, which has {}; name columns it has, or leave key out to match rows on their non-measure columns",
                columns.join(", ")
            )));
        }
        // The key is not in the fingerprint: it decides how diffs match rows, not what is
        // built, so changing it keeps the version and the annotations current.
        let print = self.fingerprint(&meta);
        Ok((meta, print))
    }

    /// Register or change a SQL analysis (see [`Registry::prepare_sql`] for the checks). A
    /// changed definition gets the next version, and so does every analysis downstream of
    /// it.
    pub async fn put_sql(&self, name: &str, def: SqlDefinition, actor: &str) -> Result<Registered> {
        let (mut meta, print) = self.prepare_sql(name, def).await?;
        let stored = self.store.analyses.get(name).await?;
        let created = stored.is_none();
        if let Some(stored) = &stored {
            if stored.fingerprint == print {
                return self.keep_computation(meta, print, stored, actor).await;
            }
            meta.version = stored.meta.version + 1;
        }
        let mut changes = vec![(meta.clone(), print)];
        changes.extend(self.downstream_bumps(&meta)?);
        self.save(changes, actor).await?;
        Ok(Registered {
            meta,
            changed: true,
            created,
        })
    }

    /// Store definitions (with their fingerprints), then serve them from the catalog.
    async fn save(&self, changes: Vec<(AnalysisMeta, String)>, actor: &str) -> Result<()> {
        self.store.analyses.put(changes.clone(), actor).await?;
        for (changed, _) in changes {
            self.catalog.insert(changed);
        }
        Ok(())
    }

    /// `meta` computes what `stored` computes (the same fingerprint): it keeps the stored
    /// version, and what changed beside the computation (the description, the declared
    /// key) is saved.
    async fn keep_computation(
        &self,
        mut meta: AnalysisMeta,
        print: String,
        stored: &AnalysisRecord,
        actor: &str,
    ) -> Result<Registered> {
        meta.version = stored.meta.version;
        if stored.meta.description != meta.description || stored.meta.key != meta.key {
            self.save(vec![(meta.clone(), print)], actor).await?;
        }
        Ok(Registered {
            meta,
            changed: false,
            created: false,
        })
    }

    /// Register a changed definition of the live analysis `name` as its candidate, beside
    /// it: stored as the analysis `name@candidate`, checked as `name` would be (its inputs
    /// may not make a cycle with `name`), with a version above the live one's and above
    /// any candidate's it replaces. A candidate whose computation changes starts over: the
    /// annotations and queued builds of the one it replaces are dropped. The live analysis
    /// is not touched.
    pub async fn put_candidate(
        &self,
        name: &str,
        def: SqlDefinition,
        actor: &str,
    ) -> Result<Registered> {
        let live = self.catalog.find(name).await?;
        if live.language == Language::Builtin {
            return Err(Error::Conflict(format!(
                "{name:?} is a built-in analysis; a candidate can only change a SQL analysis"
            )));
        }
        let (mut meta, print) = self.prepare_sql(name, def).await?;
        let live_record = self.store.analyses.get(name).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "no analysis is named {name:?}; GET /v1/analyses lists them"
            ))
        })?;
        if live_record.fingerprint == print {
            return Err(Error::Conflict(format!(
                "this is the live definition of {name:?} (version {}); change what it computes to make a candidate (a description or key alone is changed by PUT /v1/analyses/{name}, without a new version)",
                live_record.meta.version
            )));
        }
        let stored_name = candidate_name(name);
        meta.name = stored_name.clone();
        let stored = self.store.analyses.get(&stored_name).await?;
        let created = stored.is_none();
        meta.version = live_record.meta.version + 1;
        if let Some(stored) = &stored {
            if stored.fingerprint == print {
                return self.keep_computation(meta, print, stored, actor).await;
            }
            meta.version = meta.version.max(stored.meta.version + 1);
            // What the replaced candidate built is of another computation.
            self.store.analyses.discard(&stored_name, actor).await?;
        }
        self.save(vec![(meta.clone(), print)], actor).await?;
        Ok(Registered {
            meta,
            changed: true,
            created,
        })
    }

    /// Make `name`'s candidate live: the live analysis takes the candidate's definition
    /// with its next version (the candidate's own when that is higher), every analysis
    /// downstream of it the next version too, and the partitions the candidate's version
    /// built become the live annotations of that version without a rebuild. Returns the
    /// live analysis as it is now and the promoted partitions.
    pub async fn promote(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(AnalysisMeta, Vec<scholia_events::PartitionKey>)> {
        let live = self.catalog.find(name).await?;
        let stored_name = candidate_name(name);
        let candidate = self.store.analyses.get(&stored_name).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "{name:?} has no candidate; register one with PUT /v1/analyses/{name}?candidate=true"
            ))
        })?;
        let mut meta = candidate.meta.clone();
        meta.name = name.to_string();
        meta.version = (live.version + 1).max(candidate.meta.version);
        let print = self.fingerprint(&meta);
        let downstream = self.downstream_bumps(&meta)?;
        let partitions = self
            .store
            .analyses
            .promote(Promotion {
                candidate: stored_name.clone(),
                candidate_version: candidate.meta.version,
                live: meta.clone(),
                fingerprint: print,
                downstream: downstream.clone(),
                actor: actor.to_string(),
            })
            .await?;
        self.catalog.insert(meta.clone());
        for (changed, _) in downstream {
            self.catalog.insert(changed);
        }
        self.catalog.remove(&stored_name);
        Ok((meta, partitions))
    }

    /// Discard `name`'s candidate, its annotations and its queued builds.
    pub async fn discard_candidate(&self, name: &str, actor: &str) -> Result<Discarded> {
        self.catalog.find(name).await?;
        let stored_name = candidate_name(name);
        let discarded = self.store.analyses.discard(&stored_name, actor).await?;
        self.catalog.remove(&stored_name);
        Ok(discarded)
    }

    /// What decides the version: the computation, and the versions it reads.
    fn fingerprint(&self, meta: &AnalysisMeta) -> String {
        let inputs = serde_json::to_string(&meta.inputs).expect("inputs serialize");
        let upstream: Vec<String> = meta
            .upstream()
            .map(|u| {
                let version = self.catalog.get(u).map_or(0, |m| m.version);
                format!("{u}@{version}")
            })
            .collect();
        fingerprint(&[
            meta.partition.as_str(),
            &inputs,
            meta.sql.as_deref().unwrap_or(""),
            &upstream.join(","),
        ])
    }

    /// Every analysis downstream of `changed` (transitively) with its next version.
    fn downstream_bumps(&self, changed: &AnalysisMeta) -> Result<Vec<(AnalysisMeta, String)>> {
        let mut bumped: BTreeMap<String, AnalysisMeta> = BTreeMap::new();
        let mut versions: HashMap<String, i64> = HashMap::new();
        versions.insert(changed.name.clone(), changed.version);
        let mut frontier = vec![changed.name.clone()];
        for _ in 0..MAX_DEPTH {
            let mut next = Vec::new();
            for name in frontier {
                for down in self.downstream(&name) {
                    if down.language == Language::Builtin || bumped.contains_key(&down.name) {
                        continue;
                    }
                    let mut meta = (*down).clone();
                    meta.version += 1;
                    versions.insert(meta.name.clone(), meta.version);
                    next.push(meta.name.clone());
                    bumped.insert(meta.name.clone(), meta);
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        Ok(bumped
            .into_values()
            .map(|meta| {
                let upstream: Vec<String> = meta
                    .upstream()
                    .map(|u| {
                        let version = versions
                            .get(u)
                            .copied()
                            .or_else(|| self.catalog.get(u).map(|m| m.version))
                            .unwrap_or(0);
                        format!("{u}@{version}")
                    })
                    .collect();
                let inputs = serde_json::to_string(&meta.inputs).expect("inputs serialize");
                let print = fingerprint(&[
                    meta.partition.as_str(),
                    &inputs,
                    meta.sql.as_deref().unwrap_or(""),
                    &upstream.join(","),
                ]);
                (meta, print)
            })
            .collect())
    }

    /// Inputs exist (analyses; kinds may be new), are not repeated, and make no cycle.
    async fn check_inputs(&self, name: &str, inputs: &[Input]) -> Result<()> {
        if inputs.is_empty() {
            return Err(Error::Invalid("inputs is empty; name at least one".into()));
        }
        if inputs.len() > 16 {
            return Err(Error::Invalid("an analysis reads at most 16 inputs".into()));
        }
        let mut seen = BTreeSet::new();
        for input in inputs {
            let source_name = input.source.name();
            if source_name.trim().is_empty() || source_name.len() > 200 {
                return Err(Error::Invalid(
                    "an input names a kind or an analysis of 1 to 200 characters".into(),
                ));
            }
            if !seen.insert(input.source.clone()) {
                return Err(Error::Invalid(format!(
                    "the input {} is listed twice",
                    input.source
                )));
            }
        }
        self.catalog.refresh().await?;
        for input in inputs {
            let InputSource::Analysis(upstream) = &input.source else {
                continue;
            };
            if upstream == name {
                return Err(Error::Invalid(format!(
                    "{name:?} cannot read its own annotations (a cycle: {name} → {name})"
                )));
            }
            if self.catalog.get(upstream).is_none() {
                return Err(Error::Invalid(format!(
                    "the input analysis {upstream:?} does not exist; register it first (GET /v1/analyses lists them)"
                )));
            }
            if let Some(path) = self.path_to(upstream, name) {
                return Err(Error::Invalid(format!(
                    "reading {upstream:?} would make a cycle: {name} → {} → {name}",
                    path.join(" → ")
                )));
            }
        }
        Ok(())
    }

    /// The chain of inputs from `from` back to `to` (`from` reads … reads `to`), if any.
    fn path_to(&self, from: &str, to: &str) -> Option<Vec<String>> {
        let mut stack = vec![vec![from.to_string()]];
        let mut visited = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = path.last().expect("paths are not empty").clone();
            if !visited.insert(last.clone()) || path.len() > MAX_DEPTH {
                continue;
            }
            let Some(meta) = self.catalog.get(&last) else {
                continue;
            };
            for upstream in meta.upstream() {
                if upstream == to {
                    return Some(path);
                }
                let mut longer = path.clone();
                longer.push(upstream.to_string());
                stack.push(longer);
            }
        }
        None
    }

    /// Run the SQL on empty inputs; returns the columns of its result.
    async fn check_compiles(&self, meta: &AnalysisMeta) -> Result<Vec<String>> {
        let inputs = self.empty_inputs(meta, 0).await?;
        let described = describe_tables(meta, &inputs);
        let analysis = SqlAnalysis { meta: meta.clone() };
        let out = tokio::task::spawn_blocking(move || analysis.compute(inputs))
            .await
            .map_err(|e| Error::internal("checking an analysis", e))?
            .map_err(|e| {
                Error::Invalid(format!(
                    "the SQL does not run against its inputs: {e}. {described}"
                ))
            })?;
        Ok(out
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect())
    }

    /// Empty inputs shaped like `meta`'s: kinds by their schemas, analyses by what they
    /// make of empty inputs themselves.
    fn empty_inputs<'a>(
        &'a self,
        meta: &'a AnalysisMeta,
        depth: usize,
    ) -> futures::future::BoxFuture<'a, Result<Inputs>> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Err(Error::Invalid("the analysis graph is too deep".into()));
            }
            let mut inputs = Inputs::new();
            for input in &meta.inputs {
                let mut frame = match &input.source {
                    InputSource::Kind(kind) => {
                        let schema = self
                            .store
                            .kinds
                            .get(kind)
                            .await?
                            .map(|k| k.schema)
                            .unwrap_or_default();
                        frame::empty(kind, &schema).map_err(crate::frame_error)?
                    }
                    InputSource::Analysis(upstream) => {
                        let upstream = self.catalog.find(upstream).await?;
                        let upstream_inputs = self.empty_inputs(&upstream, depth + 1).await?;
                        let analysis = self.analysis(&upstream)?;
                        let mut out =
                            tokio::task::spawn_blocking(move || analysis.compute(upstream_inputs))
                                .await
                                .map_err(|e| Error::internal("checking an analysis", e))?
                                .map_err(|e| {
                                    Error::Invalid(format!(
                                        "{} does not run on empty inputs: {e}",
                                        upstream.name
                                    ))
                                })?;
                        out.with_column(
                            Series::new("partition".into(), Vec::<String>::new()).into_column(),
                        )
                        .map_err(|e| Error::internal("checking an analysis", e))?;
                        out
                    }
                };
                if input.lookback.is_some() {
                    frame
                        .with_column(
                            Series::new("in_partition".into(), Vec::<bool>::new()).into_column(),
                        )
                        .map_err(|e| Error::internal("checking an analysis", e))?;
                }
                inputs.insert(input.source.clone(), frame);
            }
            Ok(inputs)
        })
    }
}

/// "Its tables are events (data_id, source, …)": for error messages.
fn describe_tables(meta: &AnalysisMeta, inputs: &Inputs) -> String {
    let tables: Vec<String> = sql::tables(meta)
        .into_iter()
        .filter_map(|(table, source)| {
            let frame = inputs.get(&source).ok()?;
            let columns: Vec<String> = frame
                .get_column_names()
                .iter()
                .map(|c| c.to_string())
                .collect();
            Some(format!("{table} ({})", columns.join(", ")))
        })
        .collect();
    format!("Its tables are {}", tables.join("; "))
}

/// A declared key: at most [`MAX_KEY_COLUMNS`] column names, none blank, none twice.
fn check_key(key: Vec<String>) -> Result<Vec<String>> {
    if key.is_empty() {
        return Err(Error::Invalid(
            "key is empty; name the columns that identify a row, as in [\"source\"], or leave key out to match rows on their non-measure columns".into(),
        ));
    }
    if key.len() > MAX_KEY_COLUMNS {
        return Err(Error::Invalid(format!(
            "key names {} columns; it may name at most {MAX_KEY_COLUMNS}",
            key.len()
        )));
    }
    for (i, column) in key.iter().enumerate() {
        if column.trim().is_empty() || column.len() > 200 {
            return Err(Error::Invalid(format!(
                "key column {} is {column:?}; name each column by 1 to 200 characters, as the SQL's result names it",
                i + 1
            )));
        }
        if key[..i].contains(column) {
            return Err(Error::Invalid(format!(
                "the key column {column:?} is listed twice; name each column once"
            )));
        }
    }
    Ok(key)
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
