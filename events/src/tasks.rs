//! The shutdown tree: every long-lived task runs under one [`Supervisor`], by name.
//!
//! A task that fails (an error, a panic, or returning while the process is not stopping)
//! is restarted with a growing delay and reported on `/readyz`; one that keeps failing
//! (ten times with no minute of health between) or is marked fatal stops the whole
//! process, which then exits non-zero. Shutdown cancels one root token; draining waits
//! for every task, up to a limit.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Result;

/// What to do when a task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Start it again after a delay.
    Restart,
    /// Stop the process.
    Stop,
}

/// Consecutive failures, without a healthy minute between, after which a restarting task
/// stops the process instead.
const MAX_QUICK_FAILURES: u32 = 10;
/// A task that ran this long before failing was healthy; its failure count starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Restarting,
    Failed,
    Stopped,
}

/// One task's health, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskHealth {
    pub state: TaskState,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Board {
    tasks: BTreeMap<String, TaskHealth>,
    fatal: Option<String>,
}

/// Runs named tasks and knows how each is doing.
#[derive(Clone)]
pub struct Supervisor {
    shutdown: CancellationToken,
    tracker: TaskTracker,
    board: Arc<Mutex<Board>>,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Self {
        Supervisor {
            shutdown,
            tracker: TaskTracker::new(),
            board: Arc::default(),
        }
    }

    /// The root token: cancelled when the process stops.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Run `task` (made anew for each start) until shutdown.
    pub fn spawn<F, Fut>(&self, name: impl Into<String>, on_failure: OnFailure, mut task: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let name = name.into();
        let board = self.board.clone();
        let shutdown = self.shutdown.clone();
        set_state(&board, &name, TaskState::Running, None);
        self.tracker.spawn(async move {
            let mut quick_failures = 0;
            let mut delay = Duration::from_millis(500);
            loop {
                let started = Instant::now();
                let outcome = AssertUnwindSafe(task(shutdown.clone())).catch_unwind().await;
                if shutdown.is_cancelled() {
                    set_state(&board, &name, TaskState::Stopped, None);
                    return;
                }
                let error = match outcome {
                    Ok(Ok(())) => "it stopped on its own".to_string(),
                    Ok(Err(error)) => error.to_string(),
                    Err(panic) => format!("it panicked: {}", panic_text(&*panic)),
                };
                if started.elapsed() > HEALTHY_RUN {
                    quick_failures = 0;
                    delay = Duration::from_millis(500);
                }
                quick_failures += 1;
                if on_failure == OnFailure::Stop || quick_failures >= MAX_QUICK_FAILURES {
                    tracing::error!(task = %name, error = %error, "Task failed; stopping the process");
                    set_state(&board, &name, TaskState::Failed, Some(error.clone()));
                    board.lock().expect("task board").fatal =
                        Some(format!("task {name} failed: {error}"));
                    shutdown.cancel();
                    return;
                }
                tracing::error!(task = %name, error = %error, retry_in_ms = delay.as_millis() as u64, "Task failed; restarting it");
                set_state(&board, &name, TaskState::Restarting, Some(error));
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        set_state(&board, &name, TaskState::Stopped, None);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                set_state(&board, &name, TaskState::Running, None);
            }
        });
    }

    /// Every task's health.
    pub fn health(&self) -> BTreeMap<String, TaskHealth> {
        self.board.lock().expect("task board").tasks.clone()
    }

    /// Whether every task is running.
    pub fn all_running(&self) -> bool {
        self.board
            .lock()
            .expect("task board")
            .tasks
            .values()
            .all(|t| t.state == TaskState::Running)
    }

    /// Why the process is stopping, if a task stopped it.
    pub fn fatal(&self) -> Option<String> {
        self.board.lock().expect("task board").fatal.clone()
    }

    /// Stop everything and wait for the tasks, up to `limit`. False when some did not
    /// finish in time.
    pub async fn drain(&self, limit: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
    }
}

fn set_state(board: &Mutex<Board>, name: &str, state: TaskState, error: Option<String>) {
    let mut board = board.lock().expect("task board");
    let entry = board.tasks.entry(name.to_string()).or_insert(TaskHealth {
        state,
        restarts: 0,
        last_error: None,
    });
    if state == TaskState::Restarting {
        entry.restarts += 1;
    }
    if error.is_some() {
        entry.last_error = error;
    }
    entry.state = state;
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_reported() {
        let supervisor = Supervisor::new(CancellationToken::new());
        let starts = Arc::new(AtomicU32::new(0));
        let counter = starts.clone();
        supervisor.spawn("flaky", OnFailure::Restart, move |shutdown| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("boom");
                }
                shutdown.cancelled().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        let health = supervisor.health();
        assert_eq!(health["flaky"].state, TaskState::Running);
        assert_eq!(health["flaky"].restarts, 1);
        let error = health["flaky"].last_error.clone().unwrap_or_default();
        assert!(error.contains("boom"), "{error}");
        assert!(supervisor.drain(Duration::from_secs(1)).await);
        assert!(supervisor.fatal().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_task_stops_the_process() {
        let supervisor = Supervisor::new(CancellationToken::new());
        supervisor.spawn("server", OnFailure::Stop, |_| async {
            Err(crate::Error::Invalid("cannot listen".into()))
        });
        supervisor.shutdown().cancelled().await;
        assert!(supervisor.fatal().unwrap().contains("cannot listen"));
        assert_eq!(supervisor.health()["server"].state, TaskState::Failed);
    }
}
