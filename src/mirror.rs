//! Traffic mirroring as a subrequest phase. For each sampled request on a route with
//! `mirror:` entries, the primary spawns one Pingora subrequest per mirror
//! (`SubrequestSpawner::create_subrequest`); the copy re-enters the gateway's own
//! `ProxyHttp` phases with `session.subrequest_ctx` carrying a [`CopyTicket`], which sends
//! it to the mirror's upstream, skips rate limits, the access log and further mirroring,
//! and counts its outcome.
//!
//! Nothing here ever waits on a copy, so a mirror cannot slow the client's answer:
//! - the copy runs in its own task, bounded by the mirror's `timeout`;
//! - the body is fed to it chunk by chunk with `try_send` into a bounded queue that the
//!   copy's own task empties into the subrequest (the primary's chunks are shared, not
//!   copied); a copy that cannot keep up is abandoned and counted `dropped`; a body past
//!   the mirror's `max_body_bytes` is counted `too_large`, so a copy never holds more;
//! - at most `max_inflight` copies per mirror exist at once; beyond that new ones are
//!   dropped, never queued.
//!
//! An abandoned copy is *aborted*, not just cut off: a chunked subrequest reads a closed
//! channel as a clean end of body, which would deliver a truncated body as complete.
//!
//! Fallback routes use the same copies with one difference: the answer of a fallback copy
//! is captured (up to `fallback_max_body`) for the primary to use if its own upstream
//! fails, instead of being discarded.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use pingora_core::protocols::http::HttpTask;
use pingora_proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora_proxy::Session;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{MirrorConfig, RouteId, UpstreamId};
use crate::keys;
use crate::metrics::Metrics;
use crate::upstream::Upstream;
use pingora_http::ResponseHeader;
use std::time::Duration;

/// Outcome counters of one mirror, resolved once.
struct Outcomes {
    ok: IntCounter,
    error: IntCounter,
    dropped: IntCounter,
    too_large: IntCounter,
}

/// Body pieces a copy may hold before it is abandoned as too slow. Bytes are bounded
/// separately: past the mirror's `max_body_bytes` the copy is abandoned (`too_large`), so a
/// mirror holds at most `max_inflight × max_body_bytes` of body in memory.
const FEED_SLOTS: usize = 1024;

/// One `mirror:` entry of a route, with its live budget.
pub struct Mirror {
    pub config: MirrorConfig,
    upstream: Arc<Upstream>,
    inflight: AtomicUsize,
    inflight_gauge: IntGauge,
    outcomes: Outcomes,
}

impl Mirror {
    pub fn new(
        config: &MirrorConfig,
        route: &str,
        upstream: Arc<Upstream>,
        metrics: &Metrics,
    ) -> Mirror {
        let name = upstream.name();
        let count = |o: &str| metrics.mirror_requests.with_label_values(&[route, name, o]);
        Mirror {
            config: config.clone(),
            inflight: AtomicUsize::new(0),
            inflight_gauge: metrics.mirror_inflight.with_label_values(&[route, name]),
            outcomes: Outcomes {
                ok: count("ok"),
                error: count("error"),
                dropped: count("dropped"),
                too_large: count("too_large"),
            },
            upstream: Arc::clone(&upstream),
        }
    }

    pub fn upstream(&self) -> UpstreamId {
        self.config.upstream
    }

    /// Whether this request is to be copied: by `percent`, per request or per key.
    fn sampled(&self, session: &Session) -> bool {
        let draw = match &self.config.sample_by {
            None => keys::random_u64(),
            Some(key) => {
                let mut buf = [0u8; 16];
                keys::stable_hash(keys::key_bytes(session, key, &mut buf))
            }
        };
        keys::within_percent(draw, self.config.percent)
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let max = self.config.max_inflight;
        self.inflight
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        self.inflight_gauge.inc();
        Some(Permit(Arc::clone(self)))
    }

    /// Counts a copy's answer: a status below 500 is `ok`.
    pub fn count_answer(&self, status: u16) {
        if status > 0 && status < 500 {
            self.outcomes.ok.inc();
        } else {
            self.outcomes.error.inc();
        }
    }
}

/// One slot of a mirror's `max_inflight`; released when the copy ends, however it ends.
pub struct Permit(Arc<Mirror>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
        self.0.inflight_gauge.dec();
    }
}

/// What kind of copy a subrequest is.
pub enum CopyKind {
    /// A mirror copy: its answer is discarded, its outcome counted for the mirror.
    Mirror(Arc<Mirror>),
    /// A fallback copy to this upstream: its answer may replace the primary's.
    Fallback(UpstreamId),
}

/// What a copy carries into its own pass through the proxy phases.
pub struct CopyTicket {
    pub route: RouteId,
    pub request_id: String,
    pub kind: CopyKind,
    _permit: Option<Permit>,
}

impl CopyTicket {
    /// The upstream the copy goes to.
    pub fn upstream(&self) -> UpstreamId {
        match &self.kind {
            CopyKind::Mirror(m) => m.upstream(),
            CopyKind::Fallback(u) => *u,
        }
    }
}

/// Takes the ticket out of a subrequest session, if this request is a copy.
pub fn take_ticket(session: &mut Session) -> Option<CopyTicket> {
    let user = session.subrequest_ctx.as_mut()?.user_ctx_mut()?;
    user.downcast_mut::<Option<CopyTicket>>()?.take()
}

/// A fallback's complete answer.
pub struct Captured {
    pub upstream: UpstreamId,
    pub header: ResponseHeader,
    pub body: Bytes,
}

/// Where a copy's answer goes.
enum AnswerSink {
    /// Drained and discarded; a copy that times out counts as this mirror error.
    Discard(IntCounter),
    /// Kept if complete and within `max_body`, and sent (or `None` on failure) to `to`.
    Capture {
        upstream: UpstreamId,
        max_body: u64,
        to: mpsc::UnboundedSender<Option<Captured>>,
    },
}

/// Reads a copy's answer into memory, up to `max_body`; `None` if it fails or is larger.
/// Whatever follows is drained so the copy can finish.
async fn capture(
    answers: &mut mpsc::Receiver<HttpTask>,
    upstream: UpstreamId,
    max_body: u64,
) -> Option<Captured> {
    let mut header = None;
    let mut body = bytes::BytesMut::new();
    let mut complete = false;
    while let Some(task) = answers.recv().await {
        let end = task.is_end();
        match task {
            HttpTask::Header(h, _) if !h.status.is_informational() => header = Some(*h),
            HttpTask::Body(Some(b), _) => {
                if (body.len() + b.len()) as u64 > max_body {
                    header = None;
                    break;
                }
                body.extend_from_slice(&b);
            }
            HttpTask::Failed(_) => {
                header = None;
                break;
            }
            _ => {}
        }
        if end {
            complete = true;
            break;
        }
    }
    while answers.recv().await.is_some() {}
    let header = header.filter(|_| complete)?;
    Some(Captured {
        upstream,
        header,
        body: body.freeze(),
    })
}

/// A copy in flight, as the primary request sees it.
struct Copy {
    /// Feeds the copy's body; `None` once the body is complete or the copy is gone.
    body: Option<mpsc::Sender<HttpTask>>,
    task: JoinHandle<()>,
    sent: u64,
    max_body: u64,
    /// Counters for an abandoned mirror copy (`dropped`, `too_large`); none for fallbacks.
    mirror: Option<Arc<Mirror>>,
}

impl Copy {
    fn abandon(&mut self, counter: impl Fn(&Outcomes) -> &IntCounter) {
        if self.body.take().is_some() {
            self.task.abort();
            if let Some(m) = &self.mirror {
                counter(&m.outcomes).inc();
            }
        }
    }
}

/// Whether the request has a body to copy, and its declared length.
fn body_of(session: &Session) -> (bool, Option<u64>) {
    let req = session.req_header();
    let declared: Option<u64> = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    (chunked || declared.is_some_and(|n| n > 0), declared)
}

/// The copies of one primary request.
#[derive(Default)]
pub struct Copies {
    list: Vec<Copy>,
}

impl Copies {
    /// Starts a copy for each sampled mirror of the route that has room for one.
    pub fn start(
        session: &Session,
        route: RouteId,
        mirrors: &[Arc<Mirror>],
        request_id: &str,
    ) -> Copies {
        let mut copies = Copies::default();
        let (has_body, declared) = body_of(session);
        for mirror in mirrors {
            if !mirror.sampled(session) {
                continue;
            }
            if !mirror.upstream.has_available() {
                // Down (health checks, open circuits): fail at once rather than dial it.
                mirror.outcomes.error.inc();
                continue;
            }
            if declared.is_some_and(|n| n > mirror.config.max_body_bytes) {
                mirror.outcomes.too_large.inc();
                continue;
            }
            let Some(permit) = mirror.try_acquire() else {
                mirror.outcomes.dropped.inc();
                continue;
            };
            let ticket = CopyTicket {
                route,
                request_id: request_id.to_string(),
                kind: CopyKind::Mirror(Arc::clone(mirror)),
                _permit: Some(permit),
            };
            let sink = AnswerSink::Discard(mirror.outcomes.error.clone());
            copies.spawn(
                session,
                ticket,
                has_body,
                mirror.config.timeout,
                mirror.config.max_body_bytes,
                sink,
                Some(Arc::clone(mirror)),
            );
        }
        copies
    }

    /// Starts a fallback copy to each of `upstreams`, whose answers arrive on the returned
    /// channel (one per copy, `None` for a failure). `limit` bounds each copy.
    pub fn start_fallbacks(
        &mut self,
        session: &Session,
        route: RouteId,
        upstreams: &[(UpstreamId, Duration)],
        max_body: u64,
        request_id: &str,
    ) -> mpsc::UnboundedReceiver<Option<Captured>> {
        let (to, from) = mpsc::unbounded_channel();
        let (has_body, _) = body_of(session);
        for &(upstream, limit) in upstreams {
            let ticket = CopyTicket {
                route,
                request_id: request_id.to_string(),
                kind: CopyKind::Fallback(upstream),
                _permit: None,
            };
            let sink = AnswerSink::Capture {
                upstream,
                max_body,
                to: to.clone(),
            };
            self.spawn(session, ticket, has_body, limit, u64::MAX, sink, None);
        }
        from
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        session: &Session,
        ticket: CopyTicket,
        has_body: bool,
        limit: Duration,
        max_body: u64,
        sink: AnswerSink,
        mirror: Option<Arc<Mirror>>,
    ) {
        let Some(spawner) = session.subrequest_spawner.as_ref() else {
            if let AnswerSink::Capture { to, .. } = &sink {
                let _ = to.send(None);
            }
            return;
        };
        let ctx = SubrequestCtx::builder()
            .body_mode(if has_body {
                BodyMode::ExpectBody
            } else {
                BodyMode::NoBody
            })
            .user_ctx(Box::new(Some(ticket)))
            .build();
        let (prepared, handle) = spawner.create_subrequest(session.as_downstream(), ctx);
        let (into_copy, mut answers) = (handle.tx, handle.rx);
        let (feed, mut fed) = mpsc::channel::<HttpTask>(FEED_SLOTS);
        let task = tokio::spawn(async move {
            // Moves the body from the primary's queue into the subrequest at the copy's
            // own pace, then holds the subrequest's input open: a subrequest reads its
            // closing as the client going away and aborts, even after the body is done.
            let pump = async move {
                while let Some(piece) = fed.recv().await {
                    if into_copy.send(piece).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await
            };
            let copy = async {
                tokio::select! {
                    _ = prepared.run() => {}
                    _ = pump => {}
                }
            };
            match sink {
                AnswerSink::Discard(timeout_error) => {
                    let drain = async { while answers.recv().await.is_some() {} };
                    if tokio::time::timeout(limit, async { tokio::join!(copy, drain) })
                        .await
                        .is_err()
                    {
                        timeout_error.inc();
                    }
                }
                AnswerSink::Capture {
                    upstream,
                    max_body,
                    to,
                } => {
                    let kept = capture(&mut answers, upstream, max_body);
                    let result =
                        tokio::time::timeout(limit, async { tokio::join!(copy, kept).1 }).await;
                    let _ = to.send(result.ok().flatten());
                }
            }
        });
        self.list.push(Copy {
            body: has_body.then_some(feed),
            task,
            sent: 0,
            max_body,
            mirror,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Passes a piece of the primary's body to every live copy, never waiting.
    pub fn feed(&mut self, chunk: Option<&Bytes>, end: bool) {
        for copy in &mut self.list {
            let Some(tx) = &copy.body else { continue };
            copy.sent += chunk.map_or(0, |c| c.len() as u64);
            if copy.sent > copy.max_body {
                copy.abandon(|o| &o.too_large);
                continue;
            }
            match tx.try_send(HttpTask::Body(chunk.cloned(), end)) {
                Ok(()) if end => copy.body = None,
                Ok(()) => {}
                Err(_) => copy.abandon(|o| &o.dropped),
            }
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
