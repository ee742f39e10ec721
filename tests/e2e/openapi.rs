//! The OpenAPI document against the real server: every documented operation is called with
//! real requests (successes and errors), and every answer must be what the document says:
//! its status documented for the operation, its content type documented for that status,
//! and its JSON body valid against the documented schema, `$ref`s resolved.
//!
//! The `jsonschema` crate would turn on serde_json's `float_roundtrip` for the tests only,
//! and so build Polars a second time; [`Validator`] covers what utoipa emits instead.

use std::collections::BTreeSet;
use std::io::Write;

use regex::Regex;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

/// One request and what the server answered.
struct Exchange {
    method: Method,
    /// The documented path, as in the document (`/v1/events/{data_id}`).
    template: &'static str,
    path: String,
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Exchange {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn label(&self) -> String {
        format!("{} {} ({})", self.method, self.path, self.status)
    }
}

/// A request to make.
struct Call<'a> {
    method: Method,
    template: &'static str,
    path: String,
    token: Option<&'a str>,
    content_type: Option<&'a str>,
    headers: Vec<(&'a str, &'a str)>,
    body: Option<Vec<u8>>,
}

fn call<'a>(method: Method, template: &'static str, path: impl Into<String>) -> Call<'a> {
    Call {
        method,
        template,
        path: path.into(),
        token: Some(ADMIN),
        content_type: None,
        headers: Vec::new(),
        body: None,
    }
}

impl<'a> Call<'a> {
    fn token(mut self, token: Option<&'a str>) -> Self {
        self.token = token;
        self
    }

    fn json(self, body: &Value) -> Self {
        self.body(
            "application/json",
            serde_json::to_vec(body).expect("a JSON value serializes"),
        )
    }

    fn body(mut self, content_type: &'a str, body: Vec<u8>) -> Self {
        self.content_type = Some(content_type);
        self.body = Some(body);
        self
    }

    fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// Makes calls, checks each answer against the document, and remembers which operations
/// were called.
struct Checker<'a> {
    app: &'a TestApp,
    doc: &'a Value,
    validator: Validator<'a>,
    called: BTreeSet<(String, String)>,
    problems: Vec<String>,
}

impl<'a> Checker<'a> {
    fn new(app: &'a TestApp, doc: &'a Value) -> Self {
        Checker {
            app,
            doc,
            validator: Validator::new(doc),
            called: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    /// Make `call`, check the answer, and expect `status`.
    async fn expect(&mut self, call: Call<'_>, status: u16) -> Exchange {
        assert!(
            matches_template(call.template, &call.path),
            "{} does not match {}",
            call.path,
            call.template
        );
        let mut request = self
            .app
            .client
            .request(call.method.clone(), self.app.url(&call.path));
        if let Some(token) = call.token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = call.content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in &call.headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = call.body {
            request = request.body(body);
        }
        let response = send_past_early_answers(request).await;
        let exchange = Exchange {
            method: call.method,
            template: call.template,
            path: call.path,
            status: response.status().as_u16(),
            content_type: response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string()),
            body: response.bytes().await.expect("the body arrives").to_vec(),
        };
        assert_eq!(
            exchange.status,
            status,
            "{}: {}",
            exchange.label(),
            String::from_utf8_lossy(&exchange.body)
        );
        self.check(&exchange);
        exchange
    }

    /// Check an answer against the document; problems are collected, so that one run
    /// lists them all.
    fn check(&mut self, exchange: &Exchange) {
        self.called.insert((
            exchange.method.as_str().to_lowercase(),
            exchange.template.to_string(),
        ));
        if let Err(problem) = check_against(&self.validator, self.doc, exchange) {
            self.problems
                .push(format!("{}: {problem}", exchange.label()));
        }
    }
}

/// Whether `path` is an instance of `template`, segment by segment.
fn matches_template(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
}

/// What is wrong with an answer, as the document sees it.
fn check_against(
    validator: &Validator<'_>,
    doc: &Value,
    exchange: &Exchange,
) -> Result<(), String> {
    let method = exchange.method.as_str().to_lowercase();
    let operation = doc["paths"][exchange.template]
        .get(&method)
        .ok_or_else(|| format!("{method} {} is not documented", exchange.template))?;
    let responses = &operation["responses"];
    let response = responses
        .get(exchange.status.to_string())
        .or_else(|| responses.get("default"))
        .ok_or_else(|| {
            let documented: Vec<&String> = responses.as_object().unwrap().keys().collect();
            format!(
                "status {} is not documented (documented: {documented:?})",
                exchange.status
            )
        })?;
    let response = validator.resolve(response);
    let content = response.get("content").and_then(Value::as_object);
    let Some(content) = content.filter(|c| !c.is_empty()) else {
        return if exchange.body.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the documented response has no content, but the body is {} bytes",
                exchange.body.len()
            ))
        };
    };
    let received = exchange
        .content_type
        .as_deref()
        .ok_or("the response has no Content-Type")?;
    let media_type = received
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let documented = content.get(&media_type).ok_or_else(|| {
        let keys: Vec<&String> = content.keys().collect();
        format!("Content-Type {received} is not documented (documented: {keys:?})")
    })?;
    if media_type == "application/json" || media_type.ends_with("+json") {
        let body: Value = serde_json::from_slice(&exchange.body)
            .map_err(|e| format!("the body is not JSON ({e})"))?;
        let errors = validator.validate(&documented["schema"], &body);
        if !errors.is_empty() {
            return Err(format!(
                "the body does not fit its schema: {}\nbody: {body}",
                errors.join("; ")
            ));
        }
    }
    Ok(())
}

/// A validator for the JSON Schema (2020-12, as OpenAPI 3.1 uses it) that utoipa emits:
/// local `$ref`s, `type`, `enum`, `const`, object and array keywords, `allOf`/`anyOf`/
/// `oneOf`/`not`, numeric and length bounds, `pattern`, and the formats `date-time`, `date`,
/// `uuid`, `uri`, `int32` and `int64`. Other keywords (descriptions, examples) assert
/// nothing.
struct Validator<'a> {
    root: &'a Value,
}

impl<'a> Validator<'a> {
    fn new(root: &'a Value) -> Self {
        Validator { root }
    }

    /// Follow `$ref`s (`#/components/...`) to what they name.
    fn resolve<'v>(&'v self, mut value: &'v Value) -> &'v Value {
        let mut hops = 0;
        while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{reference} is not a local reference"));
            value = self
                .root
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} names nothing in the document"));
            hops += 1;
            assert!(hops < 32, "{reference} is a loop of references");
        }
        value
    }

    /// Every way `instance` breaks `schema`, with where.
    fn validate(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, instance, "$", &mut errors);
        errors
    }

    fn is_valid(&self, schema: &Value, instance: &Value) -> bool {
        self.validate(schema, instance).is_empty()
    }

    fn check(&self, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = match schema {
            Value::Bool(true) => return,
            Value::Bool(false) => {
                errors.push(format!("{at}: nothing is allowed here"));
                return;
            }
            Value::Object(schema) => schema,
            other => panic!("{other} is not a schema"),
        };
        let mut fail = |message: String| errors.push(format!("{at}: {message}"));
        if let Some(reference) = schema.get("$ref") {
            let target = self.resolve(&json!({"$ref": reference})).clone();
            let mut nested = Vec::new();
            self.check(&target, instance, at, &mut nested);
            errors.append(&mut nested);
            return self.check_keywords(schema, instance, at, errors);
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                other => panic!("{other} is not a type"),
            };
            if !types.iter().any(|t| has_type(instance, t)) {
                fail(format!("{instance} is not of type {types:?}"));
                return;
            }
        }
        self.check_keywords(schema, instance, at, errors);
    }

    /// Everything but `$ref` and `type`.
    fn check_keywords(
        &self,
        schema: &serde_json::Map<String, Value>,
        instance: &Value,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        let mut fail = |message: String| errors.push(format!("{at}: {message}"));
        if let Some(Value::Array(values)) = schema.get("enum")
            && !values.contains(instance)
        {
            fail(format!("{instance} is not one of {values:?}"));
        }
        if let Some(value) = schema.get("const")
            && value != instance
        {
            fail(format!("{instance} is not {value}"));
        }
        if let Some(n) = instance.as_f64() {
            let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
            if bound("minimum").is_some_and(|m| n < m)
                || bound("maximum").is_some_and(|m| n > m)
                || bound("exclusiveMinimum").is_some_and(|m| n <= m)
                || bound("exclusiveMaximum").is_some_and(|m| n >= m)
            {
                fail(format!("{n} is out of bounds"));
            }
            let format = schema.get("format").and_then(Value::as_str);
            let fits = match format {
                Some("int32") => instance.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
                Some("int64") => instance.as_i64().is_some() || instance.as_u64().is_some(),
                _ => true,
            };
            if !fits {
                fail(format!("{instance} is not a {}", format.unwrap_or("")));
            }
        }
        if let Some(text) = instance.as_str() {
            let length = text.chars().count() as u64;
            let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
            if bound("minLength").is_some_and(|m| length < m)
                || bound("maxLength").is_some_and(|m| length > m)
            {
                fail(format!("{text:?} has {length} characters, out of bounds"));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                let regex = Regex::new(pattern)
                    .unwrap_or_else(|e| panic!("pattern {pattern} does not compile: {e}"));
                if !regex.is_match(text) {
                    fail(format!("{text:?} does not match {pattern}"));
                }
            }
            if let Some(format) = schema.get("format").and_then(Value::as_str)
                && !has_format(text, format)
            {
                fail(format!("{text:?} is not a {format}"));
            }
        }
        if let Some(object) = instance.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !object.contains_key(name) {
                    fail(format!("{name} is required"));
                }
            }
            for (name, value) in object {
                let at = format!("{at}.{name}");
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => self.check(property, value, &at, errors),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            errors.push(format!("{at}: no such property is allowed"))
                        }
                        Some(extra @ Value::Object(_)) => self.check(extra, value, &at, errors),
                        _ => {}
                    },
                }
                if let Some(names) = schema.get("propertyNames") {
                    self.check(names, &json!(name), &at, errors);
                }
            }
        }
        if let Some(items) = instance.as_array() {
            let length = items.len() as u64;
            let mut fail = |message: String| errors.push(format!("{at}: {message}"));
            let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
            if bound("minItems").is_some_and(|m| length < m)
                || bound("maxItems").is_some_and(|m| length > m)
            {
                fail(format!("{length} items, out of bounds"));
            }
            if let Some(item) = schema.get("items") {
                for (i, value) in items.iter().enumerate() {
                    self.check(item, value, &format!("{at}[{i}]"), errors);
                }
            }
        }
        if let Some(Value::Array(all)) = schema.get("allOf") {
            for branch in all {
                self.check(branch, instance, at, errors);
            }
        }
        if let Some(Value::Array(any)) = schema.get("anyOf")
            && !any.iter().any(|branch| self.is_valid(branch, instance))
        {
            errors.push(format!("{at}: {instance} fits none of anyOf"));
        }
        if let Some(Value::Array(one)) = schema.get("oneOf") {
            let fits = one.iter().filter(|b| self.is_valid(b, instance)).count();
            if fits != 1 {
                errors.push(format!(
                    "{at}: {instance} fits {fits} branches of oneOf, not 1"
                ));
            }
        }
        if let Some(not) = schema.get("not")
            && self.is_valid(not, instance)
        {
            errors.push(format!("{at}: {instance} fits what `not` forbids"));
        }
    }
}

fn has_type(instance: &Value, ty: &str) -> bool {
    match ty {
        "null" => instance.is_null(),
        "boolean" => instance.is_boolean(),
        "string" => instance.is_string(),
        "array" => instance.is_array(),
        "object" => instance.is_object(),
        "number" => instance.is_number(),
        "integer" => {
            instance.is_i64()
                || instance.is_u64()
                || instance.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("{other} is not a JSON Schema type"),
    }
}

fn has_format(text: &str, format: &str) -> bool {
    match format {
        "date-time" => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        "date" => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok() && text.len() == 10,
        "uuid" => Uuid::try_parse(text).is_ok() && text.len() == 36,
        "uri" => text.split_once(':').is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }),
        _ => true,
    }
}

fn gzip(text: &str) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap()
}

#[test]
fn the_validator_refuses_what_does_not_fit() {
    let doc = json!({"components": {"schemas": {
        "Key": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "Row": {
            "type": "object",
            "required": ["id", "at", "n"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "at": {"type": "string", "format": "date-time"},
                "n": {"type": "integer", "format": "int64", "minimum": 0},
                "key": {"$ref": "#/components/schemas/Key"},
                "state": {"oneOf": [{"type": "string", "enum": ["ready", "failed"]}, {"type": "null"}]}
            },
            "additionalProperties": false
        }
    }}});
    let validator = Validator::new(&doc);
    let schema = json!({"$ref": "#/components/schemas/Row"});
    let good = json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": 3, "key": "2024-05-05", "state": null});
    assert_eq!(validator.validate(&schema, &good), Vec::<String>::new());
    for bad in [
        json!({"id": "nope", "at": "2024-05-05T00:00:00Z", "n": 3}),
        json!({"id": Uuid::nil(), "at": "yesterday", "n": 3}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": -1}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": 1.5}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z"}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": 3, "extra": 1}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": 3, "key": "May 5"}),
        json!({"id": Uuid::nil(), "at": "2024-05-05T00:00:00Z", "n": 3, "state": "stale"}),
    ] {
        assert!(
            !validator.validate(&schema, &bad).is_empty(),
            "{bad} passed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_what_the_openapi_document_says() {
    let Some(d) = Deployment::new(Backend::Sqlite, "openapi").await else {
        return;
    };
    let app = d.start().await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut c = Checker::new(&app, &doc);
    use Method as M;

    // The endpoints every process serves, and the page.
    c.expect(
        call(M::GET, "/openapi.json", "/openapi.json").token(None),
        200,
    )
    .await;
    for (template, path) in [
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
        ("/metrics", "/metrics"),
        ("/", "/"),
        ("/assets/app.js", "/assets/app.js"),
        ("/assets/style.css", "/assets/style.css"),
        ("/assets/uPlot.iife.min.js", "/assets/uPlot.iife.min.js"),
        ("/assets/uPlot.min.css", "/assets/uPlot.min.css"),
        ("/admin", "/admin"),
        ("/assets/admin.js", "/assets/admin.js"),
        ("/assets/admin.css", "/assets/admin.css"),
        ("/assets/common.js", "/assets/common.js"),
        ("/assets/common.css", "/assets/common.css"),
    ] {
        c.expect(call(M::GET, template, path).token(None), 200)
            .await;
    }

    // Kinds.
    let kind = "/v1/kinds/{kind}";
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation").json(&json!({"fields": {"output_mw": "float"}})),
        200,
    )
    .await;
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation")
            .json(&json!({"fields": {"output_mw": "complex"}})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation").json(&json!({"fields": {"": "float"}})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation")
            .body("application/json", b"{\"fields\":".to_vec()),
        400,
    )
    .await;
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation").body("text/plain", b"{}".to_vec()),
        415,
    )
    .await;
    let huge = format!(
        "{{\"fields\": {{\"f\": \"float\"}}, \"pad\": \"{}\"}}",
        "x".repeat(3 << 20)
    );
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation").body("application/json", huge.into_bytes()),
        413,
    )
    .await;
    c.expect(
        call(M::PUT, kind, "/v1/kinds/generation")
            .token(None)
            .json(&json!({"fields": {}})),
        401,
    )
    .await;
    c.expect(call(M::GET, "/v1/kinds", "/v1/kinds"), 200).await;

    // Records in.
    let events = "/v1/events";
    let first = Uuid::now_v7();
    let ingested = c
        .expect(
            call(M::POST, events, events).json(&json!({"data_id": first, "kind": "generation", "source": "g1", "created": "2024-05-05T01:00:00Z", "data": {"output_mw": 1.5}})),
            200,
        )
        .await;
    assert_eq!(ingested.json()["accepted"], 1);
    let array = json!([
        {"kind": "generation", "source": "g2", "created": "2024-05-05T02:00:00Z", "data": {"output_mw": 2.5}},
        17,
        {"kind": "generation", "source": "g2", "created": "2024-05-05T03:00:00Z", "data": {"output_mw": "high"}}
    ]);
    let mixed = c
        .expect(call(M::POST, events, events).json(&array), 200)
        .await;
    assert_eq!(mixed.json()["quarantined"], 2, "{}", mixed.json());
    let ndjson =
        "{\"source\":\"g3\",\"created\":\"2024-05-06T01:00:00Z\",\"data\":{\"output_mw\":3.5}}\n";
    c.expect(
        call(M::POST, events, "/v1/events?kind=generation")
            .body("application/x-ndjson", ndjson.as_bytes().to_vec()),
        200,
    )
    .await;
    c.expect(
        call(M::POST, events, "/v1/events?kind=generation&source=g4")
            .body(
                "application/x-ndjson",
                gzip("{\"data\":{\"output_mw\":4.5}}\n"),
            )
            .header("content-encoding", "gzip"),
        200,
    )
    .await;
    c.expect(
        call(M::POST, events, events).body("application/x-ndjson", b"garbage\n".to_vec()),
        400,
    )
    .await;
    c.expect(call(M::POST, events, events).json(&json!([])), 400)
        .await;
    c.expect(
        call(M::POST, events, events).body("text/csv", b"a,b\n".to_vec()),
        415,
    )
    .await;
    c.expect(
        call(M::POST, events, events)
            .body("application/x-ndjson", b"{}\n".to_vec())
            .header("content-encoding", "br"),
        415,
    )
    .await;
    c.expect(
        call(M::POST, events, events).token(None).json(&json!({})),
        401,
    )
    .await;
    let reader = app.token("read", &[]).await;
    c.expect(
        call(M::POST, events, events)
            .token(Some(&reader))
            .json(&json!({"kind": "k", "source": "s", "data": {}})),
        403,
    )
    .await;
    c.expect(
        call(M::POST, events, events)
            .token(Some("not-a-token"))
            .json(&json!({})),
        401,
    )
    .await;

    let event = "/v1/events/{data_id}";
    c.expect(call(M::GET, event, format!("/v1/events/{first}")), 200)
        .await;
    c.expect(
        call(M::GET, event, format!("/v1/events/{}", Uuid::now_v7())),
        404,
    )
    .await;
    c.expect(call(M::GET, event, "/v1/events/not-a-uuid"), 400)
        .await;

    // The quarantine.
    let quarantine = "/v1/quarantine";
    let page = c.expect(call(M::GET, quarantine, quarantine), 200).await;
    assert_eq!(
        page.json()["records"].as_array().map(Vec::len),
        Some(2),
        "{}",
        page.json()
    );
    c.expect(
        call(M::GET, quarantine, "/v1/quarantine?after=0&limit=1"),
        200,
    )
    .await;
    c.expect(call(M::GET, quarantine, "/v1/quarantine?limit=0"), 400)
        .await;
    c.expect(call(M::GET, quarantine, "/v1/quarantine?before=x"), 400)
        .await;
    c.expect(
        call(M::GET, quarantine, quarantine).token(Some(&reader)),
        403,
    )
    .await;

    // Tokens.
    let tokens = "/v1/tokens";
    let created = c
        .expect(
            call(M::POST, tokens, tokens)
                .json(&json!({"scope": "ingest", "sources": ["g*"], "name": "meters"})),
            201,
        )
        .await;
    let created_id = created.json()["id"].as_str().unwrap().to_string();
    c.expect(
        call(M::POST, tokens, tokens).json(&json!({"scope": "read", "sources": ["g*"]})),
        422,
    )
    .await;
    c.expect(
        call(M::POST, tokens, tokens).json(&json!({"scope": "root"})),
        422,
    )
    .await;
    c.expect(
        call(M::POST, tokens, tokens).json(&json!({"scope": "read", "colour": 1})),
        422,
    )
    .await;
    c.expect(
        call(M::POST, tokens, tokens).body("application/json", b"scope=read".to_vec()),
        400,
    )
    .await;
    let listed = c.expect(call(M::GET, tokens, tokens), 200).await;
    let own = listed.json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().contains("SCHOLIA_ADMIN_TOKEN"))
        .expect("the bootstrap admin token is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = "/v1/tokens/{id}";
    c.expect(
        call(M::DELETE, token, format!("/v1/tokens/{created_id}")),
        204,
    )
    .await;
    c.expect(
        call(M::DELETE, token, format!("/v1/tokens/{created_id}")),
        404,
    )
    .await;
    c.expect(call(M::DELETE, token, format!("/v1/tokens/{own}")), 409)
        .await;
    c.expect(call(M::DELETE, token, "/v1/tokens/42"), 400).await;

    // Analyses.
    c.expect(call(M::GET, "/v1/analyses", "/v1/analyses"), 200)
        .await;
    let analysis = "/v1/analyses/{name}";
    c.expect(call(M::GET, analysis, "/v1/analyses/daily_avg"), 200)
        .await;
    c.expect(call(M::GET, analysis, "/v1/analyses/no_such"), 404)
        .await;
    let definition = json!({"kind": "generation", "partition": "1h", "sql": "SELECT source, MAX(output_mw) AS max_mw FROM generation GROUP BY source", "description": "Highest output per hour"});
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max").json(&definition),
        201,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max").json(&definition),
        200,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/broken")
            .json(&json!({"kind": "generation", "sql": "SELEKT nothing"})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/other").json(&json!({"name": "hourly_max", "kind": "generation", "sql": "SELECT 1 AS one FROM generation"})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/daily_avg").json(&definition),
        409,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/Bad_Name").json(&definition),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max")
            .token(Some(&reader))
            .json(&definition),
        403,
    )
    .await;

    // Annotations, in each format.
    let annotations = "/v1/annotations/{analysis}";
    let read = c
        .expect(
            call(
                M::GET,
                annotations,
                "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-07&wait=30",
            ),
            200,
        )
        .await;
    assert_eq!(
        read.json()["partitions"][0]["status"],
        "ready",
        "{}",
        read.json()
    );
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/hourly_max?from=2024-05-05T00:00:00Z&to=2024-05-05T06:00:00Z&wait=30",
        ),
        200,
    )
    .await;
    let csv = c
        .expect(
            call(
                M::GET,
                annotations,
                "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-06&format=csv",
            ),
            200,
        )
        .await;
    assert!(String::from_utf8_lossy(&csv.body).contains("g1"));
    let arrow = c
        .expect(
            call(
                M::GET,
                annotations,
                "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-06&format=arrow",
            ),
            200,
        )
        .await;
    assert!(!arrow.body.is_empty());
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?to=2024-05-06",
        ),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=May&to=2024-05-06",
        ),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=2024-05-06&to=2024-05-05",
        ),
        422,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=1000-01-01&to=9000-01-01",
        ),
        422,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-06&format=xml",
        ),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-06&wait=301",
        ),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/no_such?from=2024-05-05&to=2024-05-06",
        ),
        404,
    )
    .await;
    c.expect(
        call(
            M::GET,
            annotations,
            "/v1/annotations/daily_avg?from=2024-05-05&to=2024-05-06",
        )
        .token(None),
        401,
    )
    .await;

    // Build history, and a candidate of hourly_max through its whole life.
    let builds = "/v1/analyses/{name}/builds";
    let history = c
        .expect(call(M::GET, builds, "/v1/analyses/daily_avg/builds"), 200)
        .await;
    assert!(
        history.json()["builds"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{}",
        history.json()
    );
    c.expect(
        call(
            M::GET,
            builds,
            "/v1/analyses/daily_avg/builds?limit=5&partition=2024-05-05",
        )
        .token(Some(&reader)),
        200,
    )
    .await;
    c.expect(
        call(M::GET, builds, "/v1/analyses/daily_avg/builds?limit=0"),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            builds,
            "/v1/analyses/daily_avg/builds?partition=May",
        ),
        422,
    )
    .await;
    c.expect(call(M::GET, builds, "/v1/analyses/no_such/builds"), 404)
        .await;
    let candidate_definition = json!({"kind": "generation", "partition": "1h", "sql": "SELECT source, MIN(output_mw) AS max_mw FROM generation GROUP BY source"});
    let registered = c
        .expect(
            call(M::PUT, analysis, "/v1/analyses/hourly_max?candidate=true")
                .json(&candidate_definition),
            201,
        )
        .await;
    assert_eq!(
        registered.json()["candidate"],
        true,
        "{}",
        registered.json()
    );
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max?candidate=true")
            .json(&candidate_definition),
        200,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max?candidate=true").json(&definition),
        409,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/no_such?candidate=true").json(&candidate_definition),
        404,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max?candidate=maybe")
            .json(&candidate_definition),
        400,
    )
    .await;
    let listed = c
        .expect(call(M::GET, "/v1/analyses", "/v1/analyses"), 200)
        .await;
    assert!(
        listed.json()["analyses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "hourly_max" && a["candidate"]["version"] == 2),
        "{}",
        listed.json()
    );
    let candidate = "/v1/analyses/{name}/candidate";
    c.expect(
        call(M::GET, candidate, "/v1/analyses/hourly_max/candidate"),
        200,
    )
    .await;
    c.expect(
        call(M::GET, candidate, "/v1/analyses/daily_avg/candidate"),
        404,
    )
    .await;
    c.expect(
        call(M::GET, candidate, "/v1/analyses/hourly_max/candidate").token(Some(&reader)),
        403,
    )
    .await;
    let candidate_builds = "/v1/analyses/{name}/candidate/builds";
    c.expect(
        call(
            M::POST,
            candidate_builds,
            "/v1/analyses/hourly_max/candidate/builds",
        )
        .json(&json!({"from": "2024-05-05T00:00:00Z", "to": "2024-05-05T06:00:00Z"})),
        202,
    )
    .await;
    c.expect(
        call(
            M::POST,
            candidate_builds,
            "/v1/analyses/hourly_max/candidate/builds",
        )
        .json(&json!({"sample": 2})),
        202,
    )
    .await;
    c.expect(
        call(
            M::POST,
            candidate_builds,
            "/v1/analyses/hourly_max/candidate/builds",
        )
        .json(&json!({})),
        422,
    )
    .await;
    c.expect(
        call(
            M::POST,
            candidate_builds,
            "/v1/analyses/daily_avg/candidate/builds",
        )
        .json(&json!({"sample": 2})),
        404,
    )
    .await;
    eventually(
        std::time::Duration::from_secs(30),
        "the candidate's builds",
        || async {
            let (_, view) = app.get("/v1/analyses/hourly_max/candidate", ADMIN).await;
            (view["built"].as_u64() >= Some(2) && view["queued"] == 0 && view["running"] == 0)
                .then_some(())
        },
    )
    .await;
    let diff = "/v1/analyses/{name}/candidate/diff";
    let compared = c
        .expect(
            call(
                M::GET,
                diff,
                "/v1/analyses/hourly_max/candidate/diff?from=2024-05-05T00:00:00Z&to=2024-05-05T06:00:00Z",
            ),
            200,
        )
        .await;
    assert!(
        compared.json()["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["status"] == "compared"),
        "{}",
        compared.json()
    );
    c.expect(
        call(
            M::GET,
            diff,
            "/v1/analyses/hourly_max/candidate/diff?to=2024-05-06",
        ),
        400,
    )
    .await;
    c.expect(
        call(
            M::GET,
            diff,
            "/v1/analyses/hourly_max/candidate/diff?from=2024-01-01&to=2025-01-01",
        ),
        422,
    )
    .await;
    let promote = "/v1/analyses/{name}/candidate/promote";
    let promoted = c
        .expect(
            call(
                M::POST,
                promote,
                "/v1/analyses/hourly_max/candidate/promote",
            ),
            200,
        )
        .await;
    assert_eq!(
        promoted.json()["analysis"]["version"],
        2,
        "{}",
        promoted.json()
    );
    c.expect(
        call(
            M::POST,
            promote,
            "/v1/analyses/hourly_max/candidate/promote",
        ),
        404,
    )
    .await;
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/hourly_max?candidate=true").json(&definition),
        201,
    )
    .await;
    c.expect(
        call(M::DELETE, candidate, "/v1/analyses/hourly_max/candidate"),
        200,
    )
    .await;
    c.expect(
        call(M::DELETE, candidate, "/v1/analyses/hourly_max/candidate"),
        404,
    )
    .await;

    // Lineage and the log.
    let lineage = "/v1/lineage/{data_id}";
    let traced = c
        .expect(call(M::GET, lineage, format!("/v1/lineage/{first}")), 200)
        .await;
    assert!(
        traced.json()["annotations"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["analysis"] == "daily_avg")),
        "{}",
        traced.json()
    );
    c.expect(
        call(M::GET, lineage, format!("/v1/lineage/{}", Uuid::now_v7())),
        404,
    )
    .await;
    c.expect(call(M::GET, lineage, "/v1/lineage/x"), 400).await;
    let log = "/v1/log";
    c.expect(call(M::GET, log, log), 200).await;
    let page = c
        .expect(call(M::GET, log, "/v1/log?limit=10000"), 200)
        .await;
    let types: BTreeSet<String> = page.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert!(
        types.contains("analysis.completed") && types.contains("admin.action"),
        "{types:?}"
    );
    c.expect(call(M::GET, log, "/v1/log?after=2&limit=3"), 200)
        .await;
    c.expect(call(M::GET, log, "/v1/log?limit=0"), 400).await;
    c.expect(call(M::GET, log, "/v1/log?after=-1"), 400).await;

    // Invalidations.
    let invalidations = "/v1/invalidations";
    let invalidation = "/v1/invalidations/{id}";
    let eager = c
        .expect(call(M::POST, invalidations, invalidations).json(&json!({"analysis": "daily_avg", "from": "2024-05-05", "to": "2024-05-07", "reason": "recalibrated"})), 202)
        .await;
    let eager_id = eager.json()["id"].as_str().unwrap().to_string();
    let lazy = c
        .expect(call(M::POST, invalidations, invalidations).json(&json!({"analysis": "*", "from": "2023-01-01", "to": "2024-01-01", "rebuild": "lazy", "cascade": false})), 202)
        .await;
    let lazy_id = lazy.json()["id"].as_str().unwrap().to_string();
    c.expect(
        call(M::POST, invalidations, invalidations)
            .json(&json!({"analysis": "no_such", "from": "2024-05-05", "to": "2024-05-06"})),
        404,
    )
    .await;
    c.expect(
        call(M::POST, invalidations, invalidations)
            .json(&json!({"analysis": "daily_avg", "from": "2024-05-06", "to": "2024-05-05"})),
        422,
    )
    .await;
    c.expect(
        call(M::POST, invalidations, invalidations)
            .json(&json!({"analysis": "daily_avg", "from": "soon", "to": "2024-05-05"})),
        400,
    )
    .await;
    c.expect(
        call(M::POST, invalidations, invalidations)
            .json(&json!({"analysis": "daily_avg", "from": "2024-05-05"})),
        422,
    )
    .await;
    c.expect(call(M::GET, invalidations, invalidations), 200)
        .await;
    c.expect(
        call(
            M::GET,
            invalidation,
            format!("/v1/invalidations/{eager_id}"),
        ),
        200,
    )
    .await;
    let planned = c
        .expect(call(M::POST, invalidations, invalidations).json(&json!({"analysis": "daily_avg", "from": "2024-05-05", "to": "2024-05-07", "dry_run": true})), 200)
        .await;
    assert_eq!(planned.json()["partitions_total"], 2, "{}", planned.json());
    c.expect(
        call(M::POST, invalidations, invalidations)
            .json(&json!({"analysis": "no_such", "from": "2024-05-05", "to": "2024-05-06", "dry_run": true})),
        404,
    )
    .await;
    let retry = "/v1/invalidations/{id}/retry";
    c.expect(
        call(
            M::POST,
            retry,
            format!("/v1/invalidations/{}/retry", Uuid::now_v7()),
        ),
        404,
    )
    .await;
    c.expect(call(M::POST, retry, "/v1/invalidations/x/retry"), 400)
        .await;
    // A build that fails, to retry.
    let (status, body) = app
        .ingest(
            ADMIN,
            &[json!({"kind": "memo", "source": "m", "created": "2024-05-05T12:00:00Z", "data": {"note": "abc"}})],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    c.expect(
        call(M::PUT, analysis, "/v1/analyses/note_numbers")
            .json(&json!({"kind": "memo", "sql": "SELECT CAST(note AS INTEGER) AS n FROM events"})),
        201,
    )
    .await;
    let failing = c
        .expect(
            call(M::POST, invalidations, invalidations).json(
                &json!({"analysis": "note_numbers", "from": "2024-05-05", "to": "2024-05-06"}),
            ),
            202,
        )
        .await;
    let failing_id = failing.json()["id"].as_str().unwrap().to_string();
    invalidation_reaches(
        &app,
        &failing_id,
        "failed",
        std::time::Duration::from_secs(30),
    )
    .await;
    let retried = c
        .expect(
            call(
                M::POST,
                retry,
                format!("/v1/invalidations/{failing_id}/retry"),
            ),
            202,
        )
        .await;
    assert_eq!(retried.json()["partitions"], 1, "{}", retried.json());
    let retried_id = retried.json()["id"].as_str().unwrap().to_string();
    invalidation_reaches(
        &app,
        &retried_id,
        "failed",
        std::time::Duration::from_secs(30),
    )
    .await;
    c.expect(
        call(
            M::POST,
            retry,
            format!("/v1/invalidations/{eager_id}/retry"),
        ),
        409,
    )
    .await;

    c.expect(
        call(
            M::GET,
            invalidation,
            format!("/v1/invalidations/{}", Uuid::now_v7()),
        ),
        404,
    )
    .await;
    c.expect(call(M::GET, invalidation, "/v1/invalidations/x"), 400)
        .await;
    let cancelled = c
        .expect(
            call(
                M::DELETE,
                invalidation,
                format!("/v1/invalidations/{lazy_id}"),
            ),
            200,
        )
        .await;
    assert_eq!(
        cancelled.json()["state"],
        "cancelled",
        "{}",
        cancelled.json()
    );
    c.expect(
        call(
            M::DELETE,
            invalidation,
            format!("/v1/invalidations/{lazy_id}"),
        ),
        409,
    )
    .await;
    c.expect(
        call(
            M::DELETE,
            invalidation,
            format!("/v1/invalidations/{}", Uuid::now_v7()),
        ),
        404,
    )
    .await;
    c.expect(
        call(M::GET, invalidations, invalidations).token(Some(&reader)),
        403,
    )
    .await;

    // Schedules.
    let schedules = "/v1/schedules";
    let schedule = "/v1/schedules/{name}";
    c.expect(
        call(M::PUT, schedule, "/v1/schedules/nightly")
            .json(&json!({"analysis": "daily_avg", "cron": "0 1 * * *", "window": "P7D"})),
        200,
    )
    .await;
    c.expect(
        call(M::PUT, schedule, "/v1/schedules/nightly")
            .json(&json!({"analysis": "daily_avg", "cron": "every night", "window": "P7D"})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, schedule, "/v1/schedules/nightly")
            .json(&json!({"analysis": "daily_avg", "cron": "0 1 * * *", "window": "P2Y"})),
        422,
    )
    .await;
    c.expect(
        call(M::PUT, schedule, "/v1/schedules/nightly")
            .json(&json!({"analysis": "no_such", "cron": "0 1 * * *", "window": "P7D"})),
        404,
    )
    .await;
    c.expect(
        call(M::PUT, schedule, "/v1/schedules/bad%20name")
            .json(&json!({"analysis": "daily_avg", "cron": "0 1 * * *", "window": "P7D"})),
        422,
    )
    .await;
    c.expect(call(M::GET, schedules, schedules), 200).await;
    c.expect(call(M::GET, schedule, "/v1/schedules/nightly"), 200)
        .await;
    c.expect(call(M::GET, schedule, "/v1/schedules/no_such"), 404)
        .await;

    // The websocket: a handshake upgrades; a plain GET is refused.
    let ws = "/v1/ws";
    c.expect(call(M::GET, ws, ws), 400).await;
    c.expect(call(M::GET, ws, ws).token(None), 401).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            app.ws_url(&format!("/v1/ws?token={ADMIN}")),
        )
        .unwrap();
    request.headers_mut().remove("authorization");
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the websocket handshake succeeds");
    drop(socket);
    c.check(&Exchange {
        method: M::GET,
        template: ws,
        path: ws.to_string(),
        status: response.status().as_u16(),
        content_type: None,
        body: Vec::new(),
    });
    assert_eq!(response.status().as_u16(), 101);

    // Every documented operation was called, and every answer fit.
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let uncalled: Vec<_> = documented.difference(&c.called).collect();
    assert!(
        uncalled.is_empty(),
        "documented but not called: {uncalled:?}"
    );
    assert!(
        c.problems.is_empty(),
        "answers the document does not describe:\n{}",
        c.problems.join("\n")
    );

    // And the check can fail: an answer the document does not describe is caught.
    let undocumented = Exchange {
        method: M::GET,
        template: "/v1/kinds",
        path: "/v1/kinds".into(),
        status: 200,
        content_type: Some("application/json".into()),
        body: br#"{"kinds": [{"kind": 7}]}"#.to_vec(),
    };
    assert!(check_against(&c.validator, &doc, &undocumented).is_err());
    let teapot = Exchange {
        status: 418,
        ..undocumented
    };
    assert!(check_against(&c.validator, &doc, &teapot).is_err());
}

/// Send `request`. A server that refuses a body by its declared length (413) answers
/// before reading it and closes the connection; a client still writing the body may then
/// see a broken pipe instead of the answer. That race is TCP's, not the server's: send
/// again (a few times at most) until the answer is read.
async fn send_past_early_answers(request: reqwest::RequestBuilder) -> reqwest::Response {
    let mut attempts = 0;
    loop {
        let attempt = request.try_clone().expect("request bodies here are bytes");
        match attempt.send().await {
            Ok(response) => return response,
            Err(error) if attempts < 4 && cut_off_while_sending(&error) => attempts += 1,
            Err(error) => panic!("the server answers: {error:?}"),
        }
    }
}

fn cut_off_while_sending(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        {
            return true;
        }
        source = e.source();
    }
    false
}
