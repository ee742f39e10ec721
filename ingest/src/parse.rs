//! Turning a request body into records: one JSON object, a JSON array, or NDJSON. Each
//! item is judged on its own, so one bad line never costs the good ones; both backends
//! accept and refuse exactly the same records, because every check is here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use scholia_events::Envelope;
use scholia_events::envelope::accepted_time;
use scholia_events::schema::KindSchema;
use scholia_events::store::{NewRecord, Rejected};

/// The deepest nesting accepted inside `data`.
pub const MAX_JSON_DEPTH: usize = 32;
/// The longest `kind` or `source` accepted.
const MAX_NAME_LEN: usize = 200;
/// The longest field name accepted inside `data`.
const MAX_FIELD_NAME_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one envelope or an array of them.
    Json,
    /// `application/x-ndjson`: one envelope per line.
    Ndjson,
}

/// Defaults from the query string.
#[derive(Debug, Default, Clone)]
pub struct Defaults {
    pub kind: Option<String>,
    pub source: Option<String>,
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub records: Vec<NewRecord>,
    pub rejected: Vec<Rejected>,
    /// The schema of each kind before this body, as the records were checked against it.
    pub schemas: BTreeMap<String, KindSchema>,
}

/// Split and parse a body, checking each record against its kind's schema (`schema_of`,
/// learning as it goes, so that one body cannot give a field two types). `Err` means
/// nothing in the body was JSON at all.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    defaults: &Defaults,
    now: DateTime<Utc>,
    schema_of: &dyn Fn(&str) -> KindSchema,
) -> Result<Parsed, String> {
    let mut items: Vec<(usize, Result<&str, String>)> = Vec::new();
    match format {
        BodyFormat::Ndjson => {
            for (i, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let text = std::str::from_utf8(line).map_err(|e| {
                    format!(
                        "not UTF-8 text ({e}); {}",
                        String::from_utf8_lossy(line)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    )
                });
                items.push((i + 1, text));
            }
        }
        BodyFormat::Json => {
            let text = std::str::from_utf8(body)
                .map_err(|e| format!("The body is not UTF-8 text ({e})."))?;
            if text.trim_start().starts_with('[') {
                let array: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
                    format!("The body is not a valid JSON array ({e}); send NDJSON (Content-Type: application/x-ndjson) to have good lines kept when some are bad.")
                })?;
                items.extend(
                    array
                        .into_iter()
                        .enumerate()
                        .map(|(i, raw)| (i + 1, Ok(raw.get()))),
                );
            } else {
                items.push((1, Ok(text)));
            }
        }
    }
    if items.is_empty() {
        return Err("The body holds no records.".into());
    }
    let mut parsed = Parsed::default();
    let mut learned: BTreeMap<String, KindSchema> = BTreeMap::new();
    let mut json_items = 0;
    for (line, raw) in items {
        let raw = match raw {
            Ok(raw) => raw,
            Err(error) => {
                let text = error.split_once("; ").map_or("", |(_, t)| t).to_string();
                parsed.rejected.push(reject(line, &text, error, None));
                continue;
            }
        };
        let value: Value = match serde_json::from_str(raw) {
            Ok(value) => value,
            Err(e) => {
                parsed
                    .rejected
                    .push(reject(line, raw, format!("not valid JSON: {e}"), None));
                continue;
            }
        };
        json_items += 1;
        let (envelope, created_given) = match to_envelope(value, defaults, now) {
            Ok(ok) => ok,
            Err((error, partial)) => {
                parsed
                    .rejected
                    .push(reject(line, raw, error, Some(partial)));
                continue;
            }
        };
        let schema = learned.entry(envelope.kind.clone()).or_insert_with(|| {
            let schema = schema_of(&envelope.kind);
            parsed.schemas.insert(envelope.kind.clone(), schema.clone());
            schema
        });
        if let Err(error) = schema.check(&envelope.data) {
            let partial = Partial::of(&envelope);
            parsed
                .rejected
                .push(reject(line, raw, error, Some(partial)));
            continue;
        }
        schema.learn(&envelope.data);
        let data_json = envelope.data_json();
        let digest = envelope.digest_with(&data_json, created_given);
        parsed.records.push(NewRecord {
            line,
            envelope,
            data_json,
            digest,
        });
    }
    if json_items == 0 {
        let first = &parsed.rejected[0];
        return Err(format!(
            "Nothing in the body is JSON (line {}: {}). Send one envelope, a JSON array, or one envelope per line as application/x-ndjson.",
            first.line, first.error
        ));
    }
    Ok(parsed)
}

#[derive(Default)]
struct Partial {
    kind: Option<String>,
    source: Option<String>,
    data_id: Option<Uuid>,
}

impl Partial {
    fn of(envelope: &Envelope) -> Self {
        Partial {
            kind: Some(envelope.kind.clone()),
            source: Some(envelope.source.clone()),
            data_id: Some(envelope.data_id),
        }
    }
}

fn reject(line: usize, raw: &str, error: String, partial: Option<Partial>) -> Rejected {
    let partial = partial.unwrap_or_default();
    Rejected {
        line,
        raw: raw.to_string(),
        error,
        kind: partial.kind,
        source: partial.source,
        data_id: partial.data_id,
    }
}

/// The envelope of one item, and whether its `created` was given.
fn to_envelope(
    value: Value,
    defaults: &Defaults,
    now: DateTime<Utc>,
) -> Result<(Envelope, bool), (String, Partial)> {
    let Value::Object(mut object) = value else {
        return Err((
            "an envelope must be a JSON object with kind, source, created and data".into(),
            Partial::default(),
        ));
    };
    let mut partial = Partial::default();
    let kind = name_field(&mut object, "kind", defaults.kind.as_deref())
        .map_err(|e| (e, Partial::default()))?;
    partial.kind = Some(kind.clone());
    let source = match name_field(&mut object, "source", defaults.source.as_deref()) {
        Ok(source) => source,
        Err(e) => return Err((e, partial)),
    };
    partial.source = Some(source.clone());
    let data_id = match object.remove("data_id") {
        None | Some(Value::Null) => Uuid::now_v7(),
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) => id,
            Err(_) => {
                return Err((
                    format!("data_id {s:?} is not a UUID; leave it out to have one assigned"),
                    partial,
                ));
            }
        },
        Some(_) => return Err(("data_id must be a UUID string".into(), partial)),
    };
    partial.data_id = Some(data_id);
    let (created, created_given) = match object.remove("created") {
        // The receive time, cut to microseconds like any other time.
        None | Some(Value::Null) => (accepted_time(now).unwrap_or(now), false),
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(&s) {
            Ok(t) => match accepted_time(t.with_timezone(&Utc)) {
                Ok(t) => (t, true),
                Err(e) => return Err((format!("created {s:?}: {e}"), partial)),
            },
            Err(_) => {
                return Err((
                    format!("created {s:?} is not an RFC 3339 time such as 2024-05-05T00:11:11Z"),
                    partial,
                ));
            }
        },
        Some(_) => return Err(("created must be an RFC 3339 time string".into(), partial)),
    };
    let data = match object.remove("data") {
        Some(Value::Object(data)) => data,
        None => return Err(("data is missing; it must be a JSON object".into(), partial)),
        Some(_) => return Err(("data must be a JSON object".into(), partial)),
    };
    if let Some(extra) = object.keys().next() {
        return Err((
            format!(
                "unknown envelope field {extra:?}; put measurements inside data (envelope fields are data_id, kind, source, created, data)"
            ),
            partial,
        ));
    }
    if depth(&data) > MAX_JSON_DEPTH {
        return Err((
            format!("data nests deeper than {MAX_JSON_DEPTH} levels"),
            partial,
        ));
    }
    if let Err(e) = check_fields(&data) {
        return Err((e, partial));
    }
    Ok((
        Envelope {
            data_id,
            kind,
            source,
            created,
            data,
        },
        created_given,
    ))
}

fn name_field(
    object: &mut Map<String, Value>,
    field: &str,
    default: Option<&str>,
) -> Result<String, String> {
    let value = match object.remove(field) {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => match default {
            Some(d) => d.to_string(),
            None => {
                return Err(format!(
                    "{field} is missing; give it in the envelope or as ?{field}= on the request"
                ));
            }
        },
        Some(_) => return Err(format!("{field} must be a string")),
    };
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(value)
}

/// Field names are 1 to 256 characters without control characters, and no text in `data`
/// holds U+0000, which PostgreSQL cannot store: refused on both backends alike.
fn check_fields(data: &Map<String, Value>) -> Result<(), String> {
    for (name, value) in data {
        if name.is_empty() || name.len() > MAX_FIELD_NAME_LEN {
            return Err(format!(
                "field names in data must be 1 to {MAX_FIELD_NAME_LEN} characters long"
            ));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(format!(
                "field name {name:?} holds a control character; rename the field"
            ));
        }
        if holds_nul(value) {
            return Err(format!(
                "field {name:?} holds the character U+0000 (NUL), which cannot be stored; remove it"
            ));
        }
    }
    Ok(())
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fn depth(data: &Map<String, Value>) -> usize {
    fn value_depth(value: &Value) -> usize {
        match value {
            Value::Object(map) => 1 + map.values().map(value_depth).max().unwrap_or(0),
            Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + data.values().map(value_depth).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use scholia_events::schema::FieldType;

    fn parse(body: &str, format: BodyFormat) -> Result<Parsed, String> {
        let schema = |kind: &str| {
            let mut schema = KindSchema::default();
            if kind == "generation" {
                schema.declare(&[("output_mw".to_string(), FieldType::Float)].into());
            }
            schema
        };
        parse_body(
            body.as_bytes(),
            format,
            &Defaults::default(),
            Utc::now(),
            &schema,
        )
    }

    #[test]
    fn a_bad_line_is_rejected_and_the_good_lines_around_it_kept() {
        let body = concat!(
            r#"{"kind":"generation","source":"g1","data":{"output_mw":1.5}}"#,
            "\n",
            "not json\n",
            r#"{"kind":"generation","source":"g1","data":{"output_mw":"lots"}}"#,
            "\n",
            r#"{"kind":"demand","source":"r1","created":"2024-05-05T00:00:00Z","data":{"mw":3}}"#,
            "\n",
        );
        let parsed = parse(body, BodyFormat::Ndjson).unwrap();
        assert_eq!(parsed.records.len(), 2);
        assert_eq!(parsed.rejected.len(), 2);
        assert_eq!(parsed.rejected[0].line, 2);
        assert_eq!(parsed.rejected[0].raw, "not json");
        assert_eq!(parsed.rejected[1].line, 3);
        assert!(
            parsed.rejected[1].error.contains("output_mw"),
            "{}",
            parsed.rejected[1].error
        );
    }

    #[test]
    fn a_body_with_nothing_parseable_is_an_error() {
        assert!(parse("garbage\nmore garbage", BodyFormat::Ndjson).is_err());
        assert!(parse("", BodyFormat::Ndjson).is_err());
    }

    #[test]
    fn an_array_is_judged_item_by_item() {
        let body = r#"[{"kind":"k","source":"s","data":{}}, 5, {"kind":"k","data":{}}]"#;
        let parsed = parse(body, BodyFormat::Json).unwrap();
        assert_eq!(parsed.records.len(), 1);
        assert_eq!(
            parsed.rejected.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(parsed.rejected[1].error.contains("source is missing"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut data = String::from("1");
        for _ in 0..40 {
            data = format!("[{data}]");
        }
        let body = format!(r#"{{"kind":"k","source":"s","data":{{"x":{data}}}}}"#);
        let parsed = parse(&body, BodyFormat::Json).unwrap();
        assert!(parsed.rejected[0].error.contains("deeper"));
    }

    #[test]
    fn text_that_no_backend_stores_is_refused_per_line() {
        let body = concat!(
            r#"{"kind":"k","source":"s","data":{"a":"x\u0000y"}}"#,
            "\n",
            r#"{"kind":"k","source":"s","data":{"a\u0000":1}}"#,
            "\n",
            r#"{"kind":"k","source":"s","data":{"a":"\ud800"}}"#,
            "\n",
            r#"{"kind":"k","source":"s","created":"0000-05-05T00:00:00Z","data":{}}"#,
            "\n",
            r#"{"kind":"k","source":"s","data":{"a":"fine"}}"#,
            "\n",
        );
        let mut bytes = body.as_bytes().to_vec();
        bytes.extend_from_slice(b"{\"kind\":\"k\",\"source\":\"s\",\"data\":{\"a\":\"\xff\"}}\n");
        let parsed = parse_body(
            &bytes,
            BodyFormat::Ndjson,
            &Defaults::default(),
            Utc::now(),
            &|_| KindSchema::default(),
        )
        .unwrap();
        assert_eq!(parsed.records.len(), 1);
        let errors: Vec<&str> = parsed.rejected.iter().map(|r| r.error.as_str()).collect();
        assert!(errors[0].contains("U+0000"), "{errors:?}");
        assert!(errors[1].contains("control character"), "{errors:?}");
        assert!(errors[2].contains("not valid JSON"), "{errors:?}");
        assert!(errors[3].contains("accepted range"), "{errors:?}");
        assert!(errors[4].contains("not UTF-8"), "{errors:?}");
    }

    #[test]
    fn one_body_cannot_give_a_field_two_types() {
        let body = concat!(
            r#"{"kind":"k","source":"s","data":{"v":1}}"#,
            "\n",
            r#"{"kind":"k","source":"s","data":{"v":"three"}}"#,
            "\n",
        );
        let parsed = parse(body, BodyFormat::Ndjson).unwrap();
        assert_eq!(parsed.records.len(), 1);
        assert!(parsed.rejected[0].error.contains("\"v\" must be an int"));
        assert!(
            parsed.schemas["k"].fields.is_empty(),
            "the schema before the body"
        );
    }

    #[test]
    fn a_retry_without_created_has_the_same_digest() {
        let body = r#"{"data_id":"0190f6c3-0000-7000-8000-000000000001","kind":"k","source":"s","data":{"a":1}}"#;
        let first = parse(body, BodyFormat::Json).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let again = parse(body, BodyFormat::Json).unwrap();
        assert_eq!(first.records[0].digest, again.records[0].digest);
        assert_ne!(
            first.records[0].envelope.created,
            again.records[0].envelope.created
        );
        // The receive time stands in for `created` cut to microseconds, as a given one is.
        assert_eq!(
            first.records[0].envelope.created.timestamp_subsec_nanos() % 1_000,
            0
        );
    }
}
