//! What is acknowledged survives: kill -9 mid-ingest, NATS down, SIGTERM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::helpers::*;

async fn count_stored(d: &Deployment, ids: &[Uuid]) -> i64 {
    match d.backend {
        Backend::Postgres => {
            let pool = d.pg().await;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records WHERE data_id = ANY($1)")
                .bind(ids)
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
        Backend::Sqlite => {
            let pool = d.sqlite().await;
            let mut n = 0;
            for chunk in ids.chunks(500) {
                let mut q =
                    sqlx::QueryBuilder::new("SELECT COUNT(*) FROM records WHERE data_id IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(*id);
                }
                q.push(")");
                let c: i64 = q.build_query_scalar().fetch_one(&pool).await.unwrap();
                n += c;
            }
            pool.close().await;
            n
        }
    }
}

both_backends!(
    acknowledged_records_survive_kill_9_mid_ingest,
    |d: Deployment| async move {
        let mut app = d.start().await;
        let acked: Arc<Mutex<Vec<Uuid>>> = Arc::default();
        let mut producers = Vec::new();
        for p in 0..4 {
            let client = app.client.clone();
            let url = app.url("/v1/events");
            let acked = acked.clone();
            producers.push(tokio::spawn(async move {
            for batch in 0..10_000 {
                let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
                let body: String = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        format!(
                            "{}\n",
                            json!({"data_id": id, "kind": "generation", "source": format!("p{p}"),
                                   "created": format!("2024-05-0{}T{:02}:00:00Z", 1 + batch % 5, i % 24),
                                   "data": {"output_mw": i}})
                        )
                    })
                    .collect();
                let sent = client
                    .post(&url)
                    .bearer_auth(ADMIN)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let answer: Value = r.json().await.unwrap_or(Value::Null);
                        if answer["accepted"] == 100 {
                            acked.lock().unwrap().extend(ids);
                        }
                    }
                    _ => return,
                }
            }
        }));
        }
        eventually(
            Duration::from_secs(60),
            "2,000 acknowledged records",
            || {
                let n = acked.lock().unwrap().len();
                async move { (n >= 2_000).then_some(()) }
            },
        )
        .await;
        app.kill9();
        for producer in producers {
            let _ = producer.await;
        }
        let acked = acked.lock().unwrap().clone();
        let app = d.start().await;
        assert_eq!(
            count_stored(&d, &acked).await,
            acked.len() as i64,
            "every acknowledged record is stored exactly once"
        );
        let (status, body) = app
            .get(&format!("/v1/events/{}", acked[acked.len() - 1]), ADMIN)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The log after the restart is still gap-free.
        let (_, log) = app.get("/v1/log?after=0&limit=10000", ADMIN).await;
        let seqs: Vec<i64> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }
);

both_backends!(
    sigterm_stops_the_service_cleanly,
    |d: Deployment| async move {
        let mut app = d.start().await;
        let (status, _) = app
            .ingest(ADMIN, &[json!({"kind": "k", "source": "s", "data": {}})])
            .await;
        assert_eq!(status, StatusCode::OK);
        let started = std::time::Instant::now();
        let exit = app.terminate();
        assert!(exit.success(), "exit status {exit:?}; log:\n{}", app.log());
        assert!(started.elapsed() < Duration::from_secs(15));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_goes_on_while_nats_is_down_and_the_log_drains_in_order_afterwards() {
    let Some(d) = Deployment::new(Backend::Postgres, "nats_outage").await else {
        return;
    };
    let mut nats = OwnNats::start(&d.dir);
    let d = d.with_nats(&nats.url());
    let app = d.start().await;
    let batch = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"kind": "generation", "source": "g", "data": {"output_mw": i}}))
            .collect()
    };
    for _ in 0..5 {
        let (status, _) = app.ingest(ADMIN, &batch(50)).await;
        assert_eq!(status, StatusCode::OK);
    }
    nats.stop();
    for _ in 0..10 {
        let (status, body) = app.ingest(ADMIN, &batch(50)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "ingest must not depend on NATS: {body}"
        );
    }
    nats.restart();
    for _ in 0..5 {
        let (status, _) = app.ingest(ADMIN, &batch(50)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, log) = app.get("/v1/log?after=0&limit=10000", ADMIN).await;
    let logged: Vec<i64> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    let last = *logged.last().unwrap();

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_name = d.nats_prefix.to_uppercase();
    let seen: Vec<i64> = eventually(
        Duration::from_secs(60),
        "the log to drain to the stream",
        || {
            let js = js.clone();
            let stream_name = stream_name.clone();
            async move {
                let mut stream = js.get_stream(&stream_name).await.ok()?;
                let count = stream.info().await.ok()?.state.messages;
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                let mut messages = consumer.messages().await.ok()?;
                let mut seqs = Vec::new();
                for _ in 0..count {
                    let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                        .await
                        .ok()??
                        .ok()?;
                    let event: Value = serde_json::from_slice(&message.payload).ok()?;
                    seqs.push(event["seq"].as_i64()?);
                }
                (seqs.last() == Some(&last)).then_some(seqs)
            }
        },
    )
    .await;
    assert_eq!(
        seen, logged,
        "the stream holds every logged event once, in log order"
    );
}
