//! The client commands: they talk to a running service at `SCHOLIA_URL` with
//! `SCHOLIA_TOKEN`, and print what a person needs to see.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

const DEFAULT_URL: &str = "http://127.0.0.1:7070";
/// Records per request when sending a file.
const BATCH_RECORDS: usize = 5_000;
const BATCH_BYTES: usize = 4 * 1024 * 1024;

struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn from_env() -> Result<Client> {
        let base = std::env::var("SCHOLIA_URL").unwrap_or_else(|_| DEFAULT_URL.to_string());
        let token = std::env::var("SCHOLIA_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder> {
        let token = self.token.as_deref().context(
            "set SCHOLIA_TOKEN to a token (an admin creates one with 'scholia token create')",
        )?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<Value> {
        let response = builder.send().await.with_context(|| {
            format!(
                "cannot reach Scholia at {}; is it running? (SCHOLIA_URL)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {detail}");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.request(reqwest::Method::GET, path)?).await
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    /// An NDJSON file (one envelope per line) or a CSV file with a header row.
    pub(crate) file: std::path::PathBuf,
    /// The kind of records that do not name one.
    #[arg(long)]
    pub(crate) kind: String,
    /// The source of records that do not name one.
    #[arg(long)]
    pub(crate) source: Option<String>,
}

pub(crate) async fn ingest(args: IngestArgs) -> Result<()> {
    let client = Client::from_env()?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let is_csv = args
        .file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reader = BufReader::new(file);
    let mut header: Option<Vec<String>> = None;
    let mut batch = String::new();
    let mut lines_in_batch = 0;
    let mut totals = (0u64, 0u64, 0u64);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line)?;
        if read > 0 {
            bar.inc(read as u64);
            let text = line.trim_end_matches(['\n', '\r']);
            if !text.trim().is_empty() {
                if is_csv {
                    match &header {
                        None => header = Some(split_csv(text)),
                        Some(columns) => {
                            batch.push_str(&csv_envelope(columns, &split_csv(text)).to_string());
                            batch.push('\n');
                            lines_in_batch += 1;
                        }
                    }
                } else {
                    batch.push_str(text);
                    batch.push('\n');
                    lines_in_batch += 1;
                }
            }
        }
        if (read == 0 && lines_in_batch > 0)
            || lines_in_batch >= BATCH_RECORDS
            || batch.len() >= BATCH_BYTES
        {
            let outcome = send_batch(&client, &args, std::mem::take(&mut batch)).await?;
            lines_in_batch = 0;
            totals.0 += outcome["accepted"].as_u64().unwrap_or(0);
            totals.1 += outcome["duplicates"].as_u64().unwrap_or(0);
            totals.2 += outcome["quarantined"].as_u64().unwrap_or(0);
            bar.set_message(format!(
                "{} accepted, {} duplicates, {} quarantined",
                totals.0, totals.1, totals.2
            ));
            if let Some(errors) = outcome["errors"].as_array() {
                for error in errors.iter().take(3) {
                    bar.println(format!(
                        "quarantined: {}",
                        error["error"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
        if read == 0 {
            break;
        }
    }
    bar.finish();
    println!(
        "{} accepted, {} duplicates, {} quarantined",
        totals.0, totals.1, totals.2
    );
    Ok(())
}

async fn send_batch(client: &Client, args: &IngestArgs, body: String) -> Result<Value> {
    let mut attempt = 0;
    loop {
        let mut request = client
            .request(reqwest::Method::POST, "/v1/events")?
            .header("content-type", "application/x-ndjson")
            .query(&[("kind", args.kind.as_str())]);
        if let Some(source) = &args.source {
            request = request.query(&[("source", source.as_str())]);
        }
        let response = request
            .body(body.clone())
            .send()
            .await
            .context("cannot reach Scholia (SCHOLIA_URL)")?;
        let status = response.status();
        if (status.as_u16() == 429 || status.as_u16() == 503) && attempt < 30 {
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1);
            attempt += 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        let text = response.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            bail!(
                "{status}: {}",
                value
                    .get("detail")
                    .and_then(Value::as_str)
                    .unwrap_or(&value.to_string())
            );
        }
        return Ok(value);
    }
}

/// Split one CSV line, honouring double quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// A CSV row as an envelope: data_id, kind, source and created columns go to the
/// envelope; the others into data, as numbers or booleans when they read as such.
fn csv_envelope(columns: &[String], values: &[String]) -> Value {
    let mut envelope = Map::new();
    let mut data = Map::new();
    for (column, value) in columns.iter().zip(values) {
        match column.as_str() {
            "data_id" | "kind" | "source" | "created" => {
                if !value.is_empty() {
                    envelope.insert(column.clone(), Value::String(value.clone()));
                }
            }
            _ => {
                let v = if value.is_empty() {
                    Value::Null
                } else if let Ok(i) = value.parse::<i64>() {
                    json!(i)
                } else if let Ok(f) = value.parse::<f64>() {
                    json!(f)
                } else if value == "true" || value == "false" {
                    json!(value == "true")
                } else {
                    Value::String(value.clone())
                };
                data.insert(column.clone(), v);
            }
        }
    }
    envelope.insert("data".into(), Value::Object(data));
    Value::Object(envelope)
}

#[derive(Debug, Subcommand)]
pub(crate) enum AnalysesCommand {
    /// List registered analyses.
    List,
    /// Register or change SQL analyses from a JSON file: one object or an array of
    /// objects with name, kind, partition, sql and description.
    Apply { file: std::path::PathBuf },
}

pub(crate) async fn analyses(command: AnalysesCommand) -> Result<()> {
    let client = Client::from_env()?;
    match command {
        AnalysesCommand::List => {
            let list = client.get("/v1/analyses").await?;
            println!(
                "{:<28} {:>7} {:<14} {:<4} DESCRIPTION",
                "NAME", "VERSION", "KIND", "PART"
            );
            for a in list["analyses"].as_array().into_iter().flatten() {
                println!(
                    "{:<28} {:>7} {:<14} {:<4} {}",
                    a["name"].as_str().unwrap_or(""),
                    a["version"].as_i64().unwrap_or(0),
                    a["kind"].as_str().unwrap_or(""),
                    a["partition"].as_str().unwrap_or(""),
                    a["description"].as_str().unwrap_or("")
                );
            }
        }
        AnalysesCommand::Apply { file } => {
            for item in read_items(&file)? {
                let name = item["name"]
                    .as_str()
                    .context("every analysis needs a \"name\"")?
                    .to_string();
                let result = client
                    .send(
                        client
                            .request(reqwest::Method::PUT, &format!("/v1/analyses/{name}"))?
                            .json(&item),
                    )
                    .await?;
                println!("{name}: version {}", result["version"]);
            }
        }
    }
    Ok(())
}

fn read_items(file: &std::path::Path) -> Result<Vec<Value>> {
    let mut text = String::new();
    std::fs::File::open(file)
        .with_context(|| format!("cannot open {}", file.display()))?
        .read_to_string(&mut text)?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", file.display()))?;
    Ok(match value {
        Value::Array(items) => items,
        Value::Object(map) if map.contains_key("name") => vec![Value::Object(map)],
        Value::Object(map) => map
            .into_iter()
            .map(|(name, mut v)| {
                v["name"] = Value::String(name);
                v
            })
            .collect(),
        _ => bail!(
            "{} must hold an object or an array of objects",
            file.display()
        ),
    })
}

#[derive(Debug, Args)]
pub(crate) struct InvalidateArgs {
    /// The analysis, or "*" for every analysis.
    pub(crate) analysis: String,
    #[arg(long)]
    pub(crate) from: String,
    #[arg(long)]
    pub(crate) to: String,
    /// Rebuild only when someone asks for the partitions.
    #[arg(long)]
    pub(crate) lazy: bool,
    /// Leave the downstream analyses' partitions alone.
    #[arg(long)]
    pub(crate) no_cascade: bool,
    #[arg(long, default_value = "invalidated from the command line")]
    pub(crate) reason: String,
    /// Change nothing: print what would be rebuilt, the source rows it reads and how long
    /// it would take.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

pub(crate) async fn invalidate(args: InvalidateArgs) -> Result<()> {
    let client = Client::from_env()?;
    let body = json!({
        "analysis": args.analysis, "from": args.from, "to": args.to,
        "reason": args.reason, "rebuild": if args.lazy { "lazy" } else { "eager" },
        "cascade": !args.no_cascade, "dry_run": args.dry_run,
    });
    if args.dry_run {
        let plan = client
            .send(
                client
                    .request(reqwest::Method::POST, "/v1/invalidations")?
                    .json(&body),
            )
            .await?;
        print!("{}", describe_plan(&plan));
        return Ok(());
    }
    let created = client
        .send(
            client
                .request(reqwest::Method::POST, "/v1/invalidations")?
                .json(&body),
        )
        .await?;
    let id = created["id"]
        .as_str()
        .context("the service did not return an invalidation id")?
        .to_string();
    println!("Invalidation {id}");
    if args.lazy {
        println!("Lazy: partitions are rebuilt when someone asks for them.");
        return Ok(());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} partitions {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let progress = client.get(&format!("/v1/invalidations/{id}")).await?;
        let total = progress["partitions_total"].as_u64().unwrap_or(0);
        let done = progress["partitions_done"].as_u64().unwrap_or(0);
        let failed = progress["partitions_failed"].as_u64().unwrap_or(0);
        let state = progress["state"].as_str().unwrap_or("?").to_string();
        bar.set_length(total);
        bar.set_position(done + failed);
        bar.set_message(if failed > 0 {
            format!("{state}, {failed} failed")
        } else {
            state.clone()
        });
        match state.as_str() {
            "done" if failed == 0 => {
                bar.finish();
                println!("Rebuilt {done} partitions.");
                return Ok(());
            }
            "done" | "failed" => {
                bar.abandon();
                bail!(
                    "{failed} of {total} partitions failed; see GET /v1/annotations for their errors"
                );
            }
            "cancelled" => {
                bar.abandon();
                bail!("the invalidation was cancelled after {done} of {total} partitions");
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A dry run's plan, for a person: one line per analysis, then the total.
fn describe_plan(plan: &Value) -> String {
    let number = |v: &Value| {
        let n = v.as_i64().unwrap_or(0);
        let digits = n.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if n < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    };
    let seconds = |v: &Value| {
        let s = v.as_f64().unwrap_or(0.0);
        if s < 60.0 {
            format!("{s:.1} s")
        } else if s < 3600.0 {
            format!("{:.1} min", s / 60.0)
        } else {
            format!("{:.1} h", s / 3600.0)
        }
    };
    let run = |r: &Value| match r {
        Value::String(key) => key.clone(),
        other => format!(
            "{} to {}",
            other["first"].as_str().unwrap_or("?"),
            other["last"].as_str().unwrap_or("?")
        ),
    };
    let mut out = String::from("Dry run: nothing was changed.\n");
    for a in plan["analyses"].as_array().into_iter().flatten() {
        let runs: Vec<String> = a["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(run)
            .collect();
        let shown = if runs.len() > 4 {
            format!("{}, and {} more runs", runs[..4].join(", "), runs.len() - 4)
        } else {
            runs.join(", ")
        };
        let history = match a["history_builds"].as_i64().unwrap_or(0) {
            0 => "no build history yet, default costs".to_string(),
            n => format!("from {n} recent builds"),
        };
        out.push_str(&format!(
            "  {} (version {}): {} partitions ({shown}), {} source rows, about {} ({history}); {} already queued, {} running\n",
            a["analysis"].as_str().unwrap_or("?"),
            a["version"],
            number(&a["partitions"]),
            number(&a["source_rows"]),
            seconds(&a["estimated_seconds"]),
            number(&a["already_queued"]),
            number(&a["already_running"]),
        ));
    }
    out.push_str(&format!(
        "Would rebuild {} partitions reading {} source rows, in about {} with {} worker slots.\n",
        number(&plan["partitions_total"]),
        number(&plan["source_rows"]),
        seconds(&plan["estimated_seconds"]),
        plan["workers"].as_u64().unwrap_or(1),
    ));
    out
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchedulesCommand {
    /// List schedules.
    List,
    /// Create or change schedules from a JSON file: an object of name → {analysis, cron,
    /// window}, or an array of objects with a name.
    Apply { file: std::path::PathBuf },
}

pub(crate) async fn schedules(command: SchedulesCommand) -> Result<()> {
    let client = Client::from_env()?;
    match command {
        SchedulesCommand::List => print_json(&client.get("/v1/schedules").await?),
        SchedulesCommand::Apply { file } => {
            for item in read_items(&file)? {
                let name = item["name"]
                    .as_str()
                    .context("every schedule needs a name")?
                    .to_string();
                client
                    .send(
                        client
                            .request(reqwest::Method::PUT, &format!("/v1/schedules/{name}"))?
                            .json(&item),
                    )
                    .await?;
                println!("{name}: applied");
            }
        }
    }
    Ok(())
}

pub(crate) async fn lineage(data_id: &str) -> Result<()> {
    let client = Client::from_env()?;
    let lineage = client.get(&format!("/v1/lineage/{data_id}")).await?;
    println!(
        "Record {data_id}: kind {}, partition {}",
        lineage["kind"], lineage["partition"]
    );
    for a in lineage["annotations"].as_array().into_iter().flatten() {
        // Built from an upstream analysis' annotations rather than from the record itself.
        let via = match a["via"].as_str() {
            Some(upstream) => format!(" via {upstream}"),
            None => String::new(),
        };
        println!(
            "  {} v{} partition {} generation {} computed {}{via}",
            a["analysis"].as_str().unwrap_or(""),
            a["version"],
            a["partition"].as_str().unwrap_or(""),
            a["generation"],
            a["computed_at"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    pub(crate) analysis: String,
    #[arg(long)]
    pub(crate) from: String,
    #[arg(long)]
    pub(crate) to: String,
}

pub(crate) async fn watch(args: WatchArgs) -> Result<()> {
    let client = Client::from_env()?;
    let token = client
        .token
        .clone()
        .context("set SCHOLIA_TOKEN to a read token")?;
    let ws_base = client.base.replacen("http", "ws", 1);
    let url = format!("{ws_base}/v1/ws?token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .with_context(|| format!("cannot open the websocket at {ws_base}/v1/ws"))?;
    let subscribe = json!({"op": "subscribe", "id": "watch", "analysis": args.analysis, "from": args.from, "to": args.to});
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            subscribe.to_string(),
        ))
        .await?;
    while let Some(message) = socket.next().await {
        let message = message?;
        let Ok(text) = message.to_text() else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        let now = chrono::Utc::now().format("%H:%M:%S");
        match value["type"].as_str().unwrap_or("") {
            "partition" => println!(
                "{now} {} gen {} v{}: {} rows {}",
                value["partition"].as_str().unwrap_or(""),
                value["generation"],
                value["version"],
                value["rows"].as_array().map(|r| r.len()).unwrap_or(0),
                value["rows"]
                    .as_array()
                    .and_then(|r| r.first())
                    .map(|r| r.to_string())
                    .unwrap_or_default()
            ),
            "waiting" => println!("{now} waiting for {}", value["partitions"]),
            "status" => println!(
                "{now} {} {}{}",
                value["partition"].as_str().unwrap_or(""),
                value["status"].as_str().unwrap_or(""),
                value["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            "ready" => println!("{now} all partitions ready"),
            "invalidated" => println!("{now} invalidated {}", value["partitions"]),
            "resync" => {
                println!("{now} fell behind; subscribing again");
                socket
                    .send(tokio_tungstenite::tungstenite::Message::text(
                        subscribe.to_string(),
                    ))
                    .await?;
            }
            "error" => eprintln!("{now} error: {}", value["message"].as_str().unwrap_or("")),
            _ => println!("{now} {text}"),
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print it alone on the last line. With SCHOLIA_TOKEN set this
    /// asks the service; otherwise it writes to the database directly
    /// (SCHOLIA_DATABASE_URL, or the embedded one under ./scholia-data/).
    Create {
        #[arg(long)]
        scope: String,
        /// Source patterns an ingest token may write, e.g. generator-* (repeatable).
        #[arg(long = "source")]
        sources: Vec<String>,
        #[arg(long)]
        name: Option<String>,
    },
}

pub(crate) async fn token(command: TokenCommand) -> Result<()> {
    let TokenCommand::Create {
        scope,
        sources,
        name,
    } = command;
    let scope: scholia_events::token::Scope = scope.parse().map_err(anyhow::Error::msg)?;
    if std::env::var("SCHOLIA_TOKEN").is_ok_and(|t| !t.is_empty()) {
        let client = Client::from_env()?;
        let body = json!({"scope": scope, "sources": sources, "name": name});
        let created = client
            .send(
                client
                    .request(reqwest::Method::POST, "/v1/tokens")?
                    .json(&body),
            )
            .await?;
        println!(
            "Created {} token {}",
            scope,
            created["id"].as_str().unwrap_or("")
        );
        println!(
            "{}",
            created["token"]
                .as_str()
                .context("no token in the answer")?
        );
    } else {
        let url = std::env::var("SCHOLIA_DATABASE_URL").ok();
        let store = scholia_store::connect(url.as_deref()).await?;
        let name = name.unwrap_or_else(|| format!("{scope} token"));
        let secret = scholia_events::token::new_secret();
        let token = store
            .tokens
            .create(
                scope,
                sources,
                &name,
                &scholia_events::token::hash_secret(&secret),
                Some("command line (database access)"),
            )
            .await?;
        store.database.close().await;
        println!("Created {} token {}", scope, token.id);
        println!("{secret}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_plan_reads_as_lines_per_analysis_and_a_total() {
        let plan = json!({"dry_run": true, "partitions_total": 8, "source_rows": 12345, "estimated_seconds": 1.25, "workers": 2,
            "analyses": [{"analysis": "daily_avg", "version": 3, "partitions": 7, "runs": [{"first": "2024-05-01", "last": "2024-05-07"}],
                          "source_rows": 12345, "estimated_seconds": 1.0, "already_queued": 1, "already_running": 0, "history_builds": 20},
                         {"analysis": "weekly", "version": 1, "partitions": 1, "runs": ["2024-05-06"], "source_rows": 0,
                          "estimated_seconds": 0.25, "already_queued": 0, "already_running": 0, "history_builds": 0}]});
        let text = describe_plan(&plan);
        assert!(text.contains("daily_avg (version 3): 7 partitions (2024-05-01 to 2024-05-07), 12,345 source rows, about 1.0 s (from 20 recent builds); 1 already queued"), "{text}");
        assert!(
            text.contains("weekly (version 1): 1 partitions (2024-05-06)"),
            "{text}"
        );
        assert!(text.contains("Would rebuild 8 partitions reading 12,345 source rows, in about 1.2 s with 2 worker slots."), "{text}");
    }

    #[test]
    fn a_csv_row_becomes_an_envelope_with_typed_data() {
        let columns = split_csv("source,created,output_mw,note,ok");
        let row = split_csv(r#"g1,2024-05-05T00:00:00Z,412.5,"a, b",true"#);
        let envelope = csv_envelope(&columns, &row);
        assert_eq!(envelope["source"], "g1");
        assert_eq!(envelope["data"]["output_mw"], 412.5);
        assert_eq!(envelope["data"]["note"], "a, b");
        assert_eq!(envelope["data"]["ok"], true);
    }
}
