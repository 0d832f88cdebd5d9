//! The copies of one primary request, shared by mirrors and fallbacks: each copy's way out
//! (a streaming task fed through a bounded queue, or, for a mirror copy, a choice deferred
//! until its first body piece shows whether the whole body can ride a lane), and the
//! feeding of the primary's body to them without ever waiting. A copy that cannot keep up
//! is abandoned; one past its body limit too; a primary that ends early takes its copies
//! down. Mirror copies count what became of them; fallback copies report their answer to
//! [`crate::fallback`].

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::compare::{BodyDigest, CompareConfig, Reduce, Seen};
use super::{Deferred, Mirror, Outcomes};
use crate::http::forwarding;
use crate::outbound::exchange::{Body, Piece};

/// Body pieces a copy may hold before it is abandoned as too slow. Bytes are bounded
/// separately: past the mirror's `max_body_bytes` the copy is abandoned (`too_large`), so a
/// mirror holds at most `max_inflight × max_body_bytes` of body in memory.
pub(super) const FEED_SLOTS: usize = 1024;

/// The client's request head, reshaped by `shape` for a copy, always HTTP/1.1 so the
/// connection to the copy's backend can be kept alive.
pub fn copy_header(
    session: &Session,
    shape: impl FnOnce(&mut RequestHeader) -> pingora_error::Result<()>,
) -> Option<RequestHeader> {
    let mut header = session.req_header().clone();
    forwarding::as_http11(&mut header).ok()?;
    shape(&mut header).ok()?;
    Some(header)
}

/// Where a copy's body goes.
pub(super) enum Sink {
    /// Into the bounded queue of a task that streams it to the copy's backend.
    Task {
        feed: mpsc::Sender<Piece>,
        task: JoinHandle<()>,
    },
    /// A mirror copy waiting for its first piece: a body that arrives whole in it goes on a
    /// lane together with the head; anything else starts a streaming task.
    Deferred(Box<Deferred>),
}

/// A copy in flight, as the primary request sees it.
pub(super) struct Copy {
    /// Takes the copy's body; `None` once the body is complete or the copy is gone.
    pub(super) sink: Option<Sink>,
    pub(super) sent: u64,
    pub(super) max_body: u64,
    /// Counters for an abandoned mirror copy (`dropped`, `too_large`); none for fallbacks.
    pub(super) mirror: Option<Arc<Mirror>>,
}

impl Copy {
    fn abandon(&mut self, counter: impl Fn(&Outcomes) -> &IntCounter) {
        let Some(sink) = self.sink.take() else { return };
        if let Sink::Task { task, .. } = sink {
            task.abort();
        }
        if let Some(m) = &self.mirror {
            counter(&m.outcomes).inc();
        }
    }

    /// Passes one piece on without waiting; a copy that cannot take it is abandoned.
    fn feed(&mut self, chunk: Option<&Bytes>, end: bool) {
        let Some(sink) = self.sink.take() else { return };
        let len = chunk.map_or(0, |c| c.len() as u64);
        self.sent += len;
        let sink = match sink {
            Sink::Deferred(d) if self.sent <= self.max_body && end && len == d.declared => {
                if let Some(body) = chunk {
                    d.send_whole(body.clone());
                }
                return;
            }
            Sink::Deferred(d) => d.start_task(),
            task => task,
        };
        self.sink = Some(sink);
        if self.sent > self.max_body {
            return self.abandon(|o| &o.too_large);
        }
        let Some(Sink::Task { feed, .. }) = &self.sink else {
            return;
        };
        let piece = Piece {
            data: chunk.cloned(),
            end,
        };
        match feed.try_send(piece) {
            Ok(()) if end => self.sink = None,
            Ok(()) => {}
            Err(_) => self.abandon(|o| &o.dropped),
        }
    }
}

/// The copies of one primary request.
#[derive(Default)]
pub struct Copies {
    pub(super) list: Vec<Copy>,
    /// The primary's side of each comparison (mirrors with `compare`).
    pub(super) primaries: Vec<Primary>,
}

/// The primary's answer, reduced as it passes for a mirror copy's comparison; handed over
/// at its end. Dropped before (the client went away, the answer failed): the comparison is
/// incomplete.
pub(super) struct Primary {
    to: Option<oneshot::Sender<Seen>>,
    reduce: Reduce,
    head: Option<(u16, HeaderMap, BodyDigest)>,
}

impl Primary {
    pub(super) fn new(to: oneshot::Sender<Seen>, config: &CompareConfig) -> Primary {
        Primary {
            to: Some(to),
            reduce: config.reduce(),
            head: None,
        }
    }
}

impl Copies {
    /// Spawns the task `run` makes of a copy whose answer is kept (a fallback copy,
    /// [`crate::fallback`]), keeping the end that feeds it the body.
    pub fn spawn_capture<F, R>(&mut self, has_body: bool, run: R)
    where
        R: FnOnce(Body) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let (feed, body) = if has_body {
            let (feed, pieces) = mpsc::channel(FEED_SLOTS);
            (Some(feed), Body::Stream(pieces))
        } else {
            (None, Body::Empty)
        };
        let task = tokio::spawn(run(body));
        self.list.push(Copy {
            sink: feed.map(|feed| Sink::Task { feed, task }),
            sent: 0,
            max_body: u64::MAX,
            mirror: None,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The primary's answer head, as the upstream (or the cache) gave it.
    pub fn primary_head(&mut self, status: u16, headers: &HeaderMap) {
        for p in &mut self.primaries {
            p.head = Some((status, headers.clone(), p.reduce.digest(headers)));
        }
    }

    /// A piece of the primary's answer body as it passes to the client; at its end each
    /// comparison gets the answer.
    pub fn primary_body(&mut self, chunk: Option<&[u8]>, end: bool) {
        for p in &mut self.primaries {
            if let (Some(chunk), Some((_, _, digest))) = (chunk, p.head.as_mut()) {
                digest.update(chunk);
            }
            if end {
                if let (Some(to), Some((status, headers, digest))) = (p.to.take(), p.head.take()) {
                    let _ = to.send(digest.finish(status, headers));
                }
            }
        }
    }

    /// Passes a piece of the primary's body to every live copy, never waiting.
    pub fn feed(&mut self, chunk: Option<&Bytes>, end: bool) {
        for copy in &mut self.list {
            copy.feed(chunk, end);
        }
    }
}

impl Drop for Copies {
    /// A primary that ends before its body did (refused, failed, client gone) takes down
    /// the copies still waiting for body: mirror copies are counted `dropped`.
    fn drop(&mut self) {
        for copy in &mut self.list {
            copy.abandon(|o| &o.dropped);
        }
    }
}
