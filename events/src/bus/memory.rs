//! The in-process bus of the embedded deployment: a broadcast channel for fan-out and a
//! shared queue per group for work, both bounded. Neither drops an event silently: a
//! subscriber or group that falls behind receives [`Delivery::Lagged`] and looks in SQL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};

use super::{Acker, AckerInner, Bus, Delivery, EventFilter, Published, Source, Subscription};
use crate::error::Result;
use crate::event::LoggedEvent;

/// How many events a fan-out subscriber may fall behind before it is told it lagged.
const BROADCAST_CAPACITY: usize = 16_384;
/// How many unconsumed events a work group holds before it is told it lagged.
const QUEUE_CAPACITY: usize = 100_000;

#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    fanout: broadcast::Sender<Arc<LoggedEvent>>,
    groups: Mutex<HashMap<String, Arc<GroupQueue>>>,
    queue_capacity: usize,
}

struct GroupQueue {
    filter: EventFilter,
    capacity: usize,
    pending: Mutex<VecDeque<Arc<LoggedEvent>>>,
    /// Events were dropped: the next delivery tells the group so.
    lagged: AtomicBool,
    notify: Notify,
}

impl GroupQueue {
    fn push_back(&self, event: Arc<LoggedEvent>) {
        let mut pending = self.pending.lock().expect("queue lock");
        if pending.len() >= self.capacity {
            pending.pop_front();
            self.lagged.store(true, Ordering::SeqCst);
        }
        pending.push_back(event);
        drop(pending);
        self.notify.notify_one();
    }

    fn push_front(&self, event: Arc<LoggedEvent>) {
        self.pending.lock().expect("queue lock").push_front(event);
        self.notify.notify_one();
    }
}

/// The acknowledgement handle of one in-process queue delivery. Dropping it without
/// acknowledging puts the event back, as a crashed consumer would on NATS.
pub(crate) struct QueueAck {
    queue: Arc<GroupQueue>,
    event: Option<Arc<LoggedEvent>>,
}

impl QueueAck {
    pub(crate) fn done(mut self) {
        self.event = None;
    }

    pub(crate) fn redeliver_after(mut self, delay: Duration) {
        if let Some(event) = self.event.take() {
            let queue = self.queue.clone();
            // Short-lived: it ends after `delay`.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.push_back(event);
            });
        }
    }
}

impl Drop for QueueAck {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            self.queue.push_front(event);
        }
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::with_queue_capacity(QUEUE_CAPACITY)
    }

    /// A bus whose work groups hold at most `capacity` events.
    pub fn with_queue_capacity(capacity: usize) -> Self {
        let (fanout, _) = broadcast::channel(BROADCAST_CAPACITY);
        MemoryBus {
            inner: Arc::new(Inner {
                fanout,
                groups: Mutex::new(HashMap::new()),
                queue_capacity: capacity.max(1),
            }),
        }
    }
}

struct FanoutSource {
    rx: broadcast::Receiver<Arc<LoggedEvent>>,
    filter: EventFilter,
}

#[async_trait]
impl Source for FanoutSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            match self.rx.recv().await {
                Ok(event) if self.filter.matches(event.body.event_type()) => {
                    return Some(Delivery::Event(event, Acker::noop()));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => return Some(Delivery::Lagged),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

struct QueueSource {
    queue: Arc<GroupQueue>,
}

#[async_trait]
impl Source for QueueSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queue.lagged.swap(false, Ordering::SeqCst) {
                return Some(Delivery::Lagged);
            }
            let event = self.queue.pending.lock().expect("queue lock").pop_front();
            if let Some(event) = event {
                let ack = QueueAck {
                    queue: self.queue.clone(),
                    event: Some(event.clone()),
                };
                return Some(Delivery::Event(event, Acker(AckerInner::Memory(ack))));
            }
            notified.await;
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, events: &[LoggedEvent]) -> Published {
        let groups: Vec<Arc<GroupQueue>> = self
            .inner
            .groups
            .lock()
            .expect("groups lock")
            .values()
            .cloned()
            .collect();
        for event in events {
            let event = Arc::new(event.clone());
            let ty = event.body.event_type();
            for group in &groups {
                if group.filter.matches(ty) {
                    group.push_back(event.clone());
                }
            }
            // No receivers is not an error: nobody is listening yet.
            let _ = self.inner.fanout.send(event);
        }
        Published {
            count: events.len(),
            error: None,
        }
    }

    async fn subscribe(&self, filter: EventFilter) -> Result<Subscription> {
        Ok(Subscription::new(FanoutSource {
            rx: self.inner.fanout.subscribe(),
            filter,
        }))
    }

    async fn queue(&self, group: &str, filter: EventFilter) -> Result<Subscription> {
        let queue = self
            .inner
            .groups
            .lock()
            .expect("groups lock")
            .entry(group.to_string())
            .or_insert_with(|| {
                Arc::new(GroupQueue {
                    filter,
                    capacity: self.inner.queue_capacity,
                    pending: Mutex::new(VecDeque::new()),
                    lagged: AtomicBool::new(false),
                    notify: Notify::new(),
                })
            })
            .clone();
        Ok(Subscription::new(QueueSource { queue }))
    }

    async fn is_ready(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "in-process"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventBody, EventType};

    fn event(seq: i64) -> LoggedEvent {
        LoggedEvent {
            seq,
            at: chrono::Utc::now(),
            actor: "test".into(),
            body: EventBody::SourceIngested {
                kind: "k".into(),
                count: 1,
                hours: vec![],
            },
        }
    }

    /// The next delivery's seq (acknowledged), -1 for `Lagged`.
    async fn take(sub: &mut Subscription) -> i64 {
        match sub.next().await {
            Some(Delivery::Event(e, acker)) => {
                acker.ack().await.unwrap();
                e.seq
            }
            Some(Delivery::Lagged) => -1,
            None => -2,
        }
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_event_in_order() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe(EventFilter::All).await.unwrap();
        let mut b = bus.subscribe(EventFilter::Family("source")).await.unwrap();
        assert!(bus.publish(&[event(1), event(2)]).await.error.is_none());
        for sub in [&mut a, &mut b] {
            assert_eq!(take(sub).await, 1);
            assert_eq!(take(sub).await, 2);
        }
    }

    #[tokio::test]
    async fn an_unacknowledged_queue_delivery_comes_back() {
        let bus = MemoryBus::new();
        let mut worker = bus
            .queue("workers", EventFilter::One(EventType::SourceIngested))
            .await
            .unwrap();
        bus.publish(&[event(1)]).await;
        let Some(Delivery::Event(first, acker)) = worker.next().await else {
            panic!()
        };
        drop(acker);
        let Some(Delivery::Event(again, acker)) = worker.next().await else {
            panic!()
        };
        assert_eq!(first.seq, again.seq);
        acker.ack().await.unwrap();
        bus.publish(&[event(2)]).await;
        assert_eq!(take(&mut worker).await, 2);
    }

    #[tokio::test]
    async fn a_full_work_group_is_told_it_lagged_instead_of_losing_events_silently() {
        let bus = MemoryBus::with_queue_capacity(2);
        let mut planner = bus.queue("planner", EventFilter::All).await.unwrap();
        bus.publish(&[event(1), event(2), event(3)]).await;
        assert_eq!(take(&mut planner).await, -1, "told it lagged first");
        assert_eq!(take(&mut planner).await, 2);
        assert_eq!(take(&mut planner).await, 3);
    }
}
