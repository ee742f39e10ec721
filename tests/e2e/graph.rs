//! Analyses as a graph: several inputs, upstream analyses, lookback windows, and
//! staleness and invalidations that follow the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;
use crate::ws::{SOON, Ws};

/// Generation records over `days` days from 2024-11-01: three stations, readings at
/// uneven minutes, some hours skipped.
fn generation_days(days: i64) -> Vec<Value> {
    let start = chrono::NaiveDate::from_ymd_opt(2024, 11, 1).unwrap();
    let mut out = Vec::new();
    for d in 0..days {
        let day = start + chrono::Duration::days(d);
        for hour in 0..24 {
            for (s, station) in ["s1", "s2", "s3"].iter().enumerate() {
                if (hour + s as u32 * 5) % 7 == 3 {
                    continue;
                }
                for minute in [5, 35] {
                    let v = 100.0
                        + (d * 24 + hour as i64) as f64 * 1.5
                        + s as f64 * 10.0
                        + minute as f64 / 10.0;
                    out.push(generation(
                        station,
                        &format!("{day}T{hour:02}:{minute:02}:00Z"),
                        json!(v),
                    ));
                }
            }
        }
    }
    out
}

async fn ingest_ok(app: &TestApp, records: &[Value]) {
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

both_backends!(
    the_moving_average_is_right_at_every_hour_day_edges_included,
    |d: Deployment| async move {
        let app = d.start().await;
        let records = generation_days(3);
        ingest_ok(&app, &records).await;
        // Independently: the mean of each station's hour, then of its hours h-2..h.
        let mut hourly: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
        for r in &records {
            let hour = r["created"].as_str().unwrap()[..13].to_string();
            let entry = hourly
                .entry((r["source"].as_str().unwrap().to_string(), hour))
                .or_default();
            entry.0 += r["data"]["output_mw"].as_f64().unwrap();
            entry.1 += 1.0;
        }
        let hour_of = |text: &str| {
            chrono::NaiveDateTime::parse_from_str(&format!("{text}:00:00"), "%Y-%m-%dT%H:%M:%S")
                .unwrap()
        };
        let body = app
            .annotations("hourly_moving_avg", "2024-11-01", "2024-11-04", 30)
            .await;
        let mut compared = 0;
        for (day, part) in partitions_of(&body) {
            assert_eq!(part["status"], "ready", "{day}: {part}");
            for row in part["rows"].as_array().unwrap() {
                let source = row["source"].as_str().unwrap().to_string();
                let hour = row["hour"].as_str().unwrap()[..13].to_string();
                let h = hour_of(&hour);
                let window: Vec<f64> = (0..3)
                    .filter_map(|back| {
                        let key = (h - chrono::Duration::hours(back))
                            .format("%Y-%m-%dT%H")
                            .to_string();
                        hourly.get(&(source.clone(), key)).map(|(sum, n)| sum / n)
                    })
                    .collect();
                let expected = window.iter().sum::<f64>() / window.len() as f64;
                assert!(
                    close(row["moving_avg_mw"].as_f64(), Some(expected)),
                    "{source} {hour}: {} != {expected} (window {window:?})",
                    row["moving_avg_mw"]
                );
                compared += 1;
            }
        }
        assert_eq!(
            compared,
            hourly.len(),
            "one row per station and hour with readings"
        );
    }
);

/// Generation of stations in regions, and demand of regions, over one day.
fn grid_day(day: &str) -> (Vec<Value>, Vec<Value>) {
    let mut generation_records = Vec::new();
    let mut demand_records = Vec::new();
    for hour in 0..24 {
        for (station, region, mw) in [
            ("n1", "north", 300.0),
            ("n2", "north", 150.0),
            ("s1", "south", 500.0),
        ] {
            generation_records.push(json!({"kind": "generation", "source": station, "created": format!("{day}T{hour:02}:10:00Z"),
                "data": {"output_mw": mw + hour as f64, "region": region}}));
        }
        for (region, mw) in [("north", 400.0), ("south", 420.0)] {
            for minute in [0, 30] {
                demand_records.push(json!({"kind": "demand", "source": region, "created": format!("{day}T{hour:02}:{minute:02}:00Z"),
                    "data": {"demand_mw": mw + (hour * 2 + minute / 30) as f64}}));
            }
        }
    }
    (generation_records, demand_records)
}

const RESERVE_SQL: &str = "WITH supply AS ( \
    SELECT region, STRFTIME(created, '%Y-%m-%dT%H') AS hour, SUM(output_mw) AS supply_mw \
    FROM generation GROUP BY region, STRFTIME(created, '%Y-%m-%dT%H')), \
  need AS ( \
    SELECT source AS region, STRFTIME(created, '%Y-%m-%dT%H') AS hour, AVG(demand_mw) AS demand_mw \
    FROM demand GROUP BY source, STRFTIME(created, '%Y-%m-%dT%H')) \
  SELECT supply.region, supply.hour, supply_mw, demand_mw, supply_mw / demand_mw - 1.0 AS reserve_margin \
  FROM supply JOIN need ON supply.region = need.region AND supply.hour = need.hour \
  ORDER BY supply.region, supply.hour";

both_backends!(
    a_two_kind_sql_analysis_equals_an_independent_join,
    |d: Deployment| async move {
        let app = d.start().await;
        let (generation_records, demand_records) = grid_day("2024-11-10");
        ingest_ok(&app, &generation_records).await;
        ingest_ok(&app, &demand_records).await;
        let (status, info) = app
            .put(
                "/v1/analyses/reserve_margin",
                ADMIN,
                &json!({"inputs": [{"kind": "generation"}, {"kind": "demand"}], "sql": RESERVE_SQL}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        assert_eq!(
            info["inputs"],
            json!([{"kind": "generation"}, {"kind": "demand"}]),
            "{info}"
        );
        assert_eq!(info["kind"], "generation", "{info}");
        let body = app
            .annotations("reserve_margin", "2024-11-10", "2024-11-11", 30)
            .await;
        let part = partitions_of(&body)["2024-11-10"].clone();
        assert_eq!(part["status"], "ready", "{body}");
        assert_equals_the_join(&part, &generation_records, &demand_records);
        let loaded = app.metric("scholia_build_frames_loaded_total").await;
        assert_eq!(loaded, 2.0, "the first build reads each kind's frame once");

        // Late records into both kinds: each frame is caught up with its own new
        // record, not read again, and the join stays exact.
        let late_generation = json!({"kind": "generation", "source": "n1", "created": "2024-11-10T05:40:00Z",
            "data": {"output_mw": 77.0, "region": "north"}});
        let late_demand = json!({"kind": "demand", "source": "south", "created": "2024-11-10T05:45:00Z",
            "data": {"demand_mw": 999.0}});
        ingest_ok(&app, &[late_generation.clone(), late_demand.clone()]).await;
        let mut generation_records = generation_records;
        let mut demand_records = demand_records;
        generation_records.push(late_generation);
        demand_records.push(late_demand);
        let part = eventually(
            Duration::from_secs(30),
            "reserve_margin rebuilt with the late records",
            || async {
                let body = app
                    .annotations("reserve_margin", "2024-11-10", "2024-11-11", 0)
                    .await;
                let part = partitions_of(&body)["2024-11-10"].clone();
                (part["status"] == "ready" && part["generation"].as_i64() >= Some(2))
                    .then_some(part)
            },
        )
        .await;
        assert_equals_the_join(&part, &generation_records, &demand_records);
        assert_eq!(
            app.metric("scholia_build_frames_loaded_total").await,
            loaded,
            "no frame read again"
        );
        assert!(
            app.metric("scholia_build_frames_extended_total").await >= 2.0,
            "both kinds' frames extended"
        );
    }
);

/// `part` (a reserve_margin partition) equals the join computed here from what was sent.
fn assert_equals_the_join(part: &Value, generation_records: &[Value], demand_records: &[Value]) {
    let mut supply: BTreeMap<(String, String), f64> = BTreeMap::new();
    for r in generation_records {
        let key = (
            r["data"]["region"].as_str().unwrap().to_string(),
            r["created"].as_str().unwrap()[..13].to_string(),
        );
        *supply.entry(key).or_default() += r["data"]["output_mw"].as_f64().unwrap();
    }
    let mut need: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for r in demand_records {
        let key = (
            r["source"].as_str().unwrap().to_string(),
            r["created"].as_str().unwrap()[..13].to_string(),
        );
        let e = need.entry(key).or_default();
        e.0 += r["data"]["demand_mw"].as_f64().unwrap();
        e.1 += 1.0;
    }
    let rows = part["rows"].as_array().unwrap();
    assert_eq!(rows.len(), supply.len(), "{part}");
    for row in rows {
        let key = (
            row["region"].as_str().unwrap().to_string(),
            row["hour"].as_str().unwrap().to_string(),
        );
        let s = supply[&key];
        let (sum, n) = need[&key];
        assert!(close(row["supply_mw"].as_f64(), Some(s)), "{row}");
        assert!(
            close(row["reserve_margin"].as_f64(), Some(s / (sum / n) - 1.0)),
            "{row}"
        );
    }
}

/// Count `analysis.completed` events per (analysis, partition).
async fn completions(app: &TestApp) -> BTreeMap<(String, String), Vec<i64>> {
    let mut out: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for event in log_after(app, 0).await {
        if event["type"] == "analysis.completed" {
            out.entry((
                event["analysis"].as_str().unwrap().to_string(),
                event["partition"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .push(event["seq"].as_i64().unwrap());
        }
    }
    out
}

async fn register_flag(app: &TestApp) {
    let (status, info) = app
        .put(
            "/v1/analyses/daily_flag",
            ADMIN,
            &json!({"inputs": [{"analysis": "daily_avg"}], "sql": "SELECT source, partition, avg_mw > 100.0 AS high, readings FROM daily_avg ORDER BY source"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{info}");
}

both_backends!(
    a_late_upstream_record_rebuilds_the_upstream_then_the_downstream_once_each,
    |d: Deployment| async move {
        let app = d.start().await;
        let day = "2024-11-15";
        ingest_ok(
            &app,
            &[
                generation("a", &format!("{day}T01:00:00Z"), json!(50.0)),
                generation("b", &format!("{day}T02:00:00Z"), json!(150.0)),
            ],
        )
        .await;
        register_flag(&app).await;
        // Reading the downstream builds its upstream first.
        let body = app.annotations("daily_flag", day, "2024-11-16", 30).await;
        let part = partitions_of(&body)[day].clone();
        assert_eq!(part["status"], "ready", "{body}");
        assert_eq!(
            part["rows"],
            json!([{"source": "a", "partition": day, "high": false, "readings": 1}, {"source": "b", "partition": day, "high": true, "readings": 1}])
        );
        let (_, info) = app.get("/v1/analyses/daily_avg", ADMIN).await;
        assert_eq!(info["downstream"], json!(["daily_flag"]), "{info}");

        let mut ws = Ws::connect(&app, ADMIN).await;
        ws.subscribe("f", "daily_flag", day, "2024-11-16").await;
        ws.until(SOON, "ready", |m| m["type"] == "ready").await;
        ingest_ok(
            &app,
            &[generation("a", &format!("{day}T03:00:00Z"), json!(250.0))],
        )
        .await;
        let (pushed, _) = ws
            .until(SOON, "the rebuilt downstream day", |m| {
                m["type"] == "partition" && m["generation"] == 2
            })
            .await;
        assert_eq!(
            pushed["rows"][0],
            json!({"source": "a", "partition": day, "high": true, "readings": 2}),
            "{pushed}"
        );
        // Settled: each level rebuilt exactly once, upstream first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let done = completions(&app).await;
        let upstream = &done[&("daily_avg".to_string(), day.to_string())];
        let downstream = &done[&("daily_flag".to_string(), day.to_string())];
        assert_eq!((upstream.len(), downstream.len()), (2, 2), "{done:?}");
        assert!(upstream[1] < downstream[1], "{done:?}");
    }
);

both_backends!(
    a_cascading_invalidation_rebuilds_upstream_and_downstream_once_each_in_order,
    |d: Deployment| async move {
        let app = d.start().await;
        let start = chrono::NaiveDate::from_ymd_opt(2024, 12, 1).unwrap();
        let records: Vec<Value> = (0..30)
            .flat_map(|i| {
                let day = start + chrono::Duration::days(i);
                [generation(
                    "c",
                    &format!("{day}T05:00:00Z"),
                    json!(i as f64 * 10.0),
                )]
            })
            .collect();
        ingest_ok(&app, &records).await;
        register_flag(&app).await;
        let body = app
            .annotations("daily_flag", "2024-12-01", "2024-12-31", 60)
            .await;
        assert!(
            partitions_of(&body)
                .values()
                .all(|p| p["status"] == "ready"),
            "{body}"
        );
        let before = completions(&app).await;

        let id = invalidate(&app, "daily_avg", "2024-12-01", "2024-12-31", "eager").await;
        let progress = invalidation_reaches(&app, &id, "done", Duration::from_secs(60)).await;
        assert_eq!(progress["partitions_total"], 60, "{progress}");
        assert_eq!(progress["partitions_done"], 60, "{progress}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = completions(&app).await;
        for i in 0..30 {
            let day = (start + chrono::Duration::days(i)).to_string();
            let up = &after[&("daily_avg".to_string(), day.clone())];
            let down = &after[&("daily_flag".to_string(), day.clone())];
            let up_before = before[&("daily_avg".to_string(), day.clone())].len();
            let down_before = before[&("daily_flag".to_string(), day.clone())].len();
            assert_eq!(
                (up.len() - up_before, down.len() - down_before),
                (1, 1),
                "{day}: {up:?} {down:?}"
            );
            assert!(
                up.last() < down.last(),
                "{day}: upstream first: {up:?} {down:?}"
            );
        }

        // Cancel stops the whole plan, downstream included.
        let id = invalidate(&app, "daily_avg", "2024-12-01", "2024-12-31", "lazy").await;
        let (status, cancelled) = app
            .send_json(
                reqwest::Method::DELETE,
                &format!("/v1/invalidations/{id}"),
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{cancelled}");
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        assert_eq!(cancelled["partitions_cancelled"], 60, "{cancelled}");
    }
);

both_backends!(
    the_graph_refuses_cycles_and_unknown_inputs_and_lineage_follows_it,
    |d: Deployment| async move {
        let app = d.start().await;
        register_flag(&app).await;
        let (status, info) = app
            .put(
                "/v1/analyses/flag_count",
                ADMIN,
                &json!({"inputs": [{"analysis": "daily_flag"}], "sql": "SELECT COUNT(*) AS flagged FROM daily_flag WHERE high"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        // daily_flag reading flag_count would close a cycle.
        let (status, problem) = app
            .put(
                "/v1/analyses/daily_flag",
                ADMIN,
                &json!({"inputs": [{"analysis": "daily_avg"}, {"analysis": "flag_count"}], "sql": "SELECT * FROM daily_avg"}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("cycle") && detail.contains("daily_flag → flag_count → daily_flag"),
            "{detail}"
        );
        let (status, problem) = app
            .put(
                "/v1/analyses/orphan",
                ADMIN,
                &json!({"inputs": [{"analysis": "no_such_analysis"}], "sql": "SELECT 1 AS one"}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("no_such_analysis"),
            "{problem}"
        );

        // A record, through two levels.
        let traced = generation("z", "2024-11-20T12:00:00Z", json!(500.0));
        let id = traced["data_id"].as_str().unwrap().to_string();
        ingest_ok(&app, &[traced]).await;
        let body = app
            .annotations("flag_count", "2024-11-20", "2024-11-21", 30)
            .await;
        assert_eq!(
            partitions_of(&body)["2024-11-20"]["rows"],
            json!([{"flagged": 1}]),
            "{body}"
        );
        let lineage = eventually(
            Duration::from_secs(10),
            "lineage through two levels",
            || async {
                let (status, body) = app.get(&format!("/v1/lineage/{id}"), ADMIN).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let listed: BTreeSet<(String, Option<String>)> = body["annotations"]
                    .as_array()?
                    .iter()
                    .map(|a| {
                        (
                            a["analysis"].as_str().unwrap().to_string(),
                            a["via"].as_str().map(str::to_string),
                        )
                    })
                    .collect();
                listed
                    .contains(&("flag_count".to_string(), Some("daily_flag".to_string())))
                    .then_some(listed)
            },
        )
        .await;
        assert!(
            lineage.contains(&("daily_avg".to_string(), None)),
            "{lineage:?}"
        );
        assert!(
            lineage.contains(&("daily_flag".to_string(), Some("daily_avg".to_string()))),
            "{lineage:?}"
        );

        // A new version upstream is a new version downstream.
        let (_, before) = app.get("/v1/analyses/flag_count", ADMIN).await;
        let (status, _) = app
            .put(
                "/v1/analyses/daily_flag",
                ADMIN,
                &json!({"inputs": [{"analysis": "daily_avg"}], "sql": "SELECT source, partition, avg_mw > 200.0 AS high FROM daily_avg"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (_, after) = app.get("/v1/analyses/flag_count", ADMIN).await;
        assert_eq!(
            after["version"],
            before["version"].as_i64().unwrap() + 1,
            "{after}"
        );
        let body = app
            .annotations("flag_count", "2024-11-20", "2024-11-21", 0)
            .await;
        assert_eq!(
            partitions_of(&body)["2024-11-20"]["status"],
            "stale",
            "{body}"
        );
    }
);

/// Run the real `scholia` command line against `app`; returns its stdout, after checking
/// that it succeeded.
async fn scholia_cli(app: &TestApp, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let base = app.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_scholia"))
            .args(&args)
            .env("SCHOLIA_URL", &base)
            .env("SCHOLIA_TOKEN", ADMIN)
            .output()
            .expect("running the scholia command line")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{}: {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

both_backends!(
    scholia_lineage_prints_the_upstream_analysis_each_annotation_was_built_through,
    |d: Deployment| async move {
        let app = d.start().await;
        register_flag(&app).await;
        let traced = generation("y", "2024-11-20T08:00:00Z", json!(120.0));
        let id = traced["data_id"].as_str().unwrap().to_string();
        ingest_ok(&app, &[traced]).await;
        let body = app
            .annotations("daily_flag", "2024-11-20", "2024-11-21", 30)
            .await;
        assert_eq!(
            partitions_of(&body)["2024-11-20"]["status"],
            "ready",
            "{body}"
        );
        let stdout = eventually(
            Duration::from_secs(10),
            "scholia lineage to list the downstream annotation",
            || async {
                let stdout = scholia_cli(&app, &["lineage", &id]).await;
                stdout
                    .lines()
                    .any(|l| l.trim_start().starts_with("daily_flag "))
                    .then_some(stdout)
            },
        )
        .await;
        let line_of = |analysis: &str| {
            stdout
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{analysis} ")))
                .unwrap_or_else(|| panic!("no {analysis} line in:\n{stdout}"))
                .to_string()
        };
        let flag = line_of("daily_flag");
        assert!(
            flag.contains("partition 2024-11-20 generation 1") && flag.ends_with(" via daily_avg"),
            "{stdout}"
        );
        let avg = line_of("daily_avg");
        assert!(
            avg.contains("partition 2024-11-20") && !avg.contains(" via "),
            "built from the record itself: {stdout}"
        );
    }
);

both_backends!(
    invalidating_with_no_cascade_leaves_the_downstream_out_of_the_plan,
    |d: Deployment| async move {
        let app = d.start().await;
        let records: Vec<Value> = ["2024-11-01", "2024-11-02", "2024-11-03"]
            .iter()
            .enumerate()
            .map(|(i, day)| {
                generation(
                    "c",
                    &format!("{day}T06:00:00Z"),
                    json!(90.0 + i as f64 * 10.0),
                )
            })
            .collect();
        ingest_ok(&app, &records).await;
        register_flag(&app).await;
        let body = app
            .annotations("daily_flag", "2024-11-01", "2024-11-04", 30)
            .await;
        assert!(
            partitions_of(&body)
                .values()
                .all(|p| p["status"] == "ready"),
            "{body}"
        );
        let range = ["--from", "2024-11-01", "--to", "2024-11-04"];
        let args = |extra: &[&'static str]| {
            let mut args = vec!["invalidate", "daily_avg"];
            args.extend(range);
            args.extend(extra);
            args
        };

        // The plans, side by side.
        let alone = scholia_cli(&app, &args(&["--dry-run", "--no-cascade"])).await;
        assert!(
            alone.contains("daily_avg (version 1): 3 partitions"),
            "{alone}"
        );
        assert!(!alone.contains("daily_flag"), "{alone}");
        assert!(alone.contains("Would rebuild 3 partitions"), "{alone}");
        let cascading = scholia_cli(&app, &args(&["--dry-run"])).await;
        assert!(
            cascading.contains("daily_flag (version 1): 3 partitions"),
            "{cascading}"
        );
        assert!(
            cascading.contains("Would rebuild 6 partitions"),
            "{cascading}"
        );

        // And done: the command line follows each to its end.
        let id_of = |stdout: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("Invalidation "))
                .unwrap_or_else(|| panic!("no invalidation id in {stdout}"))
                .trim()
                .to_string()
        };
        for (extra, total) in [(&["--no-cascade"][..], 3), (&[][..], 6)] {
            let stdout = scholia_cli(&app, &args(extra)).await;
            assert!(
                stdout.contains(&format!("Rebuilt {total} partitions.")),
                "{extra:?}: {stdout}"
            );
            let (status, progress) = app
                .get(&format!("/v1/invalidations/{}", id_of(&stdout)), ADMIN)
                .await;
            assert_eq!(status, StatusCode::OK, "{progress}");
            assert_eq!(progress["partitions_total"], total, "{extra:?}: {progress}");
            assert_eq!(progress["partitions_done"], total, "{extra:?}: {progress}");
        }
    }
);

both_backends!(
    a_daily_analysis_over_an_hourly_one_reads_its_day_s_24_hours_with_their_keys,
    |d: Deployment| async move {
        let app = d.start().await;
        // Every hour of the day, and the hours either side of it, which it must not read.
        let start = chrono::NaiveDate::from_ymd_opt(2024, 11, 20)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let mut records = Vec::new();
        for h in -3..27 {
            let hour = start + chrono::Duration::hours(h);
            for (minute, source) in [(5, "p"), (40, "p"), (20, "q")] {
                let at = hour + chrono::Duration::minutes(minute);
                records.push(generation(
                    source,
                    &at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    json!(10.0 * h as f64 + minute as f64),
                ));
            }
        }
        ingest_ok(&app, &records).await;
        let (status, info) = app
            .put(
                "/v1/analyses/hourly_total",
                ADMIN,
                &json!({"kind": "generation", "partition": "1h",
                    "sql": "SELECT source, COUNT(*) AS readings, SUM(output_mw) AS total_mw FROM events GROUP BY source ORDER BY source"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        let (status, info) = app
            .put(
                "/v1/analyses/daily_of_hours",
                ADMIN,
                &json!({"inputs": [{"analysis": "hourly_total"}], "partition": "1d",
                    "sql": "SELECT partition, source, readings, total_mw FROM hourly_total ORDER BY partition, source"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");

        let body = app
            .annotations("daily_of_hours", "2024-11-20", "2024-11-21", 60)
            .await;
        let part = partitions_of(&body)["2024-11-20"].clone();
        assert_eq!(part["status"], "ready", "{body}");
        // Computed here: per hour key and source, from what was sent on that day.
        let mut expected: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
        for r in &records {
            let created = r["created"].as_str().unwrap();
            if !created.starts_with("2024-11-20") {
                continue;
            }
            let e = expected
                .entry((
                    created[..13].to_string(),
                    r["source"].as_str().unwrap().to_string(),
                ))
                .or_default();
            e.0 += 1;
            e.1 += r["data"]["output_mw"].as_f64().unwrap();
        }
        let rows = part["rows"].as_array().unwrap();
        let keys: BTreeSet<&str> = rows
            .iter()
            .map(|r| r["partition"].as_str().unwrap())
            .collect();
        let hours: BTreeSet<String> = (0..24).map(|h| format!("2024-11-20T{h:02}")).collect();
        assert_eq!(
            keys,
            hours.iter().map(String::as_str).collect(),
            "the day's 24 upstream partitions, by key: {part}"
        );
        assert_eq!(rows.len(), expected.len(), "{part}");
        for row in rows {
            let key = (
                row["partition"].as_str().unwrap().to_string(),
                row["source"].as_str().unwrap().to_string(),
            );
            let (readings, total) = expected[&key];
            assert_eq!(row["readings"], readings, "{row}");
            assert!(close(row["total_mw"].as_f64(), Some(total)), "{row}");
        }
    }
);

both_backends!(
    a_late_record_before_midnight_rebuilds_its_day_and_the_next_day_that_looks_back_at_it,
    |d: Deployment| async move {
        let app = d.start().await;
        let days = ["2024-11-25", "2024-11-26", "2024-11-27"];
        let mut records = Vec::new();
        for (d, day) in days.iter().enumerate() {
            for hour in 0..24 {
                records.push(generation(
                    "m",
                    &format!("{day}T{hour:02}:10:00Z"),
                    json!(200.0 + (d * 24 + hour) as f64),
                ));
            }
        }
        ingest_ok(&app, &records).await;
        let before = partitions_of(
            &app.annotations("hourly_moving_avg", "2024-11-25", "2024-11-28", 30)
                .await,
        );
        assert!(
            before.values().all(|p| p["status"] == "ready"),
            "{before:?}"
        );
        let row_at = |part: &Value, hour: &str| {
            part["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["hour"].as_str().unwrap().starts_with(hour))
                .unwrap_or_else(|| panic!("no row for {hour} in {part}"))
                .clone()
        };
        // 00:00 averages 22:00 and 23:00 of the day before with itself: (222 + 223 + 224) / 3.
        assert!(
            close(
                row_at(&before["2024-11-26"], "2024-11-26T00")["moving_avg_mw"].as_f64(),
                Some(223.0)
            ),
            "{}",
            before["2024-11-26"]
        );

        // Late, at 23:40 of the first day: the 23:00 hour's mean becomes (223 + 323) / 2.
        ingest_ok(
            &app,
            &[generation("m", "2024-11-25T23:40:00Z", json!(323.0))],
        )
        .await;
        let g =
            |parts: &BTreeMap<String, Value>, day: &str| parts[day]["generation"].as_i64().unwrap();
        let after = eventually(
            Duration::from_secs(20),
            "the late record's day and the day after to be rebuilt",
            || async {
                let after = partitions_of(
                    &app.annotations("hourly_moving_avg", "2024-11-25", "2024-11-28", 0)
                        .await,
                );
                (days[..2].iter().all(|day| {
                    after[*day]["status"] == "ready" && g(&after, day) > g(&before, day)
                }))
                .then_some(after)
            },
        )
        .await;
        let late_hour = (223.0 + 323.0) / 2.0;
        for (day, hour, expected) in [
            (
                "2024-11-25",
                "2024-11-25T23",
                (221.0 + 222.0 + late_hour) / 3.0,
            ),
            (
                "2024-11-26",
                "2024-11-26T00",
                (222.0 + late_hour + 224.0) / 3.0,
            ),
            (
                "2024-11-26",
                "2024-11-26T01",
                (late_hour + 224.0 + 225.0) / 3.0,
            ),
            ("2024-11-26", "2024-11-26T02", (224.0 + 225.0 + 226.0) / 3.0),
        ] {
            let row = row_at(&after[day], hour);
            assert!(
                close(row["moving_avg_mw"].as_f64(), Some(expected)),
                "{hour}: {row}, expected {expected}"
            );
        }
        // Settled: the late record's day and the next once each, the third day untouched.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let settled = partitions_of(
            &app.annotations("hourly_moving_avg", "2024-11-25", "2024-11-28", 0)
                .await,
        );
        for day in &days[..2] {
            assert_eq!(
                g(&settled, day),
                g(&before, day) + 1,
                "{day}: {}",
                settled[*day]
            );
        }
        assert_eq!(
            settled["2024-11-27"]["computed_at"], before["2024-11-27"]["computed_at"],
            "the third day does not read the first"
        );
        assert_eq!(g(&settled, "2024-11-27"), g(&before, "2024-11-27"));
    }
);

/// One generation record a day from `start`, for `days` days.
fn one_a_day(start: chrono::NaiveDate, days: i64) -> Vec<Value> {
    (0..days)
        .map(|i| {
            let day = start + chrono::Duration::days(i);
            generation("c", &format!("{day}T05:00:00Z"), json!(i as f64))
        })
        .collect()
}

/// Every `analysis.started` event after `after`, as (analysis, partition).
async fn started_after(app: &TestApp, after: i64) -> Vec<(String, String)> {
    log_after(app, after)
        .await
        .into_iter()
        .filter(|e| e["type"] == "analysis.started")
        .map(|e| {
            (
                e["analysis"].as_str().unwrap().to_string(),
                e["partition"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

both_backends!(
    cancelling_an_eager_cascade_mid_run_stops_both_levels_with_the_counts_right,
    |d: Deployment| async move {
        let app = d.start().await;
        let start = chrono::NaiveDate::from_ymd_opt(2024, 8, 1).unwrap();
        ingest_ok(&app, &one_a_day(start, 90)).await;
        register_flag(&app).await;
        let id = invalidate(&app, "daily_avg", "2024-08-01", "2024-10-30", "eager").await;
        let path = format!("/v1/invalidations/{id}");
        let under_way = eventually(
            Duration::from_secs(60),
            "the cascade to have rebuilt a few partitions",
            || async {
                let (_, progress) = app.get(&path, ADMIN).await;
                (progress["partitions_done"].as_i64()? >= 2).then_some(progress)
            },
        )
        .await;
        assert_eq!(under_way["partitions_total"], 180, "{under_way}");

        let (status, cancelled) = app
            .send_json(reqwest::Method::DELETE, &path, ADMIN, &json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{cancelled}");
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        let at_cancel = log_head(&app).await;
        let done = cancelled["partitions_done"].as_i64().unwrap();
        assert!(
            done < 180 && cancelled["partitions_cancelled"].as_i64().unwrap() > 0,
            "cancelled mid-run: {cancelled}"
        );

        // Builds already under way may finish (and the downstream days of upstream days
        // they rebuilt follow); nothing else of the plan starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let finishing = started_after(&app, at_cancel).await;
        assert!(
            finishing.len() <= 4,
            "{} builds started after the cancel: {finishing:?}",
            finishing.len()
        );
        let quiet_from = log_head(&app).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = started_after(&app, quiet_from).await;
        assert!(
            later.is_empty(),
            "builds started after the cancel settled: {later:?}"
        );

        let (_, settled) = app.get(&path, ADMIN).await;
        assert_eq!(settled["state"], "cancelled", "{settled}");
        assert_eq!(settled["partitions_failed"], 0, "{settled}");
        let count = |k: &str| settled[k].as_i64().unwrap();
        assert_eq!(
            count("partitions_done") + count("partitions_failed") + count("partitions_cancelled"),
            count("partitions_total"),
            "{settled}"
        );
        assert_eq!(count("partitions_total"), 180, "{settled}");
        assert!(count("partitions_cancelled") > 0, "{settled}");
    }
);

both_backends!(
    a_burst_into_an_upstream_day_costs_a_handful_of_rebuilds_at_each_level,
    |d: Deployment| async move {
        let app = d.start().await;
        let day = "2024-11-12";
        ingest_ok(
            &app,
            &[
                generation("a", &format!("{day}T01:00:00Z"), json!(50.0)),
                generation("a", &format!("{day}T02:00:00Z"), json!(70.0)),
            ],
        )
        .await;
        register_flag(&app).await;
        let generations = |analysis: &'static str| {
            let app = &app;
            async move {
                let body = app.annotations(analysis, day, "2024-11-13", 0).await;
                partitions_of(&body)[day].clone()
            }
        };
        let body = app.annotations("daily_flag", day, "2024-11-13", 30).await;
        assert_eq!(partitions_of(&body)[day]["status"], "ready", "{body}");
        let up0 = generations("daily_avg").await["generation"]
            .as_i64()
            .unwrap();
        let down0 = generations("daily_flag").await["generation"]
            .as_i64()
            .unwrap();

        // 100 posts of one record each, eight at a time (within the service's limit of
        // batches in flight).
        use futures::StreamExt;
        let posts = futures::stream::iter(0..100)
            .map(|n| {
                let record = generation(
                    "b",
                    &format!("{day}T{:02}:{:02}:00Z", n % 24, n % 60),
                    json!(n as f64),
                );
                let app = &app;
                async move { app.ingest(ADMIN, &[record]).await }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        for (status, body) in posts {
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["accepted"], 1, "{body}");
        }
        eventually(
            Duration::from_secs(30),
            "the burst to reach the downstream day",
            || async {
                let part = generations("daily_flag").await;
                let all = part["rows"]
                    .as_array()?
                    .iter()
                    .any(|r| r["source"] == "b" && r["readings"] == 100);
                (part["status"] == "ready" && all).then_some(())
            },
        )
        .await;
        // Settled, then counted.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let up = generations("daily_avg").await;
        let down = generations("daily_flag").await;
        assert_eq!(
            (&up["status"], &down["status"]),
            (&json!("ready"), &json!("ready"))
        );
        let up_rebuilds = up["generation"].as_i64().unwrap() - up0;
        let down_rebuilds = down["generation"].as_i64().unwrap() - down0;
        eprintln!(
            "100 single-record posts: {up_rebuilds} upstream and {down_rebuilds} downstream rebuilds"
        );
        assert!(
            (1..=10).contains(&up_rebuilds) && (1..=10).contains(&down_rebuilds),
            "100 posts cost {up_rebuilds} upstream and {down_rebuilds} downstream rebuilds, not a handful"
        );
        let b = up["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["source"] == "b")
            .cloned()
            .unwrap();
        assert!(close(b["avg_mw"].as_f64(), Some(49.5)), "{b}");
    }
);

/// POST an eager invalidation of `analysis` alone (no cascade) and return its id.
async fn invalidate_alone(app: &TestApp, analysis: &str, from: &str, to: &str) -> String {
    let (status, body) = app
        .post(
            "/v1/invalidations",
            ADMIN,
            &json!({"analysis": analysis, "from": from, "to": to, "reason": "test", "rebuild": "eager", "cascade": false}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["id"].as_str().unwrap().to_string()
}

both_backends!(
    a_live_read_of_a_downstream_day_pulls_its_upstream_ahead_of_bulk_work,
    |d: Deployment| async move {
        let app = d.start().await;
        let start = chrono::NaiveDate::from_ymd_opt(2023, 1, 1).unwrap();
        let days = 400;
        ingest_ok(&app, &one_a_day(start, days)).await;
        register_flag(&app).await;
        let last = start + chrono::Duration::days(days - 1);
        let after_last = last + chrono::Duration::days(1);
        // Bulk work over every upstream day; the last day's queued after all the others,
        // so that bulk work reaches it last.
        let bulk = invalidate_alone(&app, "daily_avg", &start.to_string(), &last.to_string()).await;
        let tail = invalidate_alone(
            &app,
            "daily_avg",
            &last.to_string(),
            &after_last.to_string(),
        )
        .await;

        // Someone reads the downstream of that last day.
        let body = app
            .annotations("daily_flag", &last.to_string(), &after_last.to_string(), 60)
            .await;
        let (_, progress) = app.get(&format!("/v1/invalidations/{bulk}"), ADMIN).await;
        let part = partitions_of(&body)[&last.to_string()].clone();
        assert_eq!(part["status"], "ready", "{body}");
        assert_eq!(
            part["rows"],
            json!([{"source": "c", "partition": last.to_string(), "high": true, "readings": 1}]),
            "{part}"
        );
        assert_eq!(progress["partitions_total"], days - 1, "{progress}");
        let done = progress["partitions_done"].as_i64().unwrap();
        assert!(
            done < (days - 1) / 2,
            "the live read waited for {done} of {} bulk builds: {progress}",
            days - 1
        );
        let (_, tail) = app.get(&format!("/v1/invalidations/{tail}"), ADMIN).await;
        assert_eq!(tail["state"], "done", "{tail}");
        invalidation_reaches(&app, &bulk, "done", Duration::from_secs(120)).await;
    }
);

both_backends!(
    a_live_read_of_a_day_queued_behind_bulk_work_moves_it_ahead,
    |d: Deployment| async move {
        let app = d.start().await;
        let start = chrono::NaiveDate::from_ymd_opt(2023, 1, 1).unwrap();
        let days = 400;
        ingest_ok(&app, &one_a_day(start, days)).await;
        let last = start + chrono::Duration::days(days - 1);
        let after_last = last + chrono::Duration::days(1);
        // One bulk rewind over every day: the last day queued as bulk work, behind the rest.
        let bulk = invalidate_alone(
            &app,
            "daily_avg",
            &start.to_string(),
            &after_last.to_string(),
        )
        .await;

        // Someone reads that last day and waits: it goes ahead of the bulk work.
        let body = app
            .annotations("daily_avg", &last.to_string(), &after_last.to_string(), 60)
            .await;
        let (_, progress) = app.get(&format!("/v1/invalidations/{bulk}"), ADMIN).await;
        let part = partitions_of(&body)[&last.to_string()].clone();
        assert_eq!(part["status"], "ready", "{body}");
        assert_eq!(part["rows"][0]["readings"], 1, "{part}");
        assert_eq!(progress["partitions_total"], days, "{progress}");
        let done = progress["partitions_done"].as_i64().unwrap();
        assert!(
            done < days / 2,
            "the live read waited for {done} of {days} bulk builds: {progress}"
        );
        invalidation_reaches(&app, &bulk, "done", Duration::from_secs(120)).await;
    }
);

both_backends!(
    the_demo_registers_its_join_and_its_downstream_analysis_and_both_build,
    |d: Deployment| async move {
        let app = d.start_demo().await;
        // The demo sends three days of history, every ten minutes, then registers its SQL
        // analyses; the two whole days before today are complete.
        for name in ["reserve_margin", "high_output_days"] {
            eventually(
                Duration::from_secs(60),
                &format!("the demo to register {name}"),
                || async {
                    let (status, _) = app.get(&format!("/v1/analyses/{name}"), ADMIN).await;
                    (status == StatusCode::OK).then_some(())
                },
            )
            .await;
        }
        let today = chrono::Utc::now().date_naive();
        let from = (today - chrono::Duration::days(2)).to_string();
        let to = today.to_string();

        // The join: three regions, each hour of the day, supply against demand.
        let margin = app.annotations("reserve_margin", &from, &to, 60).await;
        let margins = partitions_of(&margin);
        assert_eq!(margins.len(), 2, "{margin}");
        for (day, part) in &margins {
            assert_eq!(part["status"], "ready", "{day}: {part}");
            let rows = part["rows"].as_array().unwrap();
            assert_eq!(rows.len(), 3 * 24, "{day}: {part}");
            for row in rows {
                let (supply, demand) = (row["supply_mw"].as_f64(), row["demand_mw"].as_f64());
                let (Some(supply), Some(demand)) = (supply, demand) else {
                    panic!("{day}: a row without supply or demand: {row}");
                };
                let margin = row["reserve_margin"].as_f64().unwrap();
                assert!((margin - (supply / demand - 1.0)).abs() < 1e-9, "{row}");
            }
        }

        // The downstream: one flag per station and day, from daily_avg's annotations.
        let flags = app.annotations("high_output_days", &from, &to, 60).await;
        let averages = app.annotations("daily_avg", &from, &to, 60).await;
        let averages = partitions_of(&averages);
        for (day, part) in partitions_of(&flags) {
            assert_eq!(part["status"], "ready", "{day}: {part}");
            let rows = part["rows"].as_array().unwrap();
            assert_eq!(rows.len(), 5, "five stations: {part}");
            for row in rows {
                let source = row["source"].as_str().unwrap();
                let upstream = averages[&day]["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["source"] == source)
                    .unwrap_or_else(|| panic!("{source} missing from daily_avg of {day}"));
                assert_eq!(row["avg_mw"], upstream["avg_mw"], "{day} {source}");
                let high = upstream["avg_mw"].as_f64().unwrap() > 300.0;
                assert_eq!(row["high"], high, "{day} {source}");
            }
        }
    }
);
