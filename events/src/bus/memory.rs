//! The in-process bus of the embedded deployment: a broadcast channel for fan-out and a
//! shared queue per group for work, both bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast, mpsc};

use super::{Acker, AckerInner, Bus, Delivery, EventFilter, Subscription};
use crate::error::Result;
use crate::event::LoggedEvent;

/// How many events a fan-out subscriber may fall behind before it is told it lagged.
const BROADCAST_CAPACITY: usize = 16_384;
/// How many unconsumed events a work group holds; older ones are dropped past this
/// (workers also poll SQL, so a dropped wake-up delays work but never loses it).
const QUEUE_CAPACITY: usize = 100_000;

#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    fanout: broadcast::Sender<Arc<LoggedEvent>>,
    groups: Mutex<HashMap<String, Arc<GroupQueue>>>,
}

struct GroupQueue {
    filter: EventFilter,
    pending: Mutex<VecDeque<LoggedEvent>>,
    notify: Notify,
}

impl GroupQueue {
    fn push_back(&self, event: LoggedEvent) {
        let mut pending = self.pending.lock().expect("queue lock");
        if pending.len() >= QUEUE_CAPACITY {
            pending.pop_front();
            tracing::warn!(
                capacity = QUEUE_CAPACITY,
                "In-process work queue full; dropped its oldest wake-up"
            );
        }
        pending.push_back(event);
        drop(pending);
        self.notify.notify_one();
    }

    fn push_front(&self, event: LoggedEvent) {
        self.pending.lock().expect("queue lock").push_front(event);
        self.notify.notify_one();
    }

    async fn pop(&self) -> LoggedEvent {
        loop {
            let notified = self.notify.notified();
            if let Some(event) = self.pending.lock().expect("queue lock").pop_front() {
                return event;
            }
            notified.await;
        }
    }
}

/// The acknowledgement handle of one in-process queue delivery. Dropping it without
/// acknowledging puts the event back, as a crashed consumer would on NATS.
pub(crate) struct QueueAck {
    queue: Arc<GroupQueue>,
    event: Option<LoggedEvent>,
}

impl QueueAck {
    pub(crate) fn done(mut self) {
        self.event = None;
    }

    pub(crate) fn redeliver(mut self, delay: Duration) {
        if let Some(event) = self.event.take() {
            let queue = self.queue.clone();
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
        let (fanout, _) = broadcast::channel(BROADCAST_CAPACITY);
        MemoryBus {
            inner: Arc::new(Inner {
                fanout,
                groups: Mutex::new(HashMap::new()),
            }),
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, events: &[LoggedEvent]) -> (usize, Result<()>) {
        let groups: Vec<Arc<GroupQueue>> = self
            .inner
            .groups
            .lock()
            .expect("groups lock")
            .values()
            .cloned()
            .collect();
        for event in events {
            let type_name = event.body.type_name();
            for group in &groups {
                if group.filter.matches(type_name) {
                    group.push_back(event.clone());
                }
            }
            // No receivers is not an error: nobody is listening yet.
            let _ = self.inner.fanout.send(Arc::new(event.clone()));
        }
        (events.len(), Ok(()))
    }

    async fn subscribe(&self, filter: EventFilter) -> Result<Subscription> {
        let mut rx = self.inner.fanout.subscribe();
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let delivery = match rx.recv().await {
                    Ok(event) if filter.matches(event.body.type_name()) => {
                        Delivery::Event((*event).clone(), Acker::noop())
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => Delivery::Lagged,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(delivery).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::new(out))
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
                    pending: Mutex::new(VecDeque::new()),
                    notify: Notify::new(),
                })
            })
            .clone();
        let (tx, out) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    permit = tx.reserve() => match permit { Ok(p) => p, Err(_) => return },
                };
                let event = queue.pop().await;
                let ack = QueueAck {
                    queue: queue.clone(),
                    event: Some(event.clone()),
                };
                permit.send(Delivery::Event(event, Acker(AckerInner::Memory(Some(ack)))));
            }
        });
        Ok(Subscription::new(out))
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
    use crate::event::EventBody;

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

    #[tokio::test]
    async fn every_subscriber_sees_every_event_in_order() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe(EventFilter::all()).await.unwrap();
        let mut b = bus.subscribe(EventFilter("source.*".into())).await.unwrap();
        bus.publish(&[event(1), event(2)]).await.1.unwrap();
        for sub in [&mut a, &mut b] {
            for want in [1, 2] {
                match sub.next().await.unwrap() {
                    Delivery::Event(e, _) => assert_eq!(e.seq, want),
                    Delivery::Lagged => panic!("lagged"),
                }
            }
        }
    }

    #[tokio::test]
    async fn an_unacknowledged_queue_delivery_comes_back() {
        let bus = MemoryBus::new();
        let mut worker = bus.queue("workers", EventFilter::all()).await.unwrap();
        bus.publish(&[event(1)]).await.1.unwrap();
        let Some(Delivery::Event(first, acker)) = worker.next().await else {
            panic!()
        };
        drop(acker);
        let Some(Delivery::Event(again, acker)) = worker.next().await else {
            panic!()
        };
        assert_eq!(first.seq, again.seq);
        acker.ack().await.unwrap();
        bus.publish(&[event(2)]).await.1.unwrap();
        let Some(Delivery::Event(next, _)) = worker.next().await else {
            panic!()
        };
        assert_eq!(next.seq, 2);
    }
}
