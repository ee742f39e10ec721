//! The websocket wire protocol (RFC 6455), server side, written for many idle sockets
//! and one message sent to thousands of them.
//!
//! A socket costs its TCP stream, two small tasks and its outbox of shared buffers: no
//! read or write buffer lives while it idles. A message goes out as one frame, its header
//! and the shared payload in one vectored write, so fan-out copies nothing per socket;
//! the writes are made by a few flusher tasks for every socket, so it wakes no task per
//! socket either, unless a connection cannot take its write at once.
//! What is read is bounded: a client message (all its fragments) of at most
//! `max_message` bytes, control frames of at most 125; clients must mask their frames.
//! Pings are answered, a close is answered and ends the socket.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

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

impl Frame {
    /// Its length on the wire, header included.
    fn wire_len(&self) -> usize {
        frame_head(self.opcode, self.payload.len()).1 + self.payload.len()
    }
}

/// The writing half of a socket's connection.
pub(crate) trait Sink: AsyncWrite + Send + Unpin {}
impl<T: AsyncWrite + Send + Unpin> Sink for T {}

/// What to send once a socket's queue has emptied after it refused a message (the
/// client missed something and is told so).
pub(crate) type OnRecovered = Box<dyn Fn(&Outbox) + Send + Sync>;

/// A socket's outgoing frames and its connection's writing half.
struct State {
    queue: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    written: usize,
    /// The connection, while no one is writing to it.
    io: Option<Box<dyn Sink>>,
    /// In the flusher's list.
    scheduled: bool,
    /// The socket's own writer task writes until the queue is empty: the connection did
    /// not take everything at once, or a close is queued.
    handed_over: bool,
}

/// A socket's outgoing frames, bounded: messages share their buffers with every other
/// socket they go to.
///
/// Frames are written by the [`Flusher`]'s few tasks, one vectored write per socket that
/// does not wait, so a fan-out to thousands of sockets wakes no task per socket. A
/// connection that cannot take a write at once is handed to the socket's own writer task
/// ([`Outbox::write_out`]), which waits for it, up to its timeout, until the queue is
/// empty again.
pub(crate) struct Outbox {
    state: Mutex<State>,
    capacity: usize,
    me: Weak<Outbox>,
    flusher: Arc<Flusher>,
    /// Wakes the socket's own writer task.
    handover: Notify,
    /// Something was taken out.
    space: Notify,
    closed: AtomicBool,
    /// A message was refused since the queue last emptied.
    lagged: AtomicBool,
    on_recovered: OnRecovered,
    /// The writer stopped: nothing more goes out.
    finished: AtomicBool,
    done: Notify,
}

impl Outbox {
    pub(crate) fn new(
        capacity: usize,
        io: Box<dyn Sink>,
        flusher: Arc<Flusher>,
        on_recovered: OnRecovered,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                written: 0,
                io: Some(io),
                scheduled: false,
                handed_over: false,
            }),
            capacity,
            me: me.clone(),
            flusher,
            handover: Notify::new(),
            space: Notify::new(),
            closed: AtomicBool::new(false),
            lagged: AtomicBool::new(false),
            on_recovered,
            finished: AtomicBool::new(false),
            done: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock")
    }

    /// Queue `frame`, and give the flusher the socket unless a write is on its way
    /// already (whoever holds the connection looks at the queue before giving it back).
    fn enqueue(&self, mut state: std::sync::MutexGuard<'_, State>, frame: Frame) {
        state.queue.push_back(frame);
        let schedule = !(state.scheduled || state.handed_over || state.io.is_none());
        state.scheduled |= schedule;
        drop(state);
        if schedule {
            self.schedule();
        }
    }

    fn schedule(&self) {
        if let Some(me) = self.me.upgrade() {
            self.flusher.schedule(me);
        }
    }

    /// Queue a text message without waiting; false when the queue is full (the message
    /// is dropped, and the client is told once the queue has emptied) or the socket is
    /// closed.
    pub(crate) fn offer(&self, text: Bytes) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let queued = self.offer_if_room(text).is_ok();
        if !queued {
            self.lagged.store(true, Ordering::Relaxed);
        }
        queued
    }

    /// Queue a text message, waiting for room.
    pub(crate) async fn send(&self, mut text: Bytes) {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            match self.offer_if_room(text) {
                Ok(()) => return,
                Err(back) => text = back,
            }
            space.await;
        }
    }

    /// Queue `text` if the queue has room; it comes back when there is none.
    fn offer_if_room(&self, text: Bytes) -> Result<(), Bytes> {
        let state = self.lock();
        if state.queue.len() >= self.capacity {
            return Err(text);
        }
        self.enqueue(
            state,
            Frame {
                opcode: TEXT,
                payload: text,
            },
        );
        Ok(())
    }

    /// A control frame goes out whatever the queue holds.
    fn push_control(&self, opcode: u8, payload: Bytes) {
        self.enqueue(self.lock(), Frame { opcode, payload });
    }

    /// Queue the close frame; nothing is queued after it. The socket's own writer sends
    /// what is queued, then the close, and ends the connection.
    pub(crate) fn close(&self, code: u16) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            let mut state = self.lock();
            state.queue.push_back(Frame {
                opcode: CLOSE,
                payload: Bytes::copy_from_slice(&code.to_be_bytes()),
            });
            state.handed_over = true;
            drop(state);
            self.handover.notify_one();
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

    /// Take up to [`WRITE_BATCH`] frames into `frames` with the bytes of the first one
    /// already written, and let senders waiting for room know.
    fn take_batch(&self, state: &mut State, frames: &mut Vec<Frame>) -> usize {
        let was_full = state.queue.len() >= self.capacity;
        let n = state.queue.len().min(WRITE_BATCH);
        frames.extend(state.queue.drain(..n));
        if state.queue.is_empty() && state.queue.capacity() > 16 {
            state.queue.shrink_to(4);
        }
        // Only a full queue has senders waiting for room.
        if was_full {
            self.space.notify_waiters();
        }
        std::mem::take(&mut state.written)
    }

    /// The queue emptied: if a message was refused since it last did, say so.
    fn drained(&self) {
        if self.lagged.swap(false, Ordering::Relaxed) {
            (self.on_recovered)(self);
        }
    }

    /// Write what is queued without waiting (the flusher's part): as much as the
    /// connection takes; the rest goes to the socket's own writer.
    fn flush_now(&self, frames: &mut Vec<Frame>) {
        let (mut io, skip) = {
            let mut state = self.lock();
            state.scheduled = false;
            if state.handed_over || state.queue.is_empty() {
                return;
            }
            // Someone is writing; they look at the queue before giving the connection back.
            let Some(io) = state.io.take() else {
                return;
            };
            let skip = self.take_batch(&mut state, frames);
            (io, skip)
        };
        let (written, complete) = write_now(&mut io, frames, skip);
        let mut state = self.lock();
        if !complete {
            // Back to the front of the queue, in order, from the first byte not written.
            let (whole, into) = reach(frames, skip + written);
            for frame in frames.drain(whole..).rev() {
                state.queue.push_front(frame);
            }
            state.written = into;
            state.handed_over = true;
        }
        frames.clear();
        state.io = Some(io);
        let handed_over = state.handed_over;
        let reschedule = !handed_over && !state.queue.is_empty() && !state.scheduled;
        state.scheduled |= reschedule;
        let emptied = !handed_over && state.queue.is_empty();
        drop(state);
        if handed_over {
            self.handover.notify_one();
        }
        if reschedule {
            self.schedule();
        }
        if emptied {
            self.drained();
        }
    }

    /// The socket's own writer: while the socket is handed over, write what is queued,
    /// waiting for the connection, until the queue is empty; stop when the connection
    /// fails, takes no frame within `timeout`, or the close went out.
    pub(crate) async fn write_out(&self, timeout: std::time::Duration) {
        // Nothing held while the socket idles: the batch grows, and the write's buffers
        // are boxed, only while there is something to write.
        let mut frames = Vec::new();
        loop {
            let (mut io, skip) = loop {
                let handover = self.handover.notified();
                tokio::pin!(handover);
                handover.as_mut().enable();
                {
                    let mut state = self.lock();
                    if state.handed_over
                        && let Some(io) = state.io.take()
                    {
                        let skip = self.take_batch(&mut state, &mut frames);
                        break (io, skip);
                    }
                }
                handover.await;
            };
            let written =
                tokio::time::timeout(timeout, Box::pin(write_frames(&mut io, &frames, skip)));
            let ok = matches!(written.await, Ok(Ok(())));
            let closing = frames.iter().any(|f| f.opcode == CLOSE);
            frames = Vec::new();
            if !ok || closing {
                let _ = tokio::time::timeout(timeout, io.shutdown()).await;
                break;
            }
            let mut state = self.lock();
            state.io = Some(io);
            let emptied = state.queue.is_empty();
            if emptied {
                state.handed_over = false;
            }
            drop(state);
            if emptied {
                self.drained();
            }
        }
        self.closed.store(true, Ordering::Relaxed);
        self.space.notify_waiters();
        self.finished.store(true, Ordering::Release);
        self.done.notify_waiters();
    }
}

/// Writes the sockets that have frames queued, a few tasks for all of them: a fan-out to
/// 10,000 sockets is 10,000 writes that do not wait, in the order the sockets were given,
/// rather than 10,000 task wake-ups. A socket given again before its turn goes out once,
/// with everything queued by then.
pub(crate) struct Flusher {
    dirty: Mutex<VecDeque<Arc<Outbox>>>,
    work: Notify,
}

/// Sockets a flusher task writes before it lets other tasks run.
const FLUSH_BATCH: usize = 32;

impl Flusher {
    /// A flusher writing with `tasks` tasks of the current runtime.
    pub(crate) fn start(tasks: usize) -> Arc<Flusher> {
        let flusher = Arc::new(Flusher {
            dirty: Mutex::new(VecDeque::new()),
            work: Notify::new(),
        });
        for _ in 0..tasks.max(1) {
            tokio::spawn(Arc::clone(&flusher).run());
        }
        flusher
    }

    fn schedule(&self, outbox: Arc<Outbox>) {
        let was_empty = {
            let mut dirty = self.dirty.lock().expect("flusher lock");
            dirty.push_back(outbox);
            dirty.len() == 1
        };
        // A task that found the list empty waits; busy ones come back to it by themselves.
        if was_empty {
            self.work.notify_one();
        }
    }

    async fn run(self: Arc<Self>) {
        let mut batch: Vec<Arc<Outbox>> = Vec::with_capacity(FLUSH_BATCH);
        let mut frames = Vec::with_capacity(WRITE_BATCH);
        loop {
            let work = self.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            {
                let mut dirty = self.dirty.lock().expect("flusher lock");
                let n = dirty.len().min(FLUSH_BATCH);
                batch.extend(dirty.drain(..n));
                if !dirty.is_empty() {
                    // More than this task's share: another one may take some.
                    self.work.notify_one();
                }
            }
            if batch.is_empty() {
                work.await;
                continue;
            }
            for outbox in batch.drain(..) {
                outbox.flush_now(&mut frames);
            }
            tokio::task::yield_now().await;
        }
    }
}

/// The most frames one write sends.
const WRITE_BATCH: usize = 16;

/// The headers of `frames` (at most [`WRITE_BATCH`]), and the slices of one vectored
/// write of them from byte `skip` on.
fn wire<'a>(
    frames: &'a [Frame],
    heads: &'a mut [([u8; 10], usize); WRITE_BATCH],
    slices: &'a mut [IoSlice<'a>; 2 * WRITE_BATCH],
    skip: usize,
) -> &'a mut [IoSlice<'a>] {
    assert!(
        frames.len() <= WRITE_BATCH,
        "at most WRITE_BATCH frames a write"
    );
    for (head, frame) in heads.iter_mut().zip(frames) {
        *head = frame_head(frame.opcode, frame.payload.len());
    }
    let heads: &'a [([u8; 10], usize); WRITE_BATCH] = heads;
    for (i, (frame, (head, len))) in frames.iter().zip(heads).enumerate() {
        slices[2 * i] = IoSlice::new(&head[..*len]);
        slices[2 * i + 1] = IoSlice::new(&frame.payload);
    }
    let mut rest = &mut slices[..2 * frames.len()];
    IoSlice::advance_slices(&mut rest, skip);
    rest
}

/// Unmasked, final frames, from byte `skip` of the first, their headers and payloads in
/// one vectored write (or as few as the connection takes), waiting for the connection.
async fn write_frames<W: AsyncWrite + Unpin + ?Sized>(
    io: &mut W,
    frames: &[Frame],
    skip: usize,
) -> std::io::Result<()> {
    let mut heads = [([0u8; 10], 0); WRITE_BATCH];
    let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
    let mut rest = wire(frames, &mut heads, &mut slices, skip);
    while rest.iter().any(|s| !s.is_empty()) {
        let written = io.write_vectored(rest).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    io.flush().await
}

/// The same, without waiting: the bytes the connection took, and whether that was all
/// of them (flushed). A failed connection takes nothing more; the socket's own writer
/// finds out and ends it.
fn write_now(io: &mut Box<dyn Sink>, frames: &[Frame], skip: usize) -> (usize, bool) {
    let mut heads = [([0u8; 10], 0); WRITE_BATCH];
    let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
    let mut rest = wire(frames, &mut heads, &mut slices, skip);
    // Nothing waits on this context: a write that would block goes to the writer task,
    // whose own poll registers its waker.
    let mut cx = Context::from_waker(Waker::noop());
    let mut written = 0;
    while rest.iter().any(|s| !s.is_empty()) {
        match Pin::new(&mut *io).poll_write_vectored(&mut cx, rest) {
            Poll::Ready(Ok(n)) if n > 0 => {
                written += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            _ => return (written, false),
        }
    }
    let flushed = matches!(Pin::new(&mut *io).poll_flush(&mut cx), Poll::Ready(Ok(())));
    (written, flushed)
}

/// How far `bytes`, counted from the start of `frames[0]`, reach: the frames written
/// whole, and the bytes written of the next one.
fn reach(frames: &[Frame], mut bytes: usize) -> (usize, usize) {
    let mut whole = 0;
    while let Some(frame) = frames.get(whole) {
        let len = frame.wire_len();
        if bytes < len {
            break;
        }
        bytes -= len;
        whole += 1;
    }
    (whole, bytes)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::io::DuplexStream;

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

    /// An outbox writing into one end of an in-memory pipe that holds `pipe` bytes, its
    /// own writer running; the other end, and how many times it told its client that
    /// messages were missed (it sends `resync` then).
    fn pipe_outbox(capacity: usize, pipe: usize) -> (Arc<Outbox>, DuplexStream, Arc<AtomicUsize>) {
        let (ours, theirs) = tokio::io::duplex(pipe);
        let recovered = Arc::new(AtomicUsize::new(0));
        let count = recovered.clone();
        let on_recovered: OnRecovered = Box::new(move |outbox: &Outbox| {
            count.fetch_add(1, Ordering::Relaxed);
            outbox.offer(Bytes::from_static(b"resync"));
        });
        let outbox = Outbox::new(capacity, Box::new(ours), Flusher::start(1), on_recovered);
        let writer = outbox.clone();
        tokio::spawn(async move { writer.write_out(Duration::from_secs(5)).await });
        (outbox, theirs, recovered)
    }

    /// Everything the other end receives until the connection ends, as frames.
    async fn received(mut theirs: DuplexStream) -> Vec<(u8, Vec<u8>)> {
        let mut bytes = Vec::new();
        theirs.read_to_end(&mut bytes).await.unwrap();
        server_frames(&bytes)
    }

    #[tokio::test]
    async fn frames_go_out_whole_and_in_order_and_the_close_last() {
        let (outbox, theirs, _) = pipe_outbox(8, 1 << 20);
        let sizes = [5usize, 300, 70_000];
        for (i, n) in sizes.iter().enumerate() {
            assert!(outbox.offer(Bytes::from(vec![b'a' + i as u8; *n])));
        }
        outbox.close(1000);
        let read = received(theirs).await;
        assert_eq!(read.len(), 4);
        for (i, ((opcode, payload), n)) in read.iter().zip(sizes).enumerate() {
            assert_eq!(*opcode, TEXT);
            assert_eq!(payload.len(), n);
            assert!(payload.iter().all(|b| *b == b'a' + i as u8));
        }
        assert_eq!(read[3], (CLOSE, 1000u16.to_be_bytes().to_vec()));
        outbox.finished().await;
    }

    #[tokio::test]
    async fn a_connection_that_takes_little_at_a_time_still_gets_every_frame_in_order() {
        // A 64-byte pipe: writes stop midway through frames, and the socket's own writer
        // takes over from the flusher, then gives it back once the queue is empty.
        let (outbox, mut theirs, _) = pipe_outbox(32, 64);
        let payload = |i: usize| Bytes::from(vec![i as u8; i * 37 % 500 + 1]);
        for round in 0..2 {
            let frames: Vec<Bytes> = (round * 10..round * 10 + 10).map(payload).collect();
            for frame in &frames {
                assert!(outbox.offer(frame.clone()));
            }
            let expected: usize = frames
                .iter()
                .map(|f| frame_head(TEXT, f.len()).1 + f.len())
                .sum();
            let mut bytes = vec![0u8; expected];
            tokio::time::sleep(Duration::from_millis(20)).await;
            theirs.read_exact(&mut bytes).await.unwrap();
            let read = server_frames(&bytes);
            assert_eq!(read.len(), 10, "round {round}");
            for ((opcode, got), sent) in read.iter().zip(&frames) {
                assert_eq!((*opcode, &got[..]), (TEXT, &sent[..]));
            }
            // Let the own writer hand the socket back before the next round.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        outbox.close(1000);
        assert_eq!(
            received(theirs).await,
            [(CLOSE, 1000u16.to_be_bytes().to_vec())]
        );
    }

    #[test]
    fn what_a_write_reached_is_counted_in_whole_frames_and_the_rest() {
        let frames: Vec<Frame> = [3usize, 200]
            .iter()
            .map(|n| Frame {
                opcode: TEXT,
                payload: Bytes::from(vec![0; *n]),
            })
            .collect();
        // Wire lengths 2 + 3 and 4 + 200.
        assert_eq!(reach(&frames, 0), (0, 0));
        assert_eq!(reach(&frames, 4), (0, 4));
        assert_eq!(reach(&frames, 5), (1, 0));
        assert_eq!(reach(&frames, 6), (1, 1));
        assert_eq!(reach(&frames, 209), (2, 0));
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

    async fn read_all(bytes: Vec<u8>, max: usize) -> (Vec<Incoming>, Arc<Outbox>, DuplexStream) {
        let (outbox, theirs, _) = pipe_outbox(8, 1024);
        let mut reader = Reader::new(std::io::Cursor::new(bytes), max);
        let mut out = Vec::new();
        while let Some(message) = reader.next(&outbox).await {
            let close = matches!(message, Incoming::Close(_));
            out.push(message);
            if close {
                break;
            }
        }
        (out, outbox, theirs)
    }

    #[tokio::test]
    async fn fragments_and_pings_between_them_make_one_message() {
        let mut bytes = client_frame(false, TEXT, b"{\"op\":");
        bytes.extend(client_frame(true, PING, b"hi"));
        bytes.extend(client_frame(true, CONTINUATION, "\"é\"}".as_bytes()));
        bytes.extend(client_frame(true, CLOSE, &1000u16.to_be_bytes()));
        let (messages, outbox, theirs) = read_all(bytes, 1024).await;
        assert_eq!(
            messages,
            [
                Incoming::Text("{\"op\":\"é\"}".into()),
                Incoming::Close(1000)
            ]
        );
        outbox.close(1000);
        let sent = received(theirs).await;
        assert_eq!(sent[0], (PONG, b"hi".to_vec()));
        assert_eq!(sent[1].0, CLOSE);
    }

    #[tokio::test]
    async fn too_large_unmasked_or_invalid_text_closes_with_the_right_code() {
        let (m, ..) = read_all(client_frame(true, TEXT, &[b'a'; 2000]), 1024).await;
        assert_eq!(m, [Incoming::Close(1009)]);
        let mut unmasked = client_frame(true, TEXT, b"x");
        unmasked[1] &= 0x7F;
        let (m, ..) = read_all(unmasked, 1024).await;
        assert_eq!(m, [Incoming::Close(1002)]);
        let (m, ..) = read_all(client_frame(true, TEXT, &[0xff, 0xfe]), 1024).await;
        assert_eq!(m, [Incoming::Close(1007)]);
        let (m, ..) = read_all(client_frame(true, CONTINUATION, b"x"), 1024).await;
        assert_eq!(m, [Incoming::Close(1002)]);
        // A connection that just ends is no message.
        let (m, ..) = read_all(client_frame(true, TEXT, b"abc")[..4].to_vec(), 1024).await;
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
    async fn a_full_outbox_refuses_offers_tells_its_client_once_emptied_and_a_closed_one_refuses_everything()
     {
        let (outbox, theirs, recovered) = pipe_outbox(2, 1024);
        assert!(outbox.offer(Bytes::from_static(b"1")));
        assert!(outbox.offer(Bytes::from_static(b"2")));
        assert!(!outbox.offer(Bytes::from_static(b"3")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(recovered.load(Ordering::Relaxed), 1);
        outbox.close(1000);
        assert!(!outbox.offer(Bytes::from_static(b"4")));
        let frames: Vec<(u8, Vec<u8>)> = received(theirs).await;
        assert_eq!(
            frames,
            [
                (TEXT, b"1".to_vec()),
                (TEXT, b"2".to_vec()),
                (TEXT, b"resync".to_vec()),
                (CLOSE, 1000u16.to_be_bytes().to_vec())
            ]
        );
    }

    /// One unmasked, final frame.
    async fn write_frame<W: AsyncWrite + Unpin>(
        io: &mut W,
        opcode: u8,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let frame = Frame {
            opcode,
            payload: Bytes::copy_from_slice(payload),
        };
        write_frames(io, std::slice::from_ref(&frame), 0).await
    }
}
