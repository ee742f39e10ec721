//! The service under test: where it is, how to subscribe to one day of an analysis, how
//! to ingest one record into that day, and how to read the few fields of a server
//! message that the benchmarks need.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{NaiveDate, TimeDelta};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde::Deserializer as _;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client websocket.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `errno` for "too many open files".
const EMFILE: i32 = 24;
/// How often to retry an ingest that the service answered with 429 or 503.
const INGEST_RETRIES: u32 = 20;

/// What to talk to and which partition to exercise; shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub(crate) struct TargetArgs {
    /// The service, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub(crate) base: String,
    /// A token with the read and ingest scopes (an admin token has both).
    #[arg(long)]
    pub(crate) token: String,
    /// The analysis to subscribe to.
    #[arg(long, default_value = "daily_avg")]
    pub(crate) analysis: String,
    /// The day partition (YYYY-MM-DD) to subscribe to and ingest into.
    #[arg(long)]
    pub(crate) day: NaiveDate,
    /// The kind of the ingested records (the analysis's kind).
    #[arg(long, default_value = "generation")]
    pub(crate) kind: String,
    /// The source of the ingested records.
    #[arg(long, default_value = "station-0")]
    pub(crate) source: String,
}

impl TargetArgs {
    /// The service's base address without a trailing slash.
    fn base(&self) -> &str {
        self.base.trim_end_matches('/')
    }

    /// The websocket address, token included (`http` becomes `ws`, `https` `wss`).
    pub(crate) fn ws_url(&self) -> String {
        let ws_base = self.base().replacen("http", "ws", 1);
        format!("{ws_base}/v1/ws?token={}", self.token)
    }

    /// The partition key of the day, as the server writes it.
    pub(crate) fn partition(&self) -> String {
        self.day.format("%Y-%m-%d").to_string()
    }

    /// The `subscribe` message for the one-day range `[day, day + 1)`.
    pub(crate) fn subscribe_message(&self, id: &str) -> Message {
        let to = self.day + TimeDelta::days(1);
        let message = json!({
            "op": "subscribe",
            "id": id,
            "analysis": self.analysis,
            "from": self.partition(),
            "to": to.format("%Y-%m-%d").to_string(),
        });
        Message::text(message.to_string())
    }
}

/// Open a websocket to the service (no `Origin` header, as a non-browser client).
///
/// Running out of file descriptors is reported as what to do about it.
pub(crate) async fn connect(
    target: &TargetArgs,
    config: Option<WebSocketConfig>,
) -> Result<Socket> {
    let url = target.ws_url();
    match tokio_tungstenite::connect_async_with_config(url.as_str(), config, true).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) if e.raw_os_error() == Some(EMFILE) => {
            bail!(
                "out of file descriptors (EMFILE): every client needs one; raise the limit with \
                 `ulimit -n 20000` before running scholia-bench"
            )
        }
        Err(e) => bail!(
            "cannot open the websocket at {}/v1/ws ({e}); is Scholia running there, and is \
             --token a read token?",
            target.base()
        ),
    }
}

/// Subscribe and read until the server says `ready`, noting the partition's generation
/// from the `partition` messages on the way.
pub(crate) async fn subscribe_until_ready(
    socket: &mut Socket,
    target: &TargetArgs,
    id: &str,
    generation: &mut Option<i64>,
) -> Result<()> {
    let partition = target.partition();
    socket
        .send(target.subscribe_message(id))
        .await
        .context("the websocket closed while subscribing")?;
    while let Some(message) = socket.next().await {
        let message = message.context("the websocket failed while waiting for `ready`")?;
        match Incoming::read(&message, &partition) {
            Incoming::Partition(seen) => *generation = newer(*generation, seen),
            Incoming::Ready => return Ok(()),
            Incoming::Error(text) => {
                bail!("the server refused the subscription: {text}; check --analysis and --day")
            }
            Incoming::Closed => break,
            Incoming::Resync | Incoming::Other => {}
        }
    }
    bail!("the server closed the websocket before the subscription was ready")
}

/// The larger of two generations, where "none yet" is the smallest.
pub(crate) fn newer(current: Option<i64>, seen: Option<i64>) -> Option<i64> {
    current.max(seen)
}

/// The part of a server message the benchmarks look at, borrowed from its text.
///
/// Reading stops as soon as a `partition` message has given its partition and
/// generation: the server writes those before the `rows`, which can be large, so
/// thousands of clients do not each scan every row.
#[derive(Debug, Default)]
struct Header<'de> {
    kind: Option<&'de str>,
    partition: Option<&'de str>,
    /// `Some(None)` when the message says `"generation": null`.
    generation: Option<Option<i64>>,
    message: Option<String>,
}

impl<'de> Header<'de> {
    fn parse(text: &'de str) -> Header<'de> {
        let mut header = Header::default();
        let mut deserializer = serde_json::Deserializer::from_str(text);
        // After an early stop the deserializer complains that the object goes on; what
        // was read stands, and a malformed message leaves the header incomplete.
        let _ = deserializer.deserialize_map(HeaderVisitor {
            header: &mut header,
        });
        header
    }

    /// A `partition` message whose partition and generation have been read.
    fn has_partition_fields(&self) -> bool {
        self.kind == Some("partition") && self.partition.is_some() && self.generation.is_some()
    }
}

/// Fills a [`Header`] from the top-level fields of a message object.
struct HeaderVisitor<'h, 'de> {
    header: &'h mut Header<'de>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a server message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "type" => self.header.kind = Some(map.next_value()?),
                "partition" => self.header.partition = map.next_value()?,
                "generation" => self.header.generation = Some(map.next_value()?),
                "message" => self.header.message = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if self.header.has_partition_fields() {
                break;
            }
        }
        Ok(())
    }
}

/// A server message, as far as the benchmarks care.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    /// A `partition` message for the benchmark's partition, with its generation
    /// (none while the partition has never been built).
    Partition(Option<i64>),
    Ready,
    Resync,
    Error(String),
    Closed,
    Other,
}

impl Incoming {
    /// Classify one websocket message; `partition` is the partition key of interest.
    pub(crate) fn read(message: &Message, partition: &str) -> Incoming {
        let text = match message {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => return Incoming::Closed,
            _ => return Incoming::Other,
        };
        let header = Header::parse(text);
        match header.kind.unwrap_or_default() {
            "partition" if header.partition == Some(partition) => match header.generation {
                Some(generation) => Incoming::Partition(generation),
                None => Incoming::Other,
            },
            "ready" => Incoming::Ready,
            "resync" => Incoming::Resync,
            "error" => Incoming::Error(header.message.unwrap_or_default()),
            _ => Incoming::Other,
        }
    }
}

/// One build of the benchmark's partition, as the event log stamps it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Build {
    pub(crate) generation: i64,
    /// About when it was claimed: its completion less the build's own duration (which
    /// runs from just after the claim to just before the commit).
    pub(crate) claimed: Instant,
    /// `analysis.started`, logged once its inputs were loaded.
    pub(crate) started: Instant,
    /// `analysis.completed`, logged in the commit.
    pub(crate) completed: Instant,
}

/// An RFC 3339 time of this machine's clock as an instant of this process's clock.
fn instant_of(at: &str) -> Result<Instant> {
    let at = chrono::DateTime::parse_from_rfc3339(at)
        .with_context(|| format!("the log's time {at:?} is not RFC 3339"))?;
    let ago = (chrono::Utc::now() - at.to_utc())
        .to_std()
        .unwrap_or_default();
    Ok(Instant::now() - ago)
}

/// Posts single records into the benchmark's day and reports when they were
/// acknowledged.
pub(crate) struct Ingestor {
    http: reqwest::Client,
    url: String,
    target: TargetArgs,
}

impl Ingestor {
    pub(crate) fn new(target: &TargetArgs) -> Result<Ingestor> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Ingestor {
            http,
            url: format!("{}/v1/events", target.base()),
            target: target.clone(),
        })
    }

    /// The highest seq of the server's event log now.
    pub(crate) async fn log_head(&self) -> Result<i64> {
        let mut after = 0;
        loop {
            let events = self.log_after(after).await?;
            match events.last() {
                Some(last) => after = last["seq"].as_i64().unwrap_or(after),
                None => return Ok(after),
            }
        }
    }

    /// When the server completed the first build of the benchmark's partition after log
    /// position `after`, as an instant of this process's clock (the server's own stamp
    /// on `analysis.completed`; both run on this machine's clock).
    pub(crate) async fn completed_after(&self, mut after: i64) -> Result<Option<Instant>> {
        let partition = self.target.partition();
        loop {
            let events = self.log_after(after).await?;
            let Some(last) = events.last() else {
                return Ok(None);
            };
            after = last["seq"].as_i64().unwrap_or(after);
            let completed = events.iter().find(|e| {
                e["type"] == "analysis.completed"
                    && e["analysis"] == self.target.analysis.as_str()
                    && e["partition"] == partition.as_str()
            });
            if let Some(at) = completed.and_then(|e| e["at"].as_str()) {
                return instant_of(at).map(Some);
            }
        }
    }

    /// The builds of the benchmark's partition completed after log position `after`,
    /// with the server's stamps as instants of this process's clock.
    pub(crate) async fn builds_after(&self, mut after: i64) -> Result<Vec<Build>> {
        let partition = self.target.partition();
        let ours = |e: &Value| {
            e["analysis"] == self.target.analysis.as_str() && e["partition"] == partition.as_str()
        };
        let mut started = std::collections::HashMap::new();
        let mut builds = Vec::new();
        loop {
            let events = self.log_after(after).await?;
            let Some(last) = events.last() else {
                return Ok(builds);
            };
            after = last["seq"].as_i64().unwrap_or(after);
            for event in events.iter().filter(|e| ours(e)) {
                let build = event["build"].as_str().unwrap_or_default().to_string();
                let at = instant_of(event["at"].as_str().unwrap_or_default())?;
                if event["type"] == "analysis.started" {
                    started.insert(build, at);
                } else if event["type"] == "analysis.completed"
                    && let Some(&started) = started.get(&build)
                {
                    let took = Duration::from_millis(event["duration_ms"].as_u64().unwrap_or(0));
                    builds.push(Build {
                        generation: event["generation"].as_i64().unwrap_or(-1),
                        claimed: at.checked_sub(took).unwrap_or(at).min(started),
                        started,
                        completed: at,
                    });
                }
            }
        }
    }

    async fn log_after(&self, after: i64) -> Result<Vec<Value>> {
        let url = format!("{}/v1/log?after={after}&limit=10000", self.target.base());
        let page: Value = self
            .http
            .get(&url)
            .bearer_auth(&self.target.token)
            .send()
            .await
            .with_context(|| format!("cannot read the log at {url}"))?
            .error_for_status()
            .context("reading the log needs a read token")?
            .json()
            .await
            .context("the log answer is not JSON")?;
        Ok(page["events"].as_array().cloned().unwrap_or_default())
    }

    /// POST one new NDJSON record at a random second of the day and return the instant
    /// its 2xx answer was fully read. 429 and 503 are retried after `Retry-After`.
    pub(crate) async fn post_one(&self) -> Result<Instant> {
        let body = format!("{}\n", self.envelope());
        for _ in 0..INGEST_RETRIES {
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.target.token)
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await
                .with_context(|| format!("cannot reach Scholia at {}", self.url))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let text = response
                .bytes()
                .await
                .context("the ingest answer broke off")?;
            let acked = Instant::now();
            if status.as_u16() == 429 || status.as_u16() == 503 {
                tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
                continue;
            }
            let value: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "ingest answered {status}: {}; check --token (it needs the ingest scope)",
                    value["detail"].as_str().unwrap_or("no detail")
                );
            }
            if value["accepted"].as_u64() != Some(1) {
                bail!("the service did not accept the record ({value}); check --kind and --source");
            }
            return Ok(acked);
        }
        bail!("the service stayed overloaded (429/503) through {INGEST_RETRIES} retries")
    }

    /// A fresh envelope: a new v7 id, a random second of the day, a random output.
    fn envelope(&self) -> Value {
        let random = random_u64();
        let midnight = self.target.day.and_hms_opt(0, 0, 0).unwrap_or_default();
        let created = midnight + TimeDelta::seconds((random % 86_400) as i64);
        let output_mw = ((random >> 20) % 1_000_000) as f64 / 1_000.0;
        json!({
            "data_id": uuid::Uuid::now_v7(),
            "kind": self.target.kind,
            "source": self.target.source,
            "created": created.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "data": {"output_mw": output_mw},
        })
    }
}

/// 64 random bits, from a v4 UUID (which keeps the crate free of `rand`).
fn random_u64() -> u64 {
    (uuid::Uuid::new_v4().as_u128() >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_message_is_read_without_its_rows() {
        let text = r#"{"type":"partition","sub":"f","analysis":"daily_avg","version":1,"partition":"2026-11-20","generation":7,"status":"ready","computed_at":"x","rows":[{"source":"a","avg_mw":1.5}]}"#;
        let message = Message::text(text);
        assert_eq!(
            Incoming::read(&message, "2026-11-20"),
            Incoming::Partition(Some(7))
        );
        assert_eq!(Incoming::read(&message, "2026-11-21"), Incoming::Other);
    }

    #[test]
    fn fields_after_the_rows_are_found_too() {
        let text = r#"{"rows":[{"generation":99,"partition":"x"}],"type":"partition","generation":3,"partition":"2026-11-20"}"#;
        assert_eq!(
            Incoming::read(&Message::text(text), "2026-11-20"),
            Incoming::Partition(Some(3))
        );
    }

    #[test]
    fn errors_and_broken_messages_are_told_apart() {
        let error = r#"{"type":"error","sub":"f","message":"no analysis \"x\""}"#;
        assert_eq!(
            Incoming::read(&Message::text(error), "2026-11-20"),
            Incoming::Error("no analysis \"x\"".into())
        );
        let broken = r#"{"type":"partition","partition":"2026-11-20","rows":[1,"#;
        assert_eq!(
            Incoming::read(&Message::text(broken), "2026-11-20"),
            Incoming::Other
        );
        let ready = r#"{"type":"ready","sub":"f"}"#;
        assert_eq!(Incoming::read(&Message::text(ready), "x"), Incoming::Ready);
    }

    #[test]
    fn a_never_built_partition_has_no_generation() {
        let text = r#"{"type":"partition","sub":"f","partition":"2026-11-20","generation":null,"rows":null}"#;
        assert_eq!(
            Incoming::read(&Message::text(text), "2026-11-20"),
            Incoming::Partition(None)
        );
        assert_eq!(newer(None, Some(1)), Some(1));
        assert_eq!(newer(Some(3), None), Some(3));
    }

    #[test]
    fn the_range_is_one_day_half_open() {
        let target = TargetArgs {
            base: "http://127.0.0.1:1/".into(),
            token: "t".into(),
            analysis: "daily_avg".into(),
            day: NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(),
            kind: "generation".into(),
            source: "s".into(),
        };
        let Message::Text(text) = target.subscribe_message("f") else {
            panic!("subscribe is text");
        };
        let value: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(value["from"], "2026-12-31");
        assert_eq!(value["to"], "2027-01-01");
        assert_eq!(target.ws_url(), "ws://127.0.0.1:1/v1/ws?token=t");
    }
}
