//! What this process knows of every analysis (name, version, partitioning, inputs),
//! without running any: read from SQL, refreshed when the bus says one was registered
//! and every half minute besides.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use scholia_events::analysis::{AnalysisMeta, InputSource};
use scholia_events::store::Analyses;
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

    pub fn get(&self, name: &str) -> Option<Arc<AnalysisMeta>> {
        self.metas.read().expect("catalog lock").get(name).cloned()
    }

    /// The analysis named `name`, reading SQL once if this process does not know it yet
    /// (another process may just have registered it).
    pub async fn find(&self, name: &str) -> Result<Arc<AnalysisMeta>> {
        if let Some(meta) = self.get(name) {
            return Ok(meta);
        }
        self.refresh().await?;
        self.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "no analysis is named {name:?}; GET /v1/analyses lists them"
            ))
        })
    }

    /// Every analysis, by name.
    pub fn list(&self) -> Vec<Arc<AnalysisMeta>> {
        self.metas
            .read()
            .expect("catalog lock")
            .values()
            .cloned()
            .collect()
    }

    /// The analyses that read `source` (a kind, or an analysis' annotations).
    pub fn readers(&self, source: &InputSource) -> Vec<Arc<AnalysisMeta>> {
        self.metas
            .read()
            .expect("catalog lock")
            .values()
            .filter(|m| m.input(source).is_some())
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
}
