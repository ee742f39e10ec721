//! The relay: publishes committed log events to the bus, in `seq` order (the outbox).
//!
//! One relay publishes per deployment at a time: the leader holds the store's relay lease
//! (an advisory lock on PostgreSQL), and others stand by. Where the bus keeps events for
//! consumers in other processes (NATS), the position reached is kept in SQL, so after a
//! crash or an outage the relay resumes where the bus last acknowledged, and the bus
//! deduplicates what it publishes twice. The in-process bus has no consumers from before
//! this process, so its relay starts at the log head; what those consumers would have
//! done with older events, the reconciler does from SQL.
//!
//! An event the bus can never take (larger than its payload limit) is skipped and
//! reported (a metric, a log line, `/readyz` degraded): it is in SQL all the same, and the
//! events after it must not wait behind it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::error::Result;
use crate::store::{EventLog, Leadership};

const BATCH: usize = 1_000;
/// How often a leader checks that it still holds its lease.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(5);
/// How long a skipped event keeps `/readyz` degraded.
const DEGRADED_FOR: Duration = Duration::from_secs(15 * 60);

/// What the relay has done, for metrics and `/readyz`.
#[derive(Debug, Default)]
pub struct RelayStatus {
    /// The highest `seq` the bus has acknowledged (or skipped).
    pub published_seq: AtomicI64,
    /// Publish attempts that failed and were retried.
    pub failures: AtomicU64,
    /// Events the bus could never take, skipped.
    pub skipped: AtomicU64,
    last_skipped: Mutex<Option<(Instant, String)>>,
}

impl RelayStatus {
    /// The last skipped event, while it is recent enough to report.
    pub fn recent_skip(&self) -> Option<String> {
        self.last_skipped
            .lock()
            .expect("relay status lock")
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DEGRADED_FOR)
            .map(|(_, message)| message.clone())
    }
}

pub struct Relay {
    log: Arc<dyn EventLog>,
    bus: Arc<dyn Bus>,
    /// Where this bus's position is kept; `None` to start from the log head.
    cursor_name: Option<String>,
    status: Arc<RelayStatus>,
}

impl Relay {
    pub fn new(log: Arc<dyn EventLog>, bus: Arc<dyn Bus>, cursor_name: Option<String>) -> Self {
        Relay {
            log,
            bus,
            cursor_name,
            status: Arc::new(RelayStatus::default()),
        }
    }

    pub fn status(&self) -> Arc<RelayStatus> {
        self.status.clone()
    }

    /// Lead when possible, publish until shut down. Errors end the run (the supervisor
    /// restarts it); a lost database connection is one.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        loop {
            let leadership = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                leadership = self.log.lead_relay() => leadership?,
            };
            match leadership {
                Some(leadership) => {
                    self.lead(leadership, &shutdown).await?;
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                }
                None => tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                },
            }
        }
    }

    async fn lead(
        &self,
        mut leadership: Box<dyn Leadership>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut cursor = match &self.cursor_name {
            Some(name) => self.log.relay_cursor(name).await?.unwrap_or(0),
            None => self.log.head().await?,
        };
        self.status.published_seq.store(cursor, Ordering::Relaxed);
        let mut watch = self.log.watch().await?;
        let mut backoff = Duration::from_millis(100);
        let mut checked = Instant::now();
        tracing::info!(
            bus = self.bus.name(),
            after = cursor,
            "Relay publishing the event log"
        );
        loop {
            if checked.elapsed() > LEADERSHIP_CHECK {
                if !leadership.holds().await {
                    tracing::warn!("The relay lost its lease; standing by");
                    return Ok(());
                }
                checked = Instant::now();
            }
            let events = self.log.read_after(cursor, BATCH).await?;
            if events.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = watch.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let published = self.bus.publish(&events).await;
            let mut reached = (published.count > 0).then(|| events[published.count - 1].seq);
            match published.error {
                None => backoff = Duration::from_millis(100),
                Some(error) if !error.transient => {
                    self.status.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq = error.seq, error = %error.message, "The bus cannot take this event; it stays in the log and the relay moves past it");
                    *self.status.last_skipped.lock().expect("relay status lock") =
                        Some((Instant::now(), error.message));
                    reached = Some(error.seq);
                }
                Some(error) => {
                    let failures = self.status.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures % 20 == 1 {
                        tracing::warn!(error = %error.message, pending_after = cursor, "The bus refused events; they stay in the log and will be retried");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if let Some(seq) = reached {
                cursor = seq;
                self.status.published_seq.store(cursor, Ordering::Relaxed);
                if let Some(name) = &self.cursor_name {
                    self.log.save_relay_cursor(name, cursor).await?;
                }
            }
        }
    }
}
