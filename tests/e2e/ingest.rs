//! Ingest: formats, idempotency, quarantine and limits.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    a_mixed_batch_keeps_the_good_lines_and_quarantines_the_rest,
    |d: Deployment| async move {
        let app = d.start().await;
        let (status, _) = app
            .put(
                "/v1/kinds/generation",
                ADMIN,
                &json!({"fields": {"output_mw": "float"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);

        let dup_id = Uuid::now_v7();
        let conflict_id = Uuid::now_v7();
        let first = json!({"data_id": dup_id, "kind": "generation", "source": "g1", "created": "2024-05-05T00:11:11Z", "data": {"output_mw": 1.5}});
        let (status, body) = app.ingest(ADMIN, &[first.clone(), json!({"data_id": conflict_id, "kind": "generation", "source": "g1", "created": "2024-05-05T01:00:00Z", "data": {"output_mw": 7.0}})]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 2);

        let lines = [
        json!({"kind": "generation", "source": "g2", "created": "2024-05-05T02:00:00Z", "data": {"output_mw": 2.5}}).to_string(),
        "{not json".to_string(),
        json!({"kind": "generation", "source": "g2", "data": {"output_mw": "a lot"}}).to_string(),
        first.to_string(),
        json!({"data_id": conflict_id, "kind": "generation", "source": "g1", "created": "2024-05-05T01:00:00Z", "data": {"output_mw": 8.0}}).to_string(),
        json!({"kind": "generation", "source": "g3", "created": "2024-05-05T03:00:00Z", "data": {"output_mw": null}}).to_string(),
        json!({"kind": "generation", "data": {"output_mw": 1}}).to_string(),
    ];
        let (status, body) = app
            .ingest_raw(ADMIN, "application/x-ndjson", lines.join("\n").into_bytes())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 2, "{body}");
        assert_eq!(body["duplicates"], 1, "{body}");
        assert_eq!(body["quarantined"], 4, "{body}");
        let errors: Vec<(u64, String)> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["line"].as_u64().unwrap(),
                    e["error"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 3, 5, 7]);
        assert!(errors[0].1.contains("not valid JSON"), "{errors:?}");
        assert!(
            errors[1].1.contains("output_mw") && errors[1].1.contains("float"),
            "{errors:?}"
        );
        assert!(errors[2].1.contains("immutable"), "{errors:?}");
        assert!(errors[3].1.contains("source is missing"), "{errors:?}");

        let (status, quarantine) = app.get("/v1/quarantine", ADMIN).await;
        assert_eq!(status, StatusCode::OK);
        let records = quarantine["records"].as_array().unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(
            records.iter().find(|r| r["line"] == 2).unwrap()["raw"],
            "{not json"
        );
        assert_eq!(
            records.iter().find(|r| r["line"] == 5).unwrap()["data_id"],
            json!(conflict_id)
        );

        // The stored record is the first one, unchanged by the conflicting one.
        let (status, stored) = app.get(&format!("/v1/events/{conflict_id}"), ADMIN).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(stored["data"]["output_mw"], 7.0);
        assert!(stored["seq"].as_i64().unwrap() > 0);
        assert_eq!(stored["created"], "2024-05-05T01:00:00.000000Z");
        assert!(stored["received_at"].is_string());
    }
);

both_backends!(every_body_format_is_accepted, |d: Deployment| async move {
    let app = d.start().await;
    // One envelope, with the id assigned.
    let (status, body) = app
        .ingest_raw(
            ADMIN,
            "application/json",
            json!({"kind": "k", "source": "s", "data": {"x": 1}})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(
        (status, body["accepted"].clone()),
        (StatusCode::OK, json!(1))
    );
    // A JSON array with a bad item in the middle.
    let array = json!([{"kind": "k", "source": "s", "data": {"x": 1}}, 17, {"kind": "k", "source": "s", "data": {"x": 2}}]);
    let (status, body) = app
        .ingest_raw(ADMIN, "application/json", array.to_string().into_bytes())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["accepted"].clone(), body["quarantined"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(body["errors"][0]["line"], 2);
    // Defaults from the query string, gzip-compressed NDJSON.
    let ndjson = "{\"data\":{\"x\":1}}\n{\"data\":{\"x\":2}}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(ndjson.as_bytes()).unwrap();
    let r = app
        .client
        .post(app.url("/v1/events?kind=meter&source=m1"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    let (_, kinds) = app.get("/v1/kinds", ADMIN).await;
    let names: Vec<&str> = kinds["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"meter") && names.contains(&"k"), "{kinds}");
});

both_backends!(
    bad_requests_get_clear_errors_and_write_nothing,
    |d: Deployment| async move {
        let app = d.start_with(&[("SCHOLIA_MAX_BODY_BYTES", "4096")]).await;
        let (status, body) = app
            .ingest_raw(
                ADMIN,
                "application/x-ndjson",
                b"garbage\nmore garbage\n".to_vec(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("Nothing in the body is JSON"),
            "{body}"
        );
        let (status, body) = app.ingest_raw(ADMIN, "text/plain", b"{}".to_vec()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("application/x-ndjson")
        );
        let big = format!(
            "{}\n",
            json!({"kind": "k", "source": "s", "data": {"pad": "x".repeat(5000)}})
        );
        let (status, body) = app
            .ingest_raw(ADMIN, "application/x-ndjson", big.into_bytes())
            .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        // A small gzip body that inflates past the limit.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(
            json!({"kind": "k", "source": "s", "data": {"pad": "y".repeat(100_000)}})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let r = app
            .client
            .post(app.url("/v1/events"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(gz.finish().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        // A chunked body past the limit.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..10).map(|_| Ok(vec![b' '; 1000])).collect();
        let r = app
            .client
            .post(app.url("/v1/events"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let (status, log) = app.get("/v1/log?after=0&limit=100", ADMIN).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            log["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["type"] != "source.ingested"),
            "{log}"
        );
    }
);

both_backends!(
    the_log_is_ordered_and_replayable,
    |d: Deployment| async move {
        let app = d.start().await;
        for i in 0..5 {
            let (status, _) = app
                .ingest(
                    ADMIN,
                    &[json!({"kind": "k", "source": "s", "data": {"i": i}})],
                )
                .await;
            assert_eq!(status, StatusCode::OK);
        }
        let (_, all) = app.get("/v1/log?after=0&limit=1000", ADMIN).await;
        let events = all["events"].as_array().unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let ingested: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "source.ingested")
            .collect();
        assert_eq!(ingested.len(), 5);
        assert!(
            ingested
                .iter()
                .all(|e| e["actor"].as_str().unwrap().starts_with("token:"))
        );
        let after = seqs[seqs.len() - 3];
        let (_, tail) = app
            .get(&format!("/v1/log?after={after}&limit=1"), ADMIN)
            .await;
        assert_eq!(tail["events"].as_array().unwrap().len(), 1);
        assert_eq!(tail["events"][0]["seq"], after + 1);
        assert_eq!(tail["next_after"], after + 1);
        let (status, ready) = app.get("/readyz", ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{ready}");
    }
);

both_backends!(
    concurrent_batches_with_the_same_new_ids_store_each_once,
    |d: Deployment| async move {
        let app = d.start().await;
        let records: Vec<Value> = (0..500)
            .map(|i| {
                generation(
                    &format!("s{}", i % 7),
                    &format!("2024-03-01T{:02}:{:02}:00Z", i % 24, i % 60),
                    json!(i),
                )
            })
            .collect();
        // The same new ids from eight requests at once: on PostgreSQL each copies its
        // batch without looking first, so all but the first meet the others' records in
        // the unique index and must write again with the lookup under the lock.
        let answers = futures::future::join_all((0..8).map(|_| app.ingest(ADMIN, &records))).await;
        let (mut accepted, mut duplicates) = (0, 0);
        for (status, body) in &answers {
            assert_eq!(*status, StatusCode::OK, "{body}");
            assert_eq!(body["quarantined"], 0, "{body}");
            accepted += body["accepted"].as_u64().unwrap();
            duplicates += body["duplicates"].as_u64().unwrap();
        }
        assert_eq!((accepted, duplicates), (500, 3500), "{answers:?}");
        let events = log_after(&app, 0).await;
        let ingested: u64 = events
            .iter()
            .filter(|e| e["type"] == "source.ingested")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        assert_eq!(ingested, 500, "the log counts each record once");
        if d.backend == Backend::Postgres {
            assert!(
                app.log()
                    .contains("writing it again with the lookup under the lock"),
                "the race was not exercised: {}",
                app.log()
            );
        }
    }
);
