//! The NATS JetStream bus of the production deployment.
//!
//! One stream per deployment, named after the subject prefix in capitals, capturing
//! `<prefix>.>`. The stream is a window onto the SQL log, not a second copy of it: it keeps
//! at most `max_bytes` and `max_age` and lets go of its oldest events first
//! (`discard: old`), so it can never fill up and refuse the relay. What it lets go of is
//! in SQL, and consumers that missed it catch up from there (the reconciler).
//!
//! Each event is published to `<prefix>.<type>` with `Nats-Msg-Id` set to its `seq`, so a
//! relay that publishes again after a crash is deduplicated, and with
//! `Nats-Expected-Last-Msg-Id` chaining each event to the previous one, so the stream never
//! holds them out of order. An event larger than the server's payload limit is refused
//! before it is sent, as permanent, so the relay reports it and moves on.
//!
//! Fan-out subscribers use core NATS subscriptions (the stream's subjects are ordinary
//! subjects too); when the connection comes back after an outage they are told they
//! lagged. Work groups are durable pull consumers shared by every member process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::{
    Acker, AckerInner, Bus, Delivery, EventFilter, PublishError, Published, Source, Subscription,
};
use crate::error::{Error, Result};
use crate::event::LoggedEvent;

/// The payload limit assumed before the server has said its own (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// Subject prefix; the stream is named after it in capitals.
    pub prefix: String,
    /// The most the stream keeps, in bytes; past it the oldest events go.
    pub max_bytes: i64,
    /// How long the stream keeps an event.
    pub max_age: Duration,
}

#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    stream_name: String,
    /// The `seq` of the last event this process saw stored, to chain the next publish.
    last_published: Arc<Mutex<Option<i64>>>,
    reconnected: broadcast::Sender<()>,
}

impl NatsBus {
    /// Connect; an unreachable server is not an error here: the client keeps trying in
    /// the background, and the relay holds events in the SQL log until it succeeds.
    pub async fn connect(config: NatsConfig) -> Result<NatsBus> {
        if config.prefix.is_empty()
            || !config
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Invalid(format!(
                "SCHOLIA_NATS_PREFIX must be letters, digits, '-' or '_', not {:?}",
                config.prefix
            )));
        }
        let (reconnected, _) = broadcast::channel(16);
        let notify = reconnected.clone();
        let client = async_nats::ConnectOptions::new()
            .name("scholia")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let notify = notify.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("Connected to NATS");
                            let _ = notify.send(());
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("Disconnected from NATS; retrying")
                        }
                        other => tracing::debug!(event = %other, "NATS connection event"),
                    }
                }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| Error::Invalid(format!("cannot use NATS at {}: {e}", config.url)))?;
        let js = jetstream::new(client.clone());
        let stream_name = config.prefix.to_uppercase().replace('-', "_");
        let bus = NatsBus {
            client,
            js,
            config,
            stream_name,
            last_published: Arc::new(Mutex::new(None)),
            reconnected,
        };
        if let Err(error) = bus.ensure_stream().await {
            tracing::warn!(error = %error, "NATS stream not ready yet; the relay will retry");
        }
        Ok(bus)
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    fn subject(&self, type_name: &str) -> String {
        format!("{}.{}", self.config.prefix, type_name)
    }

    fn filter_subject(&self, filter: &EventFilter) -> String {
        match filter {
            EventFilter::All => format!("{}.>", self.config.prefix),
            EventFilter::Family(family) => format!("{}.{family}.>", self.config.prefix),
            EventFilter::One(ty) => self.subject(ty.as_str()),
        }
    }

    async fn ensure_stream(&self) -> Result<stream::Stream> {
        let config = stream::Config {
            name: self.stream_name.clone(),
            subjects: vec![format!("{}.>", self.config.prefix)],
            discard: stream::DiscardPolicy::Old,
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: self.config.max_age,
            max_bytes: self.config.max_bytes,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.js.create_or_update_stream(config).await.map_err(|e| {
            Error::unavailable("the bus", format!("stream {}: {e}", self.stream_name))
        })?;
        self.js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| Error::unavailable("the bus", format!("stream {}: {e}", self.stream_name)))
    }

    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    fn decode(payload: &[u8]) -> Option<LoggedEvent> {
        match serde_json::from_slice(payload) {
            Ok(event) => Some(event),
            Err(error) => {
                tracing::warn!(error = %error, "Ignored a bus message that is not a Scholia event");
                None
            }
        }
    }

    fn forget_chain(&self) {
        *self.last_published.lock().expect("chain lock") = None;
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, events: &[LoggedEvent]) -> Published {
        let max_payload = self.max_payload();
        let mut previous = *self.last_published.lock().expect("chain lock");
        let mut pending = Vec::with_capacity(events.len());
        let mut refused = None;
        for event in events {
            let payload = Bytes::from(serde_json::to_vec(event).expect("events serialize"));
            // Headers and subject take a little room of their own.
            if payload.len() + 512 > max_payload {
                refused = Some(PublishError {
                    seq: event.seq,
                    transient: false,
                    message: format!(
                        "event {} ({}) is {} bytes, more than the bus takes ({max_payload} bytes)",
                        event.seq,
                        event.body.event_type().as_str(),
                        payload.len()
                    ),
                });
                break;
            }
            let mut message = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(event.seq.to_string());
            if let Some(previous) = previous {
                message = message.expected_last_message_id(previous.to_string());
            }
            match self
                .js
                .send_publish(self.subject(event.body.event_type().as_str()), message)
                .await
            {
                Ok(ack) => pending.push(ack),
                Err(error) => {
                    self.forget_chain();
                    return Published {
                        count: 0,
                        error: Some(PublishError {
                            seq: event.seq,
                            transient: true,
                            message: format!("publishing seq {}: {error}", event.seq),
                        }),
                    };
                }
            }
            previous = Some(event.seq);
        }
        let mut done = 0;
        for (event, ack) in events.iter().zip(pending) {
            match ack.await {
                Ok(_) => {
                    done += 1;
                    *self.last_published.lock().expect("chain lock") = Some(event.seq);
                }
                Err(error) => {
                    // Whatever follows was chained to this event and is refused too.
                    self.forget_chain();
                    if let Err(stream_error) = self.ensure_stream().await {
                        tracing::debug!(error = %stream_error, "Stream check failed");
                    }
                    return Published {
                        count: done,
                        error: Some(PublishError {
                            seq: event.seq,
                            transient: true,
                            message: format!("storing seq {}: {error}", event.seq),
                        }),
                    };
                }
            }
        }
        Published {
            count: done,
            error: refused,
        }
    }

    async fn subscribe(&self, filter: EventFilter) -> Result<Subscription> {
        let sub = self
            .client
            .subscribe(self.filter_subject(&filter))
            .await
            .map_err(|e| Error::unavailable("the bus", format!("subscribing: {e}")))?;
        Ok(Subscription::new(FanoutSource {
            sub,
            reconnected: self.reconnected.subscribe(),
        }))
    }

    async fn queue(&self, group: &str, filter: EventFilter) -> Result<Subscription> {
        let durable = format!(
            "{}_{}",
            self.stream_name,
            group.replace(['.', '*', '>', ' '], "_")
        );
        Ok(Subscription::new(QueueSource {
            bus: self.clone(),
            filter_subject: self.filter_subject(&filter),
            durable,
            messages: None,
            backoff: Duration::from_millis(200),
        }))
    }

    async fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}

struct FanoutSource {
    sub: async_nats::Subscriber,
    reconnected: broadcast::Receiver<()>,
}

#[async_trait]
impl Source for FanoutSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            tokio::select! {
                message = self.sub.next() => match message {
                    Some(message) => match NatsBus::decode(&message.payload) {
                        Some(event) => return Some(Delivery::Event(Arc::new(event), Acker::noop())),
                        None => continue,
                    },
                    None => return None,
                },
                // Whatever was published while we were away is gone for us.
                reconnected = self.reconnected.recv() => match reconnected {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => return Some(Delivery::Lagged),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            }
        }
    }
}

struct QueueSource {
    bus: NatsBus,
    filter_subject: String,
    durable: String,
    messages: Option<consumer::pull::Stream>,
    backoff: Duration,
}

impl QueueSource {
    async fn open(&self) -> Result<consumer::pull::Stream> {
        let stream = self.bus.ensure_stream().await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.durable,
                consumer::pull::Config {
                    durable_name: Some(self.durable.clone()),
                    filter_subject: self.filter_subject.clone(),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 1_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                Error::unavailable("the bus", format!("consumer {}: {e}", self.durable))
            })?;
        consumer
            .messages()
            .await
            .map_err(|e| Error::unavailable("the bus", format!("consumer {}: {e}", self.durable)))
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl Source for QueueSource {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let messages = match &mut self.messages {
                Some(messages) => messages,
                None => match self.open().await {
                    Ok(messages) => {
                        self.backoff = Duration::from_millis(200);
                        self.messages.insert(messages)
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, group = %self.durable, "Work queue not ready; retrying");
                        self.pause().await;
                        continue;
                    }
                },
            };
            match messages.next().await {
                Some(Ok(message)) => {
                    let (message, acker) = message.split();
                    match NatsBus::decode(&message.payload) {
                        Some(event) => {
                            let acker = Acker(AckerInner::Nats(Box::new(acker)));
                            return Some(Delivery::Event(Arc::new(event), acker));
                        }
                        None => {
                            let _ = acker.ack().await;
                        }
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, group = %self.durable, "Work queue read failed; reopening it");
                    self.messages = None;
                    self.pause().await;
                }
                None => {
                    self.messages = None;
                    self.pause().await;
                }
            }
        }
    }
}
