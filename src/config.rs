//! Typed configuration of `serve`, layered: defaults < `SCHOLIA_*` environment < flags.
//! Every setting is read as text and checked here, so that every invalid one is reported
//! at once, before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

pub(crate) const ALL_ROLES: [&str; 4] = ["ingest", "worker", "cache", "visualizer"];

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Comma-separated roles: ingest, worker, cache, visualizer.
    #[arg(
        long,
        env = "SCHOLIA_ROLES",
        default_value = "ingest,worker,cache,visualizer"
    )]
    pub(crate) roles: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "SCHOLIA_LISTEN", default_value = "127.0.0.1:7070")]
    pub(crate) listen: String,
    /// Write the address the service listens on to this file once it does.
    #[arg(long, env = "SCHOLIA_ADDRESS_FILE")]
    pub(crate) address_file: Option<PathBuf>,
    /// sqlite://… or postgres://…; the embedded SQLite file under ./scholia-data/ when unset.
    #[arg(long, env = "SCHOLIA_DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// nats://…; the in-process bus when unset.
    #[arg(long, env = "SCHOLIA_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Subject prefix on NATS; the stream is named after it in capitals.
    #[arg(long, env = "SCHOLIA_NATS_PREFIX", default_value = "scholia")]
    pub(crate) nats_prefix: String,
    /// The most the NATS stream keeps, in megabytes; past it the oldest events go (they
    /// stay in the SQL log).
    #[arg(long, env = "SCHOLIA_NATS_MAX_MB", default_value = "256")]
    pub(crate) nats_max_mb: String,
    /// How long the NATS stream keeps an event, in seconds.
    #[arg(long, env = "SCHOLIA_NATS_MAX_AGE_SECONDS", default_value = "3600")]
    pub(crate) nats_max_age_seconds: String,
    /// The admin token to accept (created if new); without it the first start creates one.
    #[arg(long, env = "SCHOLIA_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,
    /// The largest request body accepted, after gzip inflation too.
    #[arg(long, env = "SCHOLIA_MAX_BODY_BYTES", default_value = "16777216")]
    pub(crate) max_body_bytes: String,
    /// How long a request body may take to arrive, in seconds.
    #[arg(long, env = "SCHOLIA_BODY_TIMEOUT_SECONDS", default_value = "30")]
    pub(crate) body_timeout_seconds: String,
    /// Batches written at once before new ones get 503.
    #[arg(long, env = "SCHOLIA_MAX_INFLIGHT_BATCHES", default_value = "32")]
    pub(crate) max_inflight_batches: String,
    /// How long quarantined lines are kept, in days.
    #[arg(long, env = "SCHOLIA_QUARANTINE_DAYS", default_value = "30")]
    pub(crate) quarantine_days: String,
    /// The most quarantined lines kept; the oldest go first.
    #[arg(long, env = "SCHOLIA_QUARANTINE_MAX_ROWS", default_value = "1000000")]
    pub(crate) quarantine_max_rows: String,
    /// Builds one worker process runs at once.
    #[arg(long, env = "SCHOLIA_WORKER_CONCURRENCY", default_value = "2")]
    pub(crate) worker_concurrency: String,
    /// The longest one build may run, in seconds.
    #[arg(long, env = "SCHOLIA_BUILD_TIMEOUT_SECONDS", default_value = "600")]
    pub(crate) build_timeout_seconds: String,
    /// The most memory a SQL analysis' build may use, in megabytes; past it the build
    /// fails and says so.
    #[arg(long, env = "SCHOLIA_BUILD_MEMORY_MB", default_value = "2048")]
    pub(crate) build_memory_mb: String,
    /// How often the reconciler compares built partitions with what SQL holds, in
    /// seconds: the longest a lost bus message can delay a rebuild.
    #[arg(long, env = "SCHOLIA_RECONCILE_SECONDS", default_value = "5")]
    pub(crate) reconcile_seconds: String,
    /// Origins besides the page's own allowed to open the websocket (comma-separated).
    #[arg(long, env = "SCHOLIA_ALLOWED_ORIGINS", default_value = "")]
    pub(crate) allowed_origins: String,
    /// The most websockets one token may hold open at once.
    #[arg(long, env = "SCHOLIA_MAX_SOCKETS_PER_TOKEN", default_value = "10000")]
    pub(crate) max_sockets_per_token: String,
    /// The most websocket subscriptions one token may hold, over all its sockets.
    #[arg(
        long,
        env = "SCHOLIA_MAX_SUBSCRIPTIONS_PER_TOKEN",
        default_value = "20000"
    )]
    pub(crate) max_subscriptions_per_token: String,
    /// Memory for cached annotations, in megabytes.
    #[arg(long, env = "SCHOLIA_CACHE_MB", default_value = "256")]
    pub(crate) cache_mb: String,
    /// Memory a worker process keeps kinds' frames in, in megabytes (0: none), so that
    /// rebuilding unchanged partitions skips reading and parsing their records.
    #[arg(long, env = "SCHOLIA_FRAME_CACHE_MB", default_value = "1024")]
    pub(crate) frame_cache_mb: String,
    /// Where a worker keeps kinds' frames on disk, so that a restart does not turn
    /// rebuilds into reads of every record (a folder per database inside it).
    #[arg(long, env = "SCHOLIA_FRAME_DIR", default_value = "scholia-data/frames")]
    pub(crate) frame_dir: PathBuf,
    /// Disk a worker keeps frames on, in megabytes (0: none).
    #[arg(long, env = "SCHOLIA_FRAME_DISK_MB", default_value = "4096")]
    pub(crate) frame_disk_mb: String,
}

#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    pub(crate) roles: Vec<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) address_file: Option<PathBuf>,
    pub(crate) database_url: Option<String>,
    pub(crate) nats_url: Option<String>,
    pub(crate) nats_prefix: String,
    pub(crate) nats_max_bytes: i64,
    pub(crate) nats_max_age: Duration,
    pub(crate) admin_token: Option<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) max_inflight_batches: usize,
    pub(crate) quarantine_days: i64,
    pub(crate) quarantine_max_rows: u64,
    pub(crate) worker_concurrency: usize,
    pub(crate) build_timeout: Duration,
    pub(crate) build_memory_mb: u64,
    pub(crate) reconcile_every: Duration,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) max_sockets_per_token: usize,
    pub(crate) max_subscriptions_per_token: usize,
    pub(crate) cache_bytes: u64,
    pub(crate) frame_cache_bytes: u64,
    pub(crate) frame_dir: PathBuf,
    pub(crate) frame_disk_bytes: u64,
}

impl ServeConfig {
    pub(crate) fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Collects every problem of a configuration before reporting them together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// `text` as a `T` within `[min, max]`, or a problem naming `name`.
    fn number<T>(&mut self, name: &str, text: &str, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        match text.trim().parse::<T>() {
            Ok(value) if value >= min && value <= max => value,
            _ => {
                self.0.push(format!(
                    "{name} is {text:?}; it must be a whole number from {min} to {max}"
                ));
                min
            }
        }
    }
}

impl ServeArgs {
    pub(crate) fn into_config(self) -> Result<ServeConfig> {
        let mut p = Problems::default();
        let roles: Vec<String> = self
            .roles
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        for role in &roles {
            if !ALL_ROLES.contains(&role.as_str()) {
                p.0.push(format!(
                    "unknown role {role:?} in --roles; choose from {}",
                    ALL_ROLES.join(", ")
                ));
            }
        }
        if roles.is_empty() {
            p.0.push(format!(
                "--roles is empty; choose some of {}",
                ALL_ROLES.join(", ")
            ));
        }
        let listen = self.listen.parse::<SocketAddr>().ok();
        if listen.is_none() {
            p.0.push(format!(
                "--listen {:?} is not an address such as 127.0.0.1:7070",
                self.listen
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres:")
                || url.starts_with("postgresql:"))
        {
            p.0.push("SCHOLIA_DATABASE_URL must start with sqlite:// or postgres://".to_string());
        }
        if let Some(url) = &self.nats_url
            && !(url.starts_with("nats://") || url.starts_with("tls://") || !url.contains("://"))
        {
            p.0.push(format!("SCHOLIA_NATS_URL {url:?} must be a nats:// URL"));
        }
        if self.nats_prefix.is_empty()
            || !self
                .nats_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            p.0.push(format!(
                "SCHOLIA_NATS_PREFIX {:?} must be letters, digits, '-' or '_'",
                self.nats_prefix
            ));
        }
        if let Some(token) = &self.admin_token
            && token.len() < 16
        {
            p.0.push("SCHOLIA_ADMIN_TOKEN must be at least 16 characters long".to_string());
        }
        let nats_max_mb: i64 = p.number("SCHOLIA_NATS_MAX_MB", &self.nats_max_mb, 1, 1 << 20);
        let nats_max_age: u64 = p.number(
            "SCHOLIA_NATS_MAX_AGE_SECONDS",
            &self.nats_max_age_seconds,
            10,
            365 * 86_400,
        );
        let max_body_bytes: usize = p.number(
            "SCHOLIA_MAX_BODY_BYTES",
            &self.max_body_bytes,
            1024,
            1 << 30,
        );
        let body_timeout: u64 = p.number(
            "SCHOLIA_BODY_TIMEOUT_SECONDS",
            &self.body_timeout_seconds,
            1,
            3_600,
        );
        let max_inflight_batches: usize = p.number(
            "SCHOLIA_MAX_INFLIGHT_BATCHES",
            &self.max_inflight_batches,
            1,
            10_000,
        );
        let quarantine_days: i64 =
            p.number("SCHOLIA_QUARANTINE_DAYS", &self.quarantine_days, 1, 36_500);
        let quarantine_max_rows: u64 = p.number(
            "SCHOLIA_QUARANTINE_MAX_ROWS",
            &self.quarantine_max_rows,
            1,
            1 << 40,
        );
        let worker_concurrency: usize = p.number(
            "SCHOLIA_WORKER_CONCURRENCY",
            &self.worker_concurrency,
            1,
            1_024,
        );
        let build_timeout: u64 = p.number(
            "SCHOLIA_BUILD_TIMEOUT_SECONDS",
            &self.build_timeout_seconds,
            1,
            86_400,
        );
        let build_memory_mb: u64 = p.number(
            "SCHOLIA_BUILD_MEMORY_MB",
            &self.build_memory_mb,
            64,
            1 << 20,
        );
        let reconcile: u64 = p.number(
            "SCHOLIA_RECONCILE_SECONDS",
            &self.reconcile_seconds,
            1,
            3_600,
        );
        let max_sockets_per_token: usize = p.number(
            "SCHOLIA_MAX_SOCKETS_PER_TOKEN",
            &self.max_sockets_per_token,
            1,
            1_000_000,
        );
        let max_subscriptions_per_token: usize = p.number(
            "SCHOLIA_MAX_SUBSCRIPTIONS_PER_TOKEN",
            &self.max_subscriptions_per_token,
            1,
            10_000_000,
        );
        let cache_mb: u64 = p.number("SCHOLIA_CACHE_MB", &self.cache_mb, 1, 1 << 20);
        let frame_cache_mb: u64 =
            p.number("SCHOLIA_FRAME_CACHE_MB", &self.frame_cache_mb, 0, 1 << 20);
        let frame_disk_mb: u64 = p.number("SCHOLIA_FRAME_DISK_MB", &self.frame_disk_mb, 0, 1 << 30);
        if !p.0.is_empty() {
            bail!("invalid configuration:\n  - {}", p.0.join("\n  - "));
        }
        Ok(ServeConfig {
            roles,
            listen: listen.expect("checked above"),
            address_file: self.address_file,
            database_url: self.database_url,
            nats_url: self.nats_url,
            nats_prefix: self.nats_prefix,
            nats_max_bytes: nats_max_mb * 1024 * 1024,
            nats_max_age: Duration::from_secs(nats_max_age),
            admin_token: self.admin_token,
            max_body_bytes,
            body_timeout: Duration::from_secs(body_timeout),
            max_inflight_batches,
            quarantine_days,
            quarantine_max_rows,
            worker_concurrency,
            build_timeout: Duration::from_secs(build_timeout),
            build_memory_mb,
            reconcile_every: Duration::from_secs(reconcile),
            allowed_origins: self
                .allowed_origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            max_sockets_per_token,
            max_subscriptions_per_token,
            cache_bytes: cache_mb * 1024 * 1024,
            frame_cache_bytes: frame_cache_mb * 1024 * 1024,
            frame_dir: self.frame_dir,
            frame_disk_bytes: frame_disk_mb * 1024 * 1024,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once() {
        let cli = Cli::parse_from([
            "scholia",
            "--roles",
            "ingest,cook",
            "--cache-mb",
            "lots",
            "--reconcile-seconds",
            "0",
            "--listen",
            "here",
        ]);
        let error = cli.serve.into_config().unwrap_err().to_string();
        for named in [
            "cook",
            "SCHOLIA_CACHE_MB",
            "SCHOLIA_RECONCILE_SECONDS",
            "--listen",
        ] {
            assert!(error.contains(named), "{named} missing from: {error}");
        }
    }
}
