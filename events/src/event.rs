//! Event types of the append-only log. Each has a stable `type` name, which is also the
//! last part of its bus subject (`<prefix>.<type>`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::partition::PartitionKey;

/// What happened. Serialized with its `type` beside the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventBody {
    /// A batch of records of one kind was committed.
    #[serde(rename = "source.ingested")]
    SourceIngested {
        kind: String,
        count: u64,
        /// The hours (`2024-05-05T13`) the batch touched; days follow from them.
        hours: Vec<PartitionKey>,
    },
    #[serde(rename = "analysis.registered")]
    AnalysisRegistered {
        analysis: String,
        version: i64,
        kind: String,
        partition: String,
    },
    #[serde(rename = "analysis.invalidated")]
    AnalysisInvalidated {
        invalidation: Uuid,
        analysis: String,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        reason: String,
        rebuild: String,
        partitions: Vec<PartitionKey>,
    },
    /// Builds were queued for these partitions.
    #[serde(rename = "analysis.requested")]
    AnalysisRequested {
        analysis: String,
        version: i64,
        partitions: Vec<PartitionKey>,
        priority: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invalidation: Option<Uuid>,
    },
    #[serde(rename = "analysis.started")]
    AnalysisStarted {
        analysis: String,
        version: i64,
        partition: PartitionKey,
        build: Uuid,
        worker: String,
    },
    #[serde(rename = "analysis.completed")]
    AnalysisCompleted {
        analysis: String,
        version: i64,
        partition: PartitionKey,
        build: Uuid,
        generation: i64,
        rows: u64,
        input_rows: u64,
        input_seq: i64,
        duration_ms: u64,
    },
    #[serde(rename = "analysis.failed")]
    AnalysisFailed {
        analysis: String,
        version: i64,
        partition: PartitionKey,
        build: Uuid,
        error: String,
        attempt: i32,
        /// No more retries: the partition is `failed` until something requests it again.
        gave_up: bool,
    },
    #[serde(rename = "schedule.fired")]
    ScheduleFired {
        schedule: String,
        analysis: String,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    /// Admin actions that change configuration rather than data.
    #[serde(rename = "admin.action")]
    AdminAction {
        action: String,
        target: String,
        detail: serde_json::Value,
    },
}

impl EventBody {
    /// The event's type name, as written in the log and in bus subjects.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::SourceIngested { .. } => "source.ingested",
            EventBody::AnalysisRegistered { .. } => "analysis.registered",
            EventBody::AnalysisInvalidated { .. } => "analysis.invalidated",
            EventBody::AnalysisRequested { .. } => "analysis.requested",
            EventBody::AnalysisStarted { .. } => "analysis.started",
            EventBody::AnalysisCompleted { .. } => "analysis.completed",
            EventBody::AnalysisFailed { .. } => "analysis.failed",
            EventBody::ScheduleFired { .. } => "schedule.fired",
            EventBody::AdminAction { .. } => "admin.action",
        }
    }
}

/// An event about to be appended, with who caused it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub actor: String,
    pub body: EventBody,
}

impl NewEvent {
    pub fn new(actor: impl Into<String>, body: EventBody) -> Self {
        NewEvent {
            actor: actor.into(),
            body,
        }
    }
}

/// An event as committed to the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    #[serde(flatten)]
    pub body: EventBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_carries_its_type_beside_its_fields() {
        let event = LoggedEvent {
            seq: 7,
            at: "2024-05-05T00:00:00Z".parse().unwrap(),
            actor: "token:abc".into(),
            body: EventBody::SourceIngested {
                kind: "generation".into(),
                count: 3,
                hours: vec![PartitionKey::parse("2024-05-05T13").unwrap()],
            },
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "source.ingested");
        assert_eq!(json["hours"][0], "2024-05-05T13");
        let back: LoggedEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.body.type_name(), "source.ingested");
    }
}
