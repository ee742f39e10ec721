//! Synthetic producers for `scholia demo`: a small power grid. Stations report
//! `generation` (`output_mw`, and the `region` they feed), regions report `demand`
//! (`demand_mw`), through the same HTTP API producers use, first a few days of history,
//! then live every few seconds. Two SQL analyses show the analysis graph: the reserve
//! margin of each region and hour joins generation with demand, and a daily flag reads
//! the annotations of the built-in `daily_avg`.

use std::f64::consts::PI;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Duration as Span, Timelike, Utc};
use rand::Rng;
use scholia_events::tasks::OnFailure;
use scholia_events::token::{self, Scope};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const STATIONS: [(&str, f64, &str, &str); 5] = [
    ("station-north-wind", 320.0, "wind", "region-north"),
    ("station-east-solar", 180.0, "solar", "region-city"),
    ("station-river-hydro", 450.0, "hydro", "region-south"),
    ("station-coast-gas", 600.0, "gas", "region-city"),
    ("station-valley-wind", 240.0, "wind", "region-north"),
];

/// The demo's SQL analyses: the graph beyond one kind and one analysis.
const ANALYSES: [(&str, &str); 2] = [
    (
        "reserve_margin",
        r#"{"inputs": [{"kind": "generation"}, {"kind": "demand"}], "description": "Per region and hour: generation against demand, and the reserve margin (supply / demand - 1).",
           "sql": "WITH stations AS (SELECT region, source, STRFTIME(created, '%Y-%m-%dT%H') AS hour, AVG(output_mw) AS mw FROM generation GROUP BY region, source, STRFTIME(created, '%Y-%m-%dT%H')), supply AS (SELECT region, hour, SUM(mw) AS supply_mw FROM stations GROUP BY region, hour), need AS (SELECT source AS region, STRFTIME(created, '%Y-%m-%dT%H') AS hour, AVG(demand_mw) AS demand_mw FROM demand GROUP BY source, STRFTIME(created, '%Y-%m-%dT%H')) SELECT supply.region, supply.hour, supply_mw, demand_mw, supply_mw / demand_mw - 1.0 AS reserve_margin FROM supply JOIN need ON supply.region = need.region AND supply.hour = need.hour ORDER BY supply.region, supply.hour"}"#,
    ),
    (
        "high_output_days",
        r#"{"inputs": [{"analysis": "daily_avg"}], "description": "Per station and day, from daily_avg's annotations: whether its average output was above 300 MW.",
           "sql": "SELECT source, avg_mw, avg_mw > 300.0 AS high FROM daily_avg ORDER BY source"}"#,
    ),
];
const REGIONS: [(&str, f64); 3] = [
    ("region-north", 900.0),
    ("region-south", 1200.0),
    ("region-city", 1500.0),
];
const HISTORY_DAYS: i64 = 3;
const HISTORY_STEP_MINUTES: i64 = 10;
const LIVE_EVERY: Duration = Duration::from_secs(3);

fn output(capacity: f64, fuel: &str, at: DateTime<Utc>, rng: &mut impl Rng) -> f64 {
    let hour = at.hour() as f64 + at.minute() as f64 / 60.0;
    let shape = match fuel {
        "solar" => ((hour - 6.0) / 12.0 * PI).sin().max(0.0),
        "wind" => 0.55 + 0.35 * ((hour / 24.0 * 2.0 * PI) + capacity).sin(),
        "gas" => 0.4 + 0.5 * ((hour - 7.0) / 24.0 * 2.0 * PI).sin().max(0.0),
        _ => 0.8,
    };
    (capacity * shape * rng.random_range(0.9..1.1)).max(0.0)
}

fn demand(base: f64, at: DateTime<Utc>, rng: &mut impl Rng) -> f64 {
    let hour = at.hour() as f64 + at.minute() as f64 / 60.0;
    let daily = 0.75 + 0.25 * ((hour - 9.0) / 24.0 * 2.0 * PI).sin();
    // Now and then a spike, for the anomaly analysis to find.
    let spike = if rng.random_range(0.0..1.0) < 0.01 {
        1.6
    } else {
        1.0
    };
    base * daily * spike * rng.random_range(0.97..1.03)
}

fn records_at(at: DateTime<Utc>, rng: &mut impl Rng) -> Vec<Value> {
    let created = scholia_events::envelope::format_time(at);
    let mut out = Vec::new();
    for (name, capacity, fuel, region) in STATIONS {
        out.push(json!({"kind": "generation", "source": name, "created": created,
                        "data": {"output_mw": (output(capacity, fuel, at, rng) * 10.0).round() / 10.0, "fuel": fuel, "region": region}}));
    }
    for (name, base) in REGIONS {
        out.push(json!({"kind": "demand", "source": name, "created": created,
                        "data": {"demand_mw": (demand(base, at, rng) * 10.0).round() / 10.0}}));
    }
    out
}

async fn send(client: &reqwest::Client, base: &str, token: &str, records: &[Value]) -> Result<()> {
    let body: String = records.iter().map(|r| format!("{r}\n")).collect();
    let response = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .context("the demo producers cannot reach the service")?;
    if !response.status().is_success() {
        tracing::warn!(status = %response.status(), "The service refused demo records");
    }
    Ok(())
}

/// Make the demo's tokens, print the page's URL, and start the producers.
pub(crate) async fn start(
    app: &crate::app::Application,
    config: &crate::config::ServeConfig,
) -> Result<()> {
    let core = app.core();
    let tokens = &core.store.tokens;
    let create = async |scope: Scope, name: &str| -> Result<String> {
        let secret = token::new_secret();
        tokens
            .create(scope, Vec::new(), name, &token::hash_secret(&secret), None)
            .await?;
        Ok(secret)
    };
    let read = create(Scope::Read, "demo viewer").await?;
    let admin = match (&app.created_admin, &config.admin_token) {
        (Some(secret), _) | (None, Some(secret)) => secret.clone(),
        (None, None) => create(Scope::Admin, "demo admin").await?,
    };
    let producer = create(Scope::Ingest, "demo producers").await?;
    let address = app.address();
    println!("Open the live charts: http://{address}/?token={admin}&analysis=daily_avg");
    println!("The operators' console: http://{address}/admin?token={admin}");
    println!("Read-only token: {read}");
    let base = format!("http://{address}");
    core.supervisor
        .spawn("demo-producers", OnFailure::Restart, move |stop| {
            let (base, producer, admin) = (base.clone(), producer.clone(), admin.clone());
            async move {
                let produced = run_producers(&base, &producer, &admin, stop);
                produced.await.map_err(|e| {
                    scholia_events::Error::unavailable("the demo producers", format!("{e:#}"))
                })
            }
        });
    Ok(())
}

/// Register the demo's SQL analyses, as an admin would.
async fn register_analyses(base: &str, admin: &str) -> Result<()> {
    let client = reqwest::Client::new();
    for (name, definition) in ANALYSES {
        let body: Value =
            serde_json::from_str(definition).expect("the demo's definitions are JSON");
        let response = client
            .put(format!("{base}/v1/analyses/{name}"))
            .bearer_auth(admin)
            .json(&body)
            .send()
            .await
            .context("the demo cannot reach the service")?;
        if !response.status().is_success() {
            anyhow::bail!(
                "the demo's analysis {name} was refused: {}",
                response.text().await.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Send history, register the SQL analyses, then send live records until shut down.
async fn run_producers(
    base: &str,
    token: &str,
    admin: &str,
    shutdown: CancellationToken,
) -> Result<()> {
    let client = reqwest::Client::new();
    let now = Utc::now();
    let start = now - Span::days(HISTORY_DAYS);
    let mut batch = Vec::new();
    let mut at = start;
    while at < now {
        batch.extend(records_at(at, &mut rand::rng()));
        if batch.len() >= 2_000 {
            send(&client, base, token, &batch).await?;
            batch.clear();
        }
        at += Span::minutes(HISTORY_STEP_MINUTES);
    }
    if !batch.is_empty() {
        send(&client, base, token, &batch).await?;
    }
    // The kinds' schemas now have the fields the SQL analyses name.
    register_analyses(base, admin).await?;
    tracing::info!(
        days = HISTORY_DAYS,
        "Demo history sent and its analyses registered; producing live records"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(LIVE_EVERY) => {}
        }
        let records = records_at(Utc::now(), &mut rand::rng());
        if let Err(error) = send(&client, base, token, &records).await {
            tracing::warn!(error = %error, "Demo producers could not send");
        }
    }
}
