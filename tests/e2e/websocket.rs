//! The websocket protocol against the real binary.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::both_backends;
use crate::helpers::*;
use crate::ws::Ws;

const D1: &str = "2024-05-05";
const D2: &str = "2024-05-06";
const D3: &str = "2024-05-07";
const D4: &str = "2024-05-08";

/// How long anything the server owes a client may take (builds included).
const SOON: Duration = Duration::from_secs(30);

/// The HTTP status the server answers an upgrade request with (101 when it upgrades).
async fn upgrade_status(request: Request<()>) -> u16 {
    match tokio::time::timeout(SOON, connect_async(request)).await {
        Ok(Ok((_, response))) => response.status().as_u16(),
        Ok(Err(tungstenite::Error::Http(response))) => response.status().as_u16(),
        Ok(Err(e)) => panic!("the upgrade failed without an HTTP answer: {e}"),
        Err(_) => panic!("the upgrade took more than {SOON:?}"),
    }
}

fn is(message: &Value, kind: &str, sub: &str) -> bool {
    message["type"] == kind && message["sub"] == sub
}

fn is_partition(message: &Value, sub: &str, partition: &str) -> bool {
    is(message, "partition", sub) && message["partition"] == partition
}

/// The row of `source` in a `partition` message.
fn row<'a>(message: &'a Value, source: &str) -> &'a Value {
    message["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows in {message}"))
        .iter()
        .find(|r| r["source"] == source)
        .unwrap_or_else(|| panic!("no row of {source} in {message}"))
}

fn avg_of(message: &Value, source: &str) -> f64 {
    row(message, source)["avg_mw"]
        .as_f64()
        .unwrap_or_else(|| panic!("no avg_mw in {message}"))
}

/// Check a `partition` message of daily_avg completely.
fn check_partition(message: &Value, sub: &str, partition: &str, avg_s1: f64) -> i64 {
    assert_eq!(message["type"], "partition", "{message}");
    assert_eq!(message["sub"], sub, "{message}");
    assert_eq!(message["analysis"], "daily_avg", "{message}");
    assert_eq!(message["version"], 1, "{message}");
    assert_eq!(message["partition"], partition, "{message}");
    let generation = message["generation"]
        .as_i64()
        .unwrap_or_else(|| panic!("no generation in {message}"));
    assert!(generation >= 1, "{message}");
    assert_eq!(
        message["rows"].as_array().map(Vec::len),
        Some(1),
        "{message}"
    );
    assert!(
        close(Some(avg_of(message, "s1")), Some(avg_s1)),
        "expected avg_mw {avg_s1} in {message}"
    );
    generation
}

async fn ingest_ok(app: &TestApp, records: &[Value]) {
    let (status, body) = app.ingest(ADMIN, records).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], records.len(), "{body}");
}

/// Two records of s1 in each of D1 (avg 15), D2 (avg 40) and D3 (avg 6).
async fn three_days(app: &TestApp) {
    ingest_ok(
        app,
        &[
            generation("s1", "2024-05-05T10:00:00Z", json!(10.0)),
            generation("s1", "2024-05-05T11:00:00Z", json!(20.0)),
            generation("s1", "2024-05-06T10:00:00Z", json!(30.0)),
            generation("s1", "2024-05-06T11:00:00Z", json!(50.0)),
            generation("s1", "2024-05-07T10:00:00Z", json!(5.0)),
            generation("s1", "2024-05-07T11:00:00Z", json!(7.0)),
        ],
    )
    .await;
}

async fn build(app: &TestApp, from: &str, to: &str) -> Value {
    let body = app.annotations("daily_avg", from, to, 30).await;
    let parts = partitions_of(&body);
    assert!(
        parts.values().all(|p| p["status"] == "ready"),
        "not built: {body}"
    );
    body
}

both_backends!(the_protocol_end_to_end, |d: Deployment| async move {
    let app = d.start().await;
    three_days(&app).await;
    build(&app, D1, D2).await;
    let read = app.token("read", &[]).await;
    let mut ws = Ws::connect(&app, &read).await;
    ws.subscribe("c1", "daily_avg", D1, D4).await;

    // What is cached comes at once; the rest is requested, built and sent.
    let first = ws.next(SOON).await;
    let g1 = check_partition(&first, "c1", D1, 15.0);
    let (_, before) = ws.until(SOON, "ready", |m| m["type"] == "ready").await;
    let mut messages = before.clone();
    messages.push(json!({"type": "ready", "sub": "c1"}));
    assert!(messages.iter().all(|m| m["sub"] == "c1"), "{messages:#?}");
    let waiting: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i]["type"] == "waiting")
        .collect();
    assert_eq!(waiting.len(), 1, "one waiting message: {messages:#?}");
    let waiting = waiting[0];
    assert_eq!(
        messages[waiting]["partitions"],
        json!([D2, D3]),
        "{messages:#?}"
    );
    let mut generations = std::collections::HashMap::new();
    for (day, avg) in [(D2, 40.0), (D3, 6.0)] {
        let found: Vec<usize> = (0..messages.len())
            .filter(|&i| is_partition(&messages[i], "c1", day))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one partition message of {day}: {messages:#?}"
        );
        let at = found[0];
        assert!(
            waiting < at,
            "waiting comes before the partitions it announces: {messages:#?}"
        );
        generations.insert(day, check_partition(&messages[at], "c1", day, avg));
        let statuses: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i]["type"] == "status" && messages[i]["partition"] == day)
            .collect();
        assert!(!statuses.is_empty(), "a status of {day}: {messages:#?}");
        for &i in &statuses {
            assert!(
                i < at,
                "the status of {day} comes before its rows: {messages:#?}"
            );
            assert!(
                matches!(messages[i]["status"].as_str(), Some("queued" | "running")),
                "{messages:#?}"
            );
        }
    }
    assert!(
        messages.iter().all(|m| matches!(
            m["type"].as_str(),
            Some("waiting" | "status" | "partition" | "ready")
        )),
        "{messages:#?}"
    );
    assert!(
        !messages.iter().any(|m| m["partition"] == D1),
        "D1 was ready and is not sent again: {messages:#?}"
    );

    // New source data in a subscribed partition: it is rebuilt and sent again.
    ingest_ok(
        &app,
        &[generation("s1", "2024-05-06T12:00:00Z", json!(100.0))],
    )
    .await;
    let (update, before) = ws
        .until(SOON, "the rebuilt D2", |m| is_partition(m, "c1", D2))
        .await;
    let g2 = check_partition(&update, "c1", D2, 60.0);
    assert!(g2 > generations[D2], "a higher generation: {update}");
    assert!(
        before
            .iter()
            .all(|m| is(m, "status", "c1") && m["partition"] == D2),
        "only the status of D2 before its rebuild: {before:#?}"
    );

    // An invalidation: `invalidated`, then the rebuilt partition.
    let (status, body) = app
        .post("/v1/invalidations", ADMIN, &json!({"analysis": "daily_avg", "from": D3, "to": D4, "reason": "test", "rebuild": "eager"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (rebuilt, before) = ws
        .until(SOON, "the rebuilt D3", |m| is_partition(m, "c1", D3))
        .await;
    let g3 = check_partition(&rebuilt, "c1", D3, 6.0);
    assert!(g3 > generations[D3], "a higher generation: {rebuilt}");
    let invalidated: Vec<&Value> = before
        .iter()
        .filter(|m| m["type"] == "invalidated")
        .collect();
    assert_eq!(
        invalidated.len(),
        1,
        "one invalidated message before the rebuild: {before:#?}"
    );
    assert_eq!(invalidated[0]["sub"], "c1");
    assert!(
        invalidated[0]["partitions"]
            .as_array()
            .unwrap()
            .contains(&json!(D3)),
        "{before:#?}"
    );
    assert!(
        !invalidated[0]["partitions"]
            .as_array()
            .unwrap()
            .contains(&json!(D1)),
        "{before:#?}"
    );
    ws.until(SOON, "ready after the rebuild", |m| is(m, "ready", "c1"))
        .await;

    // Unsubscribed: nothing more for c1. A second subscription on the same socket
    // shows when the next change has been fanned out.
    ws.send(json!({"op": "unsubscribe", "id": "c1"})).await;
    ws.subscribe("c2", "daily_avg", D1, D4).await;
    let (_, before) = ws.until(SOON, "c2 ready", |m| is(m, "ready", "c2")).await;
    let days: Vec<&Value> = before
        .iter()
        .filter(|m| m["type"] == "partition")
        .map(|m| &m["partition"])
        .collect();
    assert_eq!(days, [D1, D2, D3], "{before:#?}");
    assert_eq!(check_partition(&before[0], "c2", D1, 15.0), g1);
    ingest_ok(
        &app,
        &[generation("s1", "2024-05-05T12:00:00Z", json!(30.0))],
    )
    .await;
    let (update, before) = ws
        .until(SOON, "the rebuilt D1 for c2", |m| is_partition(m, "c2", D1))
        .await;
    check_partition(&update, "c2", D1, 20.0);
    let mut after = before;
    after.extend(ws.drain_for(Duration::from_millis(1500)).await);
    assert!(
        after.iter().all(|m| m["sub"] == "c2"),
        "nothing for c1 after it was unsubscribed: {after:#?}"
    );
});

both_backends!(
    the_upgrade_checks_the_token_and_the_origin,
    |d: Deployment| async move {
        let app = d.start().await;
        let read = app.token("read", &[]).await;
        let ingest = app.token("ingest", &[]).await;
        let request = |path: &str, origin: Option<&str>| {
            let mut request = app.ws_url(path).into_client_request().unwrap();
            if let Some(origin) = origin {
                request
                    .headers_mut()
                    .insert("Origin", HeaderValue::from_str(origin).unwrap());
            }
            request
        };
        let own = app.base.clone();
        assert!(own.starts_with("http://127.0.0.1:"), "{own}");

        assert_eq!(
            upgrade_status(request("/v1/ws", None)).await,
            401,
            "no token"
        );
        assert_eq!(
            upgrade_status(request("/v1/ws?token=not-a-token-at-all", None)).await,
            401,
            "an unknown token"
        );
        assert_eq!(
            upgrade_status(request(&format!("/v1/ws?token={ingest}"), None)).await,
            403,
            "an ingest token"
        );
        assert_eq!(
            upgrade_status(request(
                &format!("/v1/ws?token={read}"),
                Some("http://evil.example")
            ))
            .await,
            403,
            "a foreign origin"
        );
        // A foreign page on the same port of another host is foreign too.
        let port = own.rsplit(':').next().unwrap();
        assert_eq!(
            upgrade_status(request(
                &format!("/v1/ws?token={read}"),
                Some(&format!("http://evil.example:{port}"))
            ))
            .await,
            403,
            "a foreign origin with the app's port"
        );
        // A refused upgrade is a clear problem answer.
        let r = app
            .client
            .get(app.url(&format!("/v1/ws?token={read}")))
            .header("Origin", "http://evil.example")
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let body: Value = r.json().await.unwrap();
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("evil.example"),
            "{body}"
        );

        // The page's own origin, no origin at all, and the token as a bearer header.
        three_days(&app).await;
        build(&app, D1, D2).await;
        for (what, request) in [
            (
                "the page's own origin",
                request(&format!("/v1/ws?token={read}"), Some(&own)),
            ),
            ("no origin", request(&format!("/v1/ws?token={read}"), None)),
            ("a bearer header", {
                let mut r = request("/v1/ws", None);
                r.headers_mut().insert(
                    "Authorization",
                    HeaderValue::from_str(&format!("Bearer {read}")).unwrap(),
                );
                r
            }),
        ] {
            let mut ws = Ws::connect_request(request).await;
            ws.subscribe("a", "daily_avg", D1, D2).await;
            let first = ws.next(SOON).await;
            assert!(is_partition(&first, "a", D1), "{what}: {first}");
            let ready = ws.next(SOON).await;
            assert!(is(&ready, "ready", "a"), "{what}: {ready}");
        }
    }
);

both_backends!(
    bad_input_gets_errors_and_an_oversized_message_closes_only_its_socket,
    |d: Deployment| async move {
        let app = d.start().await;
        three_days(&app).await;
        build(&app, D1, D2).await;
        let read = app.token("read", &[]).await;
        let mut bad = Ws::connect(&app, &read).await;
        let mut good = Ws::connect(&app, &read).await;
        good.subscribe("g", "daily_avg", D1, D2).await;
        assert!(is_partition(&good.next(SOON).await, "g", D1));
        assert!(is(&good.next(SOON).await, "ready", "g"));

        // Not JSON: an error, and the socket stays usable.
        bad.stream
            .send(Message::text("this is not json"))
            .await
            .unwrap();
        let error = bad.next(SOON).await;
        assert_eq!(error["type"], "error", "{error}");
        assert!(error.get("sub").is_none_or(Value::is_null), "{error}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("subscribe")),
            "{error}"
        );
        // JSON that is not a known operation.
        bad.send(json!({"op": "dance", "id": "x"})).await;
        let error = bad.next(SOON).await;
        assert_eq!(error["type"], "error", "{error}");
        // A binary message.
        bad.stream
            .send(Message::binary(vec![1u8, 2, 3]))
            .await
            .unwrap();
        let error = bad.next(SOON).await;
        assert_eq!(error["type"], "error", "{error}");
        // An unknown analysis: an error that names the subscription.
        bad.subscribe("u1", "no_such_analysis", D1, D2).await;
        let error = bad.next(SOON).await;
        assert!(is(&error, "error", "u1"), "{error}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("no_such_analysis")),
            "{error}"
        );
        // A bad range.
        bad.subscribe("u2", "daily_avg", D2, D1).await;
        let error = bad.next(SOON).await;
        assert!(is(&error, "error", "u2"), "{error}");
        bad.subscribe("u3", "daily_avg", "yesterday", D1).await;
        let error = bad.next(SOON).await;
        assert!(is(&error, "error", "u3"), "{error}");
        // Still usable.
        bad.subscribe("ok", "daily_avg", D1, D2).await;
        let first = bad.next(SOON).await;
        check_partition(&first, "ok", D1, 15.0);
        assert!(is(&bad.next(SOON).await, "ready", "ok"));

        // An oversized message closes that socket...
        let _ = bad.stream.send(Message::text("x".repeat(100 * 1024))).await;
        assert!(
            bad.ends_within(SOON).await,
            "the server closes a socket that sends an oversized message"
        );
        // ...and only that one: the other still gets updates.
        ingest_ok(
            &app,
            &[generation("s1", "2024-05-05T12:00:00Z", json!(30.0))],
        )
        .await;
        let (update, before) = good
            .until(SOON, "the rebuilt D1", |m| {
                is_partition(m, "g", D1) && m["rows"][0]["avg_mw"] == 20.0
            })
            .await;
        check_partition(&update, "g", D1, 20.0);
        assert!(before.iter().all(|m| m["sub"] == "g"), "{before:#?}");
        let (status, _) = app.get("/healthz", ADMIN).await;
        assert_eq!(status, StatusCode::OK);
    }
);

both_backends!(
    a_client_that_stops_reading_does_not_delay_the_others,
    |d: Deployment| async move {
        const STATIONS: usize = 300;
        const SUBSCRIPTIONS: usize = 60;
        const ROUNDS: usize = 30;
        /// Each update reaches a normal client within this long of its ingest.
        const PROMPT: Duration = Duration::from_secs(5);

        let app = d.start().await;
        // Many stations make each partition message large (~25 KB).
        let mut records: Vec<Value> = (0..STATIONS)
            .map(|i| {
                generation(
                    &format!("station-{i:04}"),
                    "2024-05-05T10:00:00Z",
                    json!(i as f64),
                )
            })
            .collect();
        records.push(generation("probe", "2024-05-05T09:00:00Z", json!(0.0)));
        ingest_ok(&app, &records).await;
        build(&app, D1, D2).await;
        let read = app.token("read", &[]).await;

        // The slow client subscribes many times to the busy day, then stops reading.
        let mut slow = Ws::connect(&app, &read).await;
        for i in 0..SUBSCRIPTIONS {
            slow.subscribe(&format!("s{i}"), "daily_avg", D1, D2).await;
        }
        for i in 0..SUBSCRIPTIONS {
            slow.until(SOON, "the slow client's subscriptions", |m| {
                is(m, "ready", &format!("s{i}"))
            })
            .await;
        }
        let mut normal = Ws::connect(&app, &read).await;
        normal.subscribe("n", "daily_avg", D1, D2).await;
        normal
            .until(SOON, "the normal client's subscription", |m| {
                is(m, "ready", "n")
            })
            .await;

        let mut slowest = Duration::ZERO;
        for round in 1..=ROUNDS {
            let value = round as f64 * 10.0;
            let created = format!("2024-05-05T{:02}:{:02}:00Z", 12 + round / 60, round % 60);
            let started = Instant::now();
            ingest_ok(&app, &[generation("probe", &created, json!(value))]).await;
            let (update, before) = normal
                .until(SOON, &format!("round {round}'s update"), |m| {
                    is_partition(m, "n", D1) && row(m, "probe")["max_mw"].as_f64() == Some(value)
                })
                .await;
            let took = started.elapsed();
            slowest = slowest.max(took);
            assert!(took <= PROMPT, "round {round}: the update took {took:?}");
            assert_eq!(
                row(&update, "probe")["readings"],
                round + 1,
                "{}",
                row(&update, "probe")
            );
            assert_eq!(update["rows"].as_array().unwrap().len(), STATIONS + 1);
            assert!(
                before
                    .iter()
                    .all(|m| m["sub"] == "n"
                        && matches!(m["type"].as_str(), Some("status" | "ready"))),
                "round {round}: {before:#?}"
            );
            let started = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                app.client.get(app.url("/healthz")).send(),
            )
            .await;
            assert!(
                matches!(&r, Ok(Ok(r)) if r.status() == StatusCode::OK),
                "round {round}: /healthz: {r:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "round {round}: /healthz took {:?}",
                started.elapsed()
            );
        }
        eprintln!("the slowest of {ROUNDS} updates took {slowest:?}");

        // The slow client missed updates: it is told to resync, or was disconnected.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut resync = false;
        loop {
            match tokio::time::timeout_at(deadline, slow.stream.next()).await {
                Err(_) => panic!("the slow client neither got a resync nor was disconnected"),
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap();
                    if message["type"] == "resync" {
                        resync = true;
                        break;
                    }
                }
                Ok(Some(Ok(_))) => {}
            }
        }
        eprintln!(
            "the slow client {}",
            if resync {
                "was asked to resync"
            } else {
                "was disconnected"
            }
        );
    }
);

both_backends!(
    a_new_version_is_rebuilt_live_and_a_new_description_changes_nothing,
    |d: Deployment| async move {
        let app = d.start().await;
        three_days(&app).await;
        let v1 =
            "SELECT source, SUM(output_mw) AS total FROM events GROUP BY source ORDER BY source";
        let v2 = "SELECT source, COUNT(*) AS n FROM events GROUP BY source ORDER BY source";
        let (status, info) = app
            .put(
                "/v1/analyses/station_sum",
                ADMIN,
                &json!({"kind": "generation", "sql": v1, "description": "a"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{info}");
        let body = app.annotations("station_sum", D1, D3, 30).await;
        assert!(
            partitions_of(&body)
                .values()
                .all(|p| p["status"] == "ready"),
            "{body}"
        );
        let read = app.token("read", &[]).await;
        let mut ws = Ws::connect(&app, &read).await;
        ws.subscribe("c1", "station_sum", D1, D3).await;
        let (_, before) = ws.until(SOON, "ready", |m| is(m, "ready", "c1")).await;
        let days: Vec<(&Value, &Value)> = before
            .iter()
            .map(|m| (&m["partition"], &m["version"]))
            .collect();
        assert_eq!(
            days,
            [(&json!(D1), &json!(1)), (&json!(D2), &json!(1))],
            "{before:#?}"
        );

        // Only the description changes: the version stays, and nothing is stale.
        let (status, info) = app
            .put(
                "/v1/analyses/station_sum",
                ADMIN,
                &json!({"kind": "generation", "sql": v1, "description": "b"}),
            )
            .await;
        assert_eq!(
            (status, info["version"].clone()),
            (StatusCode::OK, json!(1)),
            "{info}"
        );
        // A new version: every subscribed partition is invalidated, rebuilt and sent.
        let (status, info) = app
            .put(
                "/v1/analyses/station_sum",
                ADMIN,
                &json!({"kind": "generation", "sql": v2, "description": "b"}),
            )
            .await;
        assert_eq!(
            (status, info["version"].clone()),
            (StatusCode::OK, json!(2)),
            "{info}"
        );
        let (_, before) = ws
            .until(SOON, "ready with version 2", |m| is(m, "ready", "c1"))
            .await;
        let invalidated: Vec<&Value> = before
            .iter()
            .filter(|m| m["type"] == "invalidated")
            .collect();
        assert_eq!(
            invalidated.len(),
            1,
            "one invalidation, for the new version only: {before:#?}"
        );
        assert_eq!(invalidated[0]["partitions"], json!([D1, D2]), "{before:#?}");
        assert!(
            matches!(before.first(), Some(m) if m["type"] == "invalidated"),
            "{before:#?}"
        );
        for day in [D1, D2] {
            let rebuilt: Vec<&Value> = before
                .iter()
                .filter(|m| is_partition(m, "c1", day))
                .collect();
            assert_eq!(rebuilt.len(), 1, "{day} is sent again: {before:#?}");
            assert_eq!(rebuilt[0]["version"], 2, "{before:#?}");
            assert_eq!(
                rebuilt[0]["rows"],
                json!([{"source": "s1", "n": 2}]),
                "{before:#?}"
            );
        }
    }
);
