//! The shared vocabulary of Scholia: the record envelope, the event types, partition
//! keys, the SQL database handle with its migrations, the append-only event log, and the
//! bus that fans the log out (NATS JetStream or in-process).
//!
//! Concurrency model: the event log is the single source of truth. Writers append to it
//! inside their own SQL transaction (one writer at a time per database, so `seq` order is
//! commit order); a single relay task per deployment reads committed events in `seq` order
//! and publishes them to the bus (transactional outbox). Bus consumers must therefore be
//! idempotent: the relay may publish an event twice after a crash.

pub mod auth;
pub mod bus;
pub mod db;
pub mod envelope;
pub mod error;
pub mod event;
pub mod log;
pub mod metrics;
pub mod partition;
pub mod relay;

pub use bus::{Bus, Delivery, Subscription};
pub use db::Database;
pub use envelope::{Envelope, StoredEnvelope};
pub use error::{Error, Result};
pub use event::{EventBody, LoggedEvent, NewEvent};
pub use partition::{Granularity, PartitionKey};
