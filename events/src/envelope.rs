//! The envelope: one immutable, timestamped record.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One record as a producer sends it, after defaults have been applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub data_id: Uuid,
    pub kind: String,
    pub source: String,
    pub created: DateTime<Utc>,
    pub data: Map<String, Value>,
}

impl Envelope {
    /// A digest of everything but the id: two envelopes with the same id are duplicates
    /// when their digests agree, and a conflict otherwise. `serde_json::Map` keeps keys
    /// sorted, so the encoding is canonical.
    pub fn digest(&self) -> [u8; 32] {
        self.digest_with(&self.data_json())
    }

    /// The digest, given `data` already serialized by [`Envelope::data_json`] (so that
    /// a batch serializes each record once, for both the digest and the store).
    pub fn digest_with(&self, data_json: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.kind.as_bytes());
        hasher.update([0]);
        hasher.update(self.source.as_bytes());
        hasher.update([0]);
        hasher.update(self.created.timestamp_micros().to_le_bytes());
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    #[serde(flatten)]
    pub envelope: Envelope,
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

    #[test]
    fn the_digest_ignores_key_order_and_the_id() {
        let a = envelope(json!({"a": 1, "b": 2}));
        let b: Map<String, Value> = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        let b = Envelope {
            data: b,
            ..envelope(json!({}))
        };
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn the_digest_changes_with_the_content() {
        assert_ne!(
            envelope(json!({"a": 1})).digest(),
            envelope(json!({"a": 2})).digest()
        );
    }
}
