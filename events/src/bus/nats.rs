//! The NATS JetStream bus of the production deployment.
//!
//! One stream per deployment, named after the subject prefix in capitals, capturing
//! `<prefix>.>` with `discard: new` (a full stream refuses new events, and the relay
//! retries, instead of silently dropping old ones). Each event is published to
//! `<prefix>.<type>` with `Nats-Msg-Id` set to its `seq`, so a relay that publishes again
//! after a crash is deduplicated, and with `Nats-Expected-Last-Msg-Id` chaining each
//! event to the previous one, so the stream never holds them out of order.
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
use tokio::sync::{broadcast, mpsc};

use super::{Acker, AckerInner, Bus, Delivery, EventFilter, Subscription};
use crate::error::{Error, Result};
use crate::event::LoggedEvent;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// Subject prefix; the stream is named after it in capitals.
    pub prefix: String,
    /// The most the stream keeps, in bytes (JetStream reserves it up front); when full it
    /// refuses new events and the relay retries.
    pub max_bytes: i64,
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
            return Err(Error::Config(format!(
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
            .map_err(|e| Error::Config(format!("cannot use NATS at {}: {e}", config.url)))?;
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

    pub fn subject(&self, type_name: &str) -> String {
        format!("{}.{}", self.config.prefix, type_name)
    }

    fn filter_subject(&self, filter: &EventFilter) -> String {
        match filter.0.as_str() {
            "*" => format!("{}.>", self.config.prefix),
            f => match f.strip_suffix(".*") {
                Some(family) => format!("{}.{family}.>", self.config.prefix),
                None => self.subject(f),
            },
        }
    }

    async fn ensure_stream(&self) -> Result<stream::Stream> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream_name.clone(),
                subjects: vec![format!("{}.>", self.config.prefix)],
                discard: stream::DiscardPolicy::New,
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(7 * 24 * 3600),
                max_bytes: self.config.max_bytes,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::bus(format!("creating stream {}: {e}", self.stream_name)))
    }

    fn payload(event: &LoggedEvent) -> Bytes {
        Bytes::from(serde_json::to_vec(event).expect("events always serialize"))
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
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, events: &[LoggedEvent]) -> (usize, Result<()>) {
        let mut previous = *self.last_published.lock().expect("lock");
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let mut message = jetstream::message::PublishMessage::build()
                .payload(Self::payload(event))
                .message_id(event.seq.to_string());
            if let Some(previous) = previous {
                message = message.expected_last_message_id(previous.to_string());
            }
            match self
                .js
                .send_publish(self.subject(event.body.type_name()), message)
                .await
            {
                Ok(ack) => pending.push(ack),
                Err(error) => {
                    pending.clear();
                    *self.last_published.lock().expect("lock") = None;
                    return (
                        0,
                        Err(Error::bus(format!("publishing seq {}: {error}", event.seq))),
                    );
                }
            }
            previous = Some(event.seq);
        }
        let mut done = 0;
        for (event, ack) in events.iter().zip(pending) {
            match ack.await {
                Ok(_) => {
                    done += 1;
                    *self.last_published.lock().expect("lock") = Some(event.seq);
                }
                Err(error) => {
                    // Whatever follows was chained to this event and is refused too.
                    *self.last_published.lock().expect("lock") = None;
                    if let Err(stream_error) = self.ensure_stream().await {
                        tracing::debug!(error = %stream_error, "Stream check failed");
                    }
                    return (
                        done,
                        Err(Error::bus(format!("storing seq {}: {error}", event.seq))),
                    );
                }
            }
        }
        (done, Ok(()))
    }

    async fn subscribe(&self, filter: EventFilter) -> Result<Subscription> {
        let mut sub = self
            .client
            .subscribe(self.filter_subject(&filter))
            .await
            .map_err(|e| Error::bus(format!("subscribing: {e}")))?;
        let mut reconnected = self.reconnected.subscribe();
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    message = sub.next() => match message {
                        Some(message) => match Self::decode(&message.payload) {
                            Some(event) => Delivery::Event(event, Acker::noop()),
                            None => continue,
                        },
                        None => return,
                    },
                    // Whatever was published while we were away is gone for us.
                    Ok(()) = reconnected.recv() => Delivery::Lagged,
                };
                if tx.send(delivery).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::new(out))
    }

    async fn queue(&self, group: &str, filter: EventFilter) -> Result<Subscription> {
        let (tx, out) = mpsc::channel(1);
        let bus = self.clone();
        let durable = format!(
            "{}_{}",
            self.stream_name,
            group.replace(['.', '*', '>', ' '], "_")
        );
        let filter_subject = self.filter_subject(&filter);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                if tx.is_closed() {
                    return;
                }
                let messages = async {
                    let stream = bus.ensure_stream().await?;
                    let consumer: consumer::PullConsumer = stream
                        .get_or_create_consumer(
                            &durable,
                            consumer::pull::Config {
                                durable_name: Some(durable.clone()),
                                filter_subject: filter_subject.clone(),
                                deliver_policy: consumer::DeliverPolicy::New,
                                ack_policy: consumer::AckPolicy::Explicit,
                                ack_wait: Duration::from_secs(60),
                                max_ack_pending: 1_000,
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(|e| Error::bus(format!("creating consumer {durable}: {e}")))?;
                    consumer
                        .messages()
                        .await
                        .map_err(|e| Error::bus(format!("reading consumer {durable}: {e}")))
                }
                .await;
                let mut messages = match messages {
                    Ok(messages) => messages,
                    Err(error) => {
                        tracing::warn!(error = %error, group = %durable, "Work queue not ready; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                backoff = Duration::from_millis(200);
                while let Some(message) = messages.next().await {
                    let message = match message {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(error = %error, group = %durable, "Work queue read failed");
                            break;
                        }
                    };
                    let (message, acker) = message.split();
                    let Some(event) = Self::decode(&message.payload) else {
                        let _ = acker.ack().await;
                        continue;
                    };
                    let delivery = Delivery::Event(event, Acker(AckerInner::Nats(Box::new(acker))));
                    if tx.send(delivery).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(backoff).await;
            }
        });
        Ok(Subscription::new(out))
    }

    async fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}
