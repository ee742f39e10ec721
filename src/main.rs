//! The `scholia` command: parses the command line and hands each subcommand to the
//! component that does the work.

mod app;
mod client;
mod config;
mod demo;
mod openapi;

use anyhow::Result;
use clap::{Parser, Subcommand};

use config::ServeArgs;

/// mimalloc returns freed memory to the system and does not fragment across threads the
/// way glibc's arenas do: it keeps a process holding many websockets, or rebuilding large
/// frames, close to what it actually uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scholia",
    version,
    about = "Event-sourced annotations over immutable records, with history you can rewind."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (all roles by default).
    Serve(ServeArgs),
    /// Run the embedded service with synthetic producers, and print the page's URL.
    Demo(ServeArgs),
    /// Send an NDJSON or CSV file of records to the service.
    Ingest(client::IngestArgs),
    /// List or apply analyses.
    Analyses {
        #[command(subcommand)]
        command: client::AnalysesCommand,
    },
    /// Invalidate a date range of an analysis and follow the rebuild until it is done.
    Invalidate(client::InvalidateArgs),
    /// List or apply schedules of preemptive rebuilds.
    Schedules {
        #[command(subcommand)]
        command: client::SchedulesCommand,
    },
    /// Show a record's partition and the annotations built from it.
    Lineage { data_id: String },
    /// Watch an analysis over a date range, live, in the terminal.
    Watch(client::WatchArgs),
    /// Manage tokens.
    Token {
        #[command(subcommand)]
        command: client::TokenCommand,
    },
    /// Run one SQL analysis' computation for a worker (on stdin and stdout).
    #[command(hide = true)]
    Compute,
}

/// `scholia serve` and `scholia demo`.
async fn serve(config: config::ServeConfig, demo: bool) -> Result<()> {
    init_tracing();
    let app = app::Application::build(&config).await?;
    let address = app.address();
    println!(
        "Scholia listening on http://{address} (database: {}, bus: {}, roles: {})",
        app.core().store.database.backend(),
        app.core().bus.name(),
        config.roles.join(",")
    );
    if let Some(secret) = &app.created_admin {
        println!("Created the first admin token; it is shown only this once:\n{secret}");
    }
    if demo {
        demo::start(&app, &config).await?;
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    app.run_until_stopped().await
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SCHOLIA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    // Colours only for a terminal: a log file or a collector gets plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Compute = cli.command {
        std::process::exit(scholia_analytics::sandbox::serve_child());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args.into_config()?, false).await,
            Command::Demo(args) => serve(args.into_config()?, true).await,
            Command::Ingest(args) => client::ingest(args).await,
            Command::Analyses { command } => client::analyses(command).await,
            Command::Invalidate(args) => client::invalidate(args).await,
            Command::Schedules { command } => client::schedules(command).await,
            Command::Lineage { data_id } => client::lineage(&data_id).await,
            Command::Watch(args) => client::watch(args).await,
            Command::Token { command } => client::token(command).await,
            Command::Compute => unreachable!("handled before the runtime starts"),
        }
    })
}
