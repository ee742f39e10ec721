//! Annotations never lie: staleness derived from SQL (whatever the bus lost), events that
//! stay small, a stream that cannot fill up, short leases, given-up poison builds, and
//! tasks that come back.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::*;
use crate::ws::{SOON, Ws};

/// `n` generation records of `source` spread over the hours of `day`.
fn spread(source: &str, day: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            generation(
                source,
                &format!("{day}T{:02}:{:02}:{:02}Z", i % 24, (i / 24) % 60, i % 60),
                json!(i as f64),
            )
        })
        .collect()
}

/// The readings `daily_avg` counted for `source` on `day`, and the partition's status.
async fn daily_readings(app: &TestApp, day: &str, source: &str, wait: u64) -> (String, i64) {
    let next =
        chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap() + chrono::Duration::days(1);
    let body = app
        .annotations("daily_avg", day, &next.to_string(), wait)
        .await;
    let part = &partitions_of(&body)[day];
    let readings = part["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == source)
        .and_then(|r| r["readings"].as_i64())
        .unwrap_or(0);
    (part["status"].as_str().unwrap().to_string(), readings)
}

async fn ingest_ok(app: &TestApp, records: &[Value]) {
    let (status, body) = app.ingest(ADMIN, records).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["accepted"].as_u64(),
        Some(records.len() as u64),
        "{body}"
    );
}

both_backends!(
    acknowledged_records_reach_their_annotation_though_the_process_is_killed_after_each_batch,
    |d: Deployment| async move {
        let day = "2024-09-01";
        let mut app = d.start().await;
        ingest_ok(&app, &spread("k9", day, 100)).await;
        assert_eq!(
            daily_readings(&app, day, "k9", 30).await,
            ("ready".into(), 100)
        );

        // Each batch is acknowledged, then the process dies before it may plan anything.
        for _ in 0..5 {
            ingest_ok(&app, &spread("k9", day, 1_000)).await;
            app.kill9();
            app = d.start().await;
        }
        // No invalidation: what SQL holds is enough to find the day behind its records.
        eventually(
            Duration::from_secs(30),
            "the day to hold all 5,100 records",
            || async {
                let (status, readings) = daily_readings(&app, day, "k9", 0).await;
                (status == "ready" && readings == 5_100).then_some(())
            },
        )
        .await;
    }
);

both_backends!(
    a_late_record_after_an_invalidation_of_80000_hours_is_rebuilt_and_pushed,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, body) = app
            .put(
                "/v1/analyses/hourly_count",
                ADMIN,
                &json!({"kind": "tick", "partition": "1h", "sql": "SELECT COUNT(*) AS n FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let tick =
            |at: &str| json!({"kind": "tick", "source": "t", "created": at, "data": {"v": 1}});
        ingest_ok(&app, &[tick("2024-09-02T10:15:00Z")]).await;
        let hour = |body: &Value| partitions_of(body)["2024-09-02T10"].clone();
        let built = app
            .annotations(
                "hourly_count",
                "2024-09-02T10:00:00Z",
                "2024-09-02T11:00:00Z",
                30,
            )
            .await;
        assert_eq!(hour(&built)["rows"], json!([{"n": 1}]), "{built}");

        // 80,000 hours before it, lazily: one small event, not a 1 MB list.
        let (status, body) = app
            .post(
                "/v1/invalidations",
                ADMIN,
                &json!({"analysis": "hourly_count", "from": "2015-01-01", "to": "2024-02-16T08:00:00Z", "rebuild": "lazy"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["partitions_total"], 80_000, "{body}");
        let (_, ready) = app.get("/readyz", ADMIN).await;
        assert_eq!(ready["relay"]["skipped_events"], 0, "{ready}");

        let mut ws = Ws::connect(&app, ADMIN).await;
        ws.subscribe(
            "h",
            "hourly_count",
            "2024-09-02T10:00:00Z",
            "2024-09-02T11:00:00Z",
        )
        .await;
        ws.until(SOON, "ready", |m| m["type"] == "ready").await;
        ingest_ok(&app, &[tick("2024-09-02T10:40:00Z")]).await;
        let (rebuilt, _) = ws
            .until(SOON, "the rebuilt hour", |m| {
                m["type"] == "partition" && m["generation"] == 2
            })
            .await;
        assert_eq!(rebuilt["rows"], json!([{"n": 2}]), "{rebuilt}");
    }
);

both_backends!(
    a_batch_over_5001_scattered_hours_is_logged_as_several_events_that_together_name_every_hour,
    |d: Deployment| async move {
        let app = d.start().await;
        let head = log_head(&app).await;
        // One record every other hour: 5,001 hours, no two adjacent, so 5,001 runs.
        let start = chrono::DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z").unwrap();
        let hours: Vec<chrono::DateTime<chrono::FixedOffset>> = (0..5_001)
            .map(|i| start + chrono::Duration::hours(2 * i))
            .collect();
        let records: Vec<Value> = hours
            .iter()
            .map(|at| json!({"kind": "tick", "source": "scatter", "created": at.to_rfc3339(), "data": {"v": 1}}))
            .collect();
        ingest_ok(&app, &records).await;

        let events: Vec<Value> = log_after(&app, head)
            .await
            .into_iter()
            .filter(|e| e["type"] == "source.ingested" && e["kind"] == "tick")
            .collect();
        assert_eq!(events.len(), 3, "{} events", events.len());
        let mut logged = Vec::new();
        for event in &events {
            let bytes = serde_json::to_vec(event).unwrap().len();
            assert!(bytes < 1024 * 1024, "an event of {bytes} bytes");
            let runs = event["hours"].as_array().unwrap();
            assert!(runs.len() <= 2_000, "an event of {} runs", runs.len());
            logged.extend(runs.iter().map(|run| {
                run.as_str()
                    .unwrap_or_else(|| panic!("a run of more than one hour: {run}"))
                    .to_string()
            }));
        }
        let expected: Vec<String> = hours
            .iter()
            .map(|at| at.format("%Y-%m-%dT%H").to_string())
            .collect();
        assert_eq!(
            logged, expected,
            "the events together name every hour, once"
        );
        let counted: u64 = events.iter().map(|e| e["count"].as_u64().unwrap()).sum();
        assert_eq!(counted, 5_001);
        // Every one of them reached the bus.
        let head = log_head(&app).await;
        eventually(
            Duration::from_secs(20),
            "the relay to publish the batch",
            || async {
                let (_, ready) = app.get("/readyz", ADMIN).await;
                (ready["relay"]["published_seq"].as_i64() >= Some(head)).then_some(())
            },
        )
        .await;
        let (_, ready) = app.get("/readyz", ADMIN).await;
        assert_eq!(ready["relay"]["skipped_events"], 0, "{ready}");
    }
);

/// The advisory lock that serializes appends to the event log (see the store's
/// PostgreSQL backend): holding it from a test stops every log append, so a build that
/// has claimed its partition waits, holding its lease, before it logs `analysis.started`.
const LOG_LOCK_KEY: i64 = 0x05C4_011A;

/// The worker holding the lease of `partition` of `analysis`, once one does.
async fn lease_owner(pool: &sqlx::PgPool, analysis: &str, partition: &str) -> String {
    eventually(Duration::from_secs(20), "a worker to claim the partition", || async {
        let owner: Option<Option<String>> = sqlx::query_scalar(
            "SELECT lease_owner FROM partition_state WHERE analysis = $1 AND partition = $2 AND state = 'running'",
        )
        .bind(analysis)
        .bind(partition)
        .fetch_optional(pool)
        .await
        .unwrap();
        owner.flatten()
    })
    .await
}

/// The pid in a lease owner (`host-PID#slot`).
fn owner_pid(owner: &str) -> u32 {
    owner
        .rsplit_once('-')
        .and_then(|(_, rest)| rest.split('#').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in the lease owner {owner:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_partition_is_rebuilt_by_another_within_10_seconds() {
    let Some(d) = Deployment::new(Backend::Postgres, "lease_takeover").await else {
        return;
    };
    let app = d
        .start_with(&[("SCHOLIA_ROLES", "ingest,cache,visualizer")])
        .await;
    let day = "2024-09-03";
    ingest_ok(&app, &spread("w", day, 50)).await;
    let pool = d.pg().await;
    let mut lock = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOG_LOCK_KEY)
        .execute(&mut *lock)
        .await
        .unwrap();

    let mut first = d.start_with(&[("SCHOLIA_ROLES", "worker")]).await;
    // Ask for the day; the worker claims it and waits on the log lock, lease held.
    app.annotations("daily_avg", day, "2024-09-04", 1).await;
    let owner = lease_owner(&pool, "daily_avg", day).await;
    assert_eq!(owner_pid(&owner), first.pid(), "{owner}");
    let second = d.start_with(&[("SCHOLIA_ROLES", "worker")]).await;
    let killed = Instant::now();
    first.kill9();
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOG_LOCK_KEY)
        .execute(&mut *lock)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "another worker to build the day",
        || async {
            let (status, readings) = daily_readings(&app, day, "w", 0).await;
            (status == "ready" && readings == 50).then_some(())
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT worker FROM builds WHERE analysis = 'daily_avg' AND partition = $1 AND outcome = 'completed'",
    )
    .bind(day)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owner_pid(&owners[0]), second.pid(), "{owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_builds_keep_killing_their_worker_is_failed_and_others_flow() {
    let Some(d) = Deployment::new(Backend::Postgres, "poison").await else {
        return;
    };
    let app = d.start_with(&[("SCHOLIA_ROLES", "ingest,cache")]).await;
    let (poison, fine) = ("2024-09-04", "2024-09-05");
    ingest_ok(&app, &spread("p", poison, 20)).await;
    ingest_ok(&app, &spread("p", fine, 20)).await;
    let pool = d.pg().await;
    let mut lock = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOG_LOCK_KEY)
        .execute(&mut *lock)
        .await
        .unwrap();
    app.annotations("daily_avg", poison, "2024-09-05", 1).await;
    // Three builds start and never finish: each one's worker dies holding the lease.
    for attempt in 1..=3 {
        let mut worker = d.start_with(&[("SCHOLIA_ROLES", "worker")]).await;
        let pid = worker.pid();
        eventually(Duration::from_secs(20), "the worker to claim the day", || async {
            let claimed: Option<(Option<String>, i32)> = sqlx::query_as(
                "SELECT lease_owner, attempts FROM partition_state WHERE analysis = 'daily_avg' AND partition = $1 AND state = 'running'",
            )
            .bind(poison)
            .fetch_optional(&pool)
            .await
            .unwrap();
            claimed
                .filter(|(owner, attempts)| {
                    owner.as_deref().is_some_and(|o| owner_pid(o) == pid) && *attempts == attempt
                })
                .map(|_| ())
        })
        .await;
        worker.kill9();
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOG_LOCK_KEY)
        .execute(&mut *lock)
        .await
        .unwrap();
    let _survivor = d.start_with(&[("SCHOLIA_ROLES", "worker")]).await;
    let failed = eventually(
        Duration::from_secs(30),
        "the poisoned day to be failed",
        || async {
            let body = app.annotations("daily_avg", poison, "2024-09-05", 0).await;
            let part = partitions_of(&body)[poison].clone();
            (part["status"] == "failed").then_some(part)
        },
    )
    .await;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("3 builds") && error.contains("stopped its worker"),
        "{failed}"
    );
    // Other work keeps flowing.
    let (status, readings) = daily_readings(&app, fine, "p", 30).await;
    assert_eq!((status.as_str(), readings), ("ready", 20));
}

/// The idle `scholia compute` child of process `parent` (a SQL build leaves one in the
/// sandbox pool), if there is one.
fn compute_child(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command in parentheses: state, then the parent's pid.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (ppid == parent && cmdline.split(|b| *b == 0).any(|arg| arg == b"compute"))
                .then_some(pid)
        })
}

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// A deployment's `partition_state`, read and steered from the test.
enum Leases {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Leases {
    async fn of(d: &Deployment) -> Leases {
        match d.backend {
            Backend::Postgres => Leases::Pg(d.pg().await),
            Backend::Sqlite => Leases::Sqlite(d.sqlite().await),
        }
    }

    /// The lease owner and attempts of `partition` of `analysis`, while it is running.
    async fn running(&self, analysis: &str, partition: &str) -> Option<(String, i32)> {
        let sql = "SELECT lease_owner, attempts FROM partition_state WHERE analysis = $1 AND partition = $2 AND state = 'running'";
        let row: Option<(Option<String>, i32)> = match self {
            Leases::Pg(pool) => sqlx::query_as(sql)
                .bind(analysis)
                .bind(partition)
                .fetch_optional(pool)
                .await
                .unwrap(),
            Leases::Sqlite(pool) => sqlx::query_as(sql)
                .bind(analysis)
                .bind(partition)
                .fetch_optional(pool)
                .await
                .unwrap(),
        };
        row.and_then(|(owner, attempts)| Some((owner?, attempts)))
    }

    /// Move the running lease of `partition` to end `seconds` from now.
    async fn lease_ends_in(&self, analysis: &str, partition: &str, seconds: i64) {
        let done = match self {
            Leases::Pg(pool) => sqlx::query(
                "UPDATE partition_state SET lease_until = now() + $1 * interval '1 second' \
                 WHERE analysis = $2 AND partition = $3 AND state = 'running'",
            )
            .bind(seconds as f64)
            .bind(analysis)
            .bind(partition)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
            Leases::Sqlite(pool) => sqlx::query(
                "UPDATE partition_state SET lease_until = (CAST(strftime('%s', 'now') AS INTEGER) + $1) * 1000000 \
                 WHERE analysis = $2 AND partition = $3 AND state = 'running'",
            )
            .bind(seconds)
            .bind(analysis)
            .bind(partition)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
        };
        assert_eq!(done, 1, "{partition} of {analysis} is running");
    }
}

both_backends!(
    a_partition_whose_builds_keep_killing_the_whole_process_is_failed_after_restarts_and_others_flow,
    |d: Deployment| async move {
        // One build slot, so that builds take the one idle computation process in turn.
        let env = [("SCHOLIA_WORKER_CONCURRENCY", "1")];
        let mut app = d.start_with(&env).await;
        let (status, body) = app
            .put(
                "/v1/analyses/daily_count",
                ADMIN,
                &json!({"kind": "generation", "partition": "1d", "sql": "SELECT COUNT(*) AS n FROM events"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (poison, fine) = ("2024-09-14", "2024-09-15");
        ingest_ok(&app, &spread("p", poison, 20)).await;
        ingest_ok(&app, &spread("p", fine, 20)).await;
        let leases = Leases::of(&d).await;
        for attempt in 1..=3 {
            // A SQL build leaves its computation process idle in the pool; stopped, that
            // process takes the next build and never answers, as a build that hangs its
            // process until it is killed.
            let warm = format!("2024-09-{:02}", 20 + attempt);
            ingest_ok(&app, &spread("p", &warm, 5)).await;
            let next = format!("2024-09-{:02}", 21 + attempt);
            let built = app.annotations("daily_count", &warm, &next, 30).await;
            assert_eq!(partitions_of(&built)[&warm]["rows"], json!([{"n": 5}]), "{built}");
            let child = eventually(Duration::from_secs(10), "an idle computation process", || async {
                compute_child(app.pid())
            })
            .await;
            signal(child, "-STOP");
            if attempt == 1 {
                app.annotations("daily_count", poison, fine, 1).await;
            } else {
                // The killed process's lease, held until this one was ready, runs out.
                leases.lease_ends_in("daily_count", poison, -1).await;
            }
            let pid = app.pid();
            eventually(Duration::from_secs(20), "the process to claim the day", || async {
                leases
                    .running("daily_count", poison)
                    .await
                    .filter(|(owner, attempts)| owner_pid(owner) == pid && *attempts == attempt)
            })
            .await;
            app.kill9();
            signal(child, "-KILL");
            // The dead process's lease is held until the next process has its idle
            // computation process stopped too: otherwise it could retake the day first.
            leases.lease_ends_in("daily_count", poison, 3_600).await;
            app = d.start_with(&env).await;
        }
        leases.lease_ends_in("daily_count", poison, -1).await;
        let failed = eventually(
            Duration::from_secs(30),
            "the poisoned day to be failed",
            || async {
                let body = app.annotations("daily_count", poison, fine, 0).await;
                let part = partitions_of(&body)[poison].clone();
                (part["status"] == "failed").then_some(part)
            },
        )
        .await;
        let error = failed["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("3 builds") && error.contains("stopped its worker"),
            "{failed}"
        );
        // Other work keeps flowing.
        let built = app.annotations("daily_count", fine, "2024-09-16", 30).await;
        assert_eq!(partitions_of(&built)[fine]["rows"], json!([{"n": 20}]), "{built}");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_bus_cannot_take_is_skipped_reported_and_stops_nothing() {
    let Some(d) = Deployment::new(Backend::Postgres, "oversized").await else {
        return;
    };
    // A NATS server that takes messages of at most 8 KiB.
    let nats = OwnNats::start_with(&d.dir, Some("max_payload: 8192\n"));
    let d = d.with_nats(&nats.url());
    let app = d.start().await;
    let day = "2024-09-06";
    ingest_ok(&app, &spread("o", day, 10)).await;
    assert_eq!(
        daily_readings(&app, day, "o", 30).await,
        ("ready".into(), 10)
    );

    // A declaration of 600 fields logs an event of about 20 KiB.
    let fields: serde_json::Map<String, Value> = (0..600)
        .map(|i| (format!("sensor_reading_{i:04}"), json!("float")))
        .collect();
    let (status, body) = app
        .put("/v1/kinds/wide", ADMIN, &json!({"fields": fields}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ready = eventually(
        Duration::from_secs(20),
        "the relay to report the skipped event",
        || async {
            let (_, ready) = app.get("/readyz", ADMIN).await;
            (ready["relay"]["skipped_events"] == 1).then_some(ready)
        },
    )
    .await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["relay"]["last_skipped"]
            .as_str()
            .is_some_and(|m| m.contains("more than the bus takes")),
        "{ready}"
    );
    assert!(app.metric("scholia_relay_skipped_events").await >= 1.0);
    // Events after it still flow: a late record is planned and pushed.
    let mut ws = Ws::connect(&app, ADMIN).await;
    ws.subscribe("o", "daily_avg", day, "2024-09-07").await;
    ws.until(SOON, "ready", |m| m["type"] == "ready").await;
    ingest_ok(&app, &[generation("o", "2024-09-06T20:00:00Z", json!(5.0))]).await;
    let (rebuilt, _) = ws
        .until(SOON, "the rebuilt day", |m| {
            m["type"] == "partition" && m["generation"] == 2
        })
        .await;
    assert_eq!(rebuilt["rows"][0]["readings"], 11, "{rebuilt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_pushed_past_its_capacity_lets_old_events_go_and_work_still_flows() {
    let Some(d) = Deployment::new(Backend::Postgres, "stream_capacity").await else {
        return;
    };
    let app = d.start_with(&[("SCHOLIA_NATS_MAX_MB", "1")]).await;
    let day = "2024-09-07";
    ingest_ok(&app, &spread("c", day, 10)).await;
    assert_eq!(
        daily_readings(&app, day, "c", 30).await,
        ("ready".into(), 10)
    );

    // About 6 MB of events through a 1 MB stream: batches touching every other hour
    // of ten years make events of about 40 KB each.
    let start = chrono::DateTime::parse_from_rfc3339("2010-01-01T00:00:00Z").unwrap();
    for batch in 0..150 {
        let records: Vec<Value> = (0..2_000)
            .map(|i| {
                let at = start + chrono::Duration::hours(2 * i + batch % 2);
                generation(&format!("flood{batch}"), &at.to_rfc3339(), json!(1.0))
            })
            .collect();
        ingest_ok(&app, &records).await;
    }
    let head = log_head(&app).await;
    let client = async_nats::connect(d.nats_url.clone().unwrap())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_name = d.nats_prefix.to_uppercase();
    let info = eventually(
        Duration::from_secs(60),
        "the stream to catch up with the log",
        || async {
            let mut stream = js.get_stream(&stream_name).await.ok()?;
            let info = stream.info().await.ok()?.clone();
            (info.state.messages > 0).then_some(info)
        },
    )
    .await;
    assert!(
        info.state.bytes <= 1024 * 1024,
        "the stream stays within its bound: {:?}",
        info.state
    );
    assert!(
        info.state.first_sequence > 1,
        "old events were let go: {:?}",
        info.state
    );
    eventually(
        Duration::from_secs(30),
        "the relay to reach the log head",
        || async {
            let (_, ready) = app.get("/readyz", ADMIN).await;
            (ready["relay"]["published_seq"].as_i64() >= Some(head)).then_some(())
        },
    )
    .await;
    // Work still flows: a late record into the built day is rebuilt.
    ingest_ok(&app, &[generation("c", "2024-09-07T23:00:00Z", json!(2.0))]).await;
    eventually(
        Duration::from_secs(20),
        "the late record in its day",
        || async {
            let (status, readings) = daily_readings(&app, day, "c", 0).await;
            (status == "ready" && readings == 11).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_whose_database_connections_die_come_back_and_say_so() {
    let Some(d) = Deployment::new(Backend::Postgres, "task_restarts").await else {
        return;
    };
    let app = d.start().await;
    let (_, ready) = app.get("/readyz", ADMIN).await;
    assert_eq!(ready["status"], "ok", "{ready}");
    for task in [
        "relay",
        "planner",
        "reconciler",
        "worker-build-0",
        "cache-evictions",
        "websocket-hub",
    ] {
        assert_eq!(ready["tasks"][task]["state"], "running", "{task}: {ready}");
    }
    // Every connection the service holds is cut and no new one is let in, as during a
    // database failover, until a task has failed on it: the relay reads the log at
    // least every half second, so it is one.
    let (base, database) = d.database_url.rsplit_once('/').unwrap();
    let server = sqlx::PgPool::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    let allow = |allowed: bool| {
        sqlx::query::<sqlx::Postgres>(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} WITH ALLOW_CONNECTIONS {allowed}"
        )))
    };
    allow(false).execute(&server).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(database)
        .execute(&server)
        .await
        .unwrap();
    let failed = eventually(
        Duration::from_secs(20),
        "the relay to fail while the database is away",
        || async {
            let (_, ready) = app.get("/readyz", ADMIN).await;
            let relay = ready["tasks"]["relay"].clone();
            (relay["restarts"].as_u64() >= Some(1)).then_some(relay)
        },
    )
    .await;
    allow(true).execute(&server).await.unwrap();
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("database")),
        "{failed}"
    );
    let day = "2024-09-08";
    eventually(Duration::from_secs(30), "ingest to work again", || async {
        let (status, _) = app.ingest(ADMIN, &spread("r", day, 5)).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    let readings = eventually(Duration::from_secs(30), "the day to be built", || async {
        let (status, readings) = daily_readings(&app, day, "r", 5).await;
        (status == "ready").then_some(readings)
    })
    .await;
    assert!(readings >= 5, "{readings}");
    let ready = eventually(
        Duration::from_secs(30),
        "every task to run again",
        || async {
            let (status, ready) = app.get("/readyz", ADMIN).await;
            let all_running = ready["tasks"]
                .as_object()?
                .values()
                .all(|t| t["state"] == "running");
            (status == StatusCode::OK && all_running).then_some(ready)
        },
    )
    .await;
    // The restarts stay on the record once the tasks are back.
    let relay = &ready["tasks"]["relay"];
    assert!(relay["restarts"].as_u64() >= Some(1), "{ready}");
    assert!(relay["last_error"].is_string(), "{ready}");
    server.close().await;
}

both_backends!(
    a_restarted_worker_rebuilds_from_its_frame_files_and_never_from_a_stale_one,
    |d: Deployment| async move {
        let day = "2024-08-01";
        let mut app = d.start().await;
        ingest_ok(&app, &spread("f1", day, 500)).await;
        assert_eq!(
            daily_readings(&app, day, "f1", 30).await,
            ("ready".into(), 500)
        );
        // The file is written in the background after the load: give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.terminate();

        // After a restart, a rewind of the day reads it from disk, not the database.
        app = d.start().await;
        let id = invalidate(&app, "daily_avg", day, "2024-08-02", "eager").await;
        invalidation_reaches(&app, &id, "done", Duration::from_secs(30)).await;
        assert_eq!(
            app.metric("scholia_build_frames_from_disk_total").await,
            1.0
        );
        assert_eq!(app.metric("scholia_build_frames_loaded_total").await, 0.0);
        assert_eq!(
            daily_readings(&app, day, "f1", 0).await,
            ("ready".into(), 500)
        );
        app.terminate();

        // Records that arrived while no worker ran make the file stale: it is extended
        // with them (or read again), never used as it is.
        let ingest_only = d.start_with(&[("SCHOLIA_ROLES", "ingest,cache")]).await;
        ingest_ok(&ingest_only, &spread("f1", day, 7)).await;
        drop(ingest_only);
        app = d.start().await;
        eventually(
            Duration::from_secs(30),
            "the day to hold the 7 late records",
            || async {
                let (status, readings) = daily_readings(&app, day, "f1", 0).await;
                (status == "ready" && readings == 507).then_some(())
            },
        )
        .await;
        assert_eq!(app.metric("scholia_build_frames_loaded_total").await, 0.0);
        assert_eq!(app.metric("scholia_build_frames_extended_total").await, 1.0);
    }
);

both_backends!(
    a_cached_read_never_answers_what_a_commit_replaced,
    |d: Deployment| async move {
        let day = "2024-08-03";
        let app = d.start().await;
        ingest_ok(&app, &spread("c1", day, 10)).await;
        assert_eq!(
            daily_readings(&app, day, "c1", 30).await,
            ("ready".into(), 10)
        );
        // Read it often enough to be answered from rendered bytes.
        for _ in 0..20 {
            assert_eq!(
                daily_readings(&app, day, "c1", 0).await,
                ("ready".into(), 10)
            );
        }
        let mut ws = Ws::connect(&app, ADMIN).await;
        ws.subscribe("s", "daily_avg", day, "2024-08-04").await;
        ws.until(SOON, "ready", |m| m["type"] == "ready").await;
        ingest_ok(&app, &spread("c1", day, 1)).await;
        ws.until(SOON, "the rebuilt day", |m| {
            m["type"] == "partition" && m["generation"] == 2
        })
        .await;
        // Once the rebuild is pushed, no read answers the old rows.
        assert_eq!(
            daily_readings(&app, day, "c1", 0).await,
            ("ready".into(), 11)
        );
    }
);
