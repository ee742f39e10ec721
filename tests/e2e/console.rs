//! The operators' console (`/admin`) in a real browser: headless Debian Chromium, driven
//! by playwright-core (`tests/browser/console.test.mjs`), against the real binary. Each
//! test prepares its data over HTTP, runs one scenario of the script, which clicks
//! through the console and compares what it shows with the service's answers, and then
//! checks the service's state itself. Screenshots go to `$SCHOLIA_ARTIFACTS` (default
//! `./ci-artifacts`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn artifacts() -> PathBuf {
    let dir = std::env::var("SCHOLIA_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("ci-artifacts"));
    std::fs::create_dir_all(&dir).expect("creating the artifacts directory");
    dir
}

/// Whether Chromium and playwright-core are there; says loudly when they are not (and
/// fails when `SCHOLIA_REQUIRE_SERVICES=1`).
fn browser_ready(test: &str) -> bool {
    let ready = Path::new("/usr/bin/chromium").exists()
        && browser_dir().join("node_modules/playwright-core").exists();
    if !ready {
        let why =
            "needs /usr/bin/chromium and tests/browser/node_modules (scripts/test installs both)";
        if std::env::var("SCHOLIA_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("{test} {why}");
        }
        eprintln!("\n*** {test} DID NOT RUN: it {why} ***\n");
    }
    ready
}

fn backend_name(d: &Deployment) -> &'static str {
    match d.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

/// Run one scenario of `console.test.mjs` against `app`; returns its summary, after
/// asserting that it passed.
async fn run_console(
    app: &TestApp,
    d: &Deployment,
    scenario: &str,
    env: &[(&str, String)],
) -> Value {
    let prefix = format!("console-{scenario}-{}", backend_name(d));
    let mut command = tokio::process::Command::new("node");
    command
        .arg("console.test.mjs")
        .current_dir(browser_dir())
        .env("SCHOLIA_URL", &app.base)
        .env("SCHOLIA_TOKEN", ADMIN)
        .env("SCENARIO", scenario)
        .env("ARTIFACTS", artifacts())
        .env("PREFIX", &prefix)
        .env("DEADLINE_MS", "60000")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(420), command.output())
        .await
        .expect("the console's browser test finishes in time")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from the browser test:\n{stdout}\n{stderr}"));
    for shot in summary["screenshots"].as_array().into_iter().flatten() {
        eprintln!("Console screenshot: {}", shot.as_str().unwrap_or_default());
    }
    assert!(
        output.status.success() && summary["ok"] == true,
        "the console's {scenario} scenario failed: {}\n{stderr}",
        serde_json::to_string_pretty(&summary).unwrap()
    );
    summary
}

/// The `analysis.invalidated` events of the log after `after`.
async fn invalidations_logged_since(app: &TestApp, after: i64) -> Vec<Value> {
    log_after(app, after)
        .await
        .into_iter()
        .filter(|e| e["type"] == "analysis.invalidated")
        .collect()
}

fn days(from: &str, n: i64) -> Vec<String> {
    let first = NaiveDate::parse_from_str(from, "%Y-%m-%d").unwrap();
    (0..n)
        .map(|i| (first + chrono::Duration::days(i)).to_string())
        .collect()
}

both_backends!(
    the_console_map_shows_a_failed_build_its_retry_and_rewinds,
    |d: Deployment| async move {
        if !browser_ready("the console's map test") {
            return;
        }
        let app = d.start().await;
        let (from, to) = ("2024-06-01", "2024-06-05");

        // A day whose smallest note does not cast to a number: that partition fails.
        let note = |day: u32, hour: u32, note: &str| json!({"kind": "memo", "source": "m", "created": format!("2024-06-0{day}T{hour:02}:00:00Z"), "data": {"note": note}});
        let (status, body) = app
            .ingest(
                ADMIN,
                &[note(1, 10, "1"), note(2, 10, "abc"), note(3, 10, "3")],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = app
            .put(
                "/v1/analyses/note_min",
                ADMIN,
                &json!({"kind": "memo", "sql": "SELECT CAST(MIN(note) AS INTEGER) AS n, COUNT(*) AS notes FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let failing = invalidate(&app, "note_min", from, to, "eager").await;
        let progress =
            invalidation_reaches(&app, &failing, "failed", Duration::from_secs(60)).await;
        assert_eq!(progress["partitions_failed"], 1, "{progress}");

        // daily_avg over the four days, built once.
        let mut records = Vec::new();
        for day in days(from, 4) {
            for hour in [1, 7, 13, 19] {
                for (station, base) in [("s1", 100.0), ("s2", 250.0)] {
                    records.push(generation(
                        station,
                        &format!("{day}T{hour:02}:00:00Z"),
                        json!(base + hour as f64),
                    ));
                }
            }
        }
        let (status, body) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let built = app.annotations("daily_avg", from, to, 30).await;
        assert!(
            partitions_of(&built)
                .values()
                .all(|p| p["status"] == "ready" && p["generation"] == 1),
            "{built}"
        );

        // Something in the quarantine (one very long line), and a schedule.
        let long = format!(
            "{{\"kind\": \"generation\", \"source\": \"s1\", \"data\": {{\"output_mw\": \"{}\"}}}}",
            "not a number ".repeat(60)
        );
        let (status, body) = app
            .ingest_raw(
                ADMIN,
                "application/x-ndjson",
                format!("{long}\n{{not json\n").into_bytes(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["quarantined"], 2, "{body}");
        let (status, body) = app
            .put(
                "/v1/schedules/nightly",
                ADMIN,
                // Once a year, so that it never fires during the test.
                &json!({"analysis": "daily_avg", "cron": "0 1 1 1 *", "window": "P7D"}),
            )
            .await;
        assert!(status.is_success(), "{status}: {body}");

        let head = log_head(&app).await;
        let summary = run_console(
            &app,
            &d,
            "map",
            &[
                ("FROM", from.into()),
                ("TO", to.into()),
                ("ANALYSIS", "daily_avg".into()),
                ("FAILED_ANALYSIS", "note_min".into()),
                ("FAILED_PARTITION", "2024-06-02".into()),
                ("EXPECT_ERROR", "abc".into()),
                (
                    "FIX_RECORD",
                    json!({"kind": "memo", "source": "m", "created": "2024-06-02T11:00:00Z", "data": {"note": "0"}}).to_string(),
                ),
                ("INVALIDATION", failing.clone()),
            ],
        )
        .await;
        eprintln!("{}", summary["steps"]);

        // What the console did, as the service has it: the retry made the failed day
        // ready, and the two rewinds rebuilt daily_avg once more.
        let notes = partitions_of(&app.annotations("note_min", from, to, 0).await);
        assert_eq!(notes["2024-06-02"]["status"], "ready", "{notes:?}");
        assert_eq!(
            notes["2024-06-02"]["rows"],
            json!([{"n": 0, "notes": 2}]),
            "{notes:?}"
        );
        let daily = partitions_of(&app.annotations("daily_avg", from, to, 0).await);
        for (day, p) in &daily {
            assert_eq!(p["status"], "ready", "{day}: {p}");
            assert_eq!(p["generation"], 2, "{day}: {p}");
        }
        // Three invalidations from the console (the retry, the lazy and the eager
        // rewind), each logged with who made it.
        let logged = invalidations_logged_since(&app, head).await;
        assert_eq!(logged.len(), 3, "{logged:#?}");
        assert!(
            logged
                .iter()
                .all(|e| e["actor"].as_str().is_some_and(|a| !a.is_empty())),
            "{logged:#?}"
        );
    }
);

both_backends!(
    the_console_follows_a_confirmed_rewind_of_a_year_to_100_percent_and_cancels_another,
    |d: Deployment| async move {
        if !browser_ready("the console's progress test") {
            return;
        }
        let app = d.start().await;
        let (from, to) = ("2024-04-01", "2025-04-01");
        let year = days(from, 365);
        assert_eq!(year.last().unwrap(), "2025-03-31");
        let mut records = Vec::new();
        for (d, day) in year.iter().enumerate() {
            for i in 0..8 {
                records.push(generation(
                    &format!("g{}", i % 2),
                    &format!("{day}T{:02}:{:02}:00Z", i * 3, (i * 7) % 60),
                    json!(d as f64 + i as f64 * 0.5),
                ));
            }
        }
        for chunk in records.chunks(5_000) {
            let (status, body) = app.ingest(ADMIN, chunk).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        // Built once, so that the plan has history to estimate from.
        let first = invalidate(&app, "daily_avg", from, to, "eager").await;
        invalidation_reaches(&app, &first, "done", Duration::from_secs(120)).await;

        let summary = run_console(
            &app,
            &d,
            "progress",
            &[
                ("FROM", from.into()),
                ("TO", to.into()),
                ("ANALYSIS", "daily_avg".into()),
                ("PARTITIONS", "365".into()),
                // A year of builds, beside the rest of the suite on two cores: its bar may
                // take minutes to reach 100%.
                ("DEADLINE_MS", "240000".into()),
            ],
        )
        .await;
        eprintln!("{}", summary["steps"]);

        let (status, list) = app.get("/v1/invalidations", ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let list = list["invalidations"].as_array().unwrap().clone();
        let from_console: Vec<&Value> = list.iter().filter(|i| i["id"] != first).collect();
        assert_eq!(from_console.len(), 2, "{list:#?}");
        // Newest first: the cancelled one, then the year that ran to its end.
        let (cancelled, done) = (from_console[0], from_console[1]);
        assert_eq!(done["state"], "done", "{done}");
        assert_eq!(done["partitions_done"], 365, "{done}");
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        assert!(
            cancelled["partitions_done"].as_i64().unwrap()
                < cancelled["partitions_total"].as_i64().unwrap(),
            "{cancelled}"
        );
    }
);

const LIVE_SQL: &str =
    "SELECT source, AVG(output_mw) AS avg_mw, COUNT(*) AS n FROM generation GROUP BY source";
/// Twice the average, and without the station g2.
const CANDIDATE_SQL: &str = "SELECT source, AVG(output_mw) * 2 AS avg_mw, COUNT(*) AS n FROM generation WHERE source <> 'g2' GROUP BY source";
const OTHER_CANDIDATE_SQL: &str =
    "SELECT source, MAX(output_mw) AS avg_mw, COUNT(*) AS n FROM generation GROUP BY source";

both_backends!(
    the_console_diffs_a_candidate_promotes_it_and_discards_another,
    |d: Deployment| async move {
        if !browser_ready("the console's candidate test") {
            return;
        }
        let app = d.start().await;
        let (from, to) = ("2024-04-01", "2024-04-04");
        let mut records = Vec::new();
        for (d, day) in days(from, 3).iter().enumerate() {
            for i in 0..12 {
                records.push(generation(
                    &format!("g{}", i % 3),
                    &format!("{day}T{:02}:{:02}:00Z", i * 2, (i * 13) % 60),
                    json!(d as f64 * 10.0 + i as f64 * 0.5),
                ));
            }
        }
        let (status, body) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = app
            .put(
                "/v1/analyses/station_stats",
                ADMIN,
                &json!({"kind": "generation", "sql": LIVE_SQL}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let live = app.annotations("station_stats", from, to, 30).await;
        assert!(
            partitions_of(&live)
                .values()
                .all(|p| p["status"] == "ready"),
            "{live}"
        );
        let (status, body) = app
            .put(
                "/v1/analyses/station_stats?candidate=true",
                ADMIN,
                &json!({"kind": "generation", "sql": CANDIDATE_SQL}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");

        let head = log_head(&app).await;
        let summary = run_console(
            &app,
            &d,
            "candidate",
            &[
                ("FROM", from.into()),
                ("TO", to.into()),
                ("ANALYSIS", "station_stats".into()),
                ("KIND", "generation".into()),
                ("OTHER_CANDIDATE_SQL", OTHER_CANDIDATE_SQL.into()),
            ],
        )
        .await;
        eprintln!("{}", summary["steps"]);

        // Promoted: version 2 serves the candidate's rows (no g2, twice the average).
        let (_, analysis) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert_eq!(analysis["version"], 2, "{analysis}");
        assert_eq!(analysis["sql"], CANDIDATE_SQL, "{analysis}");
        assert!(analysis["candidate"].is_null(), "{analysis}");
        let before = partitions_of(&live);
        let after = partitions_of(&app.annotations("station_stats", from, to, 30).await);
        for (day, p) in &after {
            assert_eq!(p["status"], "ready", "{day}: {p}");
            assert_eq!(p["version"], 2, "{day}: {p}");
            let rows = p["rows"].as_array().unwrap();
            assert_eq!(rows.len(), 2, "{day}: {p}");
            for row in rows {
                assert_ne!(row["source"], "g2", "{day}: {p}");
                let live_row = before[day]["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["source"] == row["source"])
                    .unwrap();
                let (l, c) = (
                    live_row["avg_mw"].as_f64().unwrap(),
                    row["avg_mw"].as_f64().unwrap(),
                );
                assert!(
                    (c - 2.0 * l).abs() < 1e-9,
                    "{day}: {row} against {live_row}"
                );
            }
        }
        // Both decisions are in the log, with who made them.
        let actions: Vec<Value> = log_after(&app, head)
            .await
            .into_iter()
            .filter(|e| e["type"] == "admin.action")
            .collect();
        for action in ["candidate.promoted", "candidate.discarded"] {
            assert!(
                actions.iter().any(|e| e["action"] == action
                    && e["target"] == "station_stats"
                    && e["actor"].as_str().is_some_and(|a| !a.is_empty())),
                "{action} is logged: {actions:#?}"
            );
        }
    }
);
