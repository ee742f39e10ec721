//! The SQL both backends share. This folder is compiled once inside each backend module
//! (`postgres` and `sqlite`, through `#[path]`), where `Db`, `Backend` and `WriteTx` are
//! that backend's: one source, two typed implementations. Statements here use what both
//! dialects agree on (`$1` placeholders, `ON CONFLICT`, `RETURNING`, row values); times go
//! through `Timestamp`, and anything else that differs is asked of the backend module.

pub(crate) mod analyses;
pub(crate) mod annotations;
pub(crate) mod invalidations;
pub(crate) mod kinds;
pub(crate) mod log;
pub(crate) mod quarantine;
pub(crate) mod queue;
pub(crate) mod records;
pub(crate) mod schedules;
pub(crate) mod tokens;

pub(crate) use super::{Backend, CLAIM_LOCK, DATA_TEXT, Db, WriteTx};

/// The most bind parameters one statement carries: under both backends' limits
/// (PostgreSQL 65,535; SQLite 32,766).
pub(crate) const MAX_BINDS: usize = 30_000;
