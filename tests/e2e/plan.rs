//! Planning before rewinding: dry runs (what they plan is what the real run builds, and
//! they change nothing), their estimate against the real run, the build history, and
//! retries of exactly what failed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

/// `per_day` generation records a day over `days` days from 2024-04-01, from three
/// stations.
fn days_of_records(days: i64, per_day: usize) -> Vec<Value> {
    let start = chrono::NaiveDate::from_ymd_opt(2024, 4, 1).unwrap();
    let mut records = Vec::new();
    for d in 0..days {
        let day = start + chrono::Duration::days(d);
        for i in 0..per_day {
            let created = format!(
                "{day}T{:02}:{:02}:{:02}Z",
                i % 24,
                (i * 13) % 60,
                (i / 24) % 60
            );
            records.push(generation(
                &format!("g{}", i % 3),
                &created,
                json!(d as f64 + i as f64 * 0.5),
            ));
        }
    }
    records
}

async fn ingest_all(app: &TestApp, records: &[Value]) {
    for chunk in records.chunks(5_000) {
        let (status, body) = app.ingest(ADMIN, chunk).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["accepted"].as_u64(),
            Some(chunk.len() as u64),
            "{body}"
        );
    }
}

async fn put_analysis(app: &TestApp, name: &str, definition: Value) {
    let (status, body) = app
        .put(&format!("/v1/analyses/{name}"), ADMIN, &definition)
        .await;
    assert!(status.is_success(), "{status}: {body}");
}

/// Read `[from, to)` of `analysis` until every partition is ready.
async fn all_ready(app: &TestApp, analysis: &str, from: &str, to: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        &format!("every partition of {analysis} to be ready"),
        || async {
            let body = app.annotations(analysis, from, to, 10).await;
            partitions_of(&body)
                .values()
                .all(|p| p["status"] == "ready")
                .then_some(body)
        },
    )
    .await
}

fn dry_run_body(analysis: &str, from: &str, to: &str, cascade: bool) -> Value {
    json!({"analysis": analysis, "from": from, "to": to, "reason": "planning", "cascade": cascade, "dry_run": true})
}

/// Every (analysis, partition) that `runs` (as a plan writes them) covers.
fn keys_of_runs(analysis: &str, runs: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for run in runs.as_array().unwrap() {
        let (first, last) = match run {
            Value::String(key) => (key.clone(), key.clone()),
            other => (
                other["first"].as_str().unwrap().to_string(),
                other["last"].as_str().unwrap().to_string(),
            ),
        };
        let mut day = chrono::NaiveDate::parse_from_str(&first, "%Y-%m-%d").unwrap();
        let last = chrono::NaiveDate::parse_from_str(&last, "%Y-%m-%d").unwrap();
        while day <= last {
            out.insert((analysis.to_string(), day.to_string()));
            day += chrono::Duration::days(1);
        }
    }
    out
}

fn planned(plan: &Value) -> BTreeSet<(String, String)> {
    plan["analyses"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| keys_of_runs(a["analysis"].as_str().unwrap(), &a["runs"]))
        .collect()
}

/// The (analysis, partition) of every event of `kind` after `after`.
async fn events_after(app: &TestApp, after: i64, kind: &str) -> BTreeSet<(String, String)> {
    log_after(app, after)
        .await
        .into_iter()
        .filter(|e| e["type"] == kind)
        .map(|e| {
            (
                e["analysis"].as_str().unwrap().to_string(),
                e["partition"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

both_backends!(
    a_dry_run_plans_exactly_what_the_real_run_builds_and_changes_nothing,
    |d: Deployment| async move {
        let app = d.start().await;
        ingest_all(&app, &days_of_records(6, 12)).await;
        put_analysis(&app, "station_avg", json!({"kind": "generation", "sql": "SELECT source, AVG(output_mw) AS avg_mw FROM generation GROUP BY source"})).await;
        put_analysis(&app, "fleet_avg", json!({"inputs": [{"analysis": "station_avg"}], "sql": "SELECT AVG(avg_mw) AS fleet_mw, COUNT(*) AS stations FROM station_avg"})).await;
        all_ready(&app, "station_avg", "2024-04-01", "2024-04-07").await;
        all_ready(&app, "fleet_avg", "2024-04-01", "2024-04-07").await;

        let head = log_head(&app).await;
        let (status, plan) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &dry_run_body("station_avg", "2024-04-02", "2024-04-05", true),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{plan}");
        assert_eq!(plan["dry_run"], true, "{plan}");
        assert_eq!(plan["partitions_total"], 6, "{plan}");
        let analyses = plan["analyses"].as_array().unwrap();
        let names: Vec<&str> = analyses
            .iter()
            .map(|a| a["analysis"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["station_avg", "fleet_avg"],
            "upstream first: {plan}"
        );
        let upstream = &analyses[0];
        assert_eq!(upstream["version"], 1, "{plan}");
        assert_eq!(upstream["partitions"], 3, "{plan}");
        assert_eq!(
            upstream["runs"],
            json!([{"first": "2024-04-02", "last": "2024-04-04"}]),
            "{plan}"
        );
        assert_eq!(upstream["source_rows"], 36, "12 records a day: {plan}");
        assert_eq!(
            analyses[1]["source_rows"], 9,
            "the downstream reads three stations' rows a day: {plan}"
        );
        assert_eq!(plan["source_rows"], 45, "{plan}");
        for a in analyses {
            assert_eq!(a["already_queued"], 0, "{plan}");
            assert_eq!(a["already_running"], 0, "{plan}");
            assert!(a["history_builds"].as_u64().unwrap() >= 6, "{plan}");
            assert!(a["estimated_seconds"].as_f64().unwrap() > 0.0, "{plan}");
        }
        assert!(plan["workers"].as_u64().unwrap() >= 1, "{plan}");
        assert!(plan["estimated_seconds"].as_f64().unwrap() > 0.0, "{plan}");

        // Without cascade, the upstream alone.
        let (status, alone) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &dry_run_body("station_avg", "2024-04-02", "2024-04-05", false),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{alone}");
        assert_eq!(alone["partitions_total"], 3, "{alone}");
        assert_eq!(alone["analyses"].as_array().unwrap().len(), 1, "{alone}");
        // A dry run is refused as the real request would be.
        let (status, problem) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &dry_run_body("no_such", "2024-04-02", "2024-04-05", true),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");

        // The command line prints the plan and exits 0.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_scholia"))
            .args([
                "invalidate",
                "station_avg",
                "--from",
                "2024-04-02",
                "--to",
                "2024-04-05",
                "--dry-run",
            ])
            .env("SCHOLIA_URL", &app.base)
            .env("SCHOLIA_TOKEN", ADMIN)
            .output()
            .expect("running scholia invalidate --dry-run");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("Dry run: nothing was changed."), "{stdout}");
        assert!(
            stdout.contains(
                "station_avg (version 1): 3 partitions (2024-04-02 to 2024-04-04), 36 source rows"
            ),
            "{stdout}"
        );
        assert!(stdout.contains("Would rebuild 6 partitions"), "{stdout}");

        // Nothing changed: no event, no invalidation, nothing queued.
        assert_eq!(log_head(&app).await, head, "a dry run logs nothing");
        let (_, list) = app.get("/v1/invalidations", ADMIN).await;
        assert_eq!(list["invalidations"], json!([]), "{list}");
        for analysis in ["station_avg", "fleet_avg"] {
            let (_, body) = app
                .get(
                    &format!("/v1/annotations/{analysis}?from=2024-04-01&to=2024-04-07"),
                    ADMIN,
                )
                .await;
            assert!(
                partitions_of(&body)
                    .values()
                    .all(|p| p["status"] == "ready"),
                "nothing is queued or stale after a dry run: {body}"
            );
        }

        // The real run builds exactly the plan.
        let id = {
            let (status, body) = app
                .post(
                    "/v1/invalidations",
                    ADMIN,
                    &json!({"analysis": "station_avg", "from": "2024-04-02", "to": "2024-04-05", "reason": "for real"}),
                )
                .await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            body["id"].as_str().unwrap().to_string()
        };
        let progress = invalidation_reaches(&app, &id, "done", Duration::from_secs(60)).await;
        assert_eq!(progress["partitions_total"], 6, "{progress}");
        assert_eq!(progress["partitions_done"], 6, "{progress}");
        let expected = planned(&plan);
        assert_eq!(expected.len(), 6);
        let completed = events_after(&app, head, "analysis.completed").await;
        assert_eq!(completed, expected, "built what the dry run planned");
        let started = events_after(&app, head, "analysis.started").await;
        assert_eq!(started, expected, "started what the dry run planned");
    }
);

both_backends!(
    the_estimate_is_within_five_times_the_real_run,
    |d: Deployment| async move {
        let app = d.start().await;
        let days = 40;
        ingest_all(&app, &days_of_records(days, 300)).await;
        put_analysis(&app, "station_max", json!({"kind": "generation", "sql": "SELECT source, MAX(output_mw) AS max_mw, COUNT(*) AS n FROM generation GROUP BY source"})).await;
        let (from, to) = ("2024-04-01", "2024-05-11");
        // History: the first builds, then a rewind, as the estimated one will be.
        all_ready(&app, "station_max", from, to).await;
        let warm = invalidate(&app, "station_max", from, to, "eager").await;
        invalidation_reaches(&app, &warm, "done", Duration::from_secs(120)).await;

        let (status, plan) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &dry_run_body("station_max", from, to, true),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{plan}");
        assert_eq!(plan["partitions_total"], days, "{plan}");
        assert_eq!(plan["source_rows"], days * 300, "{plan}");
        assert!(
            plan["analyses"][0]["history_builds"].as_u64().unwrap() >= days as u64,
            "{plan}"
        );
        let estimate = plan["estimated_seconds"].as_f64().unwrap();

        let started = Instant::now();
        let id = invalidate(&app, "station_max", from, to, "eager").await;
        eventually(Duration::from_secs(120), "the rewind to finish", || async {
            let (_, progress) = app.get(&format!("/v1/invalidations/{id}"), ADMIN).await;
            (progress["state"] == "done").then_some(())
        })
        .await;
        let real = started.elapsed().as_secs_f64();
        eprintln!(
            "estimate {estimate:.3} s, real {real:.3} s ({} workers)",
            plan["workers"]
        );
        assert!(
            estimate / 5.0 <= real && real <= estimate * 5.0,
            "the estimate {estimate:.3} s is not within 5x of the real {real:.3} s: {plan}"
        );
    }
);

both_backends!(
    a_failed_build_is_in_the_history_and_a_retry_rebuilds_only_it,
    |d: Deployment| async move {
        let app = d.start().await;
        let note = |day: u32, hour: u32, note: &str| json!({"kind": "memo", "source": "m", "created": format!("2024-06-0{day}T{hour:02}:00:00Z"), "data": {"note": note}});
        let (status, body) = app
            .ingest(
                ADMIN,
                &[note(1, 10, "1"), note(2, 10, "abc"), note(3, 10, "3")],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The smallest note of the day as a number: "abc" does not cast, so that day fails.
        put_analysis(&app, "note_min", json!({"kind": "memo", "sql": "SELECT CAST(MIN(note) AS INTEGER) AS n, COUNT(*) AS notes FROM events"})).await;
        let id = invalidate(&app, "note_min", "2024-06-01", "2024-06-04", "eager").await;
        let progress = invalidation_reaches(&app, &id, "failed", Duration::from_secs(60)).await;
        assert_eq!(progress["partitions_done"], 2, "{progress}");
        assert_eq!(progress["partitions_failed"], 1, "{progress}");

        // The history, newest first, read with a read token.
        let reader = app.token("read", &[]).await;
        let (status, history) = app.get("/v1/analyses/note_min/builds", &reader).await;
        assert_eq!(status, StatusCode::OK, "{history}");
        let builds = history["builds"].as_array().unwrap();
        assert_eq!(builds.len(), 3, "{history}");
        let finished: Vec<&str> = builds
            .iter()
            .map(|b| b["finished_at"].as_str().unwrap())
            .collect();
        let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
        assert!(
            finished.windows(2).all(|w| parse(w[0]) >= parse(w[1])),
            "newest first: {history}"
        );
        let of = |partition: &str| {
            builds
                .iter()
                .find(|b| b["partition"] == partition)
                .unwrap_or_else(|| panic!("no build of {partition}: {history}"))
                .clone()
        };
        let good = of("2024-06-01");
        assert_eq!(good["outcome"], "completed", "{good}");
        assert_eq!(good["version"], 1, "{good}");
        assert_eq!(good["generation"], 1, "{good}");
        assert_eq!(good["rows_read"], 1, "{good}");
        assert_eq!(good["rows_written"], 1, "{good}");
        assert_eq!(good["attempt"], 1, "{good}");
        assert!(good["error"].is_null(), "{good}");
        assert!(good["duration_ms"].as_i64().unwrap() >= 0, "{good}");
        assert!(
            good["worker"].as_str().is_some_and(|w| w.contains('#')),
            "{good}"
        );
        assert!(
            parse(good["started_at"].as_str().unwrap())
                <= parse(good["finished_at"].as_str().unwrap()),
            "{good}"
        );
        assert!(uuid::Uuid::parse_str(good["id"].as_str().unwrap()).is_ok());
        let bad = of("2024-06-02");
        assert_eq!(bad["outcome"], "failed", "{bad}");
        assert!(bad["generation"].is_null(), "{bad}");
        assert_eq!(bad["rows_written"], 0, "{bad}");
        let error = bad["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("abc") || error.to_lowercase().contains("cast"),
            "{bad}"
        );
        // Filtered and limited; refusals are sentences.
        let (_, one) = app
            .get("/v1/analyses/note_min/builds?partition=2024-06-02", &reader)
            .await;
        assert_eq!(one["builds"].as_array().unwrap().len(), 1, "{one}");
        assert_eq!(one["builds"][0]["outcome"], "failed", "{one}");
        let (_, limited) = app
            .get("/v1/analyses/note_min/builds?limit=1", &reader)
            .await;
        assert_eq!(limited["builds"].as_array().unwrap().len(), 1, "{limited}");
        for (query, expected) in [
            ("?limit=0", StatusCode::BAD_REQUEST),
            ("?limit=1001", StatusCode::BAD_REQUEST),
            ("?partition=June", StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (status, problem) = app
                .get(&format!("/v1/analyses/note_min/builds{query}"), &reader)
                .await;
            assert_eq!(status, expected, "{query}: {problem}");
            assert!(
                problem["detail"].as_str().is_some_and(|d| d.ends_with('.')),
                "{problem}"
            );
        }
        let (status, _) = app.get("/v1/analyses/no_such/builds", &reader).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Retry refusals: unknown, still running, nothing failed.
        let (status, _) = app
            .post(
                &format!("/v1/invalidations/{}/retry", uuid::Uuid::now_v7()),
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let lazy = invalidate(&app, "note_min", "2024-06-05", "2024-06-06", "lazy").await;
        let (status, problem) = app
            .post(
                &format!("/v1/invalidations/{lazy}/retry"),
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("still running"),
            "{problem}"
        );

        // The failed day gets a record that makes it castable; nothing rebuilds it by itself.
        let (status, _) = app.ingest(ADMIN, &[note(2, 11, "0")]).await;
        assert_eq!(status, StatusCode::OK);
        let (_, body) = app
            .get(
                "/v1/annotations/note_min?from=2024-06-02&to=2024-06-03",
                ADMIN,
            )
            .await;
        assert_eq!(body["partitions"][0]["status"], "failed", "{body}");

        let head = log_head(&app).await;
        let (status, retried) = app
            .post(&format!("/v1/invalidations/{id}/retry"), ADMIN, &json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
        assert_eq!(retried["retry_of"], id.as_str(), "{retried}");
        assert_eq!(retried["partitions"], 1, "{retried}");
        let retry = retried["id"].as_str().unwrap().to_string();
        let progress = invalidation_reaches(&app, &retry, "done", Duration::from_secs(60)).await;
        assert_eq!(progress["partitions_total"], 1, "{progress}");
        assert_eq!(progress["partitions_done"], 1, "{progress}");
        assert_eq!(progress["retry_of"], id.as_str(), "{progress}");
        let rebuilt = events_after(&app, head, "analysis.started").await;
        assert_eq!(
            rebuilt,
            BTreeSet::from([("note_min".to_string(), "2024-06-02".to_string())]),
            "the retry rebuilt exactly the failed partition"
        );
        let events = log_after(&app, head).await;
        let invalidated: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "analysis.invalidated")
            .collect();
        assert_eq!(invalidated.len(), 1, "{events:?}");
        assert_eq!(invalidated[0]["invalidation"], retry.as_str());
        assert_eq!(
            invalidated[0]["partitions"],
            json!(["2024-06-02"]),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| e["type"] == "admin.action"
                && e["action"] == "invalidation.retried"
                && e["target"] == id.as_str()
                && e["actor"].as_str().is_some_and(|a| !a.is_empty())),
            "the retry is logged with who did it: {events:?}"
        );
        let body = app
            .annotations("note_min", "2024-06-01", "2024-06-04", 10)
            .await;
        let parts = partitions_of(&body);
        assert_eq!(parts["2024-06-02"]["status"], "ready", "{body}");
        assert_eq!(
            parts["2024-06-02"]["rows"],
            json!([{"n": 0, "notes": 2}]),
            "{body}"
        );
        // The history has the retry's success on top.
        let (_, history) = app
            .get("/v1/analyses/note_min/builds?partition=2024-06-02", &reader)
            .await;
        assert_eq!(history["builds"][0]["outcome"], "completed", "{history}");
        assert_eq!(history["builds"][1]["outcome"], "failed", "{history}");
        // The retry had no failures: retrying it is a conflict.
        let (status, problem) = app
            .post(
                &format!("/v1/invalidations/{retry}/retry"),
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    }
);

/// The processes whose parent is `pid`, from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            // After the command's name in parentheses: the state, then the parent's pid.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Processes held with SIGSTOP, let go (SIGCONT) when dropped, so that none outlives the
/// test stopped.
struct Stopped(Vec<u32>);

impl Stopped {
    fn stop(pids: Vec<u32>) -> Stopped {
        for pid in &pids {
            signal(*pid, "STOP");
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in self.0.drain(..) {
            let _ = std::process::Command::new("kill")
                .arg("-CONT")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// The dry run of `analysis` over `[from, to)`: its already_queued, its already_running,
/// and the whole plan.
async fn under_way(app: &TestApp, analysis: &str, from: &str, to: &str) -> (u64, u64, Value) {
    let (status, plan) = app
        .post(
            "/v1/invalidations",
            ADMIN,
            &dry_run_body(analysis, from, to, true),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    let a = &plan["analyses"][0];
    assert_eq!(a["analysis"], analysis, "{plan}");
    (
        a["already_queued"].as_u64().unwrap(),
        a["already_running"].as_u64().unwrap(),
        plan,
    )
}

both_backends!(
    a_dry_run_reports_what_is_already_queued_and_running,
    |d: Deployment| async move {
        // No worker: what an eager invalidation queues stays queued.
        let app = d.start_with(&[("SCHOLIA_ROLES", "ingest,cache")]).await;
        ingest_all(&app, &days_of_records(6, 12)).await;
        put_analysis(&app, "station_avg", json!({"kind": "generation", "sql": "SELECT source, AVG(output_mw) AS avg_mw FROM generation GROUP BY source"})).await;
        let first = invalidate(&app, "station_avg", "2024-04-01", "2024-04-05", "eager").await;
        let (queued, running, plan) =
            under_way(&app, "station_avg", "2024-04-01", "2024-04-05").await;
        assert_eq!((queued, running), (4, 0), "{plan}");
        // Over a wider range, only the queued partitions count.
        let (queued, running, plan) =
            under_way(&app, "station_avg", "2024-04-01", "2024-04-07").await;
        assert_eq!(plan["partitions_total"], 6, "{plan}");
        assert_eq!((queued, running), (4, 0), "{plan}");
        let (queued, running, plan) =
            under_way(&app, "station_avg", "2024-04-05", "2024-04-07").await;
        assert_eq!((queued, running), (0, 0), "{plan}");

        // A worker with one build slot builds them, then has its SQL child idle.
        let worker = d
            .start_with(&[
                ("SCHOLIA_ROLES", "worker"),
                ("SCHOLIA_WORKER_CONCURRENCY", "1"),
            ])
            .await;
        invalidation_reaches(&app, &first, "done", Duration::from_secs(60)).await;
        eventually(
            Duration::from_secs(30),
            "nothing of station_avg to be under way",
            || async {
                let (queued, running, _) =
                    under_way(&app, "station_avg", "2024-04-01", "2024-04-07").await;
                (queued == 0 && running == 0).then_some(())
            },
        )
        .await;
        let children = children_of(worker.pid());
        assert!(
            !children.is_empty(),
            "the worker {} has no SQL child process",
            worker.pid()
        );
        // With its SQL child stopped, the worker's one build hangs while it holds the lease,
        // and the rest waits in the queue behind it.
        let stopped = Stopped::stop(children);
        let second = invalidate(&app, "station_avg", "2024-04-01", "2024-04-04", "eager").await;
        let plan = eventually(
            Duration::from_secs(30),
            "one partition to be running and two queued",
            || async {
                let (queued, running, plan) =
                    under_way(&app, "station_avg", "2024-04-01", "2024-04-04").await;
                assert!(
                    queued + running == 3,
                    "three partitions are under way: {plan}"
                );
                (running == 1).then_some(plan)
            },
        )
        .await;
        assert_eq!(plan["analyses"][0]["already_queued"], 2, "{plan}");
        assert_eq!(plan["partitions_total"], 3, "{plan}");
        let (queued, running, plan) =
            under_way(&app, "station_avg", "2024-04-04", "2024-04-07").await;
        assert_eq!(
            (queued, running),
            (0, 0),
            "nothing outside the rewind: {plan}"
        );

        // Let go, the rewind finishes and nothing is under way.
        drop(stopped);
        invalidation_reaches(&app, &second, "done", Duration::from_secs(60)).await;
        let (queued, running, plan) =
            under_way(&app, "station_avg", "2024-04-01", "2024-04-07").await;
        assert_eq!((queued, running), (0, 0), "{plan}");
        drop(worker);
    }
);
