//! The bus: how committed log events reach the components that react to them. It is a
//! wake-up, never the truth: everything on it is in the SQL log first, so a message that
//! is lost, late or never published delays work but never loses it.
//!
//! Two delivery modes, on either backend:
//! - [`Bus::subscribe`] fans out: every subscriber sees every event it asked for, at most
//!   once, in log order; a subscriber that falls behind is told so ([`Delivery::Lagged`]).
//! - [`Bus::queue`] shares work: each event goes to one member of the named group, which
//!   acknowledges it once its effect is committed; an unacknowledged event is delivered
//!   again (to any member), so handlers must be idempotent. A group that falls behind is
//!   told so too, and its members then look in SQL.
//!
//! Only the relay publishes, in `seq` order, after commit. A subscription is a value
//! pulled by its owner: no task runs behind it.

mod memory;
mod nats;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use memory::MemoryBus;
pub use nats::{NatsBus, NatsConfig};

use crate::error::Result;
use crate::event::{EventType, LoggedEvent};

/// Which events a consumer wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    /// One family: `analysis` for every `analysis.*` event.
    Family(&'static str),
    One(EventType),
}

impl EventFilter {
    pub fn matches(&self, ty: EventType) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Family(family) => ty.family() == *family,
            EventFilter::One(one) => *one == ty,
        }
    }
}

/// One delivery to a consumer.
pub enum Delivery {
    Event(Arc<LoggedEvent>, Acker),
    /// The consumer fell behind and missed events; it should resynchronize from SQL.
    Lagged,
}

/// Acknowledges a delivery from a work queue; for fan-out deliveries it does nothing.
pub struct Acker(AckerInner);

enum AckerInner {
    Noop,
    Memory(memory::QueueAck),
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
                ack.done();
                Ok(())
            }
            AckerInner::Nats(acker) => acker
                .ack()
                .await
                .map_err(|e| crate::Error::unavailable("the bus", e)),
        }
    }

    /// The work failed in a way worth retrying: deliver again after `delay`.
    pub async fn retry_after(self, delay: Duration) -> Result<()> {
        match self.0 {
            AckerInner::Noop => Ok(()),
            AckerInner::Memory(ack) => {
                ack.redeliver_after(delay);
                Ok(())
            }
            AckerInner::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| crate::Error::unavailable("the bus", e)),
        }
    }
}

/// Where a subscription's deliveries come from.
#[async_trait]
pub(crate) trait Source: Send {
    async fn next(&mut self) -> Option<Delivery>;
}

/// A stream of deliveries, pulled by its owner.
pub struct Subscription {
    source: Box<dyn Source>,
}

impl Subscription {
    pub(crate) fn new(source: impl Source + 'static) -> Self {
        Subscription {
            source: Box::new(source),
        }
    }

    /// The next delivery, or `None` when the bus has shut down. Cancel-safe: dropping the
    /// future loses no delivery.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.source.next().await
    }
}

/// Why publishing stopped.
#[derive(Debug)]
pub struct PublishError {
    /// The `seq` of the event that was not published.
    pub seq: i64,
    /// True when retrying may succeed (the bus is unreachable); false when this event can
    /// never be published (it is larger than the bus takes).
    pub transient: bool,
    pub message: String,
}

/// How far a publish got: a prefix of the events, and what stopped it.
#[derive(Debug)]
pub struct Published {
    pub count: usize,
    pub error: Option<PublishError>,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publish committed events, in `seq` order, stopping at the first that fails.
    async fn publish(&self, events: &[LoggedEvent]) -> Published;

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
    use crate::event::EventType;

    #[test]
    fn a_filter_matches_a_type_a_family_or_everything() {
        assert!(EventFilter::Family("analysis").matches(EventType::AnalysisCompleted));
        assert!(!EventFilter::Family("analysis").matches(EventType::SourceIngested));
        assert!(EventFilter::One(EventType::SourceIngested).matches(EventType::SourceIngested));
        assert!(!EventFilter::One(EventType::SourceIngested).matches(EventType::AdminAction));
        assert!(EventFilter::All.matches(EventType::ScheduleFired));
    }
}
