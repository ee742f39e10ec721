//! Event types of the append-only log. Each has a stable type name ([`EventType`]),
//! which is also the last part of its bus subject (`<prefix>.<type>`).
//!
//! Events stay small whatever they are about: partitions travel as runs of consecutive
//! keys ([`PartitionRun`]), and writers split an event whose runs would not fit
//! ([`MAX_RUNS`]), so that no event exceeds the bus's payload limit.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::analysis::Input;
use crate::partition::{Granularity, PartitionKey, PartitionRun};
use crate::status::Rebuild;

/// The most partition runs one event carries; more are split over several events.
/// A run is at most about 60 bytes of JSON, so an event stays well under 256 KiB.
pub const MAX_RUNS: usize = 2_000;

/// The type of an event: its name in the log and on the bus, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "source.ingested")]
    SourceIngested,
    #[serde(rename = "analysis.registered")]
    AnalysisRegistered,
    #[serde(rename = "analysis.invalidated")]
    AnalysisInvalidated,
    #[serde(rename = "analysis.requested")]
    AnalysisRequested,
    #[serde(rename = "analysis.started")]
    AnalysisStarted,
    #[serde(rename = "analysis.completed")]
    AnalysisCompleted,
    #[serde(rename = "analysis.failed")]
    AnalysisFailed,
    #[serde(rename = "schedule.fired")]
    ScheduleFired,
    #[serde(rename = "admin.action")]
    AdminAction,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::SourceIngested,
        EventType::AnalysisRegistered,
        EventType::AnalysisInvalidated,
        EventType::AnalysisRequested,
        EventType::AnalysisStarted,
        EventType::AnalysisCompleted,
        EventType::AnalysisFailed,
        EventType::ScheduleFired,
        EventType::AdminAction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::SourceIngested => "source.ingested",
            EventType::AnalysisRegistered => "analysis.registered",
            EventType::AnalysisInvalidated => "analysis.invalidated",
            EventType::AnalysisRequested => "analysis.requested",
            EventType::AnalysisStarted => "analysis.started",
            EventType::AnalysisCompleted => "analysis.completed",
            EventType::AnalysisFailed => "analysis.failed",
            EventType::ScheduleFired => "schedule.fired",
            EventType::AdminAction => "admin.action",
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The part before the dot: `source`, `analysis`, `schedule` or `admin`.
    pub fn family(self) -> &'static str {
        self.as_str()
            .split('.')
            .next()
            .expect("names have a family")
    }
}

/// What happened. Serialized with its `type` beside the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum EventBody {
    /// A batch of records of one kind was committed.
    #[serde(rename = "source.ingested")]
    SourceIngested {
        kind: String,
        count: u64,
        /// The hours (`2024-05-05T13`) the batch touched, as runs; days follow from them.
        hours: Vec<PartitionRun>,
    },
    #[serde(rename = "analysis.registered")]
    AnalysisRegistered {
        analysis: String,
        version: i64,
        /// The first kind it reads, or empty when it reads only other analyses.
        kind: String,
        partition: Granularity,
        #[serde(default)]
        inputs: Vec<Input>,
    },
    #[serde(rename = "analysis.invalidated")]
    AnalysisInvalidated {
        invalidation: Uuid,
        analysis: String,
        #[schema(value_type = String, format = DateTime)]
        from: DateTime<Utc>,
        #[schema(value_type = String, format = DateTime)]
        to: DateTime<Utc>,
        reason: String,
        rebuild: Rebuild,
        partitions: Vec<PartitionRun>,
    },
    /// Builds were queued for these partitions.
    #[serde(rename = "analysis.requested")]
    AnalysisRequested {
        analysis: String,
        version: i64,
        partitions: Vec<PartitionRun>,
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
        #[schema(value_type = String, format = DateTime)]
        from: DateTime<Utc>,
        #[schema(value_type = String, format = DateTime)]
        to: DateTime<Utc>,
    },
    /// Admin actions that change configuration rather than data.
    #[serde(rename = "admin.action")]
    AdminAction {
        action: String,
        target: String,
        /// What changed; any JSON value.
        detail: serde_json::Value,
    },
}

impl EventBody {
    pub fn event_type(&self) -> EventType {
        match self {
            EventBody::SourceIngested { .. } => EventType::SourceIngested,
            EventBody::AnalysisRegistered { .. } => EventType::AnalysisRegistered,
            EventBody::AnalysisInvalidated { .. } => EventType::AnalysisInvalidated,
            EventBody::AnalysisRequested { .. } => EventType::AnalysisRequested,
            EventBody::AnalysisStarted { .. } => EventType::AnalysisStarted,
            EventBody::AnalysisCompleted { .. } => EventType::AnalysisCompleted,
            EventBody::AnalysisFailed { .. } => EventType::AnalysisFailed,
            EventBody::ScheduleFired { .. } => EventType::ScheduleFired,
            EventBody::AdminAction { .. } => EventType::AdminAction,
        }
    }

    /// The analysis the event is about, for `analysis.*` events.
    pub fn analysis(&self) -> Option<&str> {
        match self {
            EventBody::AnalysisRegistered { analysis, .. }
            | EventBody::AnalysisInvalidated { analysis, .. }
            | EventBody::AnalysisRequested { analysis, .. }
            | EventBody::AnalysisStarted { analysis, .. }
            | EventBody::AnalysisCompleted { analysis, .. }
            | EventBody::AnalysisFailed { analysis, .. } => Some(analysis),
            _ => None,
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

    /// An admin action, as the audit trail records it.
    pub fn admin(
        actor: impl Into<String>,
        action: &str,
        target: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        NewEvent::new(
            actor,
            EventBody::AdminAction {
                action: action.to_string(),
                target: target.into(),
                detail,
            },
        )
    }
}

/// `runs` in pieces of at most [`MAX_RUNS`], for events that list them.
pub fn run_pieces(runs: &[PartitionRun]) -> impl Iterator<Item = Vec<PartitionRun>> + '_ {
    runs.chunks(MAX_RUNS).map(<[PartitionRun]>::to_vec)
}

/// An event as committed to the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoggedEvent {
    pub seq: i64,
    #[schema(value_type = String, format = DateTime)]
    pub at: DateTime<Utc>,
    pub actor: String,
    #[serde(flatten)]
    pub body: EventBody,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::runs;

    #[test]
    fn an_event_carries_its_type_beside_its_fields() {
        let event = LoggedEvent {
            seq: 7,
            at: "2024-05-05T00:00:00Z".parse().unwrap(),
            actor: "token:abc".into(),
            body: EventBody::SourceIngested {
                kind: "generation".into(),
                count: 3,
                hours: runs([PartitionKey::parse("2024-05-05T13").unwrap()]),
            },
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "source.ingested");
        assert_eq!(json["hours"][0], "2024-05-05T13");
        let back: LoggedEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.body.event_type().as_str(), "source.ingested");
    }

    #[test]
    fn five_thousand_and_one_scattered_partitions_travel_in_three_events_under_the_limit() {
        let first = PartitionKey::parse("2020-01-01T00").unwrap();
        // Every other hour: no two partitions are adjacent, so each is a run of its own.
        let keys: Vec<PartitionKey> = std::iter::successors(Some(first), |k| Some(k.next().next()))
            .take(5_001)
            .collect();
        let all = runs(keys.iter().copied());
        assert_eq!(all.len(), 5_001);
        let pieces: Vec<Vec<PartitionRun>> = run_pieces(&all).collect();
        assert_eq!(pieces.len(), 3);
        for piece in &pieces {
            assert!(
                !piece.is_empty() && piece.len() <= MAX_RUNS,
                "{}",
                piece.len()
            );
            let event = EventBody::AnalysisRequested {
                analysis: "hourly_count".into(),
                version: 1,
                partitions: piece.clone(),
                priority: 0,
                invalidation: Some(Uuid::nil()),
            };
            let bytes = serde_json::to_vec(&event).unwrap().len();
            assert!(bytes < 256 * 1024, "{bytes} bytes");
        }
        let travelled: Vec<PartitionKey> = pieces
            .iter()
            .flatten()
            .flat_map(|run| run.keys().collect::<Vec<_>>())
            .collect();
        assert_eq!(
            travelled, keys,
            "the pieces together are the list, in order, once"
        );
    }

    #[test]
    fn every_type_name_is_the_serialized_tag() {
        for ty in EventType::ALL {
            let tag = serde_json::to_value(ty).unwrap();
            assert_eq!(tag, ty.as_str());
            assert_eq!(EventType::parse(ty.as_str()), Some(ty));
        }
        let body = EventBody::AdminAction {
            action: "x".into(),
            target: "y".into(),
            detail: serde_json::Value::Null,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["type"], body.event_type().as_str());
    }
}
