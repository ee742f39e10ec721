//! Freshness: ingest acknowledged → new `partition` message on a subscribed websocket
//! (SPEC §8: p99 < 250 ms), and where each sample's time went, from the server's own
//! stamps in the event log: to the claim (the planner's debounce, its wake-up and the
//! claim), loading the inputs, the build and its commit, and the push to the socket.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::stats;
use crate::target::{self, Build, Incoming, Ingestor, Socket, TargetArgs};

/// How long one sample may wait for its `partition` message.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause after each sample, so that samples do not overlap.
const PAUSE: Duration = Duration::from_millis(100);
/// How long the subscription may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub(crate) struct FreshnessArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// How many records to ingest, one at a time.
    #[arg(long, default_value_t = 40)]
    samples: usize,
}

/// A `partition` message for the subscribed day: its generation and when it arrived.
#[derive(Debug, Clone, Copy)]
struct Seen {
    generation: Option<i64>,
    at: Instant,
}

/// Subscribe once, then time `samples` single-record ingests to their `partition`
/// messages, one at a time.
pub(crate) async fn run(args: FreshnessArgs) -> Result<Value> {
    let target = &args.target;
    let mut socket = target::connect(target, None).await?;
    let mut generation = None;
    tokio::time::timeout(
        READY_TIMEOUT,
        target::subscribe_until_ready(&mut socket, target, "f", &mut generation),
    )
    .await
    .context("the subscription was not ready within 60 s; are the workers running?")??;
    eprintln!(
        "freshness: subscribed to {} {} (generation {generation:?})",
        target.analysis,
        target.partition()
    );
    let mut updates = spawn_reader(socket, target.partition());
    let ingestor = Ingestor::new(target)?;

    let head = ingestor.log_head().await?;
    let mut latencies = Vec::with_capacity(args.samples);
    let mut samples = Vec::with_capacity(args.samples);
    let mut timeouts = 0;
    for sample in 0..args.samples {
        generation = drain(&mut updates, generation)?;
        let ack = ingestor.post_one().await?;
        match next_generation(&mut updates, generation, ack + SAMPLE_TIMEOUT).await? {
            Some(seen) => {
                generation = seen.generation;
                latencies.push(stats::latency_ms(ack, seen.at));
                samples.push((ack, seen));
            }
            None => timeouts += 1,
        }
        if (sample + 1) % 10 == 0 {
            eprintln!("freshness: {} samples, {timeouts} timeouts", sample + 1);
        }
        tokio::time::sleep(PAUSE).await;
    }

    stats::sort(&mut latencies);
    let mut report = json!({"samples": args.samples, "timeouts": timeouts});
    stats::merge(&mut report, stats::summary(&latencies));
    let builds = ingestor.builds_after(head).await?;
    stats::merge(&mut report, steps(&samples, &builds));
    Ok(report)
}

/// Where the samples' time went: each step's p50 and p99, and the slowest samples whole.
/// A sample is matched to the build whose generation it received.
fn steps(samples: &[(Instant, Seen)], builds: &[Build]) -> Value {
    let mut timelines: Vec<[f64; 5]> = samples
        .iter()
        .filter_map(|(ack, seen)| {
            let build = builds
                .iter()
                .find(|b| Some(b.generation) == seen.generation)?;
            let ms = |from: Instant, to: Instant| stats::latency_ms(from, to);
            Some([
                ms(*ack, seen.at),
                ms(*ack, build.claimed),
                ms(build.claimed, build.started),
                ms(build.started, build.completed),
                ms(build.completed, seen.at),
            ])
        })
        .collect();
    let names = ["total_ms", "to_claim_ms", "load_ms", "build_ms", "push_ms"];
    let mut steps = serde_json::Map::new();
    for (i, name) in names.iter().enumerate().skip(1) {
        let mut values: Vec<f64> = timelines.iter().map(|t| t[i]).collect();
        stats::sort(&mut values);
        let summary = stats::summary(&values);
        steps.insert(
            name.to_string(),
            json!({"p50": summary["p50_ms"], "p99": summary["p99_ms"]}),
        );
    }
    timelines.sort_by(|a, b| b[0].total_cmp(&a[0]));
    let slowest: Vec<Value> = timelines
        .iter()
        .take(3)
        .map(|t| {
            names
                .iter()
                .zip(t)
                .map(|(name, v)| (name.to_string(), json!(stats::round2(*v))))
                .collect()
        })
        .collect();
    json!({"matched": timelines.len(), "steps": steps, "slowest": slowest})
}

/// Read the socket in its own task, stamping each `partition` message of the day with
/// the instant it arrived. The channel closes when the socket does.
fn spawn_reader(mut socket: Socket, partition: String) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let at = Instant::now();
            match Incoming::read(&message, &partition) {
                Incoming::Partition(generation) => {
                    if tx.send(Seen { generation, at }).is_err() {
                        break;
                    }
                }
                Incoming::Closed => break,
                Incoming::Resync => eprintln!("freshness: the server sent resync"),
                Incoming::Error(text) => eprintln!("freshness: the server sent an error: {text}"),
                Incoming::Ready | Incoming::Other => {}
            }
        }
    });
    rx
}

/// Take the generations that arrived since the last sample, so that a late update does
/// not count for the next one.
fn drain(
    updates: &mut mpsc::UnboundedReceiver<Seen>,
    mut generation: Option<i64>,
) -> Result<Option<i64>> {
    loop {
        match updates.try_recv() {
            Ok(seen) => generation = target::newer(generation, seen.generation),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(generation),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                bail!("the server closed the websocket; see its log")
            }
        }
    }
}

/// Wait until `deadline` for a `partition` message with a generation above `after`.
async fn next_generation(
    updates: &mut mpsc::UnboundedReceiver<Seen>,
    after: Option<i64>,
    deadline: Instant,
) -> Result<Option<Seen>> {
    loop {
        let next = tokio::time::timeout_at(deadline.into(), updates.recv()).await;
        match next {
            Err(_) => return Ok(None),
            Ok(None) => bail!("the server closed the websocket; see its log"),
            Ok(Some(seen)) if seen.generation > after => return Ok(Some(seen)),
            Ok(Some(_)) => {}
        }
    }
}
