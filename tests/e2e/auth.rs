//! Who may do what: every scope against every endpoint.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::both_backends;
use crate::helpers::*;

both_backends!(
    each_scope_reaches_exactly_its_endpoints,
    |d: Deployment| async move {
        let app = d.start().await;
        let ingest = app.token("ingest", &[]).await;
        let limited = app.token("ingest", &["gen-*"]).await;
        let read = app.token("read", &[]).await;
        let id = Uuid::now_v7();
        let (status, _) = app.ingest(ADMIN, &[json!({"data_id": id, "kind": "generation", "source": "gen-1", "data": {"output_mw": 1}})]).await;
        assert_eq!(status, StatusCode::OK);

        let record = |source: &str| json!({"kind": "generation", "source": source, "data": {"output_mw": 2}});
        let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
            .format("%Y-%m-%d")
            .to_string();
        let annotations = format!("/v1/annotations/daily_avg?from={today}&to={tomorrow}");
        let invalidation =
            json!({"analysis": "daily_avg", "from": today, "to": tomorrow, "rebuild": "lazy"});
        let analysis = json!({"kind": "generation", "sql": "SELECT source, COUNT(*) AS n FROM events GROUP BY source"});

        // (method, path, body, expected status for: none, bad, ingest, read, admin)
        type Case<'a> = (Method, String, Option<Value>, [u16; 5]);
        let cases: Vec<Case> = vec![
            (
                Method::POST,
                "/v1/events".into(),
                Some(record("gen-2")),
                [401, 401, 200, 403, 200],
            ),
            (
                Method::GET,
                format!("/v1/events/{id}"),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::GET,
                "/v1/kinds".into(),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::PUT,
                "/v1/kinds/meter".into(),
                Some(json!({"fields": {"kwh": "float"}})),
                [401, 401, 403, 403, 200],
            ),
            (
                Method::GET,
                "/v1/quarantine".into(),
                None,
                [401, 401, 403, 403, 200],
            ),
            (
                Method::GET,
                "/v1/tokens".into(),
                None,
                [401, 401, 403, 403, 200],
            ),
            (
                Method::POST,
                "/v1/tokens".into(),
                Some(json!({"scope": "read"})),
                [401, 401, 403, 403, 201],
            ),
            (
                Method::GET,
                "/v1/log?after=0".into(),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::GET,
                "/v1/analyses".into(),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::GET,
                "/v1/analyses/daily_avg".into(),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::PUT,
                "/v1/analyses/source_counts".into(),
                Some(analysis),
                [401, 401, 403, 403, 201],
            ),
            (Method::GET, annotations, None, [401, 401, 403, 200, 200]),
            (
                Method::POST,
                "/v1/invalidations".into(),
                Some(invalidation),
                [401, 401, 403, 403, 202],
            ),
            (
                Method::GET,
                "/v1/invalidations".into(),
                None,
                [401, 401, 403, 403, 200],
            ),
            (
                Method::GET,
                "/v1/schedules".into(),
                None,
                [401, 401, 403, 403, 200],
            ),
            (
                Method::GET,
                format!("/v1/lineage/{id}"),
                None,
                [401, 401, 403, 200, 200],
            ),
            (
                Method::GET,
                "/v1/ws".into(),
                None,
                [401, 401, 403, 400, 400],
            ),
        ];
        let tokens: [Option<&str>; 5] = [
            None,
            Some("sch_not_a_real_token"),
            Some(&ingest),
            Some(&read),
            Some(ADMIN),
        ];
        let mut failures = Vec::new();
        for (method, path, body, expected) in &cases {
            for (token, want) in tokens.iter().zip(expected) {
                let mut request = app.client.request(method.clone(), app.url(path));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                let response = request.send().await.unwrap();
                let got = response.status().as_u16();
                if got != *want {
                    failures.push(format!(
                        "{method} {path} with {token:?}: got {got}, want {want}"
                    ));
                } else if got == 401 || got == 403 {
                    assert_eq!(
                        response.headers()["content-type"],
                        "application/problem+json"
                    );
                    let problem: Value = response.json().await.unwrap();
                    assert!(
                        problem["detail"].as_str().is_some_and(|d| d.len() > 20),
                        "{problem}"
                    );
                }
            }
        }
        assert!(
            failures.is_empty(),
            "auth matrix mismatches:\n{}",
            failures.join("\n")
        );

        // Source patterns: a limited token writes its sources only, and a batch with one
        // foreign source is refused whole.
        let (status, _) = app.ingest(&limited, &[record("gen-7")]).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = app
            .ingest(&limited, &[record("gen-8"), record("meter-1")])
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body["detail"].as_str().unwrap().contains("gen-*"), "{body}");

        // Public endpoints need no token.
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/"] {
            let r = app.client.get(app.url(path)).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }

        // Revocation takes effect at once.
        let (_, listed) = app.get("/v1/tokens", ADMIN).await;
        let read_id = listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["scope"] == "read")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            listed.to_string().find(&read).is_none(),
            "listing must not show secrets"
        );
        let r = app
            .client
            .delete(app.url(&format!("/v1/tokens/{read_id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let (status, _) = app.get("/v1/kinds", &read).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        // Admin actions are in the log with who did them.
        let (_, log) = app.get("/v1/log?after=0&limit=1000", ADMIN).await;
        let actions: Vec<&Value> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "admin.action")
            .collect();
        assert!(actions.iter().any(|e| e["action"] == "token.revoked"
            && e["actor"].as_str().unwrap().contains("bootstrap admin")));
        assert!(actions.iter().any(|e| e["action"] == "kind.declared"));
    }
);
