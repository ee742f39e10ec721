//! Typed configuration of `serve`, layered: defaults < `SCHOLIA_*` environment < flags.
//! Every invalid setting is reported at once, before anything starts.

use std::net::SocketAddr;

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
    /// sqlite://… or postgres://…; the embedded SQLite file under ./scholia-data/ when unset.
    #[arg(long, env = "SCHOLIA_DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// nats://…; the in-process bus when unset.
    #[arg(long, env = "SCHOLIA_NATS_URL")]
    pub(crate) nats_url: Option<String>,
    /// Subject prefix on NATS; the stream is named after it in capitals.
    #[arg(long, env = "SCHOLIA_NATS_PREFIX", default_value = "scholia")]
    pub(crate) nats_prefix: String,
    /// The most the NATS stream keeps, in megabytes (JetStream reserves it up front).
    #[arg(long, env = "SCHOLIA_NATS_MAX_MB", default_value_t = 1024)]
    pub(crate) nats_max_mb: i64,
    /// The admin token to accept (created if new); without it the first start creates one.
    #[arg(long, env = "SCHOLIA_ADMIN_TOKEN", hide_env_values = true)]
    pub(crate) admin_token: Option<String>,
    /// The largest request body accepted, after gzip inflation too.
    #[arg(long, env = "SCHOLIA_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// Batches written at once before new ones get 503.
    #[arg(long, env = "SCHOLIA_MAX_INFLIGHT_BATCHES", default_value_t = 32)]
    pub(crate) max_inflight_batches: usize,
    /// Builds one worker process runs at once.
    #[arg(long, env = "SCHOLIA_WORKER_CONCURRENCY", default_value_t = 2)]
    pub(crate) worker_concurrency: usize,
    /// Origins besides the page's own allowed to open the websocket (comma-separated).
    #[arg(long, env = "SCHOLIA_ALLOWED_ORIGINS", default_value = "")]
    pub(crate) allowed_origins: String,
    /// Memory for cached annotations, in megabytes.
    #[arg(long, env = "SCHOLIA_CACHE_MB", default_value_t = 256)]
    pub(crate) cache_mb: u64,
    /// Memory a worker process keeps partitions' input frames in, in megabytes (0: none),
    /// so that rebuilding unchanged partitions skips reading and parsing their records.
    #[arg(long, env = "SCHOLIA_FRAME_CACHE_MB", default_value_t = 1024)]
    pub(crate) frame_cache_mb: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    pub(crate) roles: Vec<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) database_url: Option<String>,
    pub(crate) nats_url: Option<String>,
    pub(crate) nats_prefix: String,
    pub(crate) nats_max_bytes: i64,
    pub(crate) admin_token: Option<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_inflight_batches: usize,
    pub(crate) worker_concurrency: usize,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) cache_bytes: u64,
    pub(crate) frame_cache_bytes: u64,
}

impl ServeConfig {
    pub(crate) fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

impl ServeArgs {
    pub(crate) fn into_config(self) -> Result<ServeConfig> {
        let mut problems = Vec::new();
        let roles: Vec<String> = self
            .roles
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        for role in &roles {
            if !ALL_ROLES.contains(&role.as_str()) {
                problems.push(format!(
                    "unknown role {role:?} in --roles; choose from {}",
                    ALL_ROLES.join(", ")
                ));
            }
        }
        if roles.is_empty() {
            problems.push(format!(
                "--roles is empty; choose some of {}",
                ALL_ROLES.join(", ")
            ));
        }
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "--listen {:?} is not an address such as 127.0.0.1:7070",
                    self.listen
                ));
                None
            }
        };
        if let Some(url) = &self.database_url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres:")
                || url.starts_with("postgresql:"))
        {
            problems
                .push("SCHOLIA_DATABASE_URL must start with sqlite:// or postgres://".to_string());
        }
        if let Some(url) = &self.nats_url
            && !(url.starts_with("nats://") || url.starts_with("tls://") || !url.contains("://"))
        {
            problems.push(format!("SCHOLIA_NATS_URL {url:?} must be a nats:// URL"));
        }
        if self.nats_prefix.is_empty()
            || !self
                .nats_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(format!(
                "SCHOLIA_NATS_PREFIX {:?} must be letters, digits, '-' or '_'",
                self.nats_prefix
            ));
        }
        if let Some(token) = &self.admin_token
            && token.len() < 16
        {
            problems.push("SCHOLIA_ADMIN_TOKEN must be at least 16 characters long".to_string());
        }
        if self.nats_max_mb < 1 {
            problems.push("SCHOLIA_NATS_MAX_MB must be at least 1".to_string());
        }
        if self.max_body_bytes < 1024 {
            problems.push("SCHOLIA_MAX_BODY_BYTES must be at least 1024".to_string());
        }
        if self.max_inflight_batches == 0 || self.worker_concurrency == 0 {
            problems.push(
                "SCHOLIA_MAX_INFLIGHT_BATCHES and SCHOLIA_WORKER_CONCURRENCY must be at least 1"
                    .to_string(),
            );
        }
        if !problems.is_empty() {
            bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
        }
        Ok(ServeConfig {
            roles,
            listen: listen.expect("checked above"),
            database_url: self.database_url,
            nats_url: self.nats_url,
            nats_prefix: self.nats_prefix,
            nats_max_bytes: self.nats_max_mb * 1024 * 1024,
            admin_token: self.admin_token,
            max_body_bytes: self.max_body_bytes,
            max_inflight_batches: self.max_inflight_batches,
            worker_concurrency: self.worker_concurrency,
            allowed_origins: self
                .allowed_origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            cache_bytes: self.cache_mb * 1024 * 1024,
            frame_cache_bytes: self.frame_cache_mb * 1024 * 1024,
        })
    }
}
