//! [`ClientStream`]: the client connection as Pingora's HTTP/1 server reads it, with the
//! gateway's defences in between. Every byte the client sends passes the [`Framer`] first;
//! a request head reaches Pingora only once it is complete and correct, so
//!
//! - a malformed or ambiguous request is answered here (400, 414, 431 or 505, with
//!   `Connection: close`) and Pingora, and so every upstream, never sees a byte of it;
//! - a client that dribbles its head costs no more than the bytes it sent: Pingora's own
//!   read buffer waits empty, and a head not complete within `header_timeout` gets 408
//!   (a plain close when nothing at all arrived);
//! - the idle time between requests is bounded by `keepalive_timeout`, and each wait for
//!   more of a request body by `body_timeout`.
//!
//! The deadlines follow the connection's phase as the framer sees it, and the end of each
//! exchange, which [`super::accept`] reports through [`ClientStream::exchange_done`]: while
//! an answer is being produced for a complete request, no client deadline runs.
//!
//! Two kinds of connection leave HTTP/1 framing, and then pass through unchecked ("raw"):
//! one that opens with the h2 preface (h2c on a plain listener with `http2: true`, or h2
//! chosen by ALPN, whose preface must come within `header_timeout`; Pingora's h2 server
//! checks its frames and closes it after `keepalive_timeout` without a stream), and one
//! whose upgrade request (WebSocket) was answered `101 Switching Protocols`: from then on
//! it carries the new protocol's bytes both ways.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::admission::Slot;
use super::framing::{Framer, Phase, Reject};
use super::ClientPolicy;
use crate::http::{request_id, respond};

/// How long a refusal may take to write before the connection is simply dropped.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A deadline that ran out, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Nothing arrived on a new connection: a plain close.
    Silent,
    /// Idle between requests for `keepalive_timeout`: a plain close.
    Idle,
    /// The head did not complete in time: 408.
    Head,
    /// A body stalled: 408 if no answer has started.
    Body,
    /// The refusal could not be written in time.
    Answer,
}

/// An answer the stream writes itself before closing.
struct Refusal {
    answer: Bytes,
    /// Its writing has begun: nothing else may be written.
    started: bool,
    /// The request was refused inside a body Pingora is reading: answer at once.
    in_body: bool,
}

pub struct ClientStream {
    inner: Stream,
    policy: Arc<ClientPolicy>,
    framer: Framer,
    /// Bytes read from the client and not yet handed to Pingora: the first `ready` may go,
    /// the rest are a head still incomplete.
    held: BytesMut,
    ready: usize,
    accepted: Instant,
    /// Exchanges (request and answer) finished on this connection.
    exchanges: u64,
    idle_since: Instant,
    head_started: Instant,
    /// In a body: since when a read has waited for the client.
    waiting_since: Option<Instant>,
    /// Pingora wrote to the client since the current request began.
    wrote: bool,
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
    refusal: Option<Refusal>,
    /// The connection is finished: reads see its end, writes fail.
    closed: bool,
    /// The listener accepts h2c with prior knowledge, and the first bytes may be its preface.
    h2c: bool,
    /// ALPN chose h2: the first bytes must be its preface (nothing else is served).
    h2_only: bool,
    /// No longer HTTP/1 (h2c, or an upgrade): bytes pass through unchecked.
    raw: bool,
    _slot: Slot,
}

/// What an h2c connection opens with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("phase", &self.framer.phase())
            .finish()
    }
}

impl ClientStream {
    pub fn new(inner: Stream, policy: Arc<ClientPolicy>, slot: Slot, h2c: bool) -> ClientStream {
        let now = Instant::now();
        ClientStream {
            inner,
            framer: Framer::new(policy.limits),
            policy,
            held: BytesMut::new(),
            ready: 0,
            accepted: now,
            exchanges: 0,
            idle_since: now,
            head_started: now,
            waiting_since: None,
            wrote: false,
            timer: None,
            refusal: None,
            closed: false,
            h2c,
            h2_only: false,
            raw: false,
            _slot: slot,
        }
    }

    /// A connection whose TLS handshake chose h2 by ALPN: it must open with the h2 preface
    /// within `header_timeout` (a silent one is closed, as any silent connection is), then
    /// passes through to Pingora's h2 server, which bounds its idle time.
    pub fn h2(inner: Stream, policy: Arc<ClientPolicy>, slot: Slot) -> ClientStream {
        let mut stream = ClientStream::new(inner, policy, slot, true);
        stream.h2_only = true;
        stream
    }

    /// Waits until the connection's next request head is complete and checked, so that
    /// Pingora's session (its buffers and its large task state) is set up only for a
    /// connection that has a request to serve: a client that dribbles its head, says
    /// nothing, or idles between requests costs only this stream. `false`: there is
    /// nothing to serve (the client left, a deadline ran out, or the head was refused and
    /// answered here).
    pub async fn next_head(&mut self) -> bool {
        std::future::poll_fn(|cx| self.poll_next_head(cx)).await
    }

    fn poll_next_head(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.raw {
            return Poll::Ready(!self.closed);
        }
        loop {
            // Ready bytes, or a pipelined request Pingora already holds.
            if self.ready > 0 || self.answer_pending() {
                return Poll::Ready(true);
            }
            if self.refusal.is_some() {
                ready!(self.poll_refusal(cx));
                self.refusal = None;
                self.closed = true;
            }
            if self.closed {
                return Poll::Ready(false);
            }
            let mut space = [0u8; 2048];
            let mut buf = ReadBuf::new(&mut space);
            ready!(self.poll_client(cx, &mut buf));
            if self.closed || self.refusal.is_some() || buf.filled().is_empty() {
                continue;
            }
            if self.h2c {
                self.held.extend_from_slice(buf.filled());
                let n = self.held.len().min(H2_PREFACE.len());
                if self.held[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        self.raw = true;
                        self.ready = self.held.len();
                    }
                    continue;
                }
                if self.h2_only {
                    self.policy.refused.bad_request.inc();
                    self.closed = true;
                    continue;
                }
                // Not h2c: what was held goes through the framer like any bytes.
                self.h2c = false;
                let mut bytes = std::mem::take(&mut self.held).to_vec();
                let len = bytes.len();
                let mut held = ReadBuf::new(&mut bytes);
                held.set_filled(len);
                self.take_checked(&mut held);
                continue;
            }
            self.take_checked(&mut buf);
        }
    }

    /// Checks bytes read while waiting for a head, and keeps what passes for Pingora.
    fn take_checked(&mut self, buf: &mut ReadBuf<'_>) {
        self.check(buf, 0);
        // A whole head in one read stays in `buf`: keep it for Pingora.
        if !buf.filled().is_empty() {
            self.held.extend_from_slice(buf.filled());
            self.ready = self.held.len();
        }
    }

    /// Pingora writes the start of an answer: a `101` to an upgrade request turns the
    /// connection into a tunnel.
    fn answer_starts(&mut self, first: &[u8]) {
        if !self.wrote
            && self.framer.upgrade_requested()
            && (first.starts_with(b"HTTP/1.1 101") || first.starts_with(b"HTTP/1.0 101"))
        {
            self.raw = true;
            self.timer = None;
        }
    }

    /// One request has been answered completely; the connection waits for the next.
    pub fn exchange_done(&mut self) {
        self.exchanges += 1;
        self.idle_since = Instant::now();
        self.wrote = false;
        self.waiting_since = None;
    }

    /// Pingora may write no more: the connection ended, or the stream's own answer is
    /// going out. (Answers owed before a refusal is written still go out.)
    fn write_closed(&self) -> bool {
        self.closed || self.refusal.as_ref().is_some_and(|r| r.started)
    }

    /// An answer is still owed for a complete request.
    fn answer_pending(&self) -> bool {
        self.framer.heads() > self.exchanges
    }

    /// The deadline the connection's phase sets, if any.
    fn deadline(&self) -> Option<(Instant, Expiry)> {
        let p = &self.policy;
        if self.refusal.is_some() {
            return Some((Instant::now() + ANSWER_WRITE_TIMEOUT, Expiry::Answer));
        }
        match self.framer.phase() {
            Phase::Idle if self.framer.heads() == 0 => {
                Some((self.accepted + p.header_timeout, Expiry::Silent))
            }
            Phase::Idle if self.answer_pending() => None,
            Phase::Idle => Some((self.idle_since + p.keepalive_timeout, Expiry::Idle)),
            Phase::Head => Some((self.head_started + p.header_timeout, Expiry::Head)),
            Phase::Body => self
                .waiting_since
                .map(|t| (t + p.body_timeout, Expiry::Body)),
        }
    }

    /// Arms the timer for the current deadline and polls it; `Ready` when it ran out.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<Expiry> {
        let Some((at, expiry)) = self.deadline() else {
            return Poll::Pending;
        };
        // One timer per connection. A deadline that moves later (the idle deadline moves
        // with every request on a keep-alive connection) leaves the timer where it is: when
        // it fires early it is moved once, to the deadline then in force. Only a deadline
        // that moves earlier moves it at once. So the timer wheel is touched about once per
        // timeout period, not once per request. An answer's write deadline is set once, when
        // the answer starts (`refuse` clears the timer).
        let (armed, sleep) = self
            .timer
            .get_or_insert_with(|| (at, Box::pin(tokio::time::sleep_until(at.into()))));
        if at < *armed && expiry != Expiry::Answer {
            sleep.as_mut().reset(at.into());
            *armed = at;
        }
        loop {
            ready!(sleep.as_mut().poll(cx));
            // (Within the timer's millisecond granularity counts as reached.)
            if expiry == Expiry::Answer || Instant::now() + Duration::from_millis(1) >= at {
                return Poll::Ready(expiry);
            }
            sleep.as_mut().reset(at.into());
            *armed = at;
        }
    }

    /// A deadline ran out: count it, and answer or close.
    fn expire(&mut self, expiry: Expiry) {
        let refused = &self.policy.refused;
        match expiry {
            Expiry::Silent => {
                refused.header_timeout.inc();
                self.closed = true;
            }
            Expiry::Idle | Expiry::Answer => self.closed = true,
            Expiry::Head => {
                refused.header_timeout.inc();
                self.refuse(408, "request head not received in time", false);
            }
            Expiry::Body => {
                refused.body_timeout.inc();
                self.refuse(408, "request body not received in time", true);
            }
        }
    }

    /// Starts refusing the connection with `status`, or closes it if an answer already
    /// started (nothing else can be said then).
    fn refuse(&mut self, status: u16, message: &str, in_body: bool) {
        if in_body && self.wrote {
            self.closed = true;
            return;
        }
        self.policy.count_answer(status);
        // What Pingora may still have (whole requests ahead of this one) stays.
        self.held.truncate(self.ready);
        self.timer = None;
        self.refusal = Some(Refusal {
            answer: answer(status, message),
            started: false,
            in_body,
        });
    }

    fn rejected(&mut self, r: Reject) {
        self.policy.refused.bad_request.inc();
        let in_body = self.framer.phase() == Phase::Body;
        self.refuse(r.status(), r.message(), in_body);
    }

    /// Writes the refusal; `Ready` once it is written and flushed (or cannot be).
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(r) = self.refusal.as_mut() {
            r.started = true;
        }
        while let Some(r) = self.refusal.as_mut().filter(|r| !r.answer.is_empty()) {
            match Pin::new(&mut self.inner).poll_write(cx, &r.answer) {
                Poll::Ready(Ok(n)) if n > 0 => r.answer.advance(n),
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return self.poll_deadline(cx).map(|_| ()),
            }
        }
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.poll_deadline(cx).map(|_| ()),
            Poll::Ready(_) => Poll::Ready(()),
        }
    }

    /// Reads from the client into `buf`; `Pending` arms the phase's deadline.
    fn poll_client(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<()> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.waiting_since = None;
                let n = buf.filled().len() - before;
                if n == 0 {
                    // The client closed. An incomplete head is dropped: Pingora sees a
                    // connection that ended between requests.
                    self.held.clear();
                    self.closed = true;
                }
                Poll::Ready(())
            }
            Poll::Ready(Err(_)) => {
                self.closed = true;
                Poll::Ready(())
            }
            Poll::Pending => {
                if self.framer.phase() == Phase::Body && self.waiting_since.is_none() {
                    self.waiting_since = Some(Instant::now());
                }
                let expiry = ready!(self.poll_deadline(cx));
                self.expire(expiry);
                Poll::Ready(())
            }
        }
    }

    /// Checks bytes just read into `buf[before..]` and decides which of them Pingora may
    /// have now: all, when they hold no incomplete head; the rest wait in `held`.
    fn check(&mut self, buf: &mut ReadBuf<'_>, before: usize) {
        let heads = self.framer.heads();
        let held_before = self.held.len();
        let new = &buf.filled()[before..];
        match self.framer.feed(new) {
            Err(r) => {
                // Whole requests ahead of the refused one are still served, in order.
                let clean = self.framer.clean();
                if clean > 0 {
                    self.held.extend_from_slice(&new[..clean]);
                    self.ready = self.held.len();
                }
                buf.set_filled(before);
                self.rejected(r);
            }
            Ok(0) if held_before == 0 => {}
            Ok(open) => {
                // A head began in these bytes: its deadline starts now.
                if open > 0 && (held_before == 0 || self.framer.heads() != heads) {
                    self.head_started = self.head_start();
                }
                self.held.extend_from_slice(new);
                buf.set_filled(before);
                self.ready = self.held.len() - open;
            }
        }
    }

    /// When the head that starts now began, for its deadline: the first request's counts
    /// from the connection's start.
    fn head_start(&self) -> Instant {
        match self.framer.heads() {
            0 => self.accepted,
            _ => Instant::now(),
        }
    }
}

/// A complete answer with a JSON error body that closes the connection.
fn answer(status: u16, message: &str) -> Bytes {
    let id = request_id::generate();
    let body = respond::error_body(message, &id);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         {}: {id}\r\nconnection: close\r\n\r\n",
        body.len(),
        request_id::HEADER
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.raw {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if let Some(r) = &this.refusal {
                // A refused head waits until the answers owed before it are written.
                if !r.in_body && this.answer_pending() {
                    return Poll::Pending;
                }
                ready!(this.poll_refusal(cx));
                this.refusal = None;
                this.closed = true;
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            ready!(this.poll_client(cx, buf));
            if this.closed || this.refusal.is_some() {
                buf.set_filled(before);
                continue;
            }
            if buf.filled().len() == before {
                continue;
            }
            this.check(buf, before);
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.write_closed() {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        self.answer_starts(buf);
        self.wrote |= !buf.is_empty();
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.write_closed() {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.answer_starts(first);
            self.wrote = true;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// Pingora peeks for an h2c preface: it sees the start of what it is about to read (a
/// checked HTTP/1 head, or the preface of a connection that turned raw for it).
#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let n = buf.len().min(self.ready);
        buf[..n].copy_from_slice(&self.held[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

/// The peer's address, when it is an IP one.
pub fn peer_ip(stream: &Stream) -> Option<std::net::IpAddr> {
    let digest = stream.get_socket_digest()?;
    match digest.peer_addr()? {
        PingoraAddr::Inet(a) => Some(a.ip()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The local address the connection came in on, when it is an IP one.
pub fn local_addr(stream: &Stream) -> Option<std::net::SocketAddr> {
    let digest = stream.get_socket_digest()?;
    match digest.local_addr()? {
        PingoraAddr::Inet(a) => Some(*a),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
