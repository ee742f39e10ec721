//! The service as one value: [`Application::build`] connects the database and the bus,
//! starts the relay and every role's tasks under one supervisor, mounts every role's
//! endpoints, and binds (port 0 picks a free one; [`Application::address`] says which);
//! [`Application::run_until_stopped`] serves until a signal or a failed task stops it.
//!
//! One shutdown tree: the supervisor's root token. SIGINT/SIGTERM cancel it; so does a
//! task that fails for good, which then makes the process exit non-zero. Requests that
//! wait (`wait=`) end when it is cancelled, and draining has a time limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

use scholia_analytics::frame_files::FrameFiles;
use scholia_analytics::frames::FrameCache;
use scholia_analytics::{AnalyticsState, Registry, WorkerSettings, Workers};
use scholia_annotation_cache::{AnnotationCache, Catalog};
use scholia_events::bus::{MemoryBus, NatsBus, NatsConfig};
use scholia_events::relay::Relay;
use scholia_events::store::Bootstrap;
use scholia_events::tasks::{OnFailure, Supervisor};
use scholia_events::token::{self, Scope};
use scholia_events::{Bus, Store};
use scholia_http::Core;
use scholia_ingest::{IngestLimits, IngestState};

use crate::config::ServeConfig;

/// How long stopping may take before the process exits anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How often the quarantine is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub(crate) struct Application {
    listener: TcpListener,
    address: SocketAddr,
    router: Router,
    core: Core,
    /// The first admin token's secret, when this start created it.
    pub(crate) created_admin: Option<String>,
}

impl Application {
    pub(crate) async fn build(config: &ServeConfig) -> Result<Application> {
        let store = scholia_store::connect(config.database_url.as_deref())
            .await
            .context("cannot open the database (SCHOLIA_DATABASE_URL)")?;
        let (bus, cursor): (Arc<dyn Bus>, Option<String>) = match &config.nats_url {
            Some(url) => {
                let bus = NatsBus::connect(NatsConfig {
                    url: url.clone(),
                    prefix: config.nats_prefix.clone(),
                    max_bytes: config.nats_max_bytes,
                    max_age: config.nats_max_age,
                })
                .await
                .context("cannot use NATS (SCHOLIA_NATS_URL)")?;
                let cursor = format!("nats:{}", bus.stream_name());
                (Arc::new(bus), Some(cursor))
            }
            None => (Arc::new(MemoryBus::new()), None),
        };
        let supervisor = Supervisor::new(CancellationToken::new());
        let relay = Arc::new(Relay::new(store.log.clone(), bus.clone(), cursor));
        let core = Core::new(
            store.clone(),
            bus,
            supervisor.clone(),
            relay.status(),
            config.roles.clone(),
        );
        supervisor.spawn("relay", OnFailure::Restart, move |stop| {
            let relay = relay.clone();
            async move { relay.run(stop).await }
        });
        let created_admin = bootstrap_admin(&store, config.admin_token.as_deref()).await?;

        let catalog = Catalog::load(store.analyses.clone())
            .await
            .context("cannot load the analyses")?;
        let registry = Registry::load(store.clone(), catalog.clone())
            .await
            .context("cannot register the built-in analyses")?;

        let mut router = scholia_http::common_router(core.clone());
        if config.has_role("ingest") {
            let limits = IngestLimits {
                max_body_bytes: config.max_body_bytes,
                max_inflight: config.max_inflight_batches,
                body_timeout: config.body_timeout,
            };
            let state = IngestState::new(core.clone(), limits).await?;
            let kinds = state.kinds.clone();
            supervisor.spawn("kinds-refresh", OnFailure::Restart, move |stop| {
                kinds.clone().follow(stop)
            });
            let quarantine = store.quarantine.clone();
            let (days, keep) = (config.quarantine_days, config.quarantine_max_rows);
            supervisor.spawn("quarantine-pruning", OnFailure::Restart, move |stop| {
                let quarantine = quarantine.clone();
                async move {
                    loop {
                        let older_than = chrono::Utc::now() - chrono::Duration::days(days);
                        match quarantine.prune(older_than, keep).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(rows = n, "Pruned the quarantine"),
                            Err(error) => {
                                tracing::warn!(error = %error, "Cannot prune the quarantine")
                            }
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(PRUNE_EVERY) => {}
                        }
                    }
                }
            });
            router = router.merge(scholia_ingest::router(state));
        }
        let needs_cache = ["cache", "visualizer", "worker"]
            .iter()
            .any(|r| config.has_role(r));
        if needs_cache {
            let cache = AnnotationCache::new(core.clone(), catalog, config.cache_bytes);
            let follower = cache.clone();
            supervisor.spawn("cache-evictions", OnFailure::Restart, move |stop| {
                follower.clone().follow_bus(stop)
            });
            let follower = cache.clone();
            supervisor.spawn("catalog-refresh", OnFailure::Restart, move |stop| {
                follower.clone().follow_catalog(stop)
            });
            if config.has_role("worker") {
                let settings = WorkerSettings {
                    concurrency: config.worker_concurrency,
                    build_timeout: config.build_timeout,
                    build_memory_mb: config.build_memory_mb,
                    reconcile_every: config.reconcile_every,
                    ..WorkerSettings::default()
                };
                let files = frame_files(&store, config).await?;
                Workers::new(
                    cache.clone(),
                    registry.clone(),
                    FrameCache::new(config.frame_cache_bytes, files),
                    settings,
                )
                .spawn(&supervisor);
            }
            if config.has_role("cache") {
                router = router
                    .merge(scholia_annotation_cache::router(cache.clone()))
                    .merge(scholia_analytics::router(AnalyticsState {
                        registry: registry.clone(),
                        cache: cache.clone(),
                    }));
            }
            if config.has_role("visualizer") {
                let limits = scholia_visualizer::HubLimits {
                    sockets_per_token: config.max_sockets_per_token,
                    subscriptions_per_token: config.max_subscriptions_per_token,
                };
                let hub =
                    scholia_visualizer::Hub::new(cache, config.allowed_origins.clone(), limits);
                let follower = hub.clone();
                supervisor.spawn("websocket-hub", OnFailure::Restart, move |stop| {
                    follower.clone().follow_bus(stop)
                });
                router = router.merge(scholia_visualizer::router(hub));
            }
        }
        let router = router
            .fallback(scholia_http::not_found)
            .layer(axum::middleware::from_fn_with_state(
                core.clone(),
                scholia_http::log_failures,
            ))
            .layer(CatchPanicLayer::new());
        let _ = core.openapi.set(crate::openapi::document(config));

        let listener = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "cannot listen on {}; is another process using it?",
                config.listen
            )
        })?;
        let address = listener.local_addr()?;
        if let Some(path) = &config.address_file {
            std::fs::write(path, format!("http://{address}\n"))
                .with_context(|| format!("cannot write the address to {}", path.display()))?;
        }
        Ok(Application {
            listener,
            address,
            router,
            core,
            created_admin,
        })
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// Serve until SIGINT/SIGTERM or a task that failed for good; then drain. An error
    /// when a task stopped the process, or the server failed.
    pub(crate) async fn run_until_stopped(self) -> Result<()> {
        let supervisor = self.core.supervisor.clone();
        let stop = supervisor.shutdown().clone();
        let served = axum::serve(self.listener, self.router.into_make_service())
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = wait_for_signal() => {
                        tracing::info!("Shutting down");
                        stop.cancel();
                    }
                    _ = stop.cancelled() => {}
                }
            })
            .await;
        if !supervisor.drain(DRAIN_LIMIT).await {
            tracing::warn!(
                limit_seconds = DRAIN_LIMIT.as_secs(),
                "Background tasks did not stop in time; exiting anyway"
            );
        }
        self.core.store.database.close().await;
        served.context("the HTTP server failed")?;
        if let Some(fatal) = supervisor.fatal() {
            bail!("stopped because a {fatal}");
        }
        Ok(())
    }
}

/// Make sure an admin token exists. Returns a new secret to print when one was created.
/// The worker's frame files, in a folder of `SCHOLIA_FRAME_DIR` named by the database.
async fn frame_files(store: &Store, config: &ServeConfig) -> Result<Option<FrameFiles>> {
    if config.frame_disk_bytes == 0 {
        return Ok(None);
    }
    let installation = store.database.installation().await?;
    let (dir, max) = (config.frame_dir.clone(), config.frame_disk_bytes);
    let files = tokio::task::spawn_blocking(move || FrameFiles::open(&dir, installation, max))
        .await
        .context("opening the frame folder")?
        .with_context(|| {
            format!(
                "could not use {} for frames; set SCHOLIA_FRAME_DIR to a writable folder, \
                 or SCHOLIA_FRAME_DISK_MB=0 to keep frames in memory only",
                config.frame_dir.display()
            )
        })?;
    Ok(Some(files))
}

async fn bootstrap_admin(store: &Store, configured: Option<&str>) -> Result<Option<String>> {
    if let Some(secret) = configured {
        let outcome = store
            .tokens
            .bootstrap(
                Scope::Admin,
                "bootstrap admin (SCHOLIA_ADMIN_TOKEN)",
                &token::hash_secret(secret),
            )
            .await?;
        if outcome == Bootstrap::Revoked {
            tracing::warn!(
                "SCHOLIA_ADMIN_TOKEN was revoked by an admin and stays revoked; it is not accepted. Set another secret, or unset it and use another admin token"
            );
        }
        return Ok(None);
    }
    if store.tokens.count().await? == 0 {
        let secret = token::new_secret();
        store
            .tokens
            .create(
                Scope::Admin,
                Vec::new(),
                "first admin",
                &token::hash_secret(&secret),
                None,
            )
            .await?;
        return Ok(Some(secret));
    }
    Ok(None)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "Cannot listen for SIGTERM; only SIGINT stops the service");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
