//! Turning a request body into envelopes: one JSON object, a JSON array, or NDJSON.
//! Each item is judged on its own, so one bad line never costs the good ones.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use scholia_events::Envelope;

use crate::kinds::KindSpec;

/// The deepest nesting accepted inside `data`.
pub const MAX_JSON_DEPTH: usize = 32;
/// The longest `kind` or `source` accepted.
const MAX_NAME_LEN: usize = 200;

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

/// One item of a batch that cannot be accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// 1-based: the line of an NDJSON body, or the position in a JSON array.
    pub line: usize,
    pub raw: String,
    pub error: String,
    pub kind: Option<String>,
    pub source: Option<String>,
    pub data_id: Option<Uuid>,
}

#[derive(Debug, Default)]
pub struct Parsed {
    /// Envelopes with their line numbers.
    pub envelopes: Vec<(usize, Envelope)>,
    pub rejected: Vec<Rejected>,
    /// How many items were valid JSON (whether or not they were valid envelopes).
    pub json_items: usize,
}

/// Split and parse a body. `Err` means nothing in it was JSON at all.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    defaults: &Defaults,
    now: DateTime<Utc>,
    kind_spec: &dyn Fn(&str) -> Option<KindSpec>,
) -> Result<Parsed, String> {
    let text =
        std::str::from_utf8(body).map_err(|e| format!("The body is not UTF-8 text ({e})."))?;
    let mut items: Vec<(usize, &str)> = Vec::new();
    match format {
        BodyFormat::Ndjson => {
            for (i, line) in text.split('\n').enumerate() {
                let line = line.trim_end_matches('\r');
                if !line.trim().is_empty() {
                    items.push((i + 1, line));
                }
            }
        }
        BodyFormat::Json => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('[') {
                let array: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
                    format!("The body is not a valid JSON array ({e}); send NDJSON (Content-Type: application/x-ndjson) to have good lines kept when some are bad.")
                })?;
                items.extend(
                    array
                        .into_iter()
                        .enumerate()
                        .map(|(i, raw)| (i + 1, raw.get())),
                );
            } else {
                items.push((1, text));
            }
        }
    }
    if items.is_empty() {
        return Err("The body holds no records.".into());
    }
    let mut parsed = Parsed::default();
    for (line, raw) in items {
        let value: Value = match serde_json::from_str(raw) {
            Ok(value) => value,
            Err(e) => {
                parsed
                    .rejected
                    .push(reject(line, raw, format!("not valid JSON: {e}"), None));
                continue;
            }
        };
        parsed.json_items += 1;
        match to_envelope(value, defaults, now, kind_spec) {
            Ok(envelope) => parsed.envelopes.push((line, envelope)),
            Err((error, partial)) => parsed.rejected.push(reject(line, raw, error, partial)),
        }
    }
    if parsed.json_items == 0 {
        let first = &parsed.rejected[0];
        return Err(format!(
            "Nothing in the body is JSON (line {}: {}). Send one envelope, a JSON array, or one envelope per line as application/x-ndjson.",
            first.line, first.error
        ));
    }
    Ok(parsed)
}

struct Partial {
    kind: Option<String>,
    source: Option<String>,
    data_id: Option<Uuid>,
}

fn reject(line: usize, raw: &str, error: String, partial: Option<Partial>) -> Rejected {
    let partial = partial.unwrap_or(Partial {
        kind: None,
        source: None,
        data_id: None,
    });
    Rejected {
        line,
        raw: raw.to_string(),
        error,
        kind: partial.kind,
        source: partial.source,
        data_id: partial.data_id,
    }
}

fn to_envelope(
    value: Value,
    defaults: &Defaults,
    now: DateTime<Utc>,
    kind_spec: &dyn Fn(&str) -> Option<KindSpec>,
) -> Result<Envelope, (String, Option<Partial>)> {
    let Value::Object(mut object) = value else {
        return Err((
            "an envelope must be a JSON object with kind, source, created and data".into(),
            None,
        ));
    };
    let mut partial = Partial {
        kind: None,
        source: None,
        data_id: None,
    };
    let kind = match name_field(&mut object, "kind", defaults.kind.as_deref()) {
        Ok(kind) => kind,
        Err(e) => return Err((e, Some(partial))),
    };
    partial.kind = Some(kind.clone());
    let source = match name_field(&mut object, "source", defaults.source.as_deref()) {
        Ok(source) => source,
        Err(e) => return Err((e, Some(partial))),
    };
    partial.source = Some(source.clone());
    let data_id = match object.remove("data_id") {
        None | Some(Value::Null) => Uuid::now_v7(),
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) => id,
            Err(_) => {
                return Err((
                    format!("data_id {s:?} is not a UUID; leave it out to have one assigned"),
                    Some(partial),
                ));
            }
        },
        Some(_) => return Err(("data_id must be a UUID string".into(), Some(partial))),
    };
    partial.data_id = Some(data_id);
    let created = match object.remove("created") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => match DateTime::parse_from_rfc3339(&s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(_) => {
                return Err((
                    format!("created {s:?} is not an RFC 3339 time such as 2024-05-05T00:11:11Z"),
                    Some(partial),
                ));
            }
        },
        Some(_) => {
            return Err((
                "created must be an RFC 3339 time string".into(),
                Some(partial),
            ));
        }
    };
    let data = match object.remove("data") {
        Some(Value::Object(data)) => data,
        None => {
            return Err((
                "data is missing; it must be a JSON object".into(),
                Some(partial),
            ));
        }
        Some(_) => return Err(("data must be a JSON object".into(), Some(partial))),
    };
    if let Some(extra) = object.keys().next() {
        return Err((
            format!(
                "unknown envelope field {extra:?}; put measurements inside data (envelope fields are data_id, kind, source, created, data)"
            ),
            Some(partial),
        ));
    }
    if depth(&data) > MAX_JSON_DEPTH {
        return Err((
            format!("data nests deeper than {MAX_JSON_DEPTH} levels"),
            Some(partial),
        ));
    }
    if let Some(spec) = kind_spec(&kind)
        && let Err(e) = spec.check(&data)
    {
        return Err((e, Some(partial)));
    }
    Ok(Envelope {
        data_id,
        kind,
        source,
        created,
        data,
    })
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
    use crate::kinds::{FieldType, KindSpec};

    fn parse(body: &str, format: BodyFormat) -> Result<Parsed, String> {
        let spec = |kind: &str| {
            (kind == "generation").then(|| KindSpec {
                fields: [("output_mw".to_string(), FieldType::Float)].into(),
            })
        };
        parse_body(
            body.as_bytes(),
            format,
            &Defaults::default(),
            Utc::now(),
            &spec,
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
        assert_eq!(parsed.envelopes.len(), 2);
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
        assert_eq!(parsed.envelopes.len(), 1);
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
}
