//! `POST /v1/events` bodies through `parse_body`, the one place records are accepted or
//! refused. The first input byte chooses how the rest is read:
//!
//! - bit 0: NDJSON (set) or JSON (clear);
//! - bit 1: the rest is gzip, inflated the way the server does (`inflate` in
//!   ingest/src/routes.rs, copied below);
//! - bit 2: `?kind=k` is given as a default;
//! - bit 3: `?source=s` is given as a default.
//!
//! Beyond not panicking, it checks what the rest of the server relies on: every item is
//! either a record or rejected, exactly once; records hold only what both stores can keep
//! (times in range and in whole microseconds, no NUL, names within their limits); a
//! record's `data_json` is its `data`; and the records of one body never give a field two
//! types.

#![no_main]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use libfuzzer_sys::{Corpus, fuzz_target};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use common::reread_matches;
use scholia_events::envelope::{earliest_time, end_of_time};
use scholia_events::schema::{FieldSpec, FieldType, KindSchema};
use scholia_ingest::parse::{BodyFormat, Defaults, MAX_JSON_DEPTH, Parsed, parse_body};

/// What a body may inflate to. The server's default is 16 MiB; a smaller limit keeps
/// each run fast and reaches the same code.
const INFLATED_LIMIT: usize = 1 << 20;

/// The receive time. The server passes `Utc::now()`, which has nanoseconds; a fixed one
/// keeps runs reproducible.
static NOW: LazyLock<DateTime<Utc>> =
    LazyLock::new(|| DateTime::from_timestamp(1_796_128_496, 789_012_345).expect("a valid time"));

/// Every kind has the same schema: declared fields of each type, and one learned int.
static SCHEMA: LazyLock<KindSchema> = LazyLock::new(|| {
    let mut schema = KindSchema::default();
    schema.declare(
        &[
            ("mw".to_string(), FieldType::Float),
            ("n".to_string(), FieldType::Int),
            ("name".to_string(), FieldType::String),
            ("on".to_string(), FieldType::Bool),
            ("at".to_string(), FieldType::Timestamp),
            ("blob".to_string(), FieldType::Json),
        ]
        .into(),
    );
    schema.fields.insert(
        "v".to_string(),
        FieldSpec {
            ty: FieldType::Int,
            declared: false,
        },
    );
    schema
});

fuzz_target!(|input: &[u8]| -> Corpus {
    let Some((&flags, rest)) = input.split_first() else {
        return Corpus::Reject;
    };
    let format = if flags & 1 == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let inflated;
    let body = if flags & 2 == 0 {
        rest
    } else {
        match inflate(rest, INFLATED_LIMIT) {
            Some(body) => {
                inflated = body;
                &inflated[..]
            }
            // The server answers 400 or 413 without parsing.
            None => return Corpus::Keep,
        }
    };
    let defaults = Defaults {
        kind: (flags & 4 != 0).then(|| "k".to_string()),
        source: (flags & 8 != 0).then(|| "s".to_string()),
    };
    let result = parse_body(body, format, &defaults, *NOW, &|_| SCHEMA.clone());
    let items = items_of(body, format);
    match result {
        Ok(parsed) => check_parsed(&parsed, items.as_deref()),
        Err(error) => check_refused(body, format, items.as_deref(), &error),
    }
    Corpus::Keep
});

/// The same as the server's `inflate`: every gzip member, within the limit.
fn inflate(compressed: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut reader = flate2::read::MultiGzDecoder::new(compressed).take(limit as u64 + 1);
    reader.read_to_end(&mut out).ok()?;
    (out.len() <= limit).then_some(out)
}

/// The 1-based line (NDJSON) or position (JSON) of each item the body holds, or `None`
/// when a JSON body is not even an array or a single text.
fn items_of(body: &[u8], format: BodyFormat) -> Option<Vec<usize>> {
    match format {
        BodyFormat::Ndjson => Some(
            body.split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
                .map(|(i, _)| i + 1)
                .collect(),
        ),
        BodyFormat::Json => {
            let text = std::str::from_utf8(body).ok()?;
            if text.trim_start().starts_with('[') {
                let array: Vec<&RawValue> = serde_json::from_str(text).ok()?;
                Some((1..=array.len()).collect())
            } else {
                Some(vec![1])
            }
        }
    }
}

/// `Err` means nothing in the body was JSON.
fn check_refused(body: &[u8], format: BodyFormat, items: Option<&[usize]>, error: &str) {
    match format {
        BodyFormat::Ndjson => {
            for line in body.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let json = std::str::from_utf8(line)
                    .is_ok_and(|text| serde_json::from_str::<Value>(text).is_ok());
                assert!(!json, "refused ({error}) although line {line:?} is JSON");
            }
        }
        BodyFormat::Json => {
            if items.is_some() {
                let text = std::str::from_utf8(body).expect("items_of checked UTF-8");
                let any_json = if text.trim_start().starts_with('[') {
                    let array: Vec<&RawValue> =
                        serde_json::from_str(text).expect("items_of parsed the array");
                    array
                        .iter()
                        .any(|raw| serde_json::from_str::<Value>(raw.get()).is_ok())
                } else {
                    serde_json::from_str::<Value>(text).is_ok()
                };
                assert!(!any_json, "refused ({error}) although the body holds JSON");
            }
        }
    }
}

fn check_parsed(parsed: &Parsed, items: Option<&[usize]>) {
    let items = items.expect("a body that parsed has items");
    let mut seen: Vec<usize> = parsed
        .records
        .iter()
        .map(|r| r.line)
        .chain(parsed.rejected.iter().map(|r| r.line))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen, items,
        "each item must be a record or rejected, exactly once"
    );
    assert!(parsed.records.is_sorted_by_key(|r| r.line));
    assert!(parsed.rejected.is_sorted_by_key(|r| r.line));

    let mut schemas: BTreeMap<&str, KindSchema> = BTreeMap::new();
    for record in &parsed.records {
        let envelope = &record.envelope;
        let created = envelope.created;
        assert!(
            earliest_time() <= created && created < end_of_time(),
            "line {}: created {created:?} is outside the accepted range",
            record.line
        );
        // A given `created` and a defaulted one alike are whole microseconds.
        assert!(
            created.timestamp_subsec_nanos() % 1_000 == 0,
            "line {}: created {created:?} is not a whole number of microseconds",
            record.line
        );
        for (what, name) in [("kind", &envelope.kind), ("source", &envelope.source)] {
            assert!(
                (1..=200).contains(&name.len()) && !name.chars().any(char::is_control),
                "line {}: {what} {name:?}",
                record.line
            );
        }
        for name in envelope.data.keys() {
            assert!(
                (1..=256).contains(&name.len()) && !name.chars().any(char::is_control),
                "line {}: field name {name:?}",
                record.line
            );
        }
        assert!(
            !map_holds_nul(&envelope.data),
            "line {}: data holds NUL: {:?}",
            record.line,
            envelope.data
        );
        assert!(
            map_depth(&envelope.data) <= MAX_JSON_DEPTH,
            "line {}: data nests too deep",
            record.line
        );
        let reread: Map<String, Value> = serde_json::from_str(&record.data_json)
            .unwrap_or_else(|e| panic!("line {}: data_json does not parse: {e}", record.line));
        assert!(
            reread_matches(&envelope.data, &reread),
            "line {}: data_json {:?} reads back as {reread:?}, not {:?}",
            record.line,
            record.data_json,
            envelope.data
        );
        assert_eq!(record.data_json, envelope.data_json());

        // Replay the body's schema learning: each record fits what came before it.
        let before = parsed
            .schemas
            .get(envelope.kind.as_str())
            .unwrap_or_else(|| panic!("no schema shown for kind {:?}", envelope.kind));
        assert_eq!(*before, *SCHEMA, "the schema before the body");
        let schema = schemas
            .entry(envelope.kind.as_str())
            .or_insert_with(|| before.clone());
        if let Err(error) = schema.check(&envelope.data) {
            panic!("line {}: accepted, yet {error}", record.line);
        }
        schema.learn(&envelope.data);
    }
    // Learning only widens: every record still fits the schema the body ends with.
    for record in &parsed.records {
        let schema = &schemas[record.envelope.kind.as_str()];
        if let Err(error) = schema.check(&record.envelope.data) {
            panic!(
                "line {}: no longer fits its kind's schema: {error}",
                record.line
            );
        }
    }
}

fn map_holds_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v))
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map_holds_nul(map),
        _ => false,
    }
}

/// The depth as `parse_body` counts it: `data` itself is level 1.
fn map_depth(map: &Map<String, Value>) -> usize {
    fn depth(value: &Value) -> usize {
        match value {
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    1 + map.values().map(depth).max().unwrap_or(0)
}
