//! End-to-end tests: each starts the real `scholia` binary (the one cargo built for the
//! tests) against its own database and NATS prefix, and talks to it over HTTP and
//! websockets. Tests marked for both backends run once on SQLite with the in-process
//! bus and once on PostgreSQL with NATS JetStream.

#![allow(unreachable_pub, dead_code)]

mod helpers;
mod ws;

mod analyses;
mod auth;
mod browser;
mod candidates;
mod console;
mod durability;
mod graph;
mod hostile;
mod ingest;
mod live;
mod openapi;
mod plan;
mod truth;
mod websocket;
