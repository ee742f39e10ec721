//! Hostile and odd input: every request gets a clear answer, both backends accept and
//! refuse the same records, and nothing grows without bound.

use std::io::Write;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::both_backends;
use crate::helpers::*;

fn tick(created: &str, data: Value) -> Value {
    json!({"kind": "tick", "source": "t", "created": created, "data": data})
}

both_backends!(
    records_no_backend_can_store_are_quarantined_alike_and_the_good_ones_kept,
    |d: Deployment| async move {
        let app = d.start().await;
        let mut body = Vec::new();
        let mut good = tick("2024-10-01T13:59:59.9999997Z", json!({"a": "fine"}));
        good["data_id"] = json!(uuid::Uuid::now_v7());
        for line in [
            r#"{"kind":"tick","source":"t","data":{"a":"x\u0000y"}}"#.to_string(),
            r#"{"kind":"tick","source":"t","data":{"a\u0000":1}}"#.to_string(),
            r#"{"kind":"tick","source":"t","data":{"a":"\ud800"}}"#.to_string(),
            r#"{"kind":"tick","source":"t","created":"0000-05-05T00:00:00Z","data":{}}"#
                .to_string(),
            good.to_string(),
        ] {
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
        }
        body.extend_from_slice(b"{\"kind\":\"tick\",\"source\":\"t\",\"data\":{\"a\":\"\xff\"}}\n");
        let (status, answer) = app.ingest_raw(ADMIN, "application/x-ndjson", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["accepted"], 1, "{answer}");
        assert_eq!(answer["quarantined"], 5, "{answer}");
        let errors: Vec<String> = answer["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["error"].as_str().unwrap().to_string())
            .collect();
        assert!(errors[0].contains("U+0000"), "{errors:?}");
        assert!(errors[3].contains("accepted range"), "{errors:?}");
        assert!(errors[4].contains("UTF-8"), "{errors:?}");
        // 13:59:59.9999997 is cut to the microsecond: it stays in hour 13 on both backends.
        let (status, stored) = app
            .get(
                &format!("/v1/events/{}", good["data_id"].as_str().unwrap()),
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(stored["created"], "2024-10-01T13:59:59.999999Z", "{stored}");
        let (status, _) = app
            .put(
                "/v1/analyses/tick_hours",
                ADMIN,
                &json!({"kind": "tick", "partition": "1h", "sql": "SELECT COUNT(*) AS n FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let hour = app
            .annotations(
                "tick_hours",
                "2024-10-01T13:00:00Z",
                "2024-10-01T14:00:00Z",
                30,
            )
            .await;
        assert_eq!(
            partitions_of(&hour)["2024-10-01T13"]["rows"],
            json!([{"n": 1}])
        );
    }
);

both_backends!(
    a_field_of_another_type_is_quarantined_and_the_kinds_analyses_keep_working,
    |d: Deployment| async move {
        let app = d.start().await;
        let meter = |v: Value, extra: Value| {
            let mut data = json!({"v": v});
            for (k, x) in extra.as_object().unwrap() {
                data[k] = x.clone();
            }
            json!({"kind": "meter", "source": "m", "created": "2024-10-02T10:00:00Z", "data": data})
        };
        let (status, body) = app
            .ingest(
                ADMIN,
                &[
                    meter(json!(1), json!({"source": "inner", "data_source": "other"})),
                    meter(json!(2.5), json!({})),
                    meter(json!("three"), json!({})),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (body["accepted"].clone(), body["quarantined"].clone()),
            (json!(2), json!(1))
        );
        let error = body["errors"][0]["error"].as_str().unwrap();
        assert!(
            error.contains("\"v\"") && error.contains("float") && error.contains("a string"),
            "{error}"
        );
        let (_, kinds) = app.get("/v1/kinds", ADMIN).await;
        let meter_kind = kinds["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == "meter")
            .unwrap()
            .clone();
        assert_eq!(meter_kind["fields"]["v"]["type"], "float", "{meter_kind}");
        assert_eq!(meter_kind["fields"]["v"]["declared"], false, "{meter_kind}");
        assert_eq!(
            meter_kind["fields"]["source"]["column"], "data_source",
            "{meter_kind}"
        );
        assert_eq!(
            meter_kind["fields"]["data_source"]["column"], "data_data_source",
            "{meter_kind}"
        );
        // AVG(v) registers (the odd record never entered the schema), and colliding names
        // stay apart.
        let (status, info) = app
            .put(
                "/v1/analyses/meter_avg",
                ADMIN,
                &json!({"kind": "meter", "sql": "SELECT AVG(v) AS v, MAX(data_source) AS inner_source, MAX(data_data_source) AS other, MAX(source) AS source FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        let built = app
            .annotations("meter_avg", "2024-10-02", "2024-10-04", 30)
            .await;
        let parts = partitions_of(&built);
        assert_eq!(
            parts["2024-10-02"]["rows"],
            json!([{"v": 1.75, "inner_source": "inner", "other": "other", "source": "m"}]),
            "{built}"
        );
        assert_eq!(
            parts["2024-10-03"]["status"], "ready",
            "an empty day builds too: {built}"
        );
    }
);

both_backends!(
    sql_that_reads_files_is_refused,
    |d: Deployment| async move {
        let app = d.start().await;
        for (sql, named) in [
            (
                "SELECT * FROM read_parquet('/etc/passwd.parquet')",
                "read_parquet",
            ),
            (
                "SELECT * FROM events WHERE source IN (SELECT source FROM read_csv('/x.csv'))",
                "read_csv",
            ),
            ("SELECT * FROM read_ipc('/x.arrow')", "read_ipc"),
        ] {
            let (status, problem) = app
                .put(
                    "/v1/analyses/sneaky",
                    ADMIN,
                    &json!({"kind": "tick", "sql": sql}),
                )
                .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
            assert!(
                problem["detail"].as_str().unwrap().contains(named),
                "{problem}"
            );
        }
        let (status, _) = app.get("/v1/analyses/sneaky", ADMIN).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_over_its_memory_budget_fails_naming_the_limit_and_others_flow() {
    let Some(d) = Deployment::new(Backend::Sqlite, "memory_budget").await else {
        return;
    };
    let app = d.start_with(&[("SCHOLIA_BUILD_MEMORY_MB", "256")]).await;
    let big: Vec<Value> = (0..40)
        .map(|i| {
            tick(
                &format!("2024-10-05T{:02}:{:02}:00Z", i % 24, i % 60),
                json!({"v": i}),
            )
        })
        .collect();
    let (status, _) = app.ingest(ADMIN, &big).await;
    assert_eq!(status, StatusCode::OK);
    let small: Vec<Value> = (0..5)
        .map(|i| tick(&format!("2024-10-06T0{i}:00:00Z"), json!({"v": i})))
        .collect();
    let (status, _) = app.ingest(ADMIN, &small).await;
    assert_eq!(status, StatusCode::OK);
    // The partition cross-joined with itself five times: 40 records make 102,400,000 rows.
    let (status, info) = app
        .put(
            "/v1/analyses/explode",
            ADMIN,
            &json!({"kind": "tick", "sql": "SELECT COUNT(*) AS n FROM events a CROSS JOIN events b CROSS JOIN events c CROSS JOIN events d CROSS JOIN events e"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{info}");
    let started = Instant::now();
    let parts = eventually(Duration::from_secs(60), "the big day to fail", || async {
        let parts = partitions_of(
            &app.annotations("explode", "2024-10-05", "2024-10-07", 5)
                .await,
        );
        (parts["2024-10-05"]["status"] == "failed" && parts["2024-10-06"]["status"] == "ready")
            .then_some(parts)
    })
    .await;
    let error = parts["2024-10-05"]["error"].as_str().unwrap();
    assert!(
        error.contains("SCHOLIA_BUILD_MEMORY_MB") && error.contains("256 MB"),
        "{error}"
    );
    assert_eq!(parts["2024-10-06"]["rows"], json!([{"n": 3125}]));
    assert!(started.elapsed() < Duration::from_secs(60));
    let (status, ready) = app.get("/readyz", ADMIN).await;
    assert_eq!(status, StatusCode::OK, "the service stays healthy: {ready}");
}

both_backends!(
    bodies_are_read_whole_and_a_retry_without_created_is_a_duplicate,
    |d: Deployment| async move {
        let app = d.start().await;
        // Two gzip members, as `cat a.gz b.gz` makes: both are read.
        let member = |n: usize| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            for i in 0..n {
                writeln!(gz, "{}", tick("2024-10-07T01:00:00Z", json!({"i": i}))).unwrap();
            }
            gz.finish().unwrap()
        };
        let mut both = member(3);
        both.extend(member(4));
        let r = app
            .client
            .post(app.url("/v1/events"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", "gzip")
            .body(both)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["accepted"], 7, "{answer}");

        // A producer's retry of a record without `created`, a second later.
        let retried = json!({"data_id": uuid::Uuid::now_v7(), "kind": "tick", "source": "t", "data": {"a": 1}});
        let (_, first) = app.ingest(ADMIN, std::slice::from_ref(&retried)).await;
        assert_eq!(first["accepted"], 1, "{first}");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let (_, again) = app.ingest(ADMIN, &[retried]).await;
        assert_eq!(
            (
                again["accepted"].clone(),
                again["duplicates"].clone(),
                again["quarantined"].clone()
            ),
            (json!(0), json!(1), json!(0)),
            "{again}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_sent_in_time_frees_its_slot() {
    let Some(d) = Deployment::new(Backend::Sqlite, "slow_body").await else {
        return;
    };
    let app = d
        .start_with(&[
            ("SCHOLIA_BODY_TIMEOUT_SECONDS", "1"),
            ("SCHOLIA_MAX_INFLIGHT_BATCHES", "1"),
        ])
        .await;
    let address = app.base.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n{{\"kind\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    // Both receiving slots are held by the stalled uploads: a batch is refused for now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = app
        .ingest(ADMIN, &[tick("2024-10-08T00:00:00Z", json!({}))])
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let started = Instant::now();
    for mut stream in slow {
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("the server answers a stalled upload")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("did not arrive within 1 seconds"),
            "{answer}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The slots are free again.
    let (status, body) = app
        .ingest(ADMIN, &[tick("2024-10-08T00:00:00Z", json!({}))])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

both_backends!(
    waits_ranges_and_durations_are_bounded_with_4xx,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, _) = app
            .put(
                "/v1/analyses/hourly_ticks",
                ADMIN,
                &json!({"kind": "tick", "partition": "1h", "sql": "SELECT COUNT(*) AS n FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        for wait in ["1e20", "-1", "nan", "301"] {
            let (status, problem) = app
                .get(
                    &format!("/v1/annotations/daily_avg?from=2024-10-01&to=2024-10-02&wait={wait}"),
                    ADMIN,
                )
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "wait={wait}: {problem}");
            assert!(
                problem["detail"].as_str().unwrap().contains("300"),
                "{problem}"
            );
        }
        let started = Instant::now();
        let (status, problem) = app
            .get(
                "/v1/annotations/hourly_ticks?from=1000-01-01&to=9000-01-01",
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("at most 5000"),
            "{problem}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused by arithmetic, not by listing"
        );
        for window in ["P99999999999999D", "P100000000D", "P400D"] {
            let (status, problem) = app
                .put(
                    "/v1/schedules/far",
                    ADMIN,
                    &json!({"analysis": "daily_avg", "cron": "0 1 * * *", "window": window}),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{window}: {problem}"
            );
            assert!(
                problem["detail"].as_str().unwrap().contains("longer than"),
                "{problem}"
            );
        }
        // A huge invalidation is refused by counting too.
        let (status, problem) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &json!({"analysis": "hourly_ticks", "from": "0001-01-01", "to": "9999-01-01"}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        // The token is checked before the body is read.
        let r = app
            .client
            .put(app.url("/v1/kinds/k"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
);

both_backends!(
    a_batch_touching_20000_hours_is_written_in_one_piece,
    |d: Deployment| async move {
        let app = d.start().await;
        let start = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z").unwrap();
        let records: Vec<Value> = (0..20_000)
            .map(|i| {
                tick(
                    &(start + chrono::Duration::hours(i)).to_rfc3339(),
                    json!({"i": i}),
                )
            })
            .collect();
        let (status, body) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 20_000, "{body}");
    }
);

both_backends!(
    revoking_the_bootstrap_admin_token_does_not_break_the_next_start,
    |d: Deployment| async move {
        let mut app = d.start().await;
        let other = app.token("admin", &[]).await;
        let (_, tokens) = app.get("/v1/tokens", ADMIN).await;
        let bootstrap = tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"].as_str().unwrap().contains("SCHOLIA_ADMIN_TOKEN"))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = app
            .client
            .delete(app.url(&format!("/v1/tokens/{bootstrap}")))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        app.terminate();
        let app = d.start().await;
        let (status, _) = app.get("/v1/tokens", ADMIN).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "a revoked token stays revoked"
        );
        let (status, _) = app.get("/v1/tokens", &other).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            app.log().contains("SCHOLIA_ADMIN_TOKEN was revoked"),
            "{}",
            app.log()
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_declarations_reach_every_ingest_process_within_seconds() {
    let Some(d) = Deployment::new(Backend::Postgres, "declarations").await else {
        return;
    };
    let a = d.start_with(&[("SCHOLIA_ROLES", "ingest,cache")]).await;
    let b = d.start_with(&[("SCHOLIA_ROLES", "ingest")]).await;
    let (status, _) = b
        .ingest(
            ADMIN,
            &[tick("2024-10-09T00:00:00Z", json!({"level": "high"}))],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = a
        .put(
            "/v1/kinds/gauge",
            ADMIN,
            &json!({"fields": {"level": "float"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let gauge = |level: Value| json!({"kind": "gauge", "source": "g", "created": "2024-10-09T00:00:00Z", "data": {"level": level}});
    let declared = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the other process to apply the declaration",
        || async {
            let (_, body) = b.ingest(ADMIN, &[gauge(json!("high"))]).await;
            (body["quarantined"] == 1).then_some(())
        },
    )
    .await;
    assert!(
        declared.elapsed() < Duration::from_secs(5),
        "{:?}",
        declared.elapsed()
    );
    let (_, body) = b.ingest(ADMIN, &[gauge(json!(2.5))]).await;
    assert_eq!(body["accepted"], 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quarantine_keeps_at_most_its_bound() {
    let Some(d) = Deployment::new(Backend::Sqlite, "quarantine_bound").await else {
        return;
    };
    let mut app = d.start_with(&[("SCHOLIA_QUARANTINE_MAX_ROWS", "5")]).await;
    let lines: Vec<String> = (0..20)
        .map(|i| format!("not json {i}"))
        .chain([tick("2024-10-10T00:00:00Z", json!({})).to_string()])
        .collect();
    let (status, body) = app
        .ingest_raw(ADMIN, "application/x-ndjson", lines.join("\n").into_bytes())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["quarantined"], 20);
    app.terminate();
    // Pruning runs at start and then every few minutes.
    let app = d.start_with(&[("SCHOLIA_QUARANTINE_MAX_ROWS", "5")]).await;
    let page = eventually(
        Duration::from_secs(10),
        "the quarantine to be pruned",
        || async {
            let (_, page) = app.get("/v1/quarantine?limit=100", ADMIN).await;
            (page["records"].as_array()?.len() == 5).then_some(page)
        },
    )
    .await;
    assert_eq!(
        page["records"][0]["raw"], "not json 19",
        "the newest are kept: {page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outages_answer_503_with_retry_after_and_never_500() {
    let Some(d) = Deployment::new(Backend::Postgres, "outage_503").await else {
        return;
    };
    let app = d.start().await;
    let pool = d.pg().await;
    let database = d.database_url.rsplit('/').next().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(4);
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    while Instant::now() < until {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .execute(&pool)
        .await
        .unwrap();
        let r = app
            .client
            .post(app.url("/v1/events"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/x-ndjson")
            .body(format!("{}\n", tick("2024-10-11T00:00:00Z", json!({}))))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            assert_eq!(status, 503, "{}", r.text().await.unwrap_or_default());
            assert!(r.headers().contains_key("retry-after"));
        }
        *answers.entry(status).or_default() += 1;
    }
    assert!(answers.contains_key(&200), "{answers:?}");
}

both_backends!(
    an_annotation_larger_than_a_websocket_buffer_reaches_its_subscribers,
    |d: Deployment| async move {
        let app = d.start().await;
        let note = "n".repeat(120);
        let records: Vec<Value> = (0..12_000)
            .map(|i| {
                tick(
                    &format!(
                        "2024-10-02T{:02}:{:02}:{:02}Z",
                        i % 24,
                        (i / 24) % 60,
                        i % 60
                    ),
                    json!({"i": i, "note": note}),
                )
            })
            .collect();
        let (status, body) = app.ingest(ADMIN, &records).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 12_000, "{body}");
        let (status, body) = app
            .put(
                "/v1/analyses/tick_notes",
                ADMIN,
                &json!({"kind": "tick", "sql": "SELECT i, note FROM events ORDER BY i"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let mut ws = crate::ws::Ws::connect(&app, ADMIN).await;
        ws.subscribe("big", "tick_notes", "2024-10-02", "2024-10-03")
            .await;
        let (message, _) = ws
            .until(crate::ws::SOON, "the large partition", |m| {
                m["type"] == "partition"
            })
            .await;
        assert_eq!(message["rows"].as_array().unwrap().len(), 12_000);
        assert!(message.to_string().len() > 1 << 20);
        // The socket stays open and keeps working.
        ws.subscribe("again", "tick_notes", "2024-10-02", "2024-10-03")
            .await;
        ws.until(crate::ws::SOON, "the second subscription's rows", |m| {
            m["type"] == "partition" && m["sub"] == "again"
        })
        .await;
    }
);

both_backends!(
    websockets_and_subscriptions_per_token_are_bounded_and_given_back,
    |d: Deployment| async move {
        let app = d
            .start_with(&[
                ("SCHOLIA_MAX_SOCKETS_PER_TOKEN", "2"),
                ("SCHOLIA_MAX_SUBSCRIPTIONS_PER_TOKEN", "3"),
            ])
            .await;
        let reader = app.token("read", &[]).await;
        let mut first = crate::ws::Ws::connect(&app, &reader).await;
        let second = crate::ws::Ws::connect(&app, &reader).await;
        // A third socket of the same token is refused with a sentence; another token's is not.
        let url = app.ws_url(&format!("/v1/ws?token={reader}"));
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429);
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .to_string();
                assert!(body.contains("SCHOLIA_MAX_SOCKETS_PER_TOKEN"), "{body}");
            }
            other => panic!("a third socket was not refused: {other:?}"),
        }
        let _admins = crate::ws::Ws::connect(&app, ADMIN).await;

        for id in ["a", "b", "c"] {
            first
                .subscribe(id, "daily_avg", "2024-10-01", "2024-10-02")
                .await;
            first
                .until(crate::ws::SOON, "the subscription's answer", |m| {
                    m["sub"] == id && matches!(m["type"].as_str(), Some("waiting" | "ready"))
                })
                .await;
        }
        first
            .subscribe("d", "daily_avg", "2024-10-01", "2024-10-02")
            .await;
        let (refused, _) = first
            .until(crate::ws::SOON, "the refusal", |m| m["type"] == "error")
            .await;
        assert_eq!(refused["sub"], "d", "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .contains("SCHOLIA_MAX_SUBSCRIPTIONS_PER_TOKEN"),
            "{refused}"
        );
        // Unsubscribing gives one back; closing a socket gives the socket back.
        first.send(json!({"op": "unsubscribe", "id": "a"})).await;
        first
            .subscribe("d", "daily_avg", "2024-10-01", "2024-10-02")
            .await;
        first
            .until(crate::ws::SOON, "the subscription's answer", |m| {
                m["sub"] == "d" && matches!(m["type"].as_str(), Some("waiting" | "ready"))
            })
            .await;
        drop(second);
        eventually(
            Duration::from_secs(10),
            "the closed socket to be given back",
            || async {
                let url = app.ws_url(&format!("/v1/ws?token={reader}"));
                tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }
);

both_backends!(
    a_record_that_would_bring_its_kind_past_1000_fields_is_quarantined_and_the_good_ones_kept,
    |d: Deployment| async move {
        let app = d.start().await;
        let wide = |from: usize, to: usize| -> Value {
            let data: serde_json::Map<String, Value> = (from..to)
                .map(|i| (format!("sensor_{i:04}"), json!(1.5)))
                .collect();
            tick("2024-10-09T10:00:00Z", Value::Object(data))
        };
        let errors = |body: &Value| -> Vec<String> {
            body["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["error"].as_str().unwrap().to_string())
                .collect()
        };
        // One record of 1,500 fields between two good ones.
        let (status, body) = app
            .ingest(
                ADMIN,
                &[
                    tick("2024-10-09T10:00:00Z", json!({"v": 1})),
                    wide(0, 1_500),
                    tick("2024-10-09T11:00:00Z", json!({"v": 2})),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (&body["accepted"], &body["quarantined"]),
            (&json!(2), &json!(1))
        );
        assert_eq!(body["errors"][0]["line"], 2, "{body}");
        let error = errors(&body)[0].clone();
        assert!(
            error.contains("1501 fields, more than the 1000 a kind may have")
                && error.contains("one field holding an object or array"),
            "{error}"
        );

        // Up to the limit, records teach their fields; one past it is quarantined, and a
        // record of known fields still fits.
        let (status, body) = app
            .ingest(
                ADMIN,
                &[
                    wide(0, 999),
                    wide(999, 1_000),
                    tick("2024-10-09T12:00:00Z", json!({"v": 3, "sensor_0005": 2.0})),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (&body["accepted"], &body["quarantined"]),
            (&json!(2), &json!(1))
        );
        assert_eq!(body["errors"][0]["line"], 2, "{body}");
        assert!(errors(&body)[0].contains("1001 fields"), "{body}");
        let (_, kinds) = app.get("/v1/kinds", ADMIN).await;
        let tick_kind = kinds["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == "tick")
            .unwrap()
            .clone();
        assert_eq!(tick_kind["fields"].as_object().unwrap().len(), 1_000);
        let (status, quarantine) = app.get("/v1/quarantine", ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{quarantine}");
        assert!(
            quarantine.to_string().contains("a kind may have"),
            "{quarantine}"
        );

        // A declaration is held to the same limit, and names what to do.
        let (status, body) = app
            .put(
                "/v1/kinds/tick",
                ADMIN,
                &json!({"fields": {"one_more": "float"}}),
            )
            .await;
        assert!(status.is_client_error(), "{status} {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("1001 fields, more than the 1000") && detail.contains("Declare fewer"),
            "{body}"
        );
        let fields: serde_json::Map<String, Value> = (0..1_001)
            .map(|i| (format!("f{i}"), json!("float")))
            .collect();
        let (status, body) = app
            .put("/v1/kinds/fresh", ADMIN, &json!({"fields": fields}))
            .await;
        assert!(status.is_client_error(), "{status} {body}");
        // Declaring a type for a field the kind already has adds none.
        let (status, body) = app
            .put("/v1/kinds/tick", ADMIN, &json!({"fields": {"v": "float"}}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
);
