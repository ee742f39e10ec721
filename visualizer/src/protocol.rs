//! Messages of the websocket protocol (SPEC §6).

use serde::{Deserialize, Serialize};

use scholia_events::PartitionKey;
use scholia_events::status::PartitionStatus;

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum ClientMessage {
    Subscribe {
        id: String,
        analysis: String,
        from: String,
        to: String,
    },
    Unsubscribe {
        id: String,
    },
}

/// Server messages that are built per subscription (small ones). `partition` messages
/// are assembled from a shared body instead; see `hub::partition_body`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ServerMessage<'a> {
    Waiting {
        sub: &'a str,
        partitions: Vec<PartitionKey>,
    },
    Status {
        sub: &'a str,
        partition: PartitionKey,
        status: PartitionStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Ready {
        sub: &'a str,
    },
    Invalidated {
        sub: &'a str,
        partitions: Vec<PartitionKey>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        sub: Option<&'a str>,
        message: String,
    },
    Resync {
        sub: &'a str,
    },
}

impl ServerMessage<'_> {
    pub(crate) fn text(&self) -> String {
        serde_json::to_string(self).expect("server messages serialize")
    }
}
