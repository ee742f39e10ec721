//! The websocket wire protocol (RFC 6455), server side, written for many idle sockets
//! and one message sent to thousands of them.
//!
//! A socket costs its TCP stream, two small tasks and its outbox of shared buffers: no
//! read or write buffer lives while it idles. A message goes out as one frame, its header
//! and the shared payload in one vectored write, so fan-out copies nothing per socket.
//! What is read is bounded: a client message (all its fragments) of at most
//! `max_message` bytes, control frames of at most 125; clients must mask their frames.
//! Pings are answered, a close is answered and ends the socket.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use scholia_http::ApiError;

/// Added to the client's key to make the accept header (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A websocket handshake, checked: what the upgrade needs to answer `101`.
pub(crate) struct Handshake {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let refuse = || {
            ApiError::bad_request(
                "This endpoint speaks the websocket protocol; connect with a websocket client (GET with Upgrade: websocket).",
            )
        };
        let headers = &parts.headers;
        let has_token = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(token))
                })
            })
        };
        if parts.method != Method::GET
            || !has_token(header::CONNECTION, "upgrade")
            || !has_token(header::UPGRADE, "websocket")
            || headers
                .get(header::SEC_WEBSOCKET_VERSION)
                .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(refuse());
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|key| is_nonce(key.as_bytes()))
            .ok_or_else(refuse)?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or_else(refuse)?;
        Ok(Handshake {
            accept: accept_key(key.as_bytes()),
            on_upgrade,
        })
    }
}

/// Whether `key` is 16 bytes in base64, as RFC 6455 asks of `Sec-WebSocket-Key`: 22
/// characters of the alphabet and `==` (whatever the last character's unused bits are).
fn is_nonce(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn accept_key(key: &[u8]) -> HeaderValue {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    HeaderValue::from_str(&accept).expect("base64 is a valid header value")
}

impl Handshake {
    /// Answer `101` and, once the connection is switched, run `serve` on it.
    pub(crate) fn upgrade<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(Box<dyn Io>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(Box::new(TokioIo::new(upgraded))).await,
                Err(error) => tracing::debug!(%error, "A websocket upgrade did not complete"),
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers: &mut HeaderMap = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        response
    }
}

/// The connection a switched socket runs on.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What a client sent.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    Text(String),
    Binary,
    /// The client closed (or must be closed): answer with this close code, then end.
    Close(u16),
}

/// Reads a client's frames; answers to pings go to `outbox`.
pub(crate) struct Reader<R> {
    io: R,
    max_message: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub(crate) fn new(io: R, max_message: usize) -> Self {
        Reader { io, max_message }
    }

    /// The next message; `None` when the connection ended without a close.
    pub(crate) async fn next(&mut self, outbox: &Outbox) -> Option<Incoming> {
        let mut message: Vec<u8> = Vec::new();
        let mut kind: Option<u8> = None;
        loop {
            let mut head = [0u8; 2];
            self.io.read_exact(&mut head).await.ok()?;
            let fin = head[0] & 0x80 != 0;
            let opcode = head[0] & 0x0F;
            if head[0] & 0x70 != 0 || head[1] & 0x80 == 0 {
                // Reserved bits without an extension, or an unmasked client frame.
                return Some(Incoming::Close(1002));
            }
            let len = match head[1] & 0x7F {
                126 => {
                    let mut b = [0u8; 2];
                    self.io.read_exact(&mut b).await.ok()?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.io.read_exact(&mut b).await.ok()?;
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let control = opcode & 0x8 != 0;
            if control && (len > 125 || !fin) {
                return Some(Incoming::Close(1002));
            }
            if !control && message.len() as u64 + len > self.max_message as u64 {
                return Some(Incoming::Close(1009));
            }
            let mut mask = [0u8; 4];
            self.io.read_exact(&mut mask).await.ok()?;
            let mut payload = vec![0u8; len as usize];
            self.io.read_exact(&mut payload).await.ok()?;
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
            match opcode {
                PING => outbox.push_control(PONG, Bytes::from(payload)),
                PONG => {}
                CLOSE => {
                    let code = match payload.get(..2) {
                        Some(code) => u16::from_be_bytes([code[0], code[1]]),
                        None => 1000,
                    };
                    // Codes a peer may not send are answered as a protocol error.
                    let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
                    return Some(Incoming::Close(if valid { 1000 } else { 1002 }));
                }
                TEXT | BINARY if kind.is_none() => {
                    kind = Some(opcode);
                    message.extend_from_slice(&payload);
                }
                CONTINUATION if kind.is_some() => message.extend_from_slice(&payload),
                _ => return Some(Incoming::Close(1002)),
            }
            if !control && fin {
                return Some(match kind {
                    Some(TEXT) => match String::from_utf8(message) {
                        Ok(text) => Incoming::Text(text),
                        Err(_) => Incoming::Close(1007),
                    },
                    _ => Incoming::Binary,
                });
            }
        }
    }
}

/// One frame waiting to go out.
struct Frame {
    opcode: u8,
    payload: Bytes,
}

/// A socket's outgoing frames, bounded: messages share their buffers with every other
/// socket they go to.
pub(crate) struct Outbox {
    queue: Mutex<VecDeque<Frame>>,
    capacity: usize,
    /// Something was queued.
    ready: Notify,
    /// Something was taken out.
    space: Notify,
    closed: AtomicBool,
    /// The writer stopped: nothing more goes out.
    finished: AtomicBool,
    done: Notify,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            ready: Notify::new(),
            space: Notify::new(),
            closed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            done: Notify::new(),
        }
    }

    /// Queue a text message without waiting; false when the queue is full (the message
    /// is dropped) or the socket is closed.
    pub(crate) fn offer(&self, text: Bytes) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut queue = self.queue.lock().expect("outbox lock");
        if queue.len() >= self.capacity {
            return false;
        }
        queue.push_back(Frame {
            opcode: TEXT,
            payload: text,
        });
        drop(queue);
        self.ready.notify_one();
        true
    }

    /// Queue a text message, waiting for room.
    pub(crate) async fn send(&self, text: Bytes) {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            {
                let mut queue = self.queue.lock().expect("outbox lock");
                if queue.len() < self.capacity {
                    queue.push_back(Frame {
                        opcode: TEXT,
                        payload: text,
                    });
                    drop(queue);
                    self.ready.notify_one();
                    return;
                }
            }
            space.await;
        }
    }

    /// A control frame goes out whatever the queue holds.
    fn push_control(&self, opcode: u8, payload: Bytes) {
        self.queue
            .lock()
            .expect("outbox lock")
            .push_back(Frame { opcode, payload });
        self.ready.notify_one();
    }

    /// Queue the close frame; nothing is queued after it.
    pub(crate) fn close(&self, code: u16) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.push_control(CLOSE, Bytes::copy_from_slice(&code.to_be_bytes()));
        }
        self.space.notify_waiters();
    }

    /// Resolves once the writer has stopped.
    pub(crate) async fn finished(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.finished.load(Ordering::Acquire) {
                return;
            }
            done.await;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.lock().expect("outbox lock").is_empty()
    }

    /// Up to `max` frames, waiting for at least one: a writer that fell behind sends what
    /// piled up in one write.
    async fn next_batch(&self, max: usize, into: &mut Vec<Frame>) {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            {
                let mut queue = self.queue.lock().expect("outbox lock");
                if !queue.is_empty() {
                    let was_full = queue.len() >= self.capacity;
                    let n = queue.len().min(max);
                    into.extend(queue.drain(..n));
                    if queue.is_empty() && queue.capacity() > 16 {
                        queue.shrink_to(4);
                    }
                    drop(queue);
                    // Only a full queue has senders waiting for room.
                    if was_full {
                        self.space.notify_waiters();
                    }
                    return;
                }
            }
            ready.await;
        }
    }

    /// The next frame, waiting for one.
    #[cfg(test)]
    async fn next(&self) -> Frame {
        let mut one = Vec::with_capacity(1);
        self.next_batch(1, &mut one).await;
        one.pop().expect("next_batch gives at least one frame")
    }
}

/// Write what `outbox` holds until it is closed or the peer stops taking frames within
/// `timeout`; `after_each` runs when the outbox has just emptied.
pub(crate) async fn write_out<W: AsyncWrite + Unpin>(
    io: &mut W,
    outbox: &Outbox,
    timeout: std::time::Duration,
    mut after_each: impl FnMut(),
) {
    let mut frames = Vec::with_capacity(WRITE_BATCH);
    loop {
        frames.clear();
        outbox.next_batch(WRITE_BATCH, &mut frames).await;
        let written = tokio::time::timeout(timeout, write_frames(io, &frames));
        if !matches!(written.await, Ok(Ok(()))) {
            break;
        }
        if frames.iter().any(|f| f.opcode == CLOSE) {
            break;
        }
        if outbox.is_empty() {
            after_each();
        }
    }
    outbox.closed.store(true, Ordering::Relaxed);
    outbox.space.notify_waiters();
    let _ = tokio::time::timeout(timeout, io.shutdown()).await;
    outbox.finished.store(true, Ordering::Release);
    outbox.done.notify_waiters();
}

/// The most frames one write sends.
const WRITE_BATCH: usize = 16;

/// Unmasked, final frames, their headers and payloads in one vectored write (or as few as
/// the connection takes).
async fn write_frames<W: AsyncWrite + Unpin>(io: &mut W, frames: &[Frame]) -> std::io::Result<()> {
    let heads: Vec<([u8; 10], usize)> = frames
        .iter()
        .map(|f| frame_head(f.opcode, f.payload.len()))
        .collect();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() * 2);
    for (frame, (head, len)) in frames.iter().zip(&heads) {
        slices.push(IoSlice::new(&head[..*len]));
        slices.push(IoSlice::new(&frame.payload));
    }
    let mut rest = &mut slices[..];
    while rest.iter().any(|s| !s.is_empty()) {
        let written = io.write_vectored(rest).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    io.flush().await
}

/// A frame's header: final, unmasked, and its length; the bytes and how many are used.
fn frame_head(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode;
    let used = match len {
        n @ 0..=125 => {
            head[1] = n as u8;
            2
        }
        n @ 126..=0xFFFF => {
            head[1] = 126;
            head[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            head[1] = 127;
            head[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    (head, used)
}

/// One unmasked, final frame.
#[cfg(test)]
async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let frame = Frame {
        opcode,
        payload: Bytes::copy_from_slice(payload),
    };
    write_frames(io, std::slice::from_ref(&frame)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's frames in `bytes`, as (opcode, payload).
    fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0] & 0x80, 0x80, "final");
            assert_eq!(bytes[1] & 0x80, 0, "unmasked");
            let (len, at) = match bytes[1] & 0x7f {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push((bytes[0] & 0x0f, bytes[at..at + len].to_vec()));
            bytes = &bytes[at + len..];
        }
        out
    }

    #[tokio::test]
    async fn frames_that_piled_up_go_out_in_one_write_each_whole() {
        let outbox = Outbox::new(8);
        let sizes = [5usize, 300, 70_000];
        for (i, n) in sizes.iter().enumerate() {
            assert!(outbox.offer(Bytes::from(vec![b'a' + i as u8; *n])));
        }
        let mut frames = Vec::new();
        outbox.next_batch(WRITE_BATCH, &mut frames).await;
        assert_eq!(frames.len(), 3, "all three at once");
        assert!(outbox.is_empty());
        let mut wire: Vec<u8> = Vec::new();
        write_frames(&mut wire, &frames).await.unwrap();
        let read = server_frames(&wire);
        assert_eq!(read.len(), 3);
        for (i, ((opcode, payload), n)) in read.iter().zip(sizes).enumerate() {
            assert_eq!(*opcode, TEXT);
            assert_eq!(payload.len(), n);
            assert!(payload.iter().all(|b| *b == b'a' + i as u8));
        }
    }

    /// A client frame: masked, as clients must send.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [7u8, 1, 200, 33];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> (Vec<Incoming>, Outbox) {
        let outbox = Outbox::new(8);
        let mut reader = Reader::new(std::io::Cursor::new(bytes), max);
        let mut out = Vec::new();
        while let Some(message) = reader.next(&outbox).await {
            let close = matches!(message, Incoming::Close(_));
            out.push(message);
            if close {
                break;
            }
        }
        (out, outbox)
    }

    #[tokio::test]
    async fn fragments_and_pings_between_them_make_one_message() {
        let mut bytes = client_frame(false, TEXT, b"{\"op\":");
        bytes.extend(client_frame(true, PING, b"hi"));
        bytes.extend(client_frame(true, CONTINUATION, "\"é\"}".as_bytes()));
        bytes.extend(client_frame(true, CLOSE, &1000u16.to_be_bytes()));
        let (messages, outbox) = read_all(bytes, 1024).await;
        assert_eq!(
            messages,
            [
                Incoming::Text("{\"op\":\"é\"}".into()),
                Incoming::Close(1000)
            ]
        );
        let pong = outbox.next().await;
        assert_eq!((pong.opcode, &pong.payload[..]), (PONG, &b"hi"[..]));
    }

    #[tokio::test]
    async fn too_large_unmasked_or_invalid_text_closes_with_the_right_code() {
        let (m, _) = read_all(client_frame(true, TEXT, &[b'a'; 2000]), 1024).await;
        assert_eq!(m, [Incoming::Close(1009)]);
        let mut unmasked = client_frame(true, TEXT, b"x");
        unmasked[1] &= 0x7F;
        let (m, _) = read_all(unmasked, 1024).await;
        assert_eq!(m, [Incoming::Close(1002)]);
        let (m, _) = read_all(client_frame(true, TEXT, &[0xff, 0xfe]), 1024).await;
        assert_eq!(m, [Incoming::Close(1007)]);
        let (m, _) = read_all(client_frame(true, CONTINUATION, b"x"), 1024).await;
        assert_eq!(m, [Incoming::Close(1002)]);
        // A connection that just ends is no message.
        let (m, _) = read_all(client_frame(true, TEXT, b"abc")[..4].to_vec(), 1024).await;
        assert!(m.is_empty());
    }

    #[tokio::test]
    async fn frames_of_every_length_class_are_written_whole() {
        for len in [0usize, 125, 126, 65_535, 65_536, 300_000] {
            let payload = vec![b'x'; len];
            let mut out = Vec::new();
            write_frame(&mut out, TEXT, &payload).await.unwrap();
            let head = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), head + len);
            assert_eq!(out[0], 0x81);
            assert_eq!(&out[head..], &payload[..]);
        }
    }

    #[test]
    fn a_nonce_is_sixteen_bytes_in_base64() {
        assert!(is_nonce(b"dGhlIHNhbXBsZSBub25jZQ=="));
        // Unused bits set in the last character: still 16 bytes.
        assert!(is_nonce(b"AAAAAAAAAAAAAAAAAAAAAB=="));
        for bad in [
            &b"dGhlIHNhbXBsZSBub25jZQ="[..],
            b"dGhlIHNhbXBsZSBub25jZQ=x",
            b"dGhlIHNhbXBsZSBub25jZ-==",
        ] {
            assert!(!is_nonce(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_offers_and_a_closed_one_everything() {
        let outbox = Outbox::new(2);
        assert!(outbox.offer(Bytes::from_static(b"1")));
        assert!(outbox.offer(Bytes::from_static(b"2")));
        assert!(!outbox.offer(Bytes::from_static(b"3")));
        outbox.close(1000);
        assert!(!outbox.offer(Bytes::from_static(b"4")));
        let frames: Vec<u8> = [
            outbox.next().await,
            outbox.next().await,
            outbox.next().await,
        ]
        .iter()
        .map(|f| f.opcode)
        .collect();
        assert_eq!(frames, [TEXT, TEXT, CLOSE]);
    }
}
