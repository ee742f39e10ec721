//! Candidates: a changed definition registered beside the live one, built over some
//! partitions while readers and charts keep seeing the live version, compared with it,
//! then promoted (its partitions served without a rebuild) or discarded.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;
use crate::ws::{SOON, Ws};

/// 12 generation records a day over `days` days from 2024-04-01, from three stations.
fn records(days: i64) -> Vec<Value> {
    let start = chrono::NaiveDate::from_ymd_opt(2024, 4, 1).unwrap();
    let mut out = Vec::new();
    for d in 0..days {
        let day = start + chrono::Duration::days(d);
        for i in 0..12 {
            out.push(generation(
                &format!("g{}", i % 3),
                &format!("{day}T{:02}:{:02}:00Z", i * 2, (i * 13) % 60),
                json!(d as f64 * 10.0 + i as f64 * 0.5),
            ));
        }
    }
    out
}

const LIVE_SQL: &str =
    "SELECT source, AVG(output_mw) AS avg_mw, COUNT(*) AS n FROM generation GROUP BY source";
/// Twice the average, and without the station g2.
const CANDIDATE_SQL: &str = "SELECT source, AVG(output_mw) * 2 AS avg_mw, COUNT(*) AS n FROM generation WHERE source <> 'g2' GROUP BY source";

async fn start_with_live(d: &Deployment) -> TestApp {
    let app = d.start().await;
    let (status, body) = app.ingest(ADMIN, &records(6)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .put(
            "/v1/analyses/station_stats",
            ADMIN,
            &json!({"kind": "generation", "sql": LIVE_SQL}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let body = app
        .annotations("station_stats", "2024-04-01", "2024-04-07", 30)
        .await;
    assert!(
        partitions_of(&body)
            .values()
            .all(|p| p["status"] == "ready"),
        "{body}"
    );
    app
}

async fn put_candidate(app: &TestApp, sql: &str) -> (StatusCode, Value) {
    app.put(
        "/v1/analyses/station_stats?candidate=true",
        ADMIN,
        &json!({"kind": "generation", "sql": sql}),
    )
    .await
}

/// Wait until the candidate has built `n` partitions and nothing of it is under way.
async fn candidate_built(app: &TestApp, n: u64) -> Value {
    eventually(
        Duration::from_secs(60),
        &format!("the candidate to build {n} partitions"),
        || async {
            let (status, view) = app.get("/v1/analyses/station_stats/candidate", ADMIN).await;
            assert_eq!(status, StatusCode::OK, "{view}");
            assert_eq!(view["failed"], json!([]), "{view}");
            (view["built"] == n && view["queued"] == 0 && view["running"] == 0).then_some(view)
        },
    )
    .await
}

async fn delete(app: &TestApp, path: &str) -> (StatusCode, Value) {
    app.send_json(Method::DELETE, path, ADMIN, &json!({})).await
}

both_backends!(
    a_candidate_builds_beside_the_live_analysis_and_its_partitions_go_live_without_a_rebuild,
    |d: Deployment| async move {
        let app = start_with_live(&d).await;
        let (status, body) = app
            .put(
                "/v1/analyses/fleet",
                ADMIN,
                &json!({"inputs": [{"analysis": "station_stats"}], "sql": "SELECT SUM(n) AS readings FROM station_stats"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let live_before = app
            .annotations("station_stats", "2024-04-01", "2024-04-07", 30)
            .await;

        // A chart of the live analysis.
        let mut ws = Ws::connect(&app, ADMIN).await;
        ws.subscribe("c1", "station_stats", "2024-04-01", "2024-04-07")
            .await;
        ws.until(SOON, "the subscription to be ready", |m| {
            m["type"] == "ready"
        })
        .await;

        // Register the candidate; the live analysis is untouched.
        let (status, view) = put_candidate(&app, CANDIDATE_SQL).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        assert_eq!(view["name"], "station_stats", "{view}");
        assert_eq!(view["candidate"], true, "{view}");
        assert_eq!(view["version"], 2, "{view}");
        assert_eq!(view["live_version"], 1, "{view}");
        assert_eq!(view["sql"], CANDIDATE_SQL, "{view}");
        assert_eq!(view["inputs"], json!([{"kind": "generation"}]), "{view}");
        assert_eq!(view["built"], 0, "{view}");
        // Registering it is in the log, with who did it.
        let events = log_after(&app, 0).await;
        let registered: Vec<&Value> = events
            .iter()
            .filter(|e| {
                e["type"] == "analysis.registered" && e["analysis"] == "station_stats@candidate"
            })
            .collect();
        assert_eq!(registered.len(), 1, "{events:#?}");
        assert_eq!(registered[0]["version"], 2, "{registered:#?}");
        assert!(
            registered[0]["actor"]
                .as_str()
                .is_some_and(|a| a.contains("bootstrap admin")),
            "{registered:#?}"
        );
        let (status, again) = put_candidate(&app, CANDIDATE_SQL).await;
        assert_eq!(status, StatusCode::OK, "the same candidate again: {again}");
        assert_eq!(again["version"], 2, "{again}");
        let (status, problem) = put_candidate(&app, LIVE_SQL).await;
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "the live definition: {problem}"
        );
        let (status, _) = app
            .put(
                "/v1/analyses/no_such?candidate=true",
                ADMIN,
                &json!({"kind": "generation", "sql": LIVE_SQL}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a candidate needs a live analysis"
        );
        let (_, live) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert_eq!(live["version"], 1, "{live}");
        assert_eq!(live["sql"], LIVE_SQL, "{live}");
        assert_eq!(
            live["candidate"],
            json!({"version": 2, "built": 0}),
            "{live}"
        );

        // Users never see the candidate as an analysis.
        let (_, list) = app.get("/v1/analyses", ADMIN).await;
        let names: BTreeSet<&str> = list["analyses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert!(names.contains("station_stats"), "{list}");
        assert!(names.iter().all(|n| !n.contains('@')), "{list}");
        for path in [
            "/v1/analyses/station_stats@candidate",
            "/v1/annotations/station_stats@candidate?from=2024-04-01&to=2024-04-02",
            "/v1/analyses/station_stats@candidate/builds",
        ] {
            let (status, body) = app.get(path, ADMIN).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        }
        let (status, _) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &json!({"analysis": "station_stats@candidate", "from": "2024-04-01", "to": "2024-04-02"}),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let mut other = Ws::connect(&app, ADMIN).await;
        other
            .subscribe("x", "station_stats@candidate", "2024-04-01", "2024-04-02")
            .await;
        let refused = other.next(SOON).await;
        assert_eq!(refused["type"], "error", "{refused}");

        // Build it over a range and over a sample of what the live version built.
        let head = log_head(&app).await;
        let (status, built) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-02", "to": "2024-04-04"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{built}");
        assert_eq!(
            built["partitions"],
            json!(["2024-04-02", "2024-04-03"]),
            "{built}"
        );
        assert_eq!(built["queued"], 2, "{built}");
        let (status, sampled) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"sample": 2}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{sampled}");
        assert_eq!(
            sampled["partitions"],
            json!(["2024-04-05", "2024-04-06"]),
            "the two latest partitions the live version built: {sampled}"
        );
        for bad in [
            json!({}),
            json!({"sample": 0}),
            json!({"from": "2024-04-02"}),
        ] {
            let (status, problem) = app
                .post("/v1/analyses/station_stats/candidate/builds", ADMIN, &bad)
                .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {problem}");
        }
        let view = candidate_built(&app, 4).await;
        assert_eq!(
            view["partitions"],
            json!([{"first": "2024-04-02", "last": "2024-04-03"}, {"first": "2024-04-05", "last": "2024-04-06"}]),
            "{view}"
        );
        // The chart heard nothing of it, and readers still see the live version.
        let heard = ws.drain_for(Duration::from_millis(1500)).await;
        assert!(
            heard.iter().all(|m| m["type"] != "partition"),
            "a chart of the live analysis got a partition while the candidate built: {heard:#?}"
        );
        let live_now = app
            .annotations("station_stats", "2024-04-01", "2024-04-07", 0)
            .await;
        assert_eq!(
            live_now, live_before,
            "readers see the live version unchanged"
        );
        let (_, live) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert_eq!(
            live["candidate"],
            json!({"version": 2, "built": 4}),
            "{live}"
        );
        let events = log_after(&app, head).await;
        assert!(
            events.iter().all(|e| e["analysis"] != "station_stats"),
            "the candidate's builds say nothing of the live analysis: {events:#?}"
        );
        assert!(
            events.iter().any(|e| e["type"] == "analysis.requested"
                && e["analysis"] == "station_stats@candidate"
                && e["actor"].as_str().is_some_and(|a| !a.is_empty())),
            "{events:#?}"
        );

        // The diff: twice the average for g0 and g1, g2 gone.
        let (status, diff) = app
            .get(
                "/v1/analyses/station_stats/candidate/diff?from=2024-04-01&to=2024-04-07",
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{diff}");
        assert_eq!(diff["live_version"], 1, "{diff}");
        assert_eq!(diff["candidate_version"], 2, "{diff}");
        let parts = diff["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 6, "{diff}");
        let statuses: Vec<&str> = parts
            .iter()
            .map(|p| p["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            [
                "not_built",
                "compared",
                "compared",
                "not_built",
                "compared",
                "compared"
            ],
            "{diff}"
        );
        let day = &parts[1];
        assert_eq!(day["partition"], "2024-04-02", "{day}");
        assert_eq!(day["key_columns"], json!(["source", "n"]), "{day}");
        assert_eq!(day["added"], 0, "{day}");
        assert_eq!(day["removed"], 1, "{day}");
        assert_eq!(day["changed"], 2, "{day}");
        assert_eq!(day["changed_columns"], json!(["avg_mw"]), "{day}");
        assert_eq!(day["rows"]["removed"][0]["source"], "g2", "{day}");
        let changed = &day["rows"]["changed"][0];
        assert_eq!(changed["key"]["source"], "g0", "{day}");
        let (l, c) = (
            changed["live"]["avg_mw"].as_f64().unwrap(),
            changed["candidate"]["avg_mw"].as_f64().unwrap(),
        );
        assert!((c - 2.0 * l).abs() < 1e-9, "{changed}");

        // Matched on a key the caller names: the count `n` no longer takes part, so the
        // same rows pair up; a column the annotations lack is refused, by name.
        let (status, keyed) = app
            .get(
                "/v1/analyses/station_stats/candidate/diff?from=2024-04-02&to=2024-04-03&key=source",
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{keyed}");
        let keyed_day = &keyed["partitions"][0];
        assert_eq!(keyed_day["key_columns"], json!(["source"]), "{keyed}");
        assert_eq!(
            (
                &keyed_day["added"],
                &keyed_day["removed"],
                &keyed_day["changed"]
            ),
            (&json!(0), &json!(1), &json!(2)),
            "{keyed}"
        );
        let (status, refused) = app
            .get(
                "/v1/analyses/station_stats/candidate/diff?from=2024-04-02&to=2024-04-03&key=source,station",
                ADMIN,
            )
            .await;
        assert!(status.is_client_error(), "{status}: {refused}");
        assert!(
            refused["detail"].as_str().unwrap().contains("station"),
            "{refused}"
        );

        // Promote: the built partitions go live as they are, the others are stale.
        let head = log_head(&app).await;
        let (status, promoted) = app
            .post(
                "/v1/analyses/station_stats/candidate/promote",
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{promoted}");
        assert_eq!(promoted["analysis"]["version"], 2, "{promoted}");
        assert_eq!(promoted["analysis"]["sql"], CANDIDATE_SQL, "{promoted}");
        assert!(promoted["analysis"]["candidate"].is_null(), "{promoted}");
        assert_eq!(promoted["promoted"], 4, "{promoted}");
        let promoted_days = ["2024-04-02", "2024-04-03", "2024-04-05", "2024-04-06"];
        // The chart gets the promoted partitions.
        let mut seen = BTreeSet::new();
        let mut received = Vec::new();
        while seen.len() < promoted_days.len() {
            let (message, before) = ws
                .until(SOON, "the promoted partitions on the chart", |m| {
                    m["type"] == "partition" && m["version"] == 2
                })
                .await;
            received.extend(before);
            let partition = message["partition"].as_str().unwrap().to_string();
            if promoted_days.contains(&partition.as_str()) {
                assert!(
                    message["rows"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r["source"] != "g2"),
                    "{message}"
                );
                assert_eq!(message["generation"], 2, "{message}");
                seen.insert(partition);
            }
        }
        let body = app
            .annotations("station_stats", "2024-04-01", "2024-04-07", 30)
            .await;
        let parts = partitions_of(&body);
        for day in promoted_days {
            let p = &parts[day];
            assert_eq!(p["status"], "ready", "{day}: {p}");
            assert_eq!(p["version"], 2, "{day}: {p}");
            assert_eq!(p["generation"], 2, "{day}: {p}");
            assert_eq!(p["rows"].as_array().unwrap().len(), 2, "{day}: {p}");
        }
        // The partitions the candidate did not build were stale and were rebuilt by the new
        // version (the chart and the waiting read ask for them; the next test shows them
        // stale when nobody asks); nothing of the promoted partitions was rebuilt.
        for day in ["2024-04-01", "2024-04-04"] {
            let p = &parts[day];
            assert_eq!(p["status"], "ready", "{day}: {p}");
            assert_eq!(p["version"], 2, "{day}: {p}");
            assert_eq!(p["generation"], 2, "{day}: {p}");
            let rows = p["rows"].as_array().unwrap();
            assert_eq!(rows.len(), 2, "{day}: {p}");
            assert!(rows.iter().all(|r| r["source"] != "g2"), "{day}: {p}");
        }
        let events = log_after(&app, head).await;
        let started: BTreeSet<&str> = events
            .iter()
            .filter(|e| {
                e["type"] == "analysis.started"
                    && e["analysis"] == "station_stats"
                    && e["version"] == 2
            })
            .map(|e| e["partition"].as_str().unwrap())
            .collect();
        assert_eq!(
            started,
            BTreeSet::from(["2024-04-01", "2024-04-04"]),
            "only the partitions the candidate did not build are rebuilt"
        );
        assert!(
            events.iter().any(|e| e["type"] == "analysis.registered"
                && e["analysis"] == "station_stats"
                && e["version"] == 2),
            "{events:#?}"
        );
        assert!(
            events.iter().any(|e| e["type"] == "admin.action"
                && e["action"] == "candidate.promoted"
                && e["target"] == "station_stats"
                && e["actor"].as_str().is_some_and(|a| !a.is_empty())),
            "{events:#?}"
        );
        // The downstream analysis followed, as after any upstream change.
        let (_, fleet) = app.get("/v1/analyses/fleet", ADMIN).await;
        assert_eq!(fleet["version"], 2, "{fleet}");
        // The candidate is gone.
        let (status, _) = app.get("/v1/analyses/station_stats/candidate", ADMIN).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = app
            .post(
                "/v1/analyses/station_stats/candidate/promote",
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // The builds that made the promoted partitions are the live history now.
        let (_, history) = app
            .get(
                "/v1/analyses/station_stats/builds?partition=2024-04-02",
                ADMIN,
            )
            .await;
        assert_eq!(history["builds"][0]["version"], 2, "{history}");
    }
);

both_backends!(
    a_discarded_candidate_leaves_nothing_behind,
    |d: Deployment| async move {
        let app = start_with_live(&d).await;
        let (status, view) = put_candidate(&app, CANDIDATE_SQL).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        let (status, _) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-01", "to": "2024-04-04"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        candidate_built(&app, 3).await;

        let (status, discarded) = delete(&app, "/v1/analyses/station_stats/candidate").await;
        assert_eq!(status, StatusCode::OK, "{discarded}");
        assert_eq!(discarded["version"], 2, "{discarded}");
        assert_eq!(discarded["partitions"], 3, "{discarded}");
        let (status, _) = app.get("/v1/analyses/station_stats/candidate", ADMIN).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = delete(&app, "/v1/analyses/station_stats/candidate").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, live) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert_eq!(live["version"], 1, "{live}");
        assert!(live["candidate"].is_null(), "{live}");
        let events = log_after(&app, 0).await;
        assert!(
            events.iter().any(|e| e["type"] == "admin.action"
                && e["action"] == "candidate.discarded"
                && e["target"] == "station_stats"),
            "{events:#?}"
        );

        // A new candidate (the same version number again) is its own computation.
        let other = "SELECT source, MAX(output_mw) AS avg_mw, COUNT(*) AS n FROM generation GROUP BY source";
        let (status, view) = put_candidate(&app, other).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        assert_eq!(
            view["built"], 0,
            "nothing of the discarded one is left: {view}"
        );
        let (status, _) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-01", "to": "2024-04-02"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        candidate_built(&app, 1).await;
        let (_, diff) = app
            .get(
                "/v1/analyses/station_stats/candidate/diff?from=2024-04-01&to=2024-04-02",
                ADMIN,
            )
            .await;
        let day = &diff["partitions"][0];
        assert_eq!(day["status"], "compared", "{diff}");
        assert_eq!(day["removed"], 0, "the new candidate keeps g2: {diff}");
        assert_eq!(day["changed"], 3, "the maximum is not the average: {diff}");
    }
);

both_backends!(
    after_a_promotion_the_partitions_the_candidate_did_not_build_are_stale_until_rebuilt,
    |d: Deployment| async move {
        let app = start_with_live(&d).await;
        let (status, view) = put_candidate(&app, CANDIDATE_SQL).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        let (status, built) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-02", "to": "2024-04-04"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{built}");
        candidate_built(&app, 2).await;
        let (status, promoted) = app
            .post(
                "/v1/analyses/station_stats/candidate/promote",
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{promoted}");
        assert_eq!(promoted["promoted"], 2, "{promoted}");

        // Nobody reads with wait= and no chart is open, so nothing asks for a rebuild: once
        // the reader's cache has heard of the promotion, it serves the promoted partitions
        // live and the others stale, with the live version's old rows.
        let parts = eventually(
            Duration::from_secs(10),
            "the reader to see the promoted partitions",
            || async {
                let (status, body) = app
                    .get(
                        "/v1/annotations/station_stats?from=2024-04-01&to=2024-04-07",
                        ADMIN,
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let parts = partitions_of(&body);
                ["2024-04-02", "2024-04-03"]
                    .iter()
                    .all(|day| parts[*day]["version"] == 2)
                    .then_some(parts)
            },
        )
        .await;
        assert_eq!(parts.len(), 6, "{parts:?}");
        for (day, p) in &parts {
            let rows = p["rows"].as_array().unwrap();
            if ["2024-04-02", "2024-04-03"].contains(&day.as_str()) {
                assert_eq!(p["status"], "ready", "{day}: {p}");
                assert_eq!(p["version"], 2, "{day}: {p}");
                assert_eq!(rows.len(), 2, "{day}: {p}");
            } else {
                assert_eq!(p["status"], "stale", "{day}: {p}");
                assert!(p.get("rebuild").is_none(), "{day}: {p}");
                assert_eq!(p["version"], 1, "{day}: {p}");
                assert_eq!(p["generation"], 1, "{day}: {p}");
                assert_eq!(rows.len(), 3, "the live version's rows: {day}: {p}");
            }
        }

        // A reader who waits has them rebuilt by the promoted version.
        let body = app
            .annotations("station_stats", "2024-04-01", "2024-04-07", 30)
            .await;
        for (day, p) in partitions_of(&body) {
            assert_eq!(p["status"], "ready", "{day}: {p}");
            assert_eq!(p["version"], 2, "{day}: {p}");
            assert_eq!(p["generation"], 2, "{day}: {p}");
            let rows = p["rows"].as_array().unwrap();
            assert!(rows.iter().all(|r| r["source"] != "g2"), "{day}: {p}");
        }
    }
);

/// The live analysis with a declared key: [`LIVE_SQL`], rows identified by `source`.
async fn put_live_with_key(app: &TestApp, key: Value) -> (StatusCode, Value) {
    app.put(
        "/v1/analyses/station_stats",
        ADMIN,
        &json!({"kind": "generation", "sql": LIVE_SQL, "key": key}),
    )
    .await
}

/// A day's diff of the candidate, with `query` after the range.
async fn diff_day(app: &TestApp, query: &str) -> (StatusCode, Value) {
    app.get(
        &format!("/v1/analyses/station_stats/candidate/diff?from=2024-04-02&to=2024-04-03{query}"),
        ADMIN,
    )
    .await
}

/// One more reading per station than the live analysis counts: a measure (`n`, an
/// integer) changes, which matched on the non-measure columns is rows removed and added.
const MORE_READINGS_SQL: &str =
    "SELECT source, AVG(output_mw) AS avg_mw, COUNT(*) + 1 AS n FROM generation GROUP BY source";

both_backends!(
    a_diff_matches_rows_on_the_declared_key_unless_the_request_names_another,
    |d: Deployment| async move {
        let app = start_with_live(&d).await;

        // Bad keys are refused when the analysis is registered, naming the problem.
        for (key, says) in [
            (json!([]), "Key is empty"),
            (json!(["source", "source"]), "listed twice"),
            (json!(["source", " "]), "1 to 200 characters"),
            (json!(["station"]), "\"station\""),
        ] {
            let (status, problem) = put_live_with_key(&app, key.clone()).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{key}: {problem}");
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.contains(says), "{key}: {detail}");
        }
        let (_, live) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert!(live["key"].is_null(), "nothing refused was saved: {live}");

        let (status, live) = put_live_with_key(&app, json!(["source"])).await;
        assert_eq!(status, StatusCode::OK, "{live}");
        assert_eq!(live["key"], json!(["source"]), "{live}");
        assert_eq!(live["version"], 1, "a key changes nothing built: {live}");
        let (status, candidate) = put_candidate(&app, MORE_READINGS_SQL).await;
        assert_eq!(status, StatusCode::CREATED, "{candidate}");
        assert!(candidate["key"].is_null(), "{candidate}");
        let (status, built) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-02", "to": "2024-04-03"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{built}");
        candidate_built(&app, 1).await;

        // The candidate declares no key, so the live one's matches the rows: each station's
        // row changed in `n`.
        let (status, diff) = diff_day(&app, "").await;
        assert_eq!(status, StatusCode::OK, "{diff}");
        assert_eq!(diff["key"], json!(["source"]), "{diff}");
        assert_eq!(diff["key_from"], "live", "{diff}");
        let day = &diff["partitions"][0];
        assert_eq!(day["status"], "compared", "{diff}");
        assert_eq!(day["key_columns"], json!(["source"]), "{day}");
        assert_eq!(
            (&day["added"], &day["removed"], &day["changed"]),
            (&json!(0), &json!(0), &json!(3)),
            "{day}"
        );
        assert_eq!(day["changed_columns"], json!(["n"]), "{day}");
        let changed = &day["rows"]["changed"][0];
        assert_eq!(changed["key"], json!({"source": "g0"}), "{day}");
        assert_eq!(changed["live"]["n"], 4, "{day}");
        assert_eq!(changed["candidate"]["n"], 5, "{day}");

        // `?key=` overrides it: matched on the count too, every row is removed and added.
        let (status, asked) = diff_day(&app, "&key=source,n").await;
        assert_eq!(status, StatusCode::OK, "{asked}");
        assert_eq!(asked["key"], json!(["source", "n"]), "{asked}");
        assert_eq!(asked["key_from"], "query", "{asked}");
        let day = &asked["partitions"][0];
        assert_eq!(
            (&day["added"], &day["removed"], &day["changed"]),
            (&json!(3), &json!(3), &json!(0)),
            "{day}"
        );

        // A key the candidate declares wins over the live one; declaring it keeps the
        // candidate's version and what it built.
        let (status, keyed) = app
            .put(
                "/v1/analyses/station_stats?candidate=true",
                ADMIN,
                &json!({"kind": "generation", "sql": MORE_READINGS_SQL, "key": ["n"]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{keyed}");
        assert_eq!(keyed["key"], json!(["n"]), "{keyed}");
        assert_eq!(keyed["version"], candidate["version"], "{keyed}");
        assert_eq!(keyed["built"], 1, "{keyed}");
        let (status, diff) = diff_day(&app, "").await;
        assert_eq!(status, StatusCode::OK, "{diff}");
        assert_eq!(diff["key_from"], "candidate", "{diff}");
        let day = &diff["partitions"][0];
        assert_eq!(day["key_columns"], json!(["n"]), "{day}");
        assert_eq!(
            (&day["added"], &day["removed"], &day["changed"]),
            (&json!(3), &json!(3), &json!(0)),
            "{day}"
        );

        // A candidate without the live key's column: its diff is refused, naming the column,
        // until a request or the candidate names columns it has.
        let renamed = "SELECT source AS station, AVG(output_mw) AS avg_mw, COUNT(*) AS n FROM generation GROUP BY source";
        let (status, view) = put_candidate(&app, renamed).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        let (status, _) = app
            .post(
                "/v1/analyses/station_stats/candidate/builds",
                ADMIN,
                &json!({"from": "2024-04-02", "to": "2024-04-03"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        candidate_built(&app, 1).await;
        let (status, refused) = diff_day(&app, "").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
        let detail = refused["detail"].as_str().unwrap();
        assert!(
            detail.contains("key column source that station_stats declares")
                && detail.contains("station, avg_mw, n"),
            "{detail}"
        );
        let (status, asked) = diff_day(&app, "&key=n").await;
        assert_eq!(status, StatusCode::OK, "{asked}");
        assert_eq!(asked["partitions"][0]["changed"], 3, "{asked}");
        assert_eq!(
            asked["partitions"][0]["changed_columns"],
            json!(["source", "station"]),
            "{asked}"
        );
    }
);

both_backends!(
    a_declared_key_keeps_the_version_survives_a_restart_and_is_promoted_with_its_candidate,
    |d: Deployment| async move {
        let mut app = start_with_live(&d).await;
        let head = log_head(&app).await;
        let (status, live) = put_live_with_key(&app, json!(["source"])).await;
        assert_eq!(status, StatusCode::OK, "{live}");
        assert_eq!(live["key"], json!(["source"]), "{live}");
        assert_eq!(live["version"], 1, "{live}");
        // The annotations stay current: nothing is stale, nothing is rebuilt.
        let body = app
            .annotations("station_stats", "2024-04-01", "2024-04-07", 30)
            .await;
        assert!(
            partitions_of(&body)
                .values()
                .all(|p| p["status"] == "ready" && p["version"] == 1 && p["generation"] == 1),
            "{body}"
        );
        let events = log_after(&app, head).await;
        assert!(
            !events.iter().any(|e| e["type"] == "analysis.started"),
            "{events:#?}"
        );
        let (status, candidate) = app
            .put(
                "/v1/analyses/station_stats?candidate=true",
                ADMIN,
                &json!({"kind": "generation", "sql": CANDIDATE_SQL, "key": ["source", "n"]}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{candidate}");
        assert_eq!(candidate["key"], json!(["source", "n"]), "{candidate}");

        app.terminate();
        let app = d.start().await;
        let (_, live) = app.get("/v1/analyses/station_stats", ADMIN).await;
        assert_eq!(live["key"], json!(["source"]), "{live}");
        assert_eq!(live["version"], 1, "{live}");
        let (_, list) = app.get("/v1/analyses", ADMIN).await;
        let listed = list["analyses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "station_stats")
            .cloned()
            .unwrap_or_else(|| panic!("station_stats is listed: {list}"));
        assert_eq!(listed["key"], json!(["source"]), "{listed}");
        let builtin = list["analyses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "daily_avg")
            .cloned()
            .unwrap_or_else(|| panic!("daily_avg is listed: {list}"));
        assert!(
            builtin["key"].is_null(),
            "a built-in declares none: {builtin}"
        );
        let (_, candidate) = app.get("/v1/analyses/station_stats/candidate", ADMIN).await;
        assert_eq!(candidate["key"], json!(["source", "n"]), "{candidate}");

        // Leaving key out of the definition removes it, again under the same version.
        let (status, live) = app
            .put(
                "/v1/analyses/station_stats",
                ADMIN,
                &json!({"kind": "generation", "sql": LIVE_SQL}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{live}");
        assert!(live["key"].is_null(), "{live}");
        assert_eq!(live["version"], 1, "{live}");

        // Promoting the candidate makes its key the live one, with the rest of its definition.
        let (status, promoted) = app
            .post(
                "/v1/analyses/station_stats/candidate/promote",
                ADMIN,
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{promoted}");
        assert_eq!(
            promoted["analysis"]["key"],
            json!(["source", "n"]),
            "{promoted}"
        );
        assert_eq!(promoted["analysis"]["version"], 2, "{promoted}");
    }
);
