//! The websocket hub: subscriptions, their index by analysis, and the fan-out of
//! changes to them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use scholia_annotation_cache::{AnnotationCache, MAX_READ_PARTITIONS, PartitionView};
use scholia_events::analysis::AnalysisMeta;
use scholia_events::partition::parse_instant;
use scholia_events::status::{BuildState, PartitionStatus};
use scholia_events::{EventBody, LoggedEvent, PartitionKey, PartitionRun};
use scholia_http::{ApiError, Core, Problem, QueryReader};

use crate::protocol::{ClientMessage, ServerMessage};
use crate::socket::{self, Flusher, Handshake, Incoming, OnRecovered, Outbox, Reader};

/// The largest message a client may send; a larger one closes its socket.
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// Outgoing messages queued per socket before updates are dropped for a `resync`. The
/// queue holds shared buffers: a message sent to many sockets exists once.
const SEND_QUEUE: usize = 256;
/// A socket that cannot take one message in this long is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_SUBSCRIPTIONS_PER_SOCKET: usize = 64;
/// The most tasks writing sockets' frames: one per two cores, so that a fan-out leaves
/// the other cores to reading, building and serving (with the 10,000-client benchmark on
/// two cores, one task pushed with p50 75–85 ms and p99 156–206 ms, two with p50
/// 95–111 ms and p99 165–210 ms).
const FLUSHER_TASKS: usize = 4;

/// How much of the hub one token may hold.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    pub sockets_per_token: usize,
    pub subscriptions_per_token: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            sockets_per_token: 10_000,
            subscriptions_per_token: 20_000,
        }
    }
}

/// What one token holds now.
#[derive(Debug, Default)]
struct Held {
    sockets: usize,
    subscriptions: usize,
}
const MAX_SUBSCRIPTION_PARTITIONS: usize = 2_000;
const _: () = assert!(MAX_SUBSCRIPTION_PARTITIONS <= MAX_READ_PARTITIONS);

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    cache: AnnotationCache,
    allowed_origins: Vec<String>,
    limits: HubLimits,
    held: Mutex<HashMap<Uuid, Held>>,
    next_client: AtomicU64,
    /// analysis → (client, subscription id) → subscription.
    subs: RwLock<HashMap<String, SubsOfAnalysis>>,
    clients: RwLock<HashMap<u64, Arc<Client>>>,
    /// Writes every socket's frames; started with the first socket.
    flusher: OnceLock<Arc<Flusher>>,
}

/// The subscriptions to one analysis, by (client, subscription id).
type SubsOfAnalysis = HashMap<(u64, String), Arc<Sub>>;

struct Sub {
    id: String,
    client: u64,
    owner: Arc<Client>,
    analysis: String,
    /// Its partitions, in order.
    keys: Vec<PartitionKey>,
    /// The generation last sent of each of `keys` (0: none), so that no generation goes
    /// out twice or after a newer one: the subscription's first read and a completion
    /// arriving over the bus may carry the same one.
    sent: Mutex<Vec<i64>>,
    /// Partitions not ready yet; `ready` is sent when this empties.
    pending: Mutex<BTreeSet<PartitionKey>>,
    /// The newest version of the analysis this subscription has seen registered.
    version: AtomicI64,
}

impl Sub {
    fn covers(&self, key: &PartitionKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    /// Record that `generation` of `key` goes out; false when it (or a newer one) did.
    fn first_sight(&self, key: &PartitionKey, generation: i64) -> bool {
        let Ok(at) = self.keys.binary_search(key) else {
            return false;
        };
        let mut sent = self.sent.lock().expect("sent lock");
        if generation != 0 && sent[at] >= generation {
            return false;
        }
        sent[at] = sent[at].max(generation);
        true
    }
}

struct Client {
    outbox: Arc<Outbox>,
    /// Its subscription ids.
    subs: Arc<Mutex<Vec<String>>>,
    token: Uuid,
}

impl Client {
    /// Queue a message without waiting; a full queue drops it, and each of the client's
    /// subscriptions gets a `resync` once the queue has emptied.
    fn offer(&self, text: impl Into<Bytes>) {
        self.outbox.offer(text.into());
    }

    /// Queue a message, waiting for room (answers to the client's own requests).
    async fn send(&self, text: impl Into<Bytes>) {
        self.outbox.send(text.into()).await;
    }
}

impl Hub {
    pub fn new(cache: AnnotationCache, allowed_origins: Vec<String>, limits: HubLimits) -> Self {
        Hub {
            inner: Arc::new(Inner {
                cache,
                allowed_origins,
                limits,
                held: Mutex::default(),
                next_client: AtomicU64::new(1),
                subs: RwLock::default(),
                clients: RwLock::default(),
                flusher: OnceLock::new(),
            }),
        }
    }

    pub fn connected_clients(&self) -> usize {
        self.inner.clients.read().expect("clients lock").len()
    }

    /// Push every change the cache applied to the subscriptions it concerns.
    pub async fn follow_bus(self, shutdown: CancellationToken) -> scholia_events::Result<()> {
        let mut changes = self.inner.cache.changes();
        let gauge = self
            .inner
            .cache
            .core()
            .metrics
            .gauge("scholia_websocket_clients", "Open websocket connections.");
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = changes.recv() => event,
            };
            gauge.store(self.connected_clients() as u64, Ordering::Relaxed);
            match event {
                Ok(event) => self.apply(&event).await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "The websocket hub fell behind; asking every client to resync"
                    );
                    self.resync_all();
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    fn subs_of(&self, analysis: &str) -> Vec<Arc<Sub>> {
        self.inner
            .subs
            .read()
            .expect("subs lock")
            .get(analysis)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    fn client(&self, id: u64) -> Option<Arc<Client>> {
        self.inner
            .clients
            .read()
            .expect("clients lock")
            .get(&id)
            .cloned()
    }

    fn resync_all(&self) {
        let subs: Vec<Arc<Sub>> = self
            .inner
            .subs
            .read()
            .expect("subs lock")
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        for sub in subs {
            sub.owner
                .offer(ServerMessage::Resync { sub: &sub.id }.text());
        }
    }

    async fn apply(&self, event: &LoggedEvent) {
        match &event.body {
            EventBody::AnalysisCompleted {
                analysis,
                partition,
                ..
            } => {
                let key = *partition;
                let subs: Vec<Arc<Sub>> = self
                    .subs_of(analysis)
                    .into_iter()
                    .filter(|s| s.covers(&key))
                    .collect();
                if subs.is_empty() {
                    return;
                }
                let Some(analysis) = self.inner.cache.catalog().get(analysis) else {
                    return;
                };
                let view = match self
                    .inner
                    .cache
                    .read(&analysis, partition.start, partition.end())
                    .await
                {
                    Ok(mut views) if !views.is_empty() => views.remove(0),
                    Ok(_) => return,
                    Err(error) => {
                        tracing::warn!(error = %error, "Cannot read a rebuilt partition for its subscribers");
                        return;
                    }
                };
                let body = partition_body(&analysis, &view);
                // One buffer per distinct subscription id (pages mostly use the same few).
                let mut messages: HashMap<&str, Bytes> = HashMap::new();
                let mut readies: HashMap<&str, Bytes> = HashMap::new();
                let generation = view.generation.unwrap_or(0);
                for sub in &subs {
                    if !sub.first_sight(&key, generation) {
                        continue;
                    }
                    let client = &sub.owner;
                    let message = messages
                        .entry(sub.id.as_str())
                        .or_insert_with(|| partition_message(&sub.id, &body).into())
                        .clone();
                    client.offer(message);
                    if view.is_ready() {
                        let now_ready = {
                            let mut pending = sub.pending.lock().expect("pending lock");
                            pending.remove(&key) && pending.is_empty()
                        };
                        if now_ready {
                            let ready = readies
                                .entry(sub.id.as_str())
                                .or_insert_with(|| {
                                    ServerMessage::Ready { sub: &sub.id }.text().into()
                                })
                                .clone();
                            client.offer(ready);
                        }
                    }
                }
            }
            EventBody::AnalysisRequested {
                analysis,
                partitions,
                ..
            } => {
                self.status_for(analysis, partitions, PartitionStatus::Queued, None);
            }
            EventBody::AnalysisStarted {
                analysis,
                partition,
                ..
            } => {
                self.status_for(
                    analysis,
                    &[run_of(*partition)],
                    PartitionStatus::Running,
                    None,
                );
            }
            EventBody::AnalysisFailed {
                analysis,
                partition,
                error,
                gave_up,
                ..
            } => {
                let status = if *gave_up {
                    PartitionStatus::Failed
                } else {
                    PartitionStatus::Queued
                };
                self.status_for(analysis, &[run_of(*partition)], status, Some(error.clone()));
            }
            EventBody::AnalysisInvalidated {
                analysis,
                partitions,
                ..
            } => {
                for sub in self.subs_of(analysis) {
                    let hit: Vec<PartitionKey> = sub
                        .keys
                        .iter()
                        .filter(|k| partitions.iter().any(|run| run.contains(k)))
                        .copied()
                        .collect();
                    if hit.is_empty() {
                        continue;
                    }
                    sub.pending
                        .lock()
                        .expect("pending lock")
                        .extend(hit.iter().cloned());
                    sub.owner.offer(
                        ServerMessage::Invalidated {
                            sub: &sub.id,
                            partitions: hit,
                        }
                        .text(),
                    );
                }
            }
            EventBody::AnalysisRegistered {
                analysis, version, ..
            } => {
                // A new version makes every subscribed partition stale: rebuild them live.
                // A registration that keeps the version (a new description, or one
                // replayed from before the subscription) changes nothing.
                let Some(found) = self.inner.cache.catalog().get(analysis) else {
                    return;
                };
                for sub in self.subs_of(analysis) {
                    if sub.version.fetch_max(*version, Ordering::Relaxed) >= *version {
                        continue;
                    }
                    let keys: Vec<PartitionKey> = sub.keys.to_vec();
                    sub.pending
                        .lock()
                        .expect("pending lock")
                        .extend(keys.iter().cloned());
                    sub.owner.offer(
                        ServerMessage::Invalidated {
                            sub: &sub.id,
                            partitions: keys.clone(),
                        }
                        .text(),
                    );
                    if let (Some(first), Some(last)) = (keys.first(), keys.last())
                        && let Ok(views) =
                            self.inner.cache.read(&found, first.start, last.end()).await
                    {
                        let _ = self
                            .inner
                            .cache
                            .request_missing(&found, &views, "websocket subscription")
                            .await;
                    }
                }
            }
            _ => {}
        }
    }

    fn status_for(
        &self,
        analysis: &str,
        runs: &[PartitionRun],
        status: PartitionStatus,
        error: Option<String>,
    ) {
        let subs = self.subs_of(analysis);
        if subs.is_empty() {
            return;
        }
        // Only the subscribed keys of each run, however long the run is.
        let mut keys: BTreeSet<PartitionKey> = BTreeSet::new();
        for sub in &subs {
            keys.extend(
                sub.keys
                    .iter()
                    .filter(|k| runs.iter().any(|r| r.contains(k))),
            );
        }
        for key in keys {
            let message = ServerMessage::Status {
                sub: "",
                partition: key,
                status,
                error: error.clone(),
            };
            let body = message.text();
            let mut messages: HashMap<&str, Bytes> = HashMap::new();
            for sub in subs.iter().filter(|s| s.covers(&key)) {
                sub.pending.lock().expect("pending lock").insert(key);
                let message = messages
                    .entry(sub.id.as_str())
                    .or_insert_with(|| with_sub(&body, &sub.id).into())
                    .clone();
                sub.owner.offer(message);
            }
        }
    }

    fn register(&self, sub: Arc<Sub>) {
        self.inner
            .subs
            .write()
            .expect("subs lock")
            .entry(sub.analysis.clone())
            .or_default()
            .insert((sub.client, sub.id.clone()), sub);
    }

    fn unregister(&self, client: u64, id: &str) {
        let mut subs = self.inner.subs.write().expect("subs lock");
        subs.retain(|_, by_key| {
            by_key.remove(&(client, id.to_string()));
            !by_key.is_empty()
        });
    }

    fn disconnect(&self, client: u64) {
        let Some(found) = self.client(client) else {
            return;
        };
        let ids = found.subs.lock().expect("subs lock").clone();
        for id in &ids {
            self.unregister(client, id);
        }
        self.inner
            .clients
            .write()
            .expect("clients lock")
            .remove(&client);
        self.release(found.token, 1, ids.len());
    }

    /// Take a socket for `token`, or say why not.
    fn hold_socket(&self, token: Uuid) -> Result<(), String> {
        let mut held = self.inner.held.lock().expect("held lock");
        let entry = held.entry(token).or_default();
        let limit = self.inner.limits.sockets_per_token;
        if entry.sockets >= limit {
            return Err(format!(
                "This token already holds {limit} websockets (SCHOLIA_MAX_SOCKETS_PER_TOKEN); close some, or give other clients tokens of their own."
            ));
        }
        entry.sockets += 1;
        Ok(())
    }

    /// Take one more subscription for `token`, or say why not.
    fn hold_subscription(&self, token: Uuid) -> Result<(), String> {
        let mut held = self.inner.held.lock().expect("held lock");
        let entry = held.entry(token).or_default();
        let limit = self.inner.limits.subscriptions_per_token;
        if entry.subscriptions >= limit {
            return Err(format!(
                "this token already holds {limit} subscriptions (SCHOLIA_MAX_SUBSCRIPTIONS_PER_TOKEN); unsubscribe some first"
            ));
        }
        entry.subscriptions += 1;
        Ok(())
    }

    fn release(&self, token: Uuid, sockets: usize, subscriptions: usize) {
        let mut held = self.inner.held.lock().expect("held lock");
        if let Some(entry) = held.get_mut(&token) {
            entry.sockets = entry.sockets.saturating_sub(sockets);
            entry.subscriptions = entry.subscriptions.saturating_sub(subscriptions);
            if entry.sockets == 0 && entry.subscriptions == 0 {
                held.remove(&token);
            }
        }
    }

    /// Handle one client message; errors go back to the client as `error`.
    async fn handle(&self, client_id: u64, client: &Arc<Client>, text: &str) {
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                let message = format!(
                    "not a valid message ({e}); send {{\"op\":\"subscribe\",\"id\",\"analysis\",\"from\",\"to\"}} or {{\"op\":\"unsubscribe\",\"id\"}}"
                );
                let _ = client
                    .send(ServerMessage::Error { sub: None, message }.text())
                    .await;
                return;
            }
        };
        match message {
            ClientMessage::Unsubscribe { id } => {
                self.unregister(client_id, &id);
                let removed = {
                    let mut ids = client.subs.lock().expect("subs lock");
                    let before = ids.len();
                    ids.retain(|s| s != &id);
                    before - ids.len()
                };
                self.release(client.token, 0, removed);
            }
            ClientMessage::Subscribe {
                id,
                analysis,
                from,
                to,
            } => {
                if let Err(message) = self
                    .subscribe(client_id, client, &id, &analysis, &from, &to)
                    .await
                {
                    let _ = client
                        .send(
                            ServerMessage::Error {
                                sub: Some(&id),
                                message,
                            }
                            .text(),
                        )
                        .await;
                }
            }
        }
    }

    async fn subscribe(
        &self,
        client_id: u64,
        client: &Arc<Client>,
        id: &str,
        analysis: &str,
        from: &str,
        to: &str,
    ) -> Result<(), String> {
        if id.is_empty() || id.len() > 64 {
            return Err("a subscription id must be 1 to 64 characters".into());
        }
        let from = parse_instant(from)?;
        let to = parse_instant(to)?;
        if to <= from {
            return Err("the range is empty: \"to\" must come after \"from\"".into());
        }
        let cache = &self.inner.cache;
        let analysis = cache
            .catalog()
            .find(analysis)
            .await
            .map_err(|_| format!("no analysis is named {analysis:?}"))?;
        let keys = analysis
            .partition
            .partitions_between(from, to, MAX_SUBSCRIPTION_PARTITIONS)?;
        {
            let mut ids = client.subs.lock().expect("subs lock");
            if !ids.iter().any(|s| s == id) {
                if ids.len() >= MAX_SUBSCRIPTIONS_PER_SOCKET {
                    return Err(format!(
                        "a socket may hold at most {MAX_SUBSCRIPTIONS_PER_SOCKET} subscriptions"
                    ));
                }
                self.hold_subscription(client.token)?;
                ids.push(id.to_string());
            }
        }
        self.unregister(client_id, id);
        let views = cache
            .read(&analysis, from, to)
            .await
            .map_err(|e| e.to_string())?;
        let pending: BTreeSet<PartitionKey> = views
            .iter()
            .filter(|v| !v.is_ready())
            .map(|v| v.partition)
            .collect();
        let sub = Arc::new(Sub {
            id: id.to_string(),
            client: client_id,
            owner: client.clone(),
            analysis: analysis.name.clone(),
            sent: Mutex::new(vec![0; keys.len()]),
            keys,
            pending: Mutex::new(pending.clone()),
            version: AtomicI64::new(analysis.version),
        });
        // Registered before anything is sent, so that no change in between is missed.
        self.register(sub.clone());
        for view in views.iter().filter(|v| v.rows.is_some()) {
            if !sub.first_sight(&view.partition, view.generation.unwrap_or(0)) {
                continue;
            }
            let body = partition_body(&analysis, view);
            let _ = client.send(partition_message(id, &body)).await;
        }
        if !pending.is_empty() {
            cache
                .request_missing(&analysis, &views, "websocket subscription")
                .await
                .map_err(|e| e.to_string())?;
            let _ = client
                .send(
                    ServerMessage::Waiting {
                        sub: id,
                        partitions: pending.into_iter().collect(),
                    }
                    .text(),
                )
                .await;
            for view in &views {
                let status = match (view.status, view.rebuild) {
                    (
                        PartitionStatus::Queued
                        | PartitionStatus::Running
                        | PartitionStatus::Failed,
                        _,
                    ) => view.status,
                    (PartitionStatus::Stale, Some(BuildState::Queued)) => PartitionStatus::Queued,
                    (PartitionStatus::Stale, Some(BuildState::Running)) => PartitionStatus::Running,
                    _ => continue,
                };
                let message = ServerMessage::Status {
                    sub: id,
                    partition: view.partition,
                    status,
                    error: view.error.clone(),
                };
                let _ = client.send(message.text()).await;
            }
        } else {
            let _ = client.send(ServerMessage::Ready { sub: id }.text()).await;
        }
        Ok(())
    }
}

/// A `partition` message's body, serialized once for every subscriber: everything but
/// `type` and `sub`.
fn partition_body(analysis: &AnalysisMeta, view: &PartitionView) -> String {
    let stored = view.rows.as_ref();
    json!({
        "analysis": analysis.name,
        "version": stored.map(|s| s.version),
        "partition": view.partition,
        "generation": stored.map(|s| s.generation),
        "status": view.status,
        "computed_at": view.computed_at,
        "rows": stored.map(|s| &*s.rows),
    })
    .to_string()
}

fn partition_message(sub: &str, body: &str) -> String {
    let sub = serde_json::to_string(sub).expect("strings serialize");
    format!("{{\"type\":\"partition\",\"sub\":{sub},{}", &body[1..])
}

/// Put a subscription id into a message serialized with an empty `sub`.
fn with_sub(body: &str, sub: &str) -> String {
    let sub = serde_json::to_string(sub).expect("strings serialize");
    body.replacen("\"sub\":\"\"", &format!("\"sub\":{sub}"), 1)
}

impl FromRef<Hub> for Core {
    fn from_ref(hub: &Hub) -> Core {
        hub.inner.cache.core().clone()
    }
}

pub(crate) fn router(hub: Hub) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(hub)
}

/// The live websocket.
///
/// Subscribe to an analysis' partitions and receive their annotations as they change (SPEC
/// §6). A browser that cannot set headers sends the token as `?token=`. An `Origin` other
/// than this server's must be listed in `SCHOLIA_ALLOWED_ORIGINS` (403 otherwise).
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "live",
    security(("bearer" = []), ("query_token" = [])),
    params(
        ("Connection" = String, Header, pattern = "^([ -~]*,)?[ \\t]*[Uu][Pp][Gg][Rr][Aa][Dd][Ee][ \\t]*(,[ -~]*)?$", description = "Must include `Upgrade` (a comma-separated list)."),
        ("Upgrade" = String, Header, pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$", description = "`websocket`."),
        ("Sec-WebSocket-Version" = String, Header, pattern = "^13$", description = "`13`."),
        ("Sec-WebSocket-Key" = String, Header, pattern = "^[A-Za-z0-9+/]{22}==$", description = "The client's nonce: 16 bytes in base64 (RFC 6455).")
    ),
    responses(
        (status = 101, description = "Switched to the websocket protocol."),
        (status = 400, description = "Not a websocket handshake: connect with a websocket client.", body = scholia_http::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "The token holds as many websockets as it may (`SCHOLIA_MAX_SOCKETS_PER_TOKEN`).", body = scholia_http::ProblemBody, content_type = "application/problem+json")
    )
)]
async fn upgrade(
    QueryReader(token): QueryReader,
    State(hub): State<Hub>,
    headers: HeaderMap,
    handshake: Handshake,
) -> Result<Response, ApiError> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let own = origin.split_once("://").map(|(_, rest)| rest) == Some(host);
        let listed = hub
            .inner
            .allowed_origins
            .iter()
            .any(|o| o == origin.trim_end_matches('/'));
        if !own && !listed {
            return Err(ApiError::forbidden(format!(
                "Websocket connections from {origin} are not allowed; add it to SCHOLIA_ALLOWED_ORIGINS to allow it."
            )));
        }
    }
    hub.hold_socket(token.id)
        .map_err(|detail| ApiError::new(Problem::TooManyRequests, detail))?;
    // Given back when the socket ends, or when the upgrade never happens.
    let held = SocketHold {
        hub: hub.clone(),
        token: token.id,
    };
    Ok(handshake.upgrade(move |io| serve_socket(held, io)))
}

/// A socket a token holds until this drops (its subscriptions are given back with the
/// client, at disconnect).
struct SocketHold {
    hub: Hub,
    token: Uuid,
}

impl Drop for SocketHold {
    fn drop(&mut self) {
        self.hub.release(self.token, 1, 0);
    }
}

async fn serve_socket(held: SocketHold, io: Box<dyn socket::Io>) {
    let hub = held.hub.clone();
    let id = hub.inner.next_client.fetch_add(1, Ordering::Relaxed);
    let (read, write) = tokio::io::split(io);
    let subs: Arc<Mutex<Vec<String>>> = Arc::default();
    let missed = subs.clone();
    // The client missed updates while its queue was full: tell each subscription.
    let on_recovered: OnRecovered = Box::new(move |outbox: &Outbox| {
        let subs = missed.lock().expect("subs lock").clone();
        for sub in subs {
            outbox.offer(ServerMessage::Resync { sub: &sub }.text().into());
        }
    });
    let flusher = hub.inner.flusher.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Flusher::start((cores / 2).clamp(1, FLUSHER_TASKS))
    });
    let client = Arc::new(Client {
        outbox: Outbox::new(SEND_QUEUE, Box::new(write), flusher.clone(), on_recovered),
        subs,
        token: held.token,
    });
    hub.inner
        .clients
        .write()
        .expect("clients lock")
        .insert(id, client.clone());

    let outbox = client.outbox.clone();
    let writer = tokio::spawn(async move { outbox.write_out(SEND_TIMEOUT).await });

    let mut reader = Reader::new(read, MAX_CLIENT_MESSAGE);
    loop {
        let message = tokio::select! {
            message = reader.next(&client.outbox) => message,
            // The writer stopped (the peer stopped reading, or a close went out).
            _ = client.outbox.finished() => break,
        };
        match message {
            // Boxed: handling a message reads the cache and the database, and its large
            // future would otherwise be inlined into every idle socket's task.
            Some(Incoming::Text(text)) => Box::pin(hub.handle(id, &client, &text)).await,
            Some(Incoming::Binary) => {
                let message = "binary messages are not understood; send JSON text".to_string();
                client
                    .send(ServerMessage::Error { sub: None, message }.text())
                    .await;
            }
            Some(Incoming::Close(code)) => {
                client.outbox.close(code);
                break;
            }
            None => break,
        }
    }
    hub.disconnect(id);
    // Let a queued close go out; a writer that cannot finish in time is stopped.
    client.outbox.close(1000);
    let stop = writer.abort_handle();
    if tokio::time::timeout(SEND_TIMEOUT, writer).await.is_err() {
        stop.abort();
    }
    drop(held);
}

fn run_of(key: PartitionKey) -> PartitionRun {
    PartitionRun {
        first: key,
        last: key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_message_is_the_shared_body_with_its_subscription() {
        let body = r#"{"analysis":"a","rows":[]}"#;
        let message: serde_json::Value =
            serde_json::from_str(&partition_message("c\"1", body)).unwrap();
        assert_eq!(message["type"], "partition");
        assert_eq!(message["sub"], "c\"1");
        assert_eq!(message["analysis"], "a");
    }

    #[test]
    fn a_status_gets_its_subscription_filled_in() {
        let body = ServerMessage::Status {
            sub: "",
            partition: PartitionKey::parse("2024-05-05").unwrap(),
            status: PartitionStatus::Queued,
            error: None,
        }
        .text();
        let message: serde_json::Value = serde_json::from_str(&with_sub(&body, "s9")).unwrap();
        assert_eq!(message["sub"], "s9");
        assert_eq!(message["status"], "queued");
    }
}
