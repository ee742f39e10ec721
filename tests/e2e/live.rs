//! Live staleness, schedules, lineage and scale-out roles.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::helpers::*;

fn station_day(source: &str, day: &str, values: &[f64]) -> Vec<Value> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            generation(
                source,
                &format!("{day}T{:02}:{:02}:00Z", (i * 3) % 24, i % 60),
                json!(v),
            )
        })
        .collect()
}

fn generation_of(p: &Value) -> i64 {
    p["generation"]
        .as_i64()
        .unwrap_or_else(|| panic!("no generation in {p}"))
}

both_backends!(
    late_records_rebuild_only_their_day_and_bursts_coalesce,
    |d: Deployment| async move {
        let app = d.start().await;
        let days = ["2024-07-01", "2024-07-02", "2024-07-03"];
        let mut records = Vec::new();
        for day in days {
            records.extend(station_day("a", day, &[10.0, 20.0, 30.0, 40.0]));
        }
        let (status, _) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK);
        let before = partitions_of(
            &app.annotations("daily_avg", "2024-07-01", "2024-07-04", 30)
                .await,
        );
        assert!(
            before.values().all(|p| p["status"] == "ready"),
            "{before:?}"
        );
        assert_eq!(before["2024-07-02"]["rows"][0]["avg_mw"], 25.0);

        // One late record into the second day.
        let (status, _) = app
            .ingest(
                ADMIN,
                &[generation("a", "2024-07-02T23:59:59Z", json!(150.0))],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let after = eventually(
            Duration::from_secs(10),
            "the late record's day to be rebuilt",
            || async {
                let after = partitions_of(
                    &app.annotations("daily_avg", "2024-07-01", "2024-07-04", 0)
                        .await,
                );
                (generation_of(&after["2024-07-02"]) > generation_of(&before["2024-07-02"])
                    && after["2024-07-02"]["status"] == "ready")
                    .then_some(after)
            },
        )
        .await;
        let day = &after["2024-07-02"];
        assert_eq!(
            generation_of(day),
            generation_of(&before["2024-07-02"]) + 1,
            "{day}"
        );
        assert_eq!(
            day["rows"][0]["avg_mw"], 50.0,
            "(10 + 20 + 30 + 40 + 150) / 5: {day}"
        );
        assert_eq!(day["rows"][0]["readings"], 5);
        assert_eq!(day["rows"][0]["max_mw"], 150.0);
        for other in ["2024-07-01", "2024-07-03"] {
            assert_eq!(
                after[other]["generation"], before[other]["generation"],
                "{other} is not rebuilt"
            );
            assert_eq!(
                after[other]["computed_at"], before[other]["computed_at"],
                "{other} is not rebuilt"
            );
        }

        // A burst of 1,000 late records into the first day, 20 requests of 50 at once.
        let g0 = generation_of(&after["2024-07-01"]);
        let requests = (0..20).map(|r| {
            let batch: Vec<Value> = (0..50)
                .map(|i| {
                    let n = r * 50 + i;
                    generation(
                        "b",
                        &format!(
                            "2024-07-01T{:02}:{:02}:{:02}Z",
                            n % 24,
                            (n / 24) % 60,
                            n % 60
                        ),
                        json!(n as f64),
                    )
                })
                .collect();
            let app = &app;
            async move { app.ingest(ADMIN, &batch).await }
        });
        for (status, body) in futures::future::join_all(requests).await {
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["accepted"], 50, "{body}");
        }
        let settled = eventually(
            Duration::from_secs(20),
            "the burst to be reflected in the first day",
            || async {
                let parts = partitions_of(
                    &app.annotations("daily_avg", "2024-07-01", "2024-07-02", 0)
                        .await,
                );
                let day = parts["2024-07-01"].clone();
                let has_all = day["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["source"] == "b" && r["readings"] == 1000);
                (day["status"] == "ready" && has_all).then_some(day)
            },
        )
        .await;
        let rows = settled["rows"].as_array().unwrap();
        let b = rows.iter().find(|r| r["source"] == "b").unwrap();
        assert!(close(b["avg_mw"].as_f64(), Some(499.5)), "{b}");
        assert_eq!(
            (b["min_mw"].as_f64(), b["max_mw"].as_f64()),
            (Some(0.0), Some(999.0)),
            "{b}"
        );
        let a = rows.iter().find(|r| r["source"] == "a").unwrap();
        assert_eq!(a["readings"], 4, "{a}");
        let rebuilds = generation_of(&settled) - g0;
        eprintln!("1,000 late records in 20 batches: {rebuilds} rebuilds");
        assert!(
            (1..=10).contains(&rebuilds),
            "1,000 late records in 20 batches cost {rebuilds} rebuilds, not a handful"
        );
        let day3 = partitions_of(
            &app.annotations("daily_avg", "2024-07-03", "2024-07-04", 0)
                .await,
        );
        assert_eq!(
            day3["2024-07-03"]["generation"], before["2024-07-03"]["generation"],
            "the burst did not touch the third day"
        );
    }
);

both_backends!(
    lineage_names_the_annotations_built_from_a_record,
    |d: Deployment| async move {
        let app = d.start().await;
        let traced = generation("t1", "2024-08-10T13:30:00Z", json!(42.0));
        let id: Uuid = serde_json::from_value(traced["data_id"].clone()).unwrap();
        let unread = generation("t1", "2024-08-20T08:00:00Z", json!(1.0));
        let mut records = station_day("t2", "2024-08-10", &[1.0, 2.0]);
        records.push(traced);
        records.push(unread.clone());
        let (status, _) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK);

        let mut generations = BTreeMap::new();
        for analysis in ["daily_avg", "hourly_moving_avg"] {
            let parts = partitions_of(
                &app.annotations(analysis, "2024-08-10", "2024-08-11", 30)
                    .await,
            );
            assert_eq!(
                parts["2024-08-10"]["status"], "ready",
                "{analysis}: {parts:?}"
            );
            generations.insert(analysis, generation_of(&parts["2024-08-10"]));
        }

        let lineage = |expected: BTreeMap<&'static str, i64>| {
            let app = &app;
            async move {
                eventually(
                    Duration::from_secs(10),
                    "lineage to list the current generations",
                    || {
                        let expected = expected.clone();
                        async move {
                            let (status, body) = app.get(&format!("/v1/lineage/{id}"), ADMIN).await;
                            assert_eq!(status, StatusCode::OK, "{body}");
                            let listed: BTreeMap<String, i64> = body["annotations"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|a| {
                                    (
                                        a["analysis"].as_str().unwrap().to_string(),
                                        a["generation"].as_i64().unwrap(),
                                    )
                                })
                                .collect();
                            let want: BTreeMap<String, i64> =
                                expected.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                            (listed == want).then_some(body)
                        }
                    },
                )
                .await
            }
        };
        let body = lineage(generations.clone()).await;
        assert_eq!(body["partition"], "2024-08-10", "{body}");
        assert_eq!(body["kind"], "generation");
        for a in body["annotations"].as_array().unwrap() {
            assert_eq!(a["partition"], "2024-08-10", "{a}");
            assert_eq!(a["version"], 1, "{a}");
        }

        // Rewind the day for every analysis: lineage follows to the new generations.
        let inv = invalidate(&app, "*", "2024-08-10", "2024-08-11", "eager").await;
        invalidation_reaches(&app, &inv, "done", Duration::from_secs(20)).await;
        let rebuilt: BTreeMap<&'static str, i64> =
            generations.iter().map(|(k, g)| (*k, g + 1)).collect();
        lineage(rebuilt).await;

        // A record whose partition was never built names what is not built yet.
        let unread_id = unread["data_id"].as_str().unwrap();
        let (status, body) = app.get(&format!("/v1/lineage/{unread_id}"), ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["annotations"], json!([]), "{body}");
        let pending: BTreeSet<&str> = body["not_yet_built"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["analysis"].as_str().unwrap())
            .collect();
        assert_eq!(
            pending,
            BTreeSet::from(["daily_avg", "hourly_moving_avg"]),
            "{body}"
        );
        let (status, _) = app
            .get(&format!("/v1/lineage/{}", Uuid::now_v7()), ADMIN)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
);

both_backends!(bad_schedules_are_refused, |d: Deployment| async move {
    let app = d.start().await;
    for (cron, window, what) in [
        ("* * * *", "P1D", "five fields"),
        ("61 * * * *", "P1D", "61"),
        ("0 1 * * *", "7 days", "7 days"),
        ("0 1 * * *", "P", "ISO 8601"),
    ] {
        let (status, body) = app
            .put(
                "/v1/schedules/bad",
                ADMIN,
                &json!({"analysis": "daily_avg", "cron": cron, "window": window}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{cron} / {window}: {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains(what),
            "{cron} / {window}: {body}"
        );
    }
    let (status, body) = app
        .put(
            "/v1/schedules/bad",
            ADMIN,
            &json!({"analysis": "nope", "cron": "0 1 * * *", "window": "P1D"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, list) = app.get("/v1/schedules", ADMIN).await;
    assert_eq!(list["schedules"], json!([]), "{list}");
});

/// The minute boundaries in `(after, until]`.
fn minutes_between(after: DateTime<Utc>, until: DateTime<Utc>) -> BTreeSet<DateTime<Utc>> {
    let mut out = BTreeSet::new();
    let mut t =
        after.with_second(0).unwrap().with_nanosecond(0).unwrap() + chrono::Duration::minutes(1);
    while t <= until {
        out.insert(t);
        t += chrono::Duration::minutes(1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_slot_across_two_processes() {
    let Some(d) = Deployment::new(Backend::Postgres, "schedules").await else {
        return;
    };
    let one = d.start().await;
    let two = d.start().await;
    let today = Utc::now().date_naive();
    let yesterday = today - chrono::Duration::days(1);
    let (status, _) = one
        .ingest(
            ADMIN,
            &station_day("s", &yesterday.to_string(), &[1.0, 2.0, 3.0]),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (from, to) = (
        yesterday.to_string(),
        (today + chrono::Duration::days(1)).to_string(),
    );
    let before = partitions_of(&one.annotations("daily_avg", &from, &to, 30).await);
    assert!(
        before.values().all(|p| p["status"] == "ready"),
        "{before:?}"
    );

    let head = log_head(&one).await;
    let t0 = Utc::now();
    let (status, saved) = two
        .put(
            "/v1/schedules/every-minute",
            ADMIN,
            &json!({"analysis": "daily_avg", "cron": "* * * * *", "window": "P2D"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let t1 = Utc::now();
    assert!(saved["next_firing"].is_string(), "{saved}");

    let fired = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["type"] == "schedule.fired" && e["schedule"] == "every-minute")
            .cloned()
            .collect()
    };
    eventually(Duration::from_secs(70), "the schedule to fire", || async {
        let events = log_after(&one, head).await;
        (!fired(&events).is_empty()).then_some(())
    })
    .await;
    // The window ends at the firing and covers all of yesterday: it is rebuilt.
    let key = yesterday.to_string();
    eventually(
        Duration::from_secs(20),
        "yesterday to be rebuilt by the schedule",
        || async {
            let parts = partitions_of(&one.annotations("daily_avg", &from, &to, 0).await);
            (generation_of(&parts[&key]) > generation_of(&before[&key])).then_some(())
        },
    )
    .await;

    // Exactly one firing per minute slot, whichever process claimed it.
    let now = Utc::now();
    let events = fired(&log_after(&two, head).await);
    let slots: Vec<DateTime<Utc>> = events
        .iter()
        .map(|e| e["to"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap())
        .collect();
    let distinct: BTreeSet<DateTime<Utc>> = slots.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        slots.len(),
        "two firings for one slot: {events:?}"
    );
    assert!(
        slots.iter().all(|s| s.second() == 0 && s.nanosecond() == 0),
        "{slots:?}"
    );
    let surely = minutes_between(t1, now - chrono::Duration::seconds(5));
    let possibly = minutes_between(t0, now);
    assert!(
        surely.is_subset(&distinct) && distinct.is_subset(&possibly),
        "fired {distinct:?}; expected the minutes {surely:?} (maybe {possibly:?})"
    );
    for e in &events {
        let (from, to): (DateTime<Utc>, DateTime<Utc>) = (
            e["from"].as_str().unwrap().parse().unwrap(),
            e["to"].as_str().unwrap().parse().unwrap(),
        );
        assert_eq!(to - from, chrono::Duration::days(2), "{e}");
        assert_eq!(e["actor"], "schedule:every-minute", "{e}");
    }
    let (_, listed) = one.get("/v1/schedules/every-minute", ADMIN).await;
    assert!(listed["last_fired"].is_string(), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_rebuild_sixty_days_once_each_despite_a_kill_9() {
    let Some(d) = Deployment::new(Backend::Postgres, "three_workers").await else {
        return;
    };
    let front = d.start_with(&[("SCHOLIA_ROLES", "ingest,cache")]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(d.start_with(&[("SCHOLIA_ROLES", "worker")]).await);
    }
    // 60 days (2024-01-01 .. 2024-03-01), 2,000 records each, so that builds take a while.
    let start = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    let mut batch = Vec::new();
    for day in 0..60 {
        let date = start + chrono::Duration::days(day);
        for i in 0..2_000 {
            let created = format!("{date}T{:02}:{:02}:{:02}Z", i % 24, (i / 24) % 60, i % 60);
            batch.push(generation(
                &format!("w{}", i % 5),
                &created,
                json!(i as f64 * 0.25),
            ));
        }
        if batch.len() >= 10_000 {
            let (status, body) = front.ingest(ADMIN, &batch).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            batch.clear();
        }
    }
    assert!(batch.is_empty());
    let (from, to) = ("2024-01-01", "2024-03-01");
    let before = partitions_of(&front.annotations("daily_avg", from, to, 60).await);
    assert_eq!(before.len(), 60);
    assert!(
        before.values().all(|p| p["status"] == "ready"),
        "{before:?}"
    );

    let head = log_head(&front).await;
    let id = invalidate(&front, "daily_avg", from, to, "eager").await;
    // Kill -9 a worker while it holds a partition.
    let pool = d.pg().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT lease_owner FROM partition_state WHERE analysis = 'daily_avg' AND state = 'running' AND lease_owner IS NOT NULL",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let holder = workers
            .iter()
            .position(|w| owners.iter().any(|o| o.contains(&format!("-{}#", w.pid()))));
        if let Some(i) = holder {
            break i;
        }
        assert!(Instant::now() < deadline, "no worker was seen building");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    workers[victim].kill9();
    pool.close().await;

    // The victim's partitions are taken over when its lease expires.
    let progress = invalidation_reaches(&front, &id, "done", Duration::from_secs(90)).await;
    assert_eq!(
        (
            progress["partitions_total"].clone(),
            progress["partitions_done"].clone()
        ),
        (json!(60), json!(60)),
        "{progress}"
    );

    let completed: Vec<Value> = log_after(&front, head)
        .await
        .into_iter()
        .filter(|e| e["type"] == "analysis.completed" && e["analysis"] == "daily_avg")
        .collect();
    let mut per_partition: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &completed {
        per_partition
            .entry(e["partition"].as_str().unwrap().to_string())
            .or_default()
            .push(e["generation"].as_i64().unwrap());
    }
    assert_eq!(per_partition.len(), 60, "{per_partition:?}");
    for (key, generations) in &per_partition {
        assert_eq!(
            generations,
            &vec![generation_of(&before[key]) + 1],
            "{key}: one completion, the next generation"
        );
    }
    let after = eventually(
        Duration::from_secs(10),
        "the new generations to be served",
        || async {
            let after = partitions_of(&front.annotations("daily_avg", from, to, 0).await);
            after
                .iter()
                .all(|(k, p)| generation_of(p) == generation_of(&before[k]) + 1)
                .then_some(after)
        },
    )
    .await;
    for (key, p) in &after {
        assert_eq!(p["status"], "ready", "{key}: {p}");
        assert_eq!(p["rows"], before[key]["rows"], "{key}");
    }
}

both_backends!(
    rewinding_reuses_loaded_frames_and_still_sees_records_that_arrive,
    |d: Deployment| async move {
        let app = d.start().await;
        let days = ["2024-08-01", "2024-08-02", "2024-08-03"];
        let mut records = Vec::new();
        for day in days {
            records.extend(station_day("a", day, &[10.0, 20.0, 30.0, 40.0]));
        }
        let (status, _) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK);
        app.annotations("daily_avg", "2024-08-01", "2024-08-04", 30)
            .await;
        const LOADED: &str = "scholia_build_frames_loaded_total";
        const REUSED: &str = "scholia_build_frames_reused_total";
        const EXTENDED: &str = "scholia_build_frames_extended_total";
        assert_eq!(app.metric(LOADED).await, 3.0);
        assert_eq!(app.metric(REUSED).await, 0.0);

        // Rewinding unchanged days reads no rows again.
        let id = invalidate(&app, "daily_avg", "2024-08-01", "2024-08-04", "eager").await;
        invalidation_reaches(&app, &id, "done", Duration::from_secs(30)).await;
        assert_eq!(app.metric(LOADED).await, 3.0);
        assert_eq!(app.metric(REUSED).await, 3.0);

        // A record arriving in a day makes its frame stale: the rebuild reads that record
        // (only it) and appends it.
        let (status, _) = app
            .ingest(
                ADMIN,
                &[generation("a", "2024-08-02T12:30:00Z", json!(150.0))],
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        eventually(
            Duration::from_secs(10),
            "the late record in day two",
            || async {
                let parts = partitions_of(
                    &app.annotations("daily_avg", "2024-08-02", "2024-08-03", 0)
                        .await,
                );
                (parts["2024-08-02"]["rows"][0]["avg_mw"] == 50.0).then_some(())
            },
        )
        .await;
        assert_eq!(app.metric(LOADED).await, 3.0);
        assert_eq!(app.metric(EXTENDED).await, 1.0);

        // A record with a field the frame does not have: the day is read whole again.
        let mut odd = generation("a", "2024-08-03T06:00:00Z", json!(60.0));
        odd["data"]["note"] = json!("maintenance");
        let (status, _) = app.ingest(ADMIN, &[odd]).await;
        assert_eq!(status, StatusCode::OK);
        eventually(
            Duration::from_secs(10),
            "the new field in day three",
            || async {
                let parts = partitions_of(
                    &app.annotations("daily_avg", "2024-08-03", "2024-08-04", 0)
                        .await,
                );
                (parts["2024-08-03"]["rows"][0]["readings"] == 5).then_some(())
            },
        )
        .await;
        assert_eq!(app.metric(LOADED).await, 4.0);
        assert_eq!(app.metric(EXTENDED).await, 1.0);

        // And rewinding the second day again reuses its frame, late record included.
        let id = invalidate(&app, "daily_avg", "2024-08-02", "2024-08-03", "eager").await;
        invalidation_reaches(&app, &id, "done", Duration::from_secs(30)).await;
        assert_eq!(app.metric(LOADED).await, 4.0);
        assert_eq!(app.metric(REUSED).await, 4.0);
        let parts = partitions_of(
            &app.annotations("daily_avg", "2024-08-02", "2024-08-03", 0)
                .await,
        );
        assert_eq!(parts["2024-08-02"]["rows"][0]["avg_mw"], 50.0, "{parts:?}");
        assert_eq!(parts["2024-08-02"]["rows"][0]["readings"], 5);
    }
);
