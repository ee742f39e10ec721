//! What this process knows of every analysis (name, version, partitioning, inputs),
//! without running any: read from SQL, refreshed when the bus says one was registered
//! and every half minute besides.
//!
//! Candidates (`name@candidate`, see [`scholia_events::store::CANDIDATE_SUFFIX`]) are
//! known too, so that workers build them, but every question a user's request asks
//! (`get`, `find`, `list`, `readers`) leaves them out: they are reached only through
//! [`Catalog::candidate`] and, for builds, [`Catalog::find_any`].

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::store::{Analyses, candidate_name, candidate_of};
use scholia_events::{Error, Result};

#[derive(Clone)]
pub struct Catalog {
    analyses: Arc<dyn Analyses>,
    metas: Arc<RwLock<BTreeMap<String, Arc<AnalysisMeta>>>>,
}

impl Catalog {
    pub async fn load(analyses: Arc<dyn Analyses>) -> Result<Self> {
        let catalog = Catalog {
            analyses,
            metas: Arc::default(),
        };
        catalog.refresh().await?;
        Ok(catalog)
    }

    pub async fn refresh(&self) -> Result<()> {
        let metas = self
            .analyses
            .list()
            .await?
            .into_iter()
            .map(|r| (r.meta.name.clone(), Arc::new(r.meta)))
            .collect();
        *self.metas.write().expect("catalog lock") = metas;
        Ok(())
    }

    /// The live analysis named `name` (never a candidate).
    pub fn get(&self, name: &str) -> Option<Arc<AnalysisMeta>> {
        if candidate_of(name).is_some() {
            return None;
        }
        self.get_any(name)
    }

    /// The analysis or candidate stored as `name`.
    pub fn get_any(&self, name: &str) -> Option<Arc<AnalysisMeta>> {
        self.metas.read().expect("catalog lock").get(name).cloned()
    }

    /// The live analysis named `name`, reading SQL once if this process does not know it
    /// yet (another process may just have registered it). Candidates are not found.
    pub async fn find(&self, name: &str) -> Result<Arc<AnalysisMeta>> {
        if candidate_of(name).is_some() {
            return Err(not_found(name));
        }
        self.find_any(name).await
    }

    /// The analysis or candidate stored as `name` (what a build of it runs), reading SQL
    /// once if this process does not know it yet.
    pub async fn find_any(&self, name: &str) -> Result<Arc<AnalysisMeta>> {
        if let Some(meta) = self.get_any(name) {
            return Ok(meta);
        }
        self.refresh().await?;
        self.get_any(name).ok_or_else(|| not_found(name))
    }

    /// The candidate of the live analysis `name`, as this process knows it.
    pub fn candidate(&self, name: &str) -> Option<Arc<AnalysisMeta>> {
        self.get_any(&candidate_name(name))
    }

    /// Every live analysis, by name.
    pub fn list(&self) -> Vec<Arc<AnalysisMeta>> {
        self.metas
            .read()
            .expect("catalog lock")
            .values()
            .filter(|m| candidate_of(&m.name).is_none())
            .cloned()
            .collect()
    }

    /// The live analyses that read `source` (a kind, or an analysis' annotations).
    pub fn readers(&self, source: &InputSource) -> Vec<Arc<AnalysisMeta>> {
        self.metas
            .read()
            .expect("catalog lock")
            .values()
            .filter(|m| candidate_of(&m.name).is_none() && m.input(source).is_some())
            .cloned()
            .collect()
    }

    /// Learn of a definition this process stored itself, without waiting for the bus.
    pub fn insert(&self, meta: AnalysisMeta) {
        self.metas
            .write()
            .expect("catalog lock")
            .insert(meta.name.clone(), Arc::new(meta));
    }

    /// Forget a definition this process removed itself (a discarded or promoted candidate).
    pub fn remove(&self, name: &str) {
        self.metas.write().expect("catalog lock").remove(name);
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "no analysis is named {name:?}; GET /v1/analyses lists them"
    ))
}
