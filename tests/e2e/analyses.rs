//! Analyses, annotations and the rewind loop.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;

/// Two days of `generation` records: several stations, some null readings, one station
/// (`s3`) that only ever reports null, one (`s4`) that reports on the second day only,
/// and integral as well as fractional values.
fn two_days() -> Vec<Value> {
    let mut records = Vec::new();
    for day in 0..2 {
        let at = |i: usize| {
            format!(
                "2024-03-0{}T{:02}:{:02}:00Z",
                day + 1,
                (i * 5) % 24,
                (i * 7) % 60
            )
        };
        for i in 0..10 {
            let value = if i == 3 {
                Value::Null
            } else {
                json!(i as f64 * 1.7 + day as f64 + 0.125)
            };
            records.push(generation("s1", &at(i), value));
        }
        for i in 0..7 {
            let value = if i % 2 == 0 {
                json!(100 - 3 * i as i64)
            } else {
                json!(100.25 - 3.5 * i as f64)
            };
            records.push(generation("s2", &at(i), value));
        }
        for i in 0..4 {
            records.push(generation("s3", &at(i), Value::Null));
        }
        if day == 1 {
            for i in 0..3 {
                records.push(generation("s4", &at(i), json!(-2.5 * i as f64)));
            }
        }
    }
    records
}

/// (day, source) → (avg, min, max, readings, non-null readings), computed by the database
/// itself over the stored records.
type Expected = BTreeMap<(String, String), (Option<f64>, Option<f64>, Option<f64>, i64, i64)>;

async fn expected_daily(d: &Deployment) -> Expected {
    type Row = (
        String,
        String,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        i64,
        i64,
    );
    let rows: Vec<Row> = match d.backend {
        Backend::Postgres => {
            let pool = d.pg().await;
            let rows = sqlx::query_as(
                "SELECT to_char(created AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, source, \
                        AVG((data->>'output_mw')::float8), MIN((data->>'output_mw')::float8), \
                        MAX((data->>'output_mw')::float8), COUNT(*), COUNT(data->>'output_mw') \
                 FROM records WHERE kind = 'generation' GROUP BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
        Backend::Sqlite => {
            let pool = d.sqlite().await;
            let rows = sqlx::query_as(
                "SELECT strftime('%Y-%m-%d', created / 1000000, 'unixepoch') AS day, source, \
                        AVG(CAST(json_extract(data, '$.output_mw') AS REAL)), \
                        MIN(CAST(json_extract(data, '$.output_mw') AS REAL)), \
                        MAX(CAST(json_extract(data, '$.output_mw') AS REAL)), \
                        COUNT(*), COUNT(json_extract(data, '$.output_mw')) \
                 FROM records WHERE kind = 'generation' GROUP BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
    };
    rows.into_iter()
        .map(|(day, source, avg, min, max, n, non_null)| {
            ((day, source), (avg, min, max, n, non_null))
        })
        .collect()
}

fn float(v: &Value) -> Option<f64> {
    if v.is_null() {
        None
    } else {
        Some(v.as_f64().unwrap_or_else(|| panic!("{v} is not a number")))
    }
}

both_backends!(
    annotations_equal_an_independent_sql_computation,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, body) = app.ingest(ADMIN, &two_days()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 45, "{body}");
        let expected = expected_daily(&d).await;
        assert_eq!(
            expected.len(),
            7,
            "the records span 7 (day, station) groups: {expected:?}"
        );
        assert_eq!(
            expected[&("2024-03-02".to_string(), "s3".to_string())].0,
            None,
            "s3 reports only nulls"
        );

        // The built-in daily average; the third day has no records at all.
        let body = app
            .annotations("daily_avg", "2024-03-01", "2024-03-04", 30)
            .await;
        assert_eq!(body["analysis"], "daily_avg");
        let parts = partitions_of(&body);
        assert_eq!(
            parts.keys().cloned().collect::<Vec<_>>(),
            ["2024-03-01", "2024-03-02", "2024-03-03"]
        );
        assert!(parts.values().all(|p| p["status"] == "ready"), "{body}");
        assert_eq!(
            parts["2024-03-03"]["rows"],
            json!([]),
            "an empty partition is ready with no rows"
        );
        let mut seen = 0;
        for (day, p) in &parts {
            for row in p["rows"].as_array().unwrap() {
                let source = row["source"].as_str().unwrap().to_string();
                let (avg, min, max, n, _) = expected
                    .get(&(day.clone(), source.clone()))
                    .unwrap_or_else(|| {
                        panic!("daily_avg has a row for {day}/{source} the records do not: {row}")
                    });
                assert!(
                    close(float(&row["avg_mw"]), *avg),
                    "{day}/{source} avg_mw {} != {avg:?}",
                    row["avg_mw"]
                );
                assert!(
                    close(float(&row["min_mw"]), *min),
                    "{day}/{source} min_mw {} != {min:?}",
                    row["min_mw"]
                );
                assert!(
                    close(float(&row["max_mw"]), *max),
                    "{day}/{source} max_mw {} != {max:?}",
                    row["max_mw"]
                );
                assert_eq!(
                    row["readings"].as_i64(),
                    Some(*n),
                    "{day}/{source} readings: {row}"
                );
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            expected.len(),
            "one daily_avg row per (day, station): {body}"
        );

        // The same question in SQL, registered at run time.
        let sql = "SELECT source, AVG(output_mw) AS avg_mw, COUNT(output_mw) AS n FROM events GROUP BY source";
        let (status, info) = app
            .put(
                "/v1/analyses/station_avg",
                ADMIN,
                &json!({"kind": "generation", "sql": sql}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        assert_eq!(info["version"], 1, "{info}");
        let body = app
            .annotations("station_avg", "2024-03-01", "2024-03-04", 30)
            .await;
        let parts = partitions_of(&body);
        assert!(parts.values().all(|p| p["status"] == "ready"), "{body}");
        assert_eq!(
            parts["2024-03-03"]["rows"],
            json!([]),
            "an empty partition is ready with no rows: {body}"
        );
        let mut seen = 0;
        for (day, p) in &parts {
            for row in p["rows"].as_array().unwrap() {
                let source = row["source"].as_str().unwrap().to_string();
                let (avg, _, _, _, non_null) = expected
                    .get(&(day.clone(), source.clone()))
                    .unwrap_or_else(|| {
                        panic!("station_avg has a row for {day}/{source} the records do not: {row}")
                    });
                assert!(
                    close(float(&row["avg_mw"]), *avg),
                    "{day}/{source} avg_mw {} != {avg:?}",
                    row["avg_mw"]
                );
                assert_eq!(
                    row["n"].as_i64(),
                    Some(*non_null),
                    "{day}/{source} n: {row}"
                );
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            expected.len(),
            "one station_avg row per (day, station): {body}"
        );
    }
);

/// Records on each of `days` consecutive days from 2024-04-01.
fn days_of_records(days: i64, per_day: usize) -> Vec<Value> {
    let start = chrono::NaiveDate::from_ymd_opt(2024, 4, 1).unwrap();
    let mut records = Vec::new();
    for d in 0..days {
        let day = start + chrono::Duration::days(d);
        for i in 0..per_day {
            let created = format!("{day}T{:02}:{:02}:00Z", i % 24, (i * 13) % 60);
            records.push(generation(
                &format!("g{}", i % 3),
                &created,
                json!(d as f64 + i as f64 * 0.5),
            ));
        }
    }
    records
}

both_backends!(
    invalidating_two_days_rebuilds_exactly_those,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, body) = app.ingest(ADMIN, &days_of_records(3, 12)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let before = partitions_of(
            &app.annotations("daily_avg", "2024-04-01", "2024-04-04", 30)
                .await,
        );
        assert!(
            before
                .values()
                .all(|p| p["status"] == "ready" && p["generation"].as_i64().is_some()),
            "{before:?}"
        );

        let id = invalidate(&app, "daily_avg", "2024-04-01", "2024-04-03", "eager").await;
        let progress = invalidation_reaches(&app, &id, "done", Duration::from_secs(20)).await;
        assert_eq!(progress["partitions_total"], 2, "{progress}");
        assert_eq!(progress["partitions_done"], 2, "{progress}");
        assert_eq!(progress["partitions_failed"], 0, "{progress}");

        let generation = |p: &Value| p["generation"].as_i64().unwrap();
        let after = eventually(
            Duration::from_secs(10),
            "the rebuilt generations to be served",
            || async {
                let after = partitions_of(
                    &app.annotations("daily_avg", "2024-04-01", "2024-04-04", 0)
                        .await,
                );
                ["2024-04-01", "2024-04-02"]
                    .iter()
                    .all(|k| generation(&after[*k]) > generation(&before[*k]))
                    .then_some(after)
            },
        )
        .await;
        for k in ["2024-04-01", "2024-04-02"] {
            assert_eq!(
                generation(&after[k]),
                generation(&before[k]) + 1,
                "{k}: one rebuild: {}",
                after[k]
            );
            assert_eq!(after[k]["status"], "ready", "{k}: {}", after[k]);
            assert_ne!(after[k]["computed_at"], before[k]["computed_at"], "{k}");
            assert_eq!(
                after[k]["rows"], before[k]["rows"],
                "{k}: the same input gives the same rows"
            );
        }
        let untouched = "2024-04-03";
        assert_eq!(
            after[untouched]["generation"], before[untouched]["generation"],
            "the third day is not rebuilt"
        );
        assert_eq!(
            after[untouched]["computed_at"],
            before[untouched]["computed_at"]
        );

        // Each invalidated partition was built once for this invalidation, the third never.
        let completed: Vec<Value> = log_after(&app, 0)
            .await
            .into_iter()
            .filter(|e| e["type"] == "analysis.completed" && e["analysis"] == "daily_avg")
            .collect();
        for (k, builds) in [("2024-04-01", 2), ("2024-04-02", 2), ("2024-04-03", 1)] {
            assert_eq!(
                completed.iter().filter(|e| e["partition"] == k).count(),
                builds,
                "{k}: {completed:?}"
            );
        }

        // The other formats.
        let r = app
            .client
            .get(app.url("/v1/annotations/daily_avg?from=2024-04-01&to=2024-04-04&format=csv"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv"),
            "{:?}",
            r.headers()
        );
        let csv = r.text().await.unwrap();
        let mut lines = csv.lines();
        let header = lines.next().unwrap();
        assert!(header.starts_with("partition,generation"), "{header}");
        for column in ["source", "avg_mw", "min_mw", "max_mw", "readings"] {
            assert!(
                header.split(',').any(|c| c == column),
                "{column} missing from {header}"
            );
        }
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), 9, "three stations on three days:\n{csv}");
        assert!(
            rows.iter()
                .any(|l| l.starts_with(&format!("2024-04-03,{},", generation(&after[untouched])))),
            "{csv}"
        );

        let r = app
            .client
            .get(app.url("/v1/annotations/daily_avg?from=2024-04-01&to=2024-04-04&format=arrow"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-type"],
            "application/vnd.apache.arrow.stream"
        );
        let bytes = r.bytes().await.unwrap();
        assert!(
            bytes.len() > 8 && bytes[..4] == [0xFF, 0xFF, 0xFF, 0xFF],
            "an Arrow IPC stream starts with a continuation marker"
        );
        let text = String::from_utf8_lossy(&bytes);
        for column in ["partition", "generation", "avg_mw", "readings"] {
            assert!(text.contains(column), "the Arrow schema names {column}");
        }
        let (status, body) = app
            .get(
                "/v1/annotations/daily_avg?from=2024-04-01&to=2024-04-04&format=xml",
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
);

both_backends!(
    sql_analyses_are_registered_versioned_and_checked_at_run_time,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, _) = app.ingest(ADMIN, &days_of_records(2, 6)).await;
        assert_eq!(status, StatusCode::OK);

        let v1 = "SELECT source, COUNT(*) AS n FROM events GROUP BY source ORDER BY source";
        let (status, info) = app
            .put(
                "/v1/analyses/per_station",
                ADMIN,
                &json!({"kind": "generation", "sql": v1, "description": "count"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        assert_eq!(
            (info["version"].clone(), info["language"].clone()),
            (json!(1), json!("sql")),
            "{info}"
        );
        let (status, listed) = app.get("/v1/analyses/per_station", ADMIN).await;
        assert_eq!(
            (status, listed["version"].clone()),
            (StatusCode::OK, json!(1)),
            "{listed}"
        );

        let body = app
            .annotations("per_station", "2024-04-01", "2024-04-03", 30)
            .await;
        let first = partitions_of(&body);
        assert!(
            first
                .values()
                .all(|p| p["status"] == "ready" && p["version"] == 1),
            "{body}"
        );
        assert_eq!(
            first["2024-04-01"]["rows"],
            json!([{"source": "g0", "n": 2}, {"source": "g1", "n": 2}, {"source": "g2", "n": 2}])
        );

        // A changed definition is a new version; what v1 built is stale until rebuilt.
        let v2 =
            "SELECT source, SUM(output_mw) AS total FROM events GROUP BY source ORDER BY source";
        let (status, info) = app
            .put(
                "/v1/analyses/per_station",
                ADMIN,
                &json!({"kind": "generation", "sql": v2}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{info}");
        assert_eq!(info["version"], 2, "{info}");
        let body = app
            .annotations("per_station", "2024-04-01", "2024-04-03", 0)
            .await;
        assert_eq!(body["version"], 2);
        let stale = partitions_of(&body);
        assert!(
            stale
                .values()
                .all(|p| p["status"] == "stale" && p["version"] == 1),
            "{body}"
        );

        let body = app
            .annotations("per_station", "2024-04-01", "2024-04-03", 30)
            .await;
        let second = partitions_of(&body);
        for (k, p) in &second {
            assert_eq!(
                (p["status"].as_str(), p["version"].as_i64()),
                (Some("ready"), Some(2)),
                "{k}: {p}"
            );
            assert_eq!(
                p["generation"].as_i64(),
                Some(first[k]["generation"].as_i64().unwrap() + 1),
                "{k}: {p}"
            );
        }
        // Day 0 holds i = 0..6 with output_mw = i * 0.5, stations by i % 3.
        assert_eq!(
            second["2024-04-01"]["rows"],
            json!([{"source": "g0", "total": 1.5}, {"source": "g1", "total": 2.5}, {"source": "g2", "total": 3.5}])
        );

        // The same definition again keeps its version (surrounding whitespace is no change).
        let (status, info) = app
            .put(
                "/v1/analyses/per_station",
                ADMIN,
                &json!({"kind": "generation", "sql": format!("  {v2}\n")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{info}");
        assert_eq!(info["version"], 2, "{info}");
        let again = partitions_of(
            &app.annotations("per_station", "2024-04-01", "2024-04-03", 0)
                .await,
        );
        assert!(again.values().all(|p| p["status"] == "ready"), "{again:?}");

        // SQL that does not compile is refused, naming the problem, and changes nothing.
        let (status, problem) = app
        .put("/v1/analyses/per_station", ADMIN, &json!({"kind": "generation", "sql": "SELECT source, AVG(no_such_field) AS x FROM events GROUP BY source"}))
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("no_such_field"),
            "{problem}"
        );
        let (status, problem) = app
            .put(
                "/v1/analyses/broken",
                ADMIN,
                &json!({"kind": "generation", "sql": "SELEC source FRM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("SELEC"),
            "the detail names what did not parse: {problem}"
        );
        let (_, info) = app.get("/v1/analyses/per_station", ADMIN).await;
        assert_eq!(info["version"], 2, "{info}");
        let (status, _) = app.get("/v1/analyses/broken", ADMIN).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
);

both_backends!(
    a_build_that_fails_leaves_only_its_partition_failed,
    |d: Deployment| async move {
        let app = d.start().await;
        let note = |day: u32, note: &str| json!({"kind": "memo", "source": "m", "created": format!("2024-06-0{day}T12:00:00Z"), "data": {"note": note}});
        let (status, _) = app
            .ingest(
                ADMIN,
                &[note(1, "1"), note(2, "abc"), note(2, "2"), note(3, "3")],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (status, info) = app
            .put(
                "/v1/analyses/note_numbers",
                ADMIN,
                &json!({"kind": "memo", "sql": "SELECT CAST(note AS INTEGER) AS n FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");

        let parts = eventually(
            Duration::from_secs(30),
            "the bad day to fail and the others to be ready",
            || async {
                let parts = partitions_of(
                    &app.annotations("note_numbers", "2024-06-01", "2024-06-04", 5)
                        .await,
                );
                (parts["2024-06-02"]["status"] == "failed").then_some(parts)
            },
        )
        .await;
        let failed = &parts["2024-06-02"];
        let error = failed["error"]
            .as_str()
            .unwrap_or_else(|| panic!("a failed partition says why: {failed}"));
        assert!(
            error.contains("abc") || error.to_lowercase().contains("cast"),
            "{error}"
        );
        assert_eq!(parts["2024-06-01"]["status"], "ready", "{parts:?}");
        assert_eq!(parts["2024-06-01"]["rows"], json!([{"n": 1}]));
        assert_eq!(parts["2024-06-03"]["status"], "ready", "{parts:?}");

        // A deterministic failure (the same input fails the same way) is not retried: it
        // is given up at once, and the log says so.
        let failures: Vec<Value> = log_after(&app, 0)
            .await
            .into_iter()
            .filter(|e| e["type"] == "analysis.failed" && e["analysis"] == "note_numbers")
            .collect();
        assert!(
            failures.iter().all(|e| e["partition"] == "2024-06-02"),
            "{failures:?}"
        );
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(failures.last().unwrap()["gave_up"], true, "{failures:?}");
    }
);

both_backends!(
    a_cancelled_invalidation_stops_building,
    |d: Deployment| async move {
        let app = d.start_with(&[("SCHOLIA_WORKER_CONCURRENCY", "1")]).await;
        let (status, body) = app.ingest(ADMIN, &days_of_records(300, 4)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // 2024-04-01 + 300 days.
        let (from, to) = ("2024-04-01", "2025-01-26");
        let id = invalidate(&app, "daily_avg", from, to, "eager").await;
        eventually(
            Duration::from_secs(20),
            "the first partitions to be built",
            || async {
                let (_, progress) = app.get(&format!("/v1/invalidations/{id}"), ADMIN).await;
                assert_eq!(progress["partitions_total"], 300, "{progress}");
                (progress["partitions_done"].as_i64().unwrap() > 0).then_some(())
            },
        )
        .await;
        let r = app
            .client
            .delete(app.url(&format!("/v1/invalidations/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let cancelled: Value = r.json().await.unwrap();
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        let done_at_cancel = cancelled["partitions_done"].as_i64().unwrap();
        assert!(
            done_at_cancel < 300,
            "the rebuild finished before it could be cancelled: {cancelled}"
        );

        // Wait until nothing of the range is queued or being built any more.
        let views = eventually(
            Duration::from_secs(20),
            "the queue to drain after the cancel",
            || async {
                let (status, body) = app
                    .get(
                        &format!("/v1/annotations/daily_avg?from={from}&to={to}"),
                        ADMIN,
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let parts = partitions_of(&body);
                parts
                    .values()
                    .all(|p| {
                        matches!(p["status"].as_str(), Some("ready" | "missing"))
                            && p.get("rebuild").is_none()
                    })
                    .then_some(parts)
            },
        )
        .await;
        let built = views.values().filter(|p| p["status"] == "ready").count() as i64;
        assert!(
            built <= done_at_cancel + 1,
            "{built} partitions built, {done_at_cancel} done at the cancel"
        );

        let (_, progress) = app.get(&format!("/v1/invalidations/{id}"), ADMIN).await;
        assert_eq!(progress["state"], "cancelled", "{progress}");
        let done = progress["partitions_done"].as_i64().unwrap();
        assert!(
            done <= done_at_cancel + 1 && done < 300,
            "done {done} after cancelling at {done_at_cancel}: {progress}"
        );
        assert_eq!(progress["partitions_total"], 300);
        // No build started after the one in flight at the cancel.
        let started = log_after(&app, 0)
            .await
            .into_iter()
            .filter(|e| e["type"] == "analysis.started" && e["analysis"] == "daily_avg")
            .count() as i64;
        assert!(
            started <= done_at_cancel + 1,
            "{started} builds started, {done_at_cancel} done at the cancel"
        );
        let r = app
            .client
            .delete(app.url(&format!("/v1/invalidations/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT, "cancelling twice");
    }
);
