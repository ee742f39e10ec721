//! The visualizer: the websocket hub at `/v1/ws` that feeds live charts, and the web
//! page at `/`.
//!
//! Concurrency model: each socket has a reader task and a bounded queue of outgoing
//! messages. A few flusher tasks write every socket's queue without waiting; a socket's
//! own writer task takes over only while its connection cannot take a write. The hub
//! follows the annotation cache's change stream (which already evicted what changed)
//! and, for each event, reads what changed once, serializes it once, and offers it to
//! every subscription it concerns without waiting: a client whose queue is full misses
//! the update and gets `resync` instead, so a slow client never delays the others.

mod hub;
pub mod page;
mod protocol;
mod socket;

pub use hub::{Hub, HubLimits};

use axum::Router;

/// The websocket endpoint and the page.
pub fn router(hub: Hub) -> Router {
    hub::router(hub).merge(page::router())
}
