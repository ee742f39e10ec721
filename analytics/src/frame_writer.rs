//! The thread that writes frame files, out of the builds' way.
//!
//! Frame files are written one at a time, on a thread of its own at the lowest CPU
//! priority (nice 19), and only once the worker's builds have paused for `QUIET` (or a
//! write has waited `MAX_DEFER`). A write encodes and copies tens of megabytes, and the
//! kernel then writes them back: run beside builds (a rewind right after a first build,
//! the next late record's build) it took their cores, and the thirty of a month's first
//! build held both cores for seconds. The files are for the next process; they can wait
//! for a pause. `flush` writes what is asked for at once and waits for it, so that a
//! process stopping gracefully leaves its files for the next one.
//!
//! A write may also be asked not to start before a delay (a frame extended with late
//! records waits 2 s, so that a run of them costs one write).
//!
//! What a waiting write holds is bounded. A span has at most one write waiting: a newer
//! one takes its place (and its frame, so the older frame is let go at once) and keeps
//! its place in line and its delay. And the frames that only waiting writes still hold (the frame
//! cache let them go) are held up to `held_bytes`: past it, the writer writes without
//! waiting for a pause, and a write asked for past it lets go of the newest waiting
//! writes that only it holds (all but the longest-waiting one) until the rest fit. Under
//! steady load builds never pause, and every late record's extension of a day asked for a
//! write: queued one after another, each holding its own version of the day for up to
//! `MAX_DEFER`, they grew a worker by hundreds of megabytes; with one write a span, a
//! writer at nice 19 that the builds leave no CPU still held the newest frame of every
//! span the cache had let go, and that grew with the spans' records. A write let go
//! leaves its span's file as it was (or absent): still exact, since a file is checked
//! against its span's summary and extended when it is read, so it costs only the
//! catching up after a restart. The next build of the span asks for its write again.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long builds must have paused before a frame file is written.
pub(crate) const QUIET: Duration = Duration::from_secs(1);
/// The longest a write waits for a pause.
pub(crate) const MAX_DEFER: Duration = Duration::from_secs(60);

/// How often the writer looks again at what only it holds, while writes wait.
const LOOK_AGAIN: Duration = Duration::from_millis(100);

/// Writes asked for, of values `V` by span key `K`; cloned handles share one thread.
pub(crate) struct Writer<K, V> {
    shared: Arc<Shared<K, V>>,
    /// The last handle dropped ends the thread (writes still waiting are let go).
    _open: Arc<Open<K, V>>,
}

impl<K, V> Clone for Writer<K, V> {
    fn clone(&self) -> Self {
        Writer {
            shared: self.shared.clone(),
            _open: self._open.clone(),
        }
    }
}

struct Shared<K, V> {
    state: Mutex<State<K, V>>,
    changed: Condvar,
    held_bytes: u64,
}

/// A write waiting: the value, its size, when the span's first waiting write was asked,
/// and before when it is not to start (unless the process is stopping).
struct Waiting<V> {
    asked: Instant,
    not_before: Instant,
    value: Arc<V>,
    bytes: u64,
}

struct State<K, V> {
    waiting: HashMap<K, Waiting<V>>,
    running: bool,
    builds: usize,
    last_ended: Instant,
    flushing: bool,
    closed: bool,
}

impl<K, V> State<K, V> {
    /// Writes asked for and not done: waiting or running.
    fn pending(&self) -> usize {
        self.waiting.len() + usize::from(self.running)
    }

    /// The bytes of the waiting writes' values that nothing else holds any more.
    fn held_alone(&self) -> u64 {
        self.waiting
            .values()
            .filter(|waiting| Arc::strong_count(&waiting.value) == 1)
            .map(|waiting| waiting.bytes)
            .sum()
    }

    /// Take out the newest waiting writes whose values nothing else holds, all but the
    /// longest-waiting write, until what is held alone is within `held_bytes`; they are
    /// returned, to be dropped outside the lock.
    fn trim(&mut self, held_bytes: u64) -> Vec<Waiting<V>>
    where
        K: Eq + std::hash::Hash + Clone,
    {
        let mut held = self.held_alone();
        if held <= held_bytes {
            return Vec::new();
        }
        let mut alone: Vec<(Instant, K, u64)> = self
            .waiting
            .iter()
            .filter(|(_, waiting)| Arc::strong_count(&waiting.value) == 1)
            .map(|(key, waiting)| (waiting.asked, key.clone(), waiting.bytes))
            .collect();
        let oldest = self.waiting.values().map(|waiting| waiting.asked).min();
        alone.sort_by_key(|(asked, _, _)| std::cmp::Reverse(*asked));
        let mut dropped = Vec::new();
        for (asked, key, bytes) in alone {
            if held <= held_bytes || Some(asked) == oldest {
                break;
            }
            dropped.extend(self.waiting.remove(&key));
            held -= bytes;
        }
        dropped
    }
}

struct Open<K, V>(Arc<Shared<K, V>>);

impl<K, V> Drop for Open<K, V> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.changed.notify_all();
    }
}

impl<K, V> Shared<K, V> {
    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().expect("frame writer lock")
    }
}

/// A build under way, for the frame writer to wait out; dropping it ends it.
pub struct Building(Option<Box<dyn Send + Sync + FnOnce()>>);

impl Building {
    pub(crate) fn none() -> Building {
        Building(None)
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if let Some(end) = self.0.take() {
            end();
        }
    }
}

impl<K, V> Writer<K, V>
where
    K: Eq + std::hash::Hash + Clone + Send + 'static,
    V: Send + Sync + 'static,
{
    /// A writer thread that writes with `write`, and holds up to `held_bytes` of values
    /// nothing else holds before it writes without waiting for a pause.
    pub(crate) fn start(held_bytes: u64, write: impl Fn(&K, &V) + Send + 'static) -> Writer<K, V> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                waiting: HashMap::new(),
                running: false,
                builds: 0,
                last_ended: Instant::now(),
                flushing: false,
                closed: false,
            }),
            changed: Condvar::new(),
            held_bytes,
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("frame-writer".into())
            .spawn(move || {
                lower_priority();
                run(&thread, write);
            })
            .expect("starting the frame writer thread");
        Writer {
            _open: Arc::new(Open(shared.clone())),
            shared,
        }
    }

    /// A build starts; the writer waits until it and every other one has ended.
    pub(crate) fn building(&self) -> Building {
        self.shared.lock().builds += 1;
        let shared = self.shared.clone();
        Building(Some(Box::new(move || {
            let mut state = shared.lock();
            state.builds -= 1;
            state.last_ended = Instant::now();
            drop(state);
            shared.changed.notify_all();
        })))
    }

    /// The write of `value` (of about `bytes`) for `key`'s span, not to start before
    /// `delay`, in place of one still waiting for it (whose place and delay it keeps).
    pub(crate) fn submit(&self, key: K, value: Arc<V>, bytes: u64, delay: Duration) {
        let mut state = self.shared.lock();
        let now = Instant::now();
        let (asked, not_before) = match state.waiting.get(&key) {
            Some(waiting) => (waiting.asked, waiting.not_before),
            None => (now, now + delay),
        };
        let replaced = state.waiting.insert(
            key,
            Waiting {
                asked,
                not_before,
                value,
                bytes,
            },
        );
        let let_go = state.trim(self.shared.held_bytes);
        drop(state);
        self.shared.changed.notify_all();
        // The superseded write's frame, and those let go, are dropped here, outside the lock.
        drop(replaced);
        if !let_go.is_empty() {
            tracing::debug!(
                writes = let_go.len(),
                "frame files left as they were: the frames waiting to be written were past their bound"
            );
        }
        drop(let_go);
    }

    /// Write what is asked for without waiting for a pause, and wait until every write
    /// asked for so far is done, or `limit` passed. Whether all were.
    pub(crate) fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.lock();
        state.flushing = true;
        self.shared.changed.notify_all();
        while state.pending() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .expect("frame writer lock")
                .0;
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.shared.lock().pending()
    }
}

/// The writer thread: the longest-waiting span's write, each time the gate opens.
fn run<K: Eq + std::hash::Hash + Clone, V>(shared: &Shared<K, V>, write: impl Fn(&K, &V)) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        if state.waiting.is_empty() {
            state = shared.changed.wait(state).expect("frame writer lock");
            continue;
        }
        // The longest-waiting write past its delay (every one, when stopping).
        let now = Instant::now();
        let due = state
            .waiting
            .iter()
            .filter(|(_, waiting)| state.flushing || waiting.not_before <= now)
            .min_by_key(|(_, waiting)| waiting.asked)
            .map(|(key, waiting)| (key.clone(), waiting.asked));
        let Some((key, asked)) = due else {
            let next = state
                .waiting
                .values()
                .map(|waiting| waiting.not_before)
                .min();
            let wait = next.map_or(LOOK_AGAIN, |next| next.saturating_duration_since(now));
            state = shared
                .changed
                .wait_timeout(state, wait)
                .expect("frame writer lock")
                .0;
            continue;
        };
        // How long until the gate opens for it (zero: now). Builds ending and writes
        // asked for wake the thread; what only it holds grows as the frame cache lets
        // frames go, unannounced, so it looks again every `LOOK_AGAIN`.
        let deferred = MAX_DEFER.saturating_sub(asked.elapsed());
        let wait = if state.flushing || deferred.is_zero() || state.held_alone() > shared.held_bytes
        {
            Duration::ZERO
        } else if state.builds == 0 {
            QUIET
                .saturating_sub(state.last_ended.elapsed())
                .min(deferred)
                .min(LOOK_AGAIN)
        } else {
            deferred.min(LOOK_AGAIN)
        };
        if !wait.is_zero() {
            state = shared
                .changed
                .wait_timeout(state, wait)
                .expect("frame writer lock")
                .0;
            continue;
        }
        let waiting = state.waiting.remove(&key).expect("the write just found");
        state.running = true;
        drop(state);
        write(&key, &waiting.value);
        drop(waiting);
        state = shared.lock();
        state.running = false;
        shared.changed.notify_all();
    }
}

/// The calling thread at nice 19, through `renice` on the thread's own id (on Linux the
/// nice value is a thread's own, so the rest of the process keeps its priority). Best
/// effort: without `renice`, or where it is refused, writes run at the normal priority.
fn lower_priority() {
    let lowered = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| Some(link.file_name()?.to_string_lossy().into_owned()))
        .and_then(|tid| {
            std::process::Command::new("renice")
                .args(["-n", "19", "-p", &tid])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()
        })
        .is_some_and(|status| status.success());
    if !lowered {
        tracing::info!("Frame files are written at the normal priority (renice failed)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Test = Writer<u32, usize>;

    /// A writer whose writes add their value to `written` (and take as many
    /// milliseconds, past 100).
    fn writer(held_bytes: u64) -> (Test, Arc<AtomicUsize>) {
        let written = Arc::new(AtomicUsize::new(0));
        let adding = written.clone();
        let writer = Writer::start(held_bytes, move |_key: &u32, value: &usize| {
            if *value > 100 {
                std::thread::sleep(Duration::from_millis(*value as u64));
            }
            adding.fetch_add(*value, Ordering::SeqCst);
        });
        (writer, written)
    }

    fn ask(writer: &Test, key: u32, value: &Arc<usize>) {
        writer.submit(key, value.clone(), 1 << 20, Duration::ZERO);
    }

    #[test]
    fn a_file_is_written_only_once_builds_have_paused() {
        let (writer, _) = writer(u64::MAX);
        let building = writer.building();
        ask(&writer, 1, &Arc::new(1));
        std::thread::sleep(QUIET + Duration::from_millis(300));
        assert_eq!(writer.pending(), 1, "written while a build ran");
        drop(building);
        std::thread::sleep(QUIET / 2);
        assert_eq!(
            writer.pending(),
            1,
            "written before builds paused for QUIET"
        );
        std::thread::sleep(QUIET);
        assert_eq!(writer.pending(), 0, "not written once builds paused");
    }

    #[test]
    fn a_write_waits_out_its_delay_and_a_newer_one_keeps_it() {
        let (writer, written) = writer(u64::MAX);
        // Builds paused long ago: only the delay holds the write back.
        std::thread::sleep(QUIET);
        writer.submit(1, Arc::new(1), 1, Duration::from_millis(600));
        std::thread::sleep(Duration::from_millis(300));
        writer.submit(1, Arc::new(10), 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(writer.pending(), 1, "written before its delay");
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            writer.pending(),
            0,
            "the newer write did not keep the first delay"
        );
        assert_eq!(
            written.load(Ordering::SeqCst),
            10,
            "not the newest write ran"
        );
    }

    #[test]
    fn a_flush_writes_at_once_though_builds_run_and_delays_wait() {
        let (writer, written) = writer(u64::MAX);
        let _building = writer.building();
        for key in 0..3 {
            ask(&writer, key, &Arc::new(1));
        }
        writer.submit(3, Arc::new(1), 1, Duration::from_secs(60));
        let started = Instant::now();
        assert!(writer.flush(Duration::from_secs(5)));
        assert!(started.elapsed() < QUIET, "the flush waited for a pause");
        assert_eq!(writer.pending(), 0);
        assert_eq!(written.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_flush_gives_up_at_its_limit_on_a_write_still_running() {
        let (writer, _) = writer(u64::MAX);
        ask(&writer, 1, &Arc::new(400));
        assert!(!writer.flush(Duration::from_millis(100)));
        assert!(writer.flush(Duration::from_secs(5)));
    }

    #[test]
    fn a_newer_write_of_a_span_replaces_the_waiting_one_and_lets_its_value_go() {
        let (writer, written) = writer(u64::MAX);
        let _building = writer.building();
        let older = Arc::new(1);
        ask(&writer, 7, &older);
        ask(&writer, 7, &Arc::new(10));
        assert_eq!(writer.pending(), 1, "two versions of one span wait as one");
        assert_eq!(
            Arc::strong_count(&older),
            1,
            "the replaced write still holds its value"
        );
        assert!(writer.flush(Duration::from_secs(5)));
        assert_eq!(
            written.load(Ordering::SeqCst),
            10,
            "not the newest write ran"
        );
    }

    #[test]
    fn values_only_the_writer_holds_are_written_past_the_bound_though_builds_run() {
        // Each value is 1 MB; up to 2 MB may be held by the writer alone.
        let (writer, written) = writer(2 << 20);
        let _building = writer.building();
        let cached: Vec<Arc<usize>> = (0..4).map(|_| Arc::new(1)).collect();
        for (key, value) in cached.iter().enumerate() {
            ask(&writer, key as u32, value);
        }
        std::thread::sleep(LOOK_AGAIN * 3);
        assert_eq!(
            writer.pending(),
            4,
            "written while a build ran and memory held them"
        );
        // Memory lets all four go: two are written, the two left are within the bound.
        drop(cached);
        std::thread::sleep(LOOK_AGAIN * 5);
        assert_eq!(writer.pending(), 2, "not written down to the bound");
        assert_eq!(written.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn past_the_bound_the_newest_writes_held_alone_are_let_go() {
        // Each value is 1 MB; up to 2 MB may be held by the writer alone, and a build runs
        // throughout, as under steady load.
        let (writer, written) = writer(2 << 20);
        let _building = writer.building();
        // The writer is busy with a slow write of a value something else still holds.
        let busy = Arc::new(500);
        ask(&writer, 0, &busy);
        std::thread::sleep(LOOK_AGAIN * 2);
        assert_eq!(writer.pending(), 1);
        // Six spans' values that only the writer holds: the oldest one and the two of
        // the bound wait, the rest are let go as they come.
        let values: Vec<Arc<usize>> = (1..=6).map(|_| Arc::new(1)).collect();
        let weak: Vec<_> = values.iter().map(Arc::downgrade).collect();
        for (key, value) in values.into_iter().enumerate() {
            writer.submit(key as u32 + 1, value, 1 << 20, Duration::ZERO);
        }
        let kept = weak.iter().filter(|w| w.upgrade().is_some()).count();
        assert!(kept <= 3, "{kept} values held alone, past the bound");
        assert!(weak[0].upgrade().is_some() || written.load(Ordering::SeqCst) > 0);
        assert!(writer.flush(Duration::from_secs(5)));
        assert!(
            weak.iter().all(|w| w.upgrade().is_none()),
            "a value was kept"
        );
    }
}
