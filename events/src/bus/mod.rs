//! The bus: how committed log events reach the components that react to them.
//!
//! Two delivery modes, on either backend:
//! - [`Bus::subscribe`] fans out: every subscriber sees every event it asked for, at most
//!   once, in log order; a subscriber that falls behind is told so ([`Delivery::Lagged`]).
//! - [`Bus::queue`] shares work: each event goes to one member of the named group, which
//!   acknowledges it once its effect is committed; an unacknowledged event is delivered
//!   again (to any member), so handlers must be idempotent.
//!
//! Only the relay publishes, in `seq` order, after commit.

mod memory;
mod nats;

use std::time::Duration;

use async_trait::async_trait;

pub use memory::MemoryBus;
pub use nats::{NatsBus, NatsConfig};

use crate::error::Result;
use crate::event::LoggedEvent;

/// Which event types a consumer wants: a type name (`analysis.completed`) or a prefix
/// ending in `.*` (`analysis.*`), or `*` for all.
#[derive(Debug, Clone)]
pub struct EventFilter(pub String);

impl EventFilter {
    pub fn all() -> Self {
        EventFilter("*".into())
    }

    pub fn matches(&self, type_name: &str) -> bool {
        match self.0.as_str() {
            "*" => true,
            f => match f.strip_suffix(".*") {
                Some(prefix) => type_name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.')),
                None => f == type_name,
            },
        }
    }
}

/// One delivery to a consumer. (Moved once into a channel; boxing the event would cost
/// an allocation per delivery for nothing.)
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    Event(LoggedEvent, Acker),
    /// The consumer fell behind and missed events; it should resynchronize from SQL.
    Lagged,
}

/// Acknowledges a delivery from a work queue; for fan-out deliveries it does nothing.
pub struct Acker(AckerInner);

enum AckerInner {
    Noop,
    Memory(Option<memory::QueueAck>),
    Nats(Box<async_nats::jetstream::message::Acker>),
}

impl Acker {
    pub(crate) fn noop() -> Self {
        Acker(AckerInner::Noop)
    }

    /// The work is committed: do not deliver this event again.
    pub async fn ack(self) -> Result<()> {
        match self.0 {
            AckerInner::Noop => Ok(()),
            AckerInner::Memory(ack) => {
                if let Some(ack) = ack {
                    ack.done();
                }
                Ok(())
            }
            AckerInner::Nats(acker) => acker.ack().await.map_err(crate::Error::bus),
        }
    }

    /// The work failed in a way worth retrying: deliver again after `delay`.
    pub async fn retry_after(self, delay: Duration) -> Result<()> {
        match self.0 {
            AckerInner::Noop => Ok(()),
            AckerInner::Memory(ack) => {
                if let Some(ack) = ack {
                    ack.redeliver(delay);
                }
                Ok(())
            }
            AckerInner::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(crate::Error::bus),
        }
    }

    /// Still working: do not redeliver yet.
    pub async fn in_progress(&self) -> Result<()> {
        match &self.0 {
            AckerInner::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(crate::Error::bus),
            _ => Ok(()),
        }
    }
}

/// A stream of deliveries.
pub struct Subscription {
    rx: tokio::sync::mpsc::Receiver<Delivery>,
}

impl Subscription {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Delivery>) -> Self {
        Subscription { rx }
    }

    /// The next delivery, or `None` when the bus has shut down.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publish committed events, in `seq` order. Returns how many were published (a
    /// prefix of `events`) before an error stopped it, so that the relay resumes there.
    async fn publish(&self, events: &[LoggedEvent]) -> (usize, Result<()>);

    /// Every event matching `filter` from now on.
    async fn subscribe(&self, filter: EventFilter) -> Result<Subscription>;

    /// Events matching `filter`, shared among the members of `group`, with
    /// acknowledgements and redelivery.
    async fn queue(&self, group: &str, filter: EventFilter) -> Result<Subscription>;

    /// Whether the bus is reachable now.
    async fn is_ready(&self) -> bool;

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::EventFilter;

    #[test]
    fn a_filter_matches_a_type_a_family_or_everything() {
        assert!(EventFilter("analysis.*".into()).matches("analysis.completed"));
        assert!(!EventFilter("analysis.*".into()).matches("analysisx.completed"));
        assert!(!EventFilter("analysis.*".into()).matches("source.ingested"));
        assert!(EventFilter("source.ingested".into()).matches("source.ingested"));
        assert!(EventFilter::all().matches("schedule.fired"));
    }
}
