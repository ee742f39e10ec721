//! Websocket scale: many subscribed clients, the server's memory while they idle, and
//! the time for one update to reach all of them (SPEC §8: 10,000 clients in ≤ 200 MB,
//! fan-out p99 < 200 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::stats::{self, Memory};
use crate::target::{self, Incoming, Ingestor, Socket, TargetArgs};

/// How long one client may take from its connect to `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long every client together may take to become ready.
const ALL_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// The idle time before the server's memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// How long an update may take to reach a client.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause between update rounds.
const ROUND_GAP: Duration = Duration::from_secs(1);
/// File descriptors the process needs besides one per client.
const SPARE_FDS: u64 = 64;
/// The subscription id every client uses.
const SUB_ID: &str = "s";

#[derive(Debug, Args)]
pub(crate) struct WsScaleArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// How many websocket clients to open.
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// How many clients may be connecting and subscribing at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// The server's process id, to read its memory from /proc (omit to skip).
    #[arg(long)]
    server_pid: Option<u32>,
    /// How many single-record updates to time, one second apart.
    #[arg(long, default_value_t = 5)]
    updates: u32,
}

/// What a client task tells the coordinator.
#[derive(Debug)]
enum Event {
    Connected,
    Ready {
        client: u32,
        generation: Option<i64>,
    },
    Failed {
        error: String,
    },
    /// A `partition` message with a higher generation than the client had.
    Update {
        client: u32,
        generation: Option<i64>,
        at: Instant,
    },
    Resync,
    Closed,
}

/// Counts kept while clients run.
#[derive(Debug, Default)]
struct Tally {
    connected: u32,
    ready: u32,
    failed: u32,
    resyncs: u32,
    closed: u32,
    first_error: Option<String>,
    /// The highest generation each client has seen.
    generations: Vec<Option<i64>>,
}

impl Tally {
    fn new(clients: u32) -> Tally {
        Tally {
            generations: vec![None; clients as usize],
            ..Tally::default()
        }
    }

    /// Count one event; an update is returned for the caller to time.
    fn count(&mut self, event: Event) -> Option<(u32, Option<i64>, Instant)> {
        match event {
            Event::Connected => self.connected += 1,
            Event::Ready { client, generation } => {
                self.ready += 1;
                self.raise(client, generation);
            }
            Event::Failed { error } => {
                self.failed += 1;
                self.first_error.get_or_insert(error);
            }
            Event::Update {
                client,
                generation,
                at,
            } => {
                self.raise(client, generation);
                return Some((client, generation, at));
            }
            Event::Resync => self.resyncs += 1,
            Event::Closed => self.closed += 1,
        }
        None
    }

    fn raise(&mut self, client: u32, generation: Option<i64>) {
        let slot = &mut self.generations[client as usize];
        *slot = target::newer(*slot, generation);
    }
}

/// Open the clients, read the server's idle memory, then time `updates` fan-outs.
pub(crate) async fn run(args: WsScaleArgs) -> Result<Value> {
    check_open_files(args.clients)?;
    let target = Arc::new(args.target.clone());
    let (tx, mut events) = mpsc::unbounded_channel();
    let started = Instant::now();
    spawn_clients(&args, &target, tx);

    let mut tally = Tally::new(args.clients);
    wait_until_ready(&mut events, &mut tally, args.clients).await?;
    let connect_seconds = stats::seconds(started.elapsed());
    eprintln!(
        "ws-scale: {} of {} clients ready in {connect_seconds} s",
        tally.ready, args.clients
    );
    if tally.ready == 0 {
        bail!(
            "no client became ready; first error: {}",
            tally.first_error.as_deref().unwrap_or("none")
        );
    }

    tokio::time::sleep(SETTLE).await;
    let idle = server_memory(args.server_pid)?;
    let ingestor = Ingestor::new(&target)?;
    let mut pooled = Vec::new();
    let mut spreads = Vec::new();
    let mut pushes = Vec::new();
    let mut round_p99 = Vec::new();
    let mut round_push_p99 = Vec::new();
    let mut expected = 0;
    let cpu_before = Cpu::now(args.server_pid);
    for round in 0..args.updates {
        if round > 0 {
            tokio::time::sleep(ROUND_GAP).await;
        }
        let outcome = fan_out(&mut events, &mut tally, &ingestor).await?;
        expected += outcome.listening;
        let mut latencies = outcome.latencies();
        stats::sort(&mut latencies);
        let p99 = stats::quantile(&latencies, 0.99).map(stats::round2);
        eprintln!(
            "ws-scale: round {}: {} of {} clients updated, p99 {} ms",
            round + 1,
            latencies.len(),
            outcome.listening,
            p99.map_or("-".to_string(), |p| p.to_string())
        );
        round_p99.push(p99);
        let mut round_pushes = outcome.pushes();
        stats::sort(&mut round_pushes);
        round_push_p99.push(stats::quantile(&round_pushes, 0.99).map(stats::round2));
        pooled.extend(latencies);
        spreads.extend(outcome.spreads());
        pushes.extend(round_pushes);
    }
    let cpu = Cpu::now(args.server_pid).since(&cpu_before);
    let after = server_memory(args.server_pid)?;

    stats::sort(&mut pooled);
    stats::sort(&mut spreads);
    stats::sort(&mut pushes);
    Ok(json!({
        "clients": args.clients,
        "connected": tally.connected,
        "ready": tally.ready,
        "connect_seconds": connect_seconds,
        "rss_idle_mb": idle.map(|m| m.rss_mb),
        "hwm_mb": idle.map(|m| m.hwm_mb),
        "rss_after_mb": after.map(|m| m.rss_mb),
        "hwm_after_mb": after.map(|m| m.hwm_mb),
        "fanout_p50_ms": stats::quantile(&pooled, 0.50).map(stats::round2),
        "fanout_p99_ms": stats::quantile(&pooled, 0.99).map(stats::round2),
        "fanout_max_ms": pooled.last().copied().map(stats::round2),
        "received": pooled.len(),
        "expected": expected,
        "round_p99_ms": round_p99,
        "round_push_p99_ms": round_push_p99,
        "push_p50_ms": stats::quantile(&pushes, 0.50).map(stats::round2),
        "push_p99_ms": stats::quantile(&pushes, 0.99).map(stats::round2),
        "push_max_ms": pushes.last().copied().map(stats::round2),
        "spread_p50_ms": stats::quantile(&spreads, 0.50).map(stats::round2),
        "spread_p99_ms": stats::quantile(&spreads, 0.99).map(stats::round2),
        "failed": tally.failed,
        "closed": tally.closed,
        "resyncs": tally.resyncs,
        "first_error": tally.first_error,
        "client_rss_mb": stats::memory("self").ok().map(|m| m.rss_mb),
        "server_cpu_s_rounds": cpu.server,
        "client_cpu_s_rounds": cpu.client,
    }))
}

/// Fail early, and say what to do, when this process may not open enough sockets.
fn check_open_files(clients: u32) -> Result<()> {
    let needed = u64::from(clients) + SPARE_FDS;
    match stats::open_files_limit() {
        Some(limit) if limit < needed => bail!(
            "{clients} clients need about {needed} open files but the limit is {limit}; \
             raise it with `ulimit -n {needed}` (the server needs as many)"
        ),
        _ => Ok(()),
    }
}

/// Start one task per client; at most `connect_concurrency` connect and subscribe at once.
fn spawn_clients(args: &WsScaleArgs, target: &Arc<TargetArgs>, tx: mpsc::UnboundedSender<Event>) {
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let partition: Arc<str> = target.partition().into();
    for client in 0..args.clients {
        tokio::spawn(run_client(
            client,
            Arc::clone(target),
            Arc::clone(&partition),
            Arc::clone(&gate),
            tx.clone(),
        ));
    }
}

/// Buffers small enough for thousands of clients, with room to read a whole `partition`
/// message (about 4.6 KB for 50 stations) in one read: with 4 KB, each took two reads,
/// and the extra reads and window updates cost the server's cores as much as the
/// client's (push p99 156–191 ms with 4 KB, 125–143 ms with 16 KB, same server).
fn light_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
}

/// One client: connect and subscribe (holding a place in the gate), then report every
/// newer generation of the partition until the socket closes.
async fn run_client(
    client: u32,
    target: Arc<TargetArgs>,
    partition: Arc<str>,
    gate: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let Ok(place) = gate.acquire_owned().await else {
        return;
    };
    let mut generation = None;
    let socket = match open(&target, &tx, &mut generation).await {
        Ok(socket) => socket,
        Err(e) => {
            let _ = tx.send(Event::Failed {
                error: format!("{e:#}"),
            });
            return;
        }
    };
    drop(place);
    let _ = tx.send(Event::Ready { client, generation });
    listen(client, socket, &target, &partition, generation, &tx).await;
    let _ = tx.send(Event::Closed);
}

/// Connect and subscribe until `ready`.
async fn open(
    target: &TargetArgs,
    tx: &mpsc::UnboundedSender<Event>,
    generation: &mut Option<i64>,
) -> Result<Socket> {
    let mut socket = target::connect(target, Some(light_config())).await?;
    let _ = tx.send(Event::Connected);
    tokio::time::timeout(
        READY_TIMEOUT,
        target::subscribe_until_ready(&mut socket, target, SUB_ID, generation),
    )
    .await
    .context("the subscription was not ready within 60 s")??;
    Ok(socket)
}

/// Read until the socket closes, stamping each newer generation with its arrival time.
/// A `resync` is answered by subscribing again, as a real client would.
async fn listen(
    client: u32,
    mut socket: Socket,
    target: &TargetArgs,
    partition: &str,
    mut generation: Option<i64>,
    tx: &mpsc::UnboundedSender<Event>,
) {
    while let Some(Ok(message)) = socket.next().await {
        let at = Instant::now();
        match Incoming::read(&message, partition) {
            Incoming::Partition(seen) if seen > generation => {
                generation = seen;
                let _ = tx.send(Event::Update {
                    client,
                    generation,
                    at,
                });
            }
            Incoming::Resync => {
                let _ = tx.send(Event::Resync);
                if socket.send(target.subscribe_message(SUB_ID)).await.is_err() {
                    return;
                }
            }
            Incoming::Closed => return,
            _ => {}
        }
    }
}

/// Count events until every client is ready or has failed. Running out of file
/// descriptors stops the run at once.
async fn wait_until_ready(
    events: &mut mpsc::UnboundedReceiver<Event>,
    tally: &mut Tally,
    clients: u32,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + ALL_READY_TIMEOUT;
    let mut next_report = 1_000;
    while tally.ready + tally.failed < clients {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await else {
            eprintln!("ws-scale: gave up waiting for every client to be ready");
            break;
        };
        tally.count(event);
        if let Some(error) = tally
            .first_error
            .as_deref()
            .filter(|e| e.contains("EMFILE"))
        {
            bail!("{error}");
        }
        if tally.ready >= next_report {
            eprintln!("ws-scale: {} clients ready", tally.ready);
            next_report += 1_000;
        }
    }
    Ok(())
}

/// One update round: when the record was acknowledged, when each client received
/// the new generation, and how many clients were listening.
struct Round {
    ack: Instant,
    /// When the server completed the rebuild the record caused.
    completed: Option<Instant>,
    receipts: Vec<Instant>,
    listening: usize,
}

impl Round {
    /// Per client, milliseconds from the acknowledgement to receipt.
    fn latencies(&self) -> Vec<f64> {
        let ack = self.ack;
        self.receipts
            .iter()
            .map(|&at| stats::latency_ms(ack, at))
            .collect()
    }

    /// Per client, milliseconds from the server's completion of the rebuild to receipt:
    /// the push to every client, without the rebuild before it.
    fn pushes(&self) -> Vec<f64> {
        let Some(completed) = self.completed else {
            return Vec::new();
        };
        self.receipts
            .iter()
            .map(|&at| stats::latency_ms(completed, at))
            .collect()
    }

    /// Per client, milliseconds from the first client's receipt to its own: the cost of
    /// fanning out, without the rebuild before it.
    fn spreads(&self) -> Vec<f64> {
        let Some(&first) = self.receipts.iter().min() else {
            return Vec::new();
        };
        self.receipts
            .iter()
            .map(|&at| stats::latency_ms(first, at))
            .collect()
    }
}

/// Post one record and note when each listening client receives a newer generation
/// of the partition (clients that do not within 10 s are left out).
async fn fan_out(
    events: &mut mpsc::UnboundedReceiver<Event>,
    tally: &mut Tally,
    ingestor: &Ingestor,
) -> Result<Round> {
    while let Ok(event) = events.try_recv() {
        tally.count(event);
    }
    let before = tally.generations.clone();
    let listening = (tally.ready - tally.closed.min(tally.ready)) as usize;
    let head = ingestor.log_head().await?;
    let ack = ingestor.post_one().await?;
    let deadline = ack + ROUND_TIMEOUT;
    let mut got = vec![false; before.len()];
    let mut receipts = Vec::with_capacity(listening);
    while receipts.len() < listening {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline.into(), events.recv()).await else {
            break;
        };
        let Some((client, generation, at)) = tally.count(event) else {
            continue;
        };
        let index = client as usize;
        if generation > before[index] && !got[index] {
            got[index] = true;
            receipts.push(at);
        }
    }
    let completed = ingestor.completed_after(head).await?;
    Ok(Round {
        ack,
        completed,
        receipts,
        listening,
    })
}

/// CPU seconds used so far by the server (when its process id was given) and by this
/// client; both share the machine's cores, so both shape the fan-out figures.
struct Cpu {
    server: Option<f64>,
    client: Option<f64>,
}

impl Cpu {
    fn now(server_pid: Option<u32>) -> Cpu {
        Cpu {
            server: server_pid.and_then(|pid| stats::cpu_seconds(&pid.to_string())),
            client: stats::cpu_seconds("self"),
        }
    }

    /// The CPU seconds used since `earlier`, rounded to milliseconds.
    fn since(&self, earlier: &Cpu) -> Cpu {
        let delta = |now: Option<f64>, then: Option<f64>| {
            Some(stats::seconds(Duration::from_secs_f64(
                (now? - then?).max(0.0),
            )))
        };
        Cpu {
            server: delta(self.server, earlier.server),
            client: delta(self.client, earlier.client),
        }
    }
}

/// The server's memory, when its process id was given.
fn server_memory(pid: Option<u32>) -> Result<Option<Memory>> {
    pid.map(|pid| stats::memory(&pid.to_string())).transpose()
}
