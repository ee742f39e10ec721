//! The shared vocabulary of Scholia: the record envelope, the event types, partition
//! keys, kind schemas, statuses, what every component knows of an analysis; the store
//! traits (one per aggregate, implemented for PostgreSQL and SQLite by `scholia-store`);
//! the bus that fans the log out (NATS JetStream or in-process); the relay between them;
//! the supervisor of long-lived tasks; and metrics. It knows nothing of HTTP, SQL
//! drivers or Polars.
//!
//! Concurrency model: the event log in SQL is the single source of truth. Writers append
//! to it inside their own transaction, under the deployment's log lock, so `seq` order is
//! commit order; a single relay per deployment reads committed events in `seq` order and
//! publishes them to the bus (transactional outbox). Bus consumers are idempotent, since
//! the relay may publish an event twice after a crash, and never rely on the bus alone:
//! a lost message delays work, and SQL repairs it.

pub mod analysis;
pub mod bus;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod event;
pub mod metrics;
mod openapi;
pub mod partition;
pub mod relay;
pub mod schema;
pub mod status;
pub mod store;
pub mod tasks;
pub mod token;

pub use analysis::{AnalysisMeta, ColumnSpec, Input, InputSource};
pub use bus::{Bus, Delivery, EventFilter, Subscription};
pub use envelope::{Envelope, StoredEnvelope};
pub use error::{Error, Result};
pub use event::{EventBody, EventType, LoggedEvent, NewEvent};
pub use partition::{Granularity, PartitionKey, PartitionRun};
pub use store::Store;
