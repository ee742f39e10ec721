//! Starting the real `scholia` binary against a fresh database (and, for PostgreSQL, a
//! fresh NATS subject prefix), and talking to it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

pub const ADMIN: &str = "test-admin-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where PostgreSQL and NATS are, from `SCHOLIA_TEST_DATABASE_URL` and
/// `SCHOLIA_TEST_NATS_URL`, else the standard local ports when both answer, else (with the
/// `containers` feature) testcontainers, where a container engine answers.
pub struct Services {
    pub pg_admin_url: String,
    pub nats_url: String,
}

static SERVICES: tokio::sync::OnceCell<Option<Services>> = tokio::sync::OnceCell::const_new();

async fn services() -> Option<&'static Services> {
    SERVICES
        .get_or_init(|| async {
            match (
                std::env::var("SCHOLIA_TEST_DATABASE_URL"),
                std::env::var("SCHOLIA_TEST_NATS_URL"),
            ) {
                (Ok(pg), Ok(nats)) if !pg.is_empty() && !nats.is_empty() => Some(Services {
                    pg_admin_url: pg,
                    nats_url: nats,
                }),
                _ => match local::find().await {
                    Some(services) => Some(services),
                    None => containers::start().await,
                },
            }
        })
        .await
        .as_ref()
}

/// The PostgreSQL + NATS services, or `None` (said loudly) when there are none and they
/// are not required.
pub async fn require_services(test: &str) -> Option<&'static Services> {
    match services().await {
        Some(s) => Some(s),
        None if std::env::var("SCHOLIA_REQUIRE_SERVICES").as_deref() == Ok("1") => panic!(
            "{test} needs PostgreSQL and NATS: set SCHOLIA_TEST_DATABASE_URL and SCHOLIA_TEST_NATS_URL (SCHOLIA_REQUIRE_SERVICES=1 is set)"
        ),
        None => {
            eprintln!(
                "\n*** {test} DID NOT RUN: no PostgreSQL/NATS (set SCHOLIA_TEST_DATABASE_URL and SCHOLIA_TEST_NATS_URL, or start them on their standard local ports) ***\n"
            );
            None
        }
    }
}

#[cfg(feature = "containers")]
mod containers {
    use super::Services;
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    /// Start PostgreSQL and NATS in containers; they live as long as the test process.
    pub(super) async fn start() -> Option<Services> {
        let pg = GenericImage::new("postgres", "15")
            .with_exposed_port(5432.tcp())
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .start()
            .await
            .ok()?;
        let nats = GenericImage::new("nats", "2.10")
            .with_exposed_port(4222.tcp())
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
            .with_cmd(["-js"])
            .start()
            .await
            .ok()?;
        let services = Services {
            pg_admin_url: format!(
                "postgres://postgres@127.0.0.1:{}/postgres",
                pg.get_host_port_ipv4(5432).await.ok()?
            ),
            nats_url: format!(
                "nats://127.0.0.1:{}",
                nats.get_host_port_ipv4(4222).await.ok()?
            ),
        };
        // Kept for the life of the process.
        std::mem::forget(pg);
        std::mem::forget(nats);
        Some(services)
    }
}

#[cfg(not(feature = "containers"))]
mod containers {
    use super::Services;

    /// Without the `containers` feature there is nothing to start.
    pub(super) async fn start() -> Option<Services> {
        None
    }
}

mod local {
    use super::Services;
    use std::time::Duration;

    /// PostgreSQL and NATS on their standard local ports, when both answer.
    pub(super) async fn find() -> Option<Services> {
        for addr in ["127.0.0.1:5432", "127.0.0.1:4222"] {
            let connect = tokio::net::TcpStream::connect(addr);
            tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .ok()?
                .ok()?;
        }
        Some(Services {
            pg_admin_url: "postgres://postgres@127.0.0.1:5432/postgres".to_string(),
            nats_url: "nats://127.0.0.1:4222".to_string(),
        })
    }
}

/// The configuration of one test's deployment: its own database and subject prefix.
/// Not `Clone`: dropping it deletes its NATS stream, so there must be one of it.
pub struct Deployment {
    pub backend: Backend,
    pub database_url: String,
    pub nats_url: Option<String>,
    pub nats_prefix: String,
    pub dir: PathBuf,
    /// The shared server's admin URL, through which the database is dropped at the end.
    admin_url: Option<String>,
}

/// A deployment's NATS stream goes with it (after its processes: the apps a test starts
/// are dropped before the deployment it was given): each stream reserves storage on the
/// shared NATS server, and streams left behind by finished tests would exhaust it
/// (JetStream then refuses new streams, "insufficient storage resources"). So do its
/// PostgreSQL database and its directory (the SQLite database and the servers' logs),
/// unless the test failed: then both stay where the message printed says, to be looked at.
impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(url) = self.nats_url.clone() {
            let name = self.nats_prefix.to_uppercase().replace('-', "_");
            on_own_thread(Duration::from_secs(5), async move {
                let client = async_nats::connect(&url).await.ok()?;
                async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await
                    .ok()
            });
        }
        if std::thread::panicking() {
            let database = match self.backend {
                Backend::Postgres => format!(" and the database {}", self.database_url),
                Backend::Sqlite => String::new(),
            };
            eprintln!(
                "the failed test's logs stay in {}{database}",
                self.dir.display()
            );
            return;
        }
        if let (Some(admin_url), Some((_, name))) =
            (self.admin_url.take(), self.database_url.rsplit_once('/'))
        {
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            on_own_thread(Duration::from_secs(10), async move {
                let admin = sqlx::PgPool::connect(&admin_url).await.ok()?;
                let dropped = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await;
                admin.close().await;
                dropped.ok()
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run a clean-up to its end (or for at most `limit`) on a thread and runtime of its own:
/// a test's runtime may be shutting down around the deployment being dropped.
fn on_own_thread<T>(limit: Duration, work: impl Future<Output = T> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let _ = tokio::time::timeout(limit, work).await;
            });
    })
    .join();
}

impl Deployment {
    /// A fresh deployment, or `None` when the backend's services are missing.
    pub async fn new(backend: Backend, test: &str) -> Option<Deployment> {
        let id = Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("scholia-test-{}", &id[..12]));
        std::fs::create_dir_all(&dir).expect("creating a test directory");
        match backend {
            Backend::Sqlite => Some(Deployment {
                backend,
                database_url: format!("sqlite://{}/scholia.db", dir.display()),
                nats_url: None,
                nats_prefix: format!("t{}", &id[..12]),
                dir,
                admin_url: None,
            }),
            Backend::Postgres => {
                let services = require_services(test).await?;
                let name = format!("scholia_test_{}", &id[..16]);
                let admin = sqlx::PgPool::connect(&services.pg_admin_url)
                    .await
                    .expect("connecting to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("creating a test database");
                admin.close().await;
                let database_url = match services.pg_admin_url.rsplit_once('/') {
                    Some((base, _)) => format!("{base}/{name}"),
                    None => panic!("SCHOLIA_TEST_DATABASE_URL must end with a database name"),
                };
                Some(Deployment {
                    backend,
                    database_url,
                    nats_url: Some(services.nats_url.clone()),
                    nats_prefix: format!("t{}", &id[..12]),
                    dir,
                    admin_url: Some(services.pg_admin_url.clone()),
                })
            }
        }
    }

    pub fn with_nats(mut self, url: &str) -> Self {
        self.nats_url = Some(url.to_string());
        self
    }

    /// Start a `scholia serve` process of this deployment.
    pub async fn start(&self) -> TestApp {
        self.start_with(&[]).await
    }

    pub async fn start_with(&self, env: &[(&str, &str)]) -> TestApp {
        TestApp::spawn(self, "serve", env).await
    }

    /// Start a `scholia demo` process of this deployment: the service with its synthetic
    /// producers.
    pub async fn start_demo(&self) -> TestApp {
        TestApp::spawn(self, "demo", &[]).await
    }

    /// A direct connection to the deployment's database, for independent checks.
    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("connecting to the test database")
    }

    pub async fn sqlite(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&self.database_url)
            .await
            .expect("opening the test database")
    }
}

static LOG_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A running `scholia` process.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    child: Child,
    log: PathBuf,
}

impl TestApp {
    async fn spawn(deployment: &Deployment, subcommand: &str, env: &[(&str, &str)]) -> TestApp {
        let n = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = deployment.dir.join(format!("server-{n}.log"));
        let address_file = deployment.dir.join(format!("server-{n}.address"));
        let log_file = std::fs::File::create(&log).expect("creating a server log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_scholia"));
        command
            .arg(subcommand)
            .current_dir(&deployment.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SCHOLIA_LISTEN", "127.0.0.1:0")
            .env("SCHOLIA_ADDRESS_FILE", &address_file)
            .env("SCHOLIA_DATABASE_URL", &deployment.database_url)
            .env("SCHOLIA_NATS_PREFIX", &deployment.nats_prefix)
            .env("SCHOLIA_ADMIN_TOKEN", ADMIN)
            // Every test has its own stream; keep each one small on the shared server.
            .env("SCHOLIA_NATS_MAX_MB", "16")
            .env("SCHOLIA_LOG", "info,sqlx=warn,async_nats=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        if let Some(url) = &deployment.nats_url {
            command.env("SCHOLIA_NATS_URL", url);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting scholia");
        // The service writes its address once it listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        let base = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file)
                && text.ends_with('\n')
            {
                break text.trim().to_string();
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "scholia did not start ({exited:?}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        TestApp {
            base,
            client,
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("waiting for scholia")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http", "ws", 1))
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let r = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.send_json(reqwest::Method::PUT, path, token, body)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.send_json(reqwest::Method::POST, path, token, body)
            .await
    }

    /// POST records as NDJSON; returns the status and the answer.
    pub async fn ingest(&self, token: &str, records: &[Value]) -> (StatusCode, Value) {
        let body: String = records.iter().map(|r| format!("{r}\n")).collect();
        self.ingest_raw(token, "application/x-ndjson", body.into_bytes())
            .await
    }

    pub async fn ingest_raw(
        &self,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url("/v1/events"))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST /v1/events");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The value of a counter or gauge on `/metrics` (0 when it is not there yet).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text");
        text.lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .sum()
    }

    /// Create a token and return its secret.
    pub async fn token(&self, scope: &str, sources: &[&str]) -> String {
        let (status, body) = self
            .post(
                "/v1/tokens",
                ADMIN,
                &json!({"scope": scope, "sources": sources}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// Read annotations of `[from, to)`, waiting up to `wait` seconds.
    pub async fn annotations(&self, analysis: &str, from: &str, to: &str, wait: u64) -> Value {
        let (status, body) = self
            .get(
                &format!("/v1/annotations/{analysis}?from={from}&to={to}&wait={wait}"),
                ADMIN,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- last lines of {} ---\n{tail}", self.log.display());
        }
    }
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A generation record of one station.
pub fn generation(source: &str, created: &str, output_mw: Value) -> Value {
    json!({"data_id": Uuid::now_v7(), "kind": "generation", "source": source, "created": created, "data": {"output_mw": output_mw}})
}

/// Run a test body against both backends.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let f = $body;
                if let Some(d) =
                    Deployment::new(Backend::Sqlite, concat!(stringify!($name), "::sqlite")).await
                {
                    f(d).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let f = $body;
                if let Some(d) =
                    Deployment::new(Backend::Postgres, concat!(stringify!($name), "::postgres"))
                        .await
                {
                    f(d).await;
                }
            }
        }
    };
}

/// The partitions of an annotations answer, by partition key.
pub fn partitions_of(body: &Value) -> std::collections::BTreeMap<String, Value> {
    body["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("no partitions in {body}"))
        .iter()
        .map(|p| (p["partition"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

/// POST an invalidation and return its id.
pub async fn invalidate(
    app: &TestApp,
    analysis: &str,
    from: &str,
    to: &str,
    rebuild: &str,
) -> String {
    let (status, body) = app
        .post("/v1/invalidations", ADMIN, &json!({"analysis": analysis, "from": from, "to": to, "reason": "test", "rebuild": rebuild}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_string()
}

/// Poll an invalidation until its state is `state`; returns its progress.
pub async fn invalidation_reaches(
    app: &TestApp,
    id: &str,
    state: &str,
    timeout: Duration,
) -> Value {
    eventually(
        timeout,
        &format!("invalidation {id} to be {state}"),
        || async move {
            let (status, body) = app.get(&format!("/v1/invalidations/{id}"), ADMIN).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(
                body["state"] == state
                    || !matches!(
                        body["state"].as_str(),
                        Some("done" | "failed" | "cancelled")
                    ),
                "invalidation {id} ended {} instead of {state}: {body}",
                body["state"]
            );
            (body["state"] == state).then_some(body)
        },
    )
    .await
}

/// Every event of the log after `after`, paging through it.
pub async fn log_after(app: &TestApp, mut after: i64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let (status, body) = app
            .get(&format!("/v1/log?after={after}&limit=10000"), ADMIN)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let events = body["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        after = events.last().unwrap()["seq"].as_i64().unwrap();
        out.extend(events);
    }
}

/// The highest seq of the log now.
pub async fn log_head(app: &TestApp) -> i64 {
    log_after(app, 0)
        .await
        .last()
        .map(|e| e["seq"].as_i64().unwrap())
        .unwrap_or(0)
}

/// Floats equal within a relative tolerance; nulls equal nulls.
pub fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

/// A NATS server of this test's own, so that it can be stopped and started.
pub struct OwnNats {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
    config: Option<std::path::PathBuf>,
}

impl OwnNats {
    pub fn start(dir: &std::path::Path) -> OwnNats {
        Self::start_with(dir, None)
    }

    /// A server with `config` (nats-server configuration text) besides its port and store.
    pub fn start_with(dir: &std::path::Path, config: Option<&str>) -> OwnNats {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = config.map(|text| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, text).expect("writing a NATS configuration");
            path
        });
        let mut nats = OwnNats {
            child: None,
            port,
            dir: dir.join("nats"),
            config,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let binary = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "nats-server",
        ]
        .into_iter()
        .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
        .unwrap();
        let mut command = Command::new(binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server (install the nats-server package)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}
