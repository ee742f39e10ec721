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
        // The join, computed here from what was sent.
        let mut supply: BTreeMap<(String, String), f64> = BTreeMap::new();
        for r in &generation_records {
            let key = (
                r["data"]["region"].as_str().unwrap().to_string(),
                r["created"].as_str().unwrap()[..13].to_string(),
            );
            *supply.entry(key).or_default() += r["data"]["output_mw"].as_f64().unwrap();
        }
        let mut need: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
        for r in &demand_records {
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
);

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
        let _streams = stream_cleanup(&d);
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
        let _streams = stream_cleanup(&d);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_refuses_cycles_and_unknown_inputs_and_lineage_follows_it() {
    let Some(d) = Deployment::new(Backend::Sqlite, "graph_rules").await else {
        return;
    };
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
