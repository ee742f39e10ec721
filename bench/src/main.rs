//! `scholia-bench`: the load client that `scripts/bench` runs against a live Scholia
//! service to measure the websocket targets of SPEC §8.
//!
//! Each subcommand prints exactly one JSON object on stdout when it is done; progress
//! goes to stderr.
//!
//! - `freshness`: one subscribed websocket; ingest one record at a time and time
//!   "ingest acknowledged → new `partition` message received".
//! - `ws-scale`: many subscribed websockets; the server's memory while they idle, and
//!   the time for one update to reach all of them.
//!
//! `ws-scale` needs one file descriptor per client: run it with `ulimit -n` above the
//! client count (these machines allow 20000).

mod freshness;
mod stats;
mod target;
mod ws_scale;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "scholia-bench",
    about = "Websocket load client for scripts/bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time from an acknowledged ingest to the `partition` message on one websocket.
    Freshness(freshness::FreshnessArgs),
    /// Server memory with many subscribed websockets, and fan-out time of one update.
    WsScale(ws_scale::WsScaleArgs),
}

/// Print the report, or the error as one sentence on stderr (and fail).
#[tokio::main]
async fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Freshness(args) => freshness::run(args).await,
        Command::WsScale(args) => ws_scale::run(args).await,
    };
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("scholia-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
