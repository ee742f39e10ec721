//! The envelope: one immutable, timestamped record, and the one way times are written.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

/// The earliest `created` (and range bound) accepted: 0001-01-01T00:00:00Z.
pub fn earliest_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0)
        .single()
        .expect("year 1 is a valid time")
}

/// The end of the accepted time range: 10000-01-01T00:00:00Z (exclusive), so every
/// accepted time has a four-digit year and partition keys sort as text.
pub fn end_of_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0)
        .single()
        .expect("year 10000 is a valid time")
}

/// Checks that `t` is within the accepted range and cuts it to whole microseconds, the
/// precision both databases keep (PostgreSQL would round, SQLite truncate: cutting here
/// puts a record in the same hour on both).
pub fn accepted_time(t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    // Cut first, then check: a leap second (23:59:60) counts as the next second once cut,
    // and 9999-12-31T23:59:60 would otherwise land in the year 10000.
    let cut = DateTime::from_timestamp_micros(t.timestamp_micros());
    match cut {
        Some(cut) if cut >= earliest_time() && cut < end_of_time() => Ok(cut),
        _ => Err(format!(
            "{} is outside the accepted range of times, 0001-01-01 to 9999-12-31 (UTC)",
            format_time(t)
        )),
    }
}

/// One record as a producer sends it, after defaults have been applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Envelope {
    pub data_id: Uuid,
    pub kind: String,
    pub source: String,
    /// Event time, RFC 3339. Defaults to the time the record was received.
    #[schema(value_type = String, format = DateTime)]
    pub created: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
}

impl Envelope {
    /// A digest of everything but the id: two envelopes with the same id are duplicates
    /// when their digests agree, and a conflict otherwise. `serde_json::Map` keeps keys
    /// sorted, so the encoding is canonical. `data_json` is `data` as serialized by
    /// [`Envelope::data_json`], so that a batch serializes each record once.
    ///
    /// A `created` that the producer left out (`created_given == false`) is not part of
    /// the digest: it is the receive time, which a retry of the same record cannot
    /// repeat, so a retry without `created` is a duplicate rather than a conflict.
    pub fn digest_with(&self, data_json: &str, created_given: bool) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.kind.as_bytes());
        hasher.update([0]);
        hasher.update(self.source.as_bytes());
        hasher.update([0]);
        if created_given {
            hasher.update(self.created.timestamp_micros().to_le_bytes());
        } else {
            hasher.update(b"created:defaulted");
        }
        hasher.update(data_json.as_bytes());
        hasher.finalize().into()
    }

    /// The `data` object as compact JSON text.
    pub fn data_json(&self) -> String {
        serde_json::to_string(&self.data).expect("a JSON map always serializes")
    }
}

/// A record as stored: the envelope, when it arrived, and the log sequence of the
/// `source.ingested` event that brought it in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredEnvelope {
    #[serde(flatten)]
    pub envelope: Envelope,
    #[schema(value_type = String, format = DateTime)]
    pub received_at: DateTime<Utc>,
    pub seq: i64,
}

/// RFC 3339 with microseconds and a `Z`, the one way times are written.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(data: Value) -> Envelope {
        Envelope {
            data_id: Uuid::now_v7(),
            kind: "generation".into(),
            source: "generator-10".into(),
            created: "2024-05-05T00:11:11Z".parse().unwrap(),
            data: data.as_object().unwrap().clone(),
        }
    }

    fn digest(e: &Envelope) -> [u8; 32] {
        e.digest_with(&e.data_json(), true)
    }

    #[test]
    fn the_digest_ignores_key_order_and_the_id() {
        let a = envelope(json!({"a": 1, "b": 2}));
        let b: Map<String, Value> = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        let b = Envelope {
            data: b,
            ..envelope(json!({}))
        };
        assert_eq!(digest(&a), digest(&b));
    }

    #[test]
    fn the_digest_changes_with_the_content() {
        assert_ne!(
            digest(&envelope(json!({"a": 1}))),
            digest(&envelope(json!({"a": 2})))
        );
    }

    #[test]
    fn a_defaulted_created_is_not_part_of_the_digest() {
        let first = envelope(json!({"a": 1}));
        let retry = Envelope {
            created: first.created + chrono::Duration::seconds(1),
            ..first.clone()
        };
        let data = first.data_json();
        assert_eq!(
            first.digest_with(&data, false),
            retry.digest_with(&data, false)
        );
        assert_ne!(
            first.digest_with(&data, true),
            retry.digest_with(&data, true)
        );
    }

    #[test]
    fn times_are_cut_to_microseconds_and_bounded() {
        let t: DateTime<Utc> = "2024-05-05T13:59:59.9999997Z".parse().unwrap();
        assert_eq!(
            format_time(accepted_time(t).unwrap()),
            "2024-05-05T13:59:59.999999Z"
        );
        let year_zero = Utc.with_ymd_and_hms(0, 6, 1, 0, 0, 0).unwrap();
        assert!(accepted_time(year_zero).unwrap_err().contains("0001-01-01"));
        assert!(accepted_time(end_of_time()).is_err());
    }
}
