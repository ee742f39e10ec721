//! This process's copy of every kind's schema, so that a batch is checked without a
//! query. It is refreshed every few seconds (declarations and what other processes
//! learned reach it within that time) and after every batch; a stale copy costs only
//! speed, since the store checks again under the log lock whatever moved meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use scholia_events::Result;
use scholia_events::schema::KindSchema;
use scholia_events::store::Kinds;

/// How often the copy is refreshed from SQL.
pub const REFRESH: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct KindCache {
    kinds: Arc<dyn Kinds>,
    schemas: Arc<RwLock<HashMap<String, KindSchema>>>,
}

impl KindCache {
    pub async fn load(kinds: Arc<dyn Kinds>) -> Result<Self> {
        let cache = KindCache {
            kinds,
            schemas: Arc::default(),
        };
        cache.refresh().await?;
        Ok(cache)
    }

    /// The schema this process knows for `kind` (empty for a kind it has not seen).
    pub fn schema(&self, kind: &str) -> KindSchema {
        self.schemas
            .read()
            .expect("kinds lock")
            .get(kind)
            .cloned()
            .unwrap_or_default()
    }

    pub fn remember(&self, kind: &str, schema: KindSchema) {
        self.schemas
            .write()
            .expect("kinds lock")
            .insert(kind.to_string(), schema);
    }

    pub async fn refresh(&self) -> Result<()> {
        let map = self
            .kinds
            .list()
            .await?
            .into_iter()
            .map(|k| (k.kind, k.schema))
            .collect();
        *self.schemas.write().expect("kinds lock") = map;
        Ok(())
    }

    /// Refresh until shut down.
    pub async fn follow(self, shutdown: CancellationToken) -> Result<()> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(REFRESH) => {}
            }
            if let Err(error) = self.refresh().await {
                tracing::warn!(error = %error, "Cannot refresh kinds' schemas; keeping the last ones");
            }
        }
    }
}
