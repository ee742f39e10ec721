//! Synthetic producers for `scholia demo`: a small power grid. Stations report
//! `generation` (`output_mw`), regions report `demand` (`demand_mw`), through the same
//! HTTP API producers use, first a few days of history, then live every few seconds.

use std::f64::consts::PI;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Duration as Span, Timelike, Utc};
use rand::Rng;
use scholia_events::tasks::OnFailure;
use scholia_events::token::{self, Scope};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const STATIONS: [(&str, f64, &str); 5] = [
    ("station-north-wind", 320.0, "wind"),
    ("station-east-solar", 180.0, "solar"),
    ("station-river-hydro", 450.0, "hydro"),
    ("station-coast-gas", 600.0, "gas"),
    ("station-valley-wind", 240.0, "wind"),
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
    for (name, capacity, fuel) in STATIONS {
        out.push(json!({"kind": "generation", "source": name, "created": created,
                        "data": {"output_mw": (output(capacity, fuel, at, rng) * 10.0).round() / 10.0, "fuel": fuel}}));
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
    println!("Read-only token: {read}");
    let base = format!("http://{address}");
    core.supervisor
        .spawn("demo-producers", OnFailure::Restart, move |stop| {
            let (base, producer) = (base.clone(), producer.clone());
            async move {
                run_producers(&base, &producer, stop).await.map_err(|e| {
                    scholia_events::Error::unavailable("the demo producers", format!("{e:#}"))
                })
            }
        });
    Ok(())
}

/// Send history, then live records until shut down.
async fn run_producers(base: &str, token: &str, shutdown: CancellationToken) -> Result<()> {
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
    tracing::info!(
        days = HISTORY_DAYS,
        "Demo history sent; producing live records"
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
