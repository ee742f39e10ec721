//! Scholia's SQL: every store trait of `scholia_events::store`, implemented for
//! PostgreSQL (production) and SQLite (embedded), and the migrations of both.
//!
//! Layout: `postgres/` and `sqlite/` hold what truly differs between the two (the log
//! lock, `COPY`, `FOR UPDATE SKIP LOCKED`, `LISTEN`/`NOTIFY`, leader election, how rows
//! are scanned). Everything else is written once in `shared/`, and each backend module
//! compiles those files as its own submodules (`#[path]`), where `super::Db` is that
//! backend's sqlx database: one source, two typed implementations, no dispatch at run
//! time. Times are `TIMESTAMPTZ` on PostgreSQL and integer microseconds on SQLite,
//! everywhere, through [`time::Timestamp`].
//!
//! Concurrency model: a write that appends to the event log takes the deployment's log
//! lock (an advisory transaction lock on PostgreSQL; a mutex with `BEGIN IMMEDIATE` on
//! SQLite) and holds it until commit, so `seq` order is commit order. Other writes do
//! not take it (SQLite has one writer anyway). Readers never do.

#[cfg(test)]
mod build_history_tests;
mod error;
#[cfg(test)]
mod load_tests;
mod postgres;
#[cfg(test)]
mod scratch;
mod sqlite;
mod time;

use std::sync::Arc;

use scholia_events::store::Store;
use scholia_events::{Error, Result};

/// Where data lives when no database URL is given.
pub const DEFAULT_DATA_DIR: &str = "scholia-data";

/// Connect to `url` (`sqlite://…` or `postgres://…`), or to the embedded SQLite file
/// under `./scholia-data/` when `url` is `None`; run pending migrations; return every
/// store of the deployment.
pub async fn connect(url: Option<&str>) -> Result<Store> {
    match url {
        None => {
            std::fs::create_dir_all(DEFAULT_DATA_DIR).map_err(|e| {
                Error::Invalid(format!(
                    "cannot create the data directory ./{DEFAULT_DATA_DIR}: {e}"
                ))
            })?;
            let url = format!("sqlite://{DEFAULT_DATA_DIR}/scholia.db");
            Ok(bundle(sqlite::SqliteStore::connect(&url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => {
            Ok(bundle(sqlite::SqliteStore::connect(url).await?))
        }
        Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
            Ok(bundle(postgres::PgStore::connect(url).await?))
        }
        Some(url) => Err(Error::Invalid(format!(
            "SCHOLIA_DATABASE_URL must start with sqlite:// or postgres://, not {:?}",
            url.split(':').next().unwrap_or(url)
        ))),
    }
}

/// One backend behind every store trait.
fn bundle<B>(backend: B) -> Store
where
    B: scholia_events::store::Database
        + scholia_events::store::EventLog
        + scholia_events::store::Records
        + scholia_events::store::Kinds
        + scholia_events::store::Tokens
        + scholia_events::store::Quarantine
        + scholia_events::store::Analyses
        + scholia_events::store::BuildQueue
        + scholia_events::store::Annotations
        + scholia_events::store::Invalidations
        + scholia_events::store::Schedules
        + 'static,
{
    let backend = Arc::new(backend);
    Store {
        database: backend.clone(),
        log: backend.clone(),
        records: backend.clone(),
        kinds: backend.clone(),
        tokens: backend.clone(),
        quarantine: backend.clone(),
        analyses: backend.clone(),
        queue: backend.clone(),
        annotations: backend.clone(),
        invalidations: backend.clone(),
        schedules: backend,
    }
}
