//! `scholia serve` and `scholia demo`: connect the database and the bus, start the
//! relay and the tasks of each role, and serve the HTTP endpoints of each role.
//!
//! One shutdown tree: a root cancellation token; every long task is spawned with a name
//! into one tracker; when one fails, all stop; SIGINT/SIGTERM cancel the root, and
//! draining has a time limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use scholia_analytics::Registry;
use scholia_events::auth::{self, Scope};
use scholia_events::bus::{MemoryBus, NatsBus, NatsConfig};
use scholia_events::metrics::Metrics;
use scholia_events::relay::Relay;
use scholia_events::{Bus, Database};
use scholia_ingest::{Authenticator, IngestLimits, IngestState, Shared};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::config::ServeConfig;

const DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(config: ServeConfig, demo: bool) -> Result<()> {
    init_tracing();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let db = Database::connect(config.database_url.as_deref())
        .await
        .context("cannot open the database (SCHOLIA_DATABASE_URL)")?;
    let (bus, cursor_name): (Arc<dyn Bus>, Option<String>) = match &config.nats_url {
        Some(url) => {
            let bus = NatsBus::connect(NatsConfig {
                url: url.clone(),
                prefix: config.nats_prefix.clone(),
                max_bytes: config.nats_max_bytes,
            })
            .await
            .context("cannot use NATS (SCHOLIA_NATS_URL)")?;
            let cursor = format!("nats:{}", bus.stream_name());
            (Arc::new(bus), Some(cursor))
        }
        None => (Arc::new(MemoryBus::new()), None),
    };

    let admin_secret = bootstrap_admin(&db, config.admin_token.as_deref()).await?;
    let metrics = Arc::new(Metrics::default());
    let shared = Shared {
        db: db.clone(),
        bus: bus.clone(),
        auth: Authenticator::new(db.clone()),
        metrics: metrics.clone(),
        started: Instant::now(),
        roles: config.roles.clone(),
    };

    let relay = Relay::new(db.clone(), bus.clone(), cursor_name);
    let relay_status = relay.status.clone();
    spawn(&tasks, &shutdown, "relay", {
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await.map_err(anyhow::Error::from) }
    });
    metrics.gauge(
        "scholia_relay_published_seq",
        "Highest log seq the bus has acknowledged.",
    );
    {
        let metrics = metrics.clone();
        let db = db.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let published = metrics.gauge(
                "scholia_relay_published_seq",
                "Highest log seq the bus has acknowledged.",
            );
            let head = metrics.gauge("scholia_log_head_seq", "Highest committed log seq.");
            loop {
                published.store(
                    relay_status
                        .published_seq
                        .load(std::sync::atomic::Ordering::Relaxed) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                if let Ok(seq) = scholia_events::log::head(&db).await {
                    head.store(seq as u64, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    let registry = Registry::load(db.clone())
        .await
        .context("cannot load the analyses")?;
    let mut app = Router::new().merge(scholia_ingest::common_router(shared.clone()));

    if config.has_role("ingest") {
        let limits = IngestLimits {
            max_body_bytes: config.max_body_bytes,
            max_inflight: config.max_inflight_batches,
        };
        let state = IngestState::new(shared.clone(), limits).await?;
        app = app.merge(scholia_ingest::router(state));
    }
    if config.has_role("worker") {
        let workers = scholia_analytics::Workers::new(
            db.clone(),
            bus.clone(),
            registry.clone(),
            metrics.clone(),
            config.worker_concurrency,
            scholia_analytics::frames::FrameCache::new(config.frame_cache_bytes),
        );
        for (name, task) in workers.tasks(shutdown.clone()) {
            spawn(&tasks, &shutdown, name, async move {
                task.await.map_err(anyhow::Error::from)
            });
        }
    }
    let cache = if config.has_role("cache") || config.has_role("visualizer") {
        let cache = scholia_annotation_cache::AnnotationCache::new(
            shared.clone(),
            registry.clone(),
            config.cache_bytes,
        );
        let evictions = cache.clone();
        let stop = shutdown.clone();
        spawn(&tasks, &shutdown, "cache-evictions", async move {
            evictions
                .follow_bus(stop)
                .await
                .map_err(anyhow::Error::from)
        });
        Some(cache)
    } else {
        None
    };
    if config.has_role("cache") {
        app = app.merge(scholia_annotation_cache::router(
            cache.clone().expect("cache role has a cache"),
        ));
    }
    if config.has_role("visualizer") {
        let hub = scholia_visualizer::Hub::new(
            cache.clone().expect("visualizer role has a cache"),
            config.allowed_origins.clone(),
        );
        let follower = hub.clone();
        let stop = shutdown.clone();
        spawn(&tasks, &shutdown, "websocket-hub", async move {
            follower.follow_bus(stop).await.map_err(anyhow::Error::from)
        });
        app = app.merge(scholia_visualizer::router(hub));
    }
    let app = app
        .layer(CatchPanicLayer::new())
        .layer(TraceLayer::new_for_http());

    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}; is another process using it?",
            config.listen
        )
    })?;
    let addr = listener.local_addr()?;
    println!(
        "Scholia listening on http://{addr} (database: {}, bus: {}, roles: {})",
        db.backend_name(),
        bus.name(),
        config.roles.join(",")
    );
    if let Some(secret) = &admin_secret {
        println!("Created the first admin token; it is shown only this once:\n{secret}");
    }
    if demo {
        let read = auth::create(&db, Scope::Read, Vec::new(), "demo viewer")
            .await?
            .1;
        let admin = match &admin_secret {
            Some(s) => s.clone(),
            None => match &config.admin_token {
                Some(t) => t.clone(),
                None => {
                    auth::create(&db, Scope::Admin, Vec::new(), "demo admin")
                        .await?
                        .1
                }
            },
        };
        let producer = auth::create(&db, Scope::Ingest, Vec::new(), "demo producers")
            .await?
            .1;
        println!("Open the live charts: http://{addr}/?token={admin}&analysis=daily_avg");
        println!("Read-only token: {read}");
        let base = format!("http://{addr}");
        let stop = shutdown.clone();
        spawn(&tasks, &shutdown, "demo-producers", async move {
            crate::demo::run_producers(&base, &producer, stop).await
        });
    }
    std::io::Write::flush(&mut std::io::stdout())?;

    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            wait_for_signal().await;
            tracing::info!("Shutting down");
            shutdown.cancel();
        });
    }
    let server_shutdown = shutdown.clone();
    let served = axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
        .await;
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_LIMIT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            limit_seconds = DRAIN_LIMIT.as_secs(),
            "Background tasks did not stop in time; exiting anyway"
        );
    }
    db.close().await;
    served.context("the HTTP server failed")
}

/// Spawn a named long task; if it fails, everything stops.
fn spawn<F>(tasks: &TaskTracker, shutdown: &CancellationToken, name: &'static str, task: F)
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        match task.await {
            Ok(()) => tracing::debug!(task = name, "Task finished"),
            Err(error) => {
                tracing::error!(task = name, error = %format!("{error:#}"), "Task failed; stopping the process");
                shutdown.cancel();
            }
        }
    });
}

/// Make sure an admin token exists. Returns a new secret to print when one was created.
async fn bootstrap_admin(db: &Database, configured: Option<&str>) -> Result<Option<String>> {
    if let Some(secret) = configured {
        auth::ensure(
            db,
            Scope::Admin,
            "bootstrap admin (SCHOLIA_ADMIN_TOKEN)",
            secret,
        )
        .await?;
        return Ok(None);
    }
    if auth::count(db).await? == 0 {
        let (_, secret) = auth::create(db, Scope::Admin, Vec::new(), "first admin").await?;
        return Ok(Some(secret));
    }
    Ok(None)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SCHOLIA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,tower_http=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
