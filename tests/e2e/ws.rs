//! A websocket client for the tests: JSON messages read with deadlines.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Request;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::helpers::TestApp;

/// How long anything the server owes a client may take (builds included).
pub const SOON: Duration = Duration::from_secs(30);

/// A websocket client that reads JSON messages with deadlines.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(app: &TestApp, token: &str) -> Ws {
        let request = app
            .ws_url(&format!("/v1/ws?token={token}"))
            .into_client_request()
            .unwrap();
        Ws::connect_request(request).await
    }

    pub async fn connect_request(request: Request<()>) -> Ws {
        match tokio::time::timeout(SOON, connect_async(request)).await {
            Ok(Ok((stream, response))) => {
                assert_eq!(response.status().as_u16(), 101);
                Ws { stream }
            }
            Ok(Err(e)) => panic!("the websocket upgrade failed: {e}"),
            Err(_) => panic!("the websocket upgrade took more than {SOON:?}"),
        }
    }

    pub async fn send(&mut self, message: Value) {
        self.stream
            .send(Message::text(message.to_string()))
            .await
            .expect("sending a websocket message");
    }

    pub async fn subscribe(&mut self, id: &str, analysis: &str, from: &str, to: &str) {
        self.send(
            json!({"op": "subscribe", "id": id, "analysis": analysis, "from": from, "to": to}),
        )
        .await;
    }

    /// The next JSON message before `deadline`, or why there is none.
    pub async fn next_before(&mut self, deadline: tokio::time::Instant) -> Result<Value, String> {
        loop {
            let message = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(message) => message,
                Err(_) => return Err("no message in time".into()),
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("a server message is not JSON ({e}): {text}")));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_))) => panic!("the server sent a binary message"),
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("the server closed the socket: {frame:?}"));
                }
                Some(Err(e)) => return Err(format!("the socket failed: {e}")),
                None => return Err("the socket ended".into()),
            }
        }
    }

    /// The next JSON message, within `within`; panics on a timeout or a closed socket.
    pub async fn next(&mut self, within: Duration) -> Value {
        match self.next_before(tokio::time::Instant::now() + within).await {
            Ok(message) => message,
            Err(why) => panic!("waiting {within:?} for a websocket message: {why}"),
        }
    }

    /// Read until a message satisfies `wanted`, within `within`; returns it and the
    /// messages before it.
    pub async fn until(
        &mut self,
        within: Duration,
        what: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut before = Vec::new();
        loop {
            match self.next_before(deadline).await {
                Ok(message) if wanted(&message) => return (message, before),
                Ok(message) => before.push(message),
                Err(why) => {
                    panic!("waiting {within:?} for {what}: {why}; received meanwhile: {before:#?}")
                }
            }
        }
    }

    /// Every message that arrives within `within` (a bounded wait for silence).
    pub async fn drain_for(&mut self, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return out,
                Ok(Some(Ok(Message::Text(text)))) => {
                    out.push(serde_json::from_str(text.as_str()).unwrap())
                }
                Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => {
                    panic!("the socket closed; received: {out:#?}")
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Whether the server ends the socket within `within` (messages before the end are
    /// skipped).
    pub async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}
