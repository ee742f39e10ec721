//! The page in a real browser: headless Debian Chromium, driven by playwright-core
//! (`tests/browser/page.test.mjs`), against the real binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{Duration as Span, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_partitions_waiting_then_draws_the_chart() {
    let ready = Path::new("/usr/bin/chromium").exists()
        && browser_dir().join("node_modules/playwright-core").exists();
    if !ready {
        let why =
            "needs /usr/bin/chromium and tests/browser/node_modules (scripts/test installs both)";
        if std::env::var("SCHOLIA_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("the browser test {why}");
        }
        eprintln!("\n*** the browser test DID NOT RUN: it {why} ***\n");
        return;
    }
    let d = Deployment::new(Backend::Sqlite, "browser")
        .await
        .expect("SQLite needs no services");
    let app = d.start().await;
    // Three days of readings from two stations; nothing is built before the page asks.
    let today = Utc::now().date_naive();
    let mut records = Vec::new();
    for day in 0..3 {
        let date = today - Span::days(2 - day);
        for hour in 0..24 {
            for (station, base) in [("station-a", 100.0), ("station-b", 250.0)] {
                records.push(json!({"kind": "generation", "source": station,
                    "created": format!("{date}T{hour:02}:00:00Z"),
                    "data": {"output_mw": base + hour as f64 + day as f64 * 10.0}}));
            }
        }
    }
    let (status, body) = app.ingest(ADMIN, &records).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let artifacts = std::env::var("SCHOLIA_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("ci-artifacts"));
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("visualizer-page.png");
    let from = (today - Span::days(2)).to_string();
    let to = (today + Span::days(1)).to_string();
    let output = tokio::time::timeout(
        Duration::from_secs(150),
        tokio::process::Command::new("node")
            .arg("page.test.mjs")
            .current_dir(browser_dir())
            .env("SCHOLIA_URL", &app.base)
            .env("SCHOLIA_TOKEN", ADMIN)
            .env("SCHOLIA_ANALYSIS", "daily_avg")
            .env("SCHOLIA_FROM", &from)
            .env("SCHOLIA_TO", &to)
            .env("SCREENSHOT", &screenshot)
            .env("DEADLINE_MS", "90000")
            .output(),
    )
    .await
    .expect("the browser test finishes in time")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary in:\n{stdout}"));
    assert_eq!(summary["ok"], true, "{summary}");
    // Nothing was built before the page subscribed, so the server must have told it that
    // partitions were waiting; under load the strip may show that only briefly.
    let waiting = summary["ws_messages"]["waiting"].as_u64().unwrap_or(0);
    assert!(
        summary["saw"] == "pending-then-charts" || waiting >= 1,
        "the page must be told the partitions are waiting before the chart: {summary}"
    );
    assert!(
        screenshot.exists(),
        "screenshot saved at {}",
        screenshot.display()
    );
    eprintln!("Browser test screenshot: {}", screenshot.display());
}
