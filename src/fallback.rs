//! Fallback routes (`fallback: [b, c]` on a proxy route, the "go-conductor" pattern): the
//! request goes to the route's upstream and to every fallback at once. Everything about them
//! is here: starting the copies (the copies of [`crate::mirror`] in capture mode, their
//! answers kept in memory up to `fallback_max_body`, at most `fallback_max_inflight` of the
//! route's at once), letting them go when the primary answers, and, when the primary fails,
//! completing their bodies and picking and sending the answer the client gets: the first
//! successful fallback, in order of arrival. A request carries all of it in one
//! [`Failover`], which each proxy phase asks one thing.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use pingora_core::connectors::http::Connector;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};

use crate::config::{RouteConfig, RouteKind, UpstreamId};
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::limits::{self, BodyCounter, Refusal};
use crate::mirror::{copy_header, Copies};
use crate::observe::span;
use crate::outbound::exchange::{self, Keep};
use crate::upstream::{Tried, Upstream};

/// A fallback's complete answer.
pub struct Captured {
    pub upstream: UpstreamId,
    pub header: ResponseHeader,
    pub body: Bytes,
}

/// The fallback upstreams of a proxy route, in order, and the bound on their copies.
pub struct FallbackUpstreams {
    pub upstreams: Vec<(UpstreamId, Arc<Upstream>)>,
    pub budget: Arc<CopyBudget>,
}

/// One request's fallback state: its copies' answers, whether the primary failed (its
/// answer is then not the client's), and whose answer the client got. Empty on routes
/// without fallbacks. Each proxy phase asks it one thing.
#[derive(Default)]
pub struct Failover {
    /// The copies' answers; `None` without fallbacks, when the route's budget was used up,
    /// or once they were given up.
    fallbacks: Option<Fallbacks>,
    primary_failed: bool,
    answered_by: Option<UpstreamId>,
}

/// The client request fallback copies are made of.
#[derive(Clone, Copy)]
pub struct Of<'a> {
    pub session: &'a Session,
    /// Its client, and the path a `rewrite` made for upstreams.
    pub pass: &'a Passage,
    pub request_id: &'a str,
}

impl Failover {
    /// Starts the fallback copies of a request (see [`start`]).
    pub fn start(
        copies: &mut Copies,
        of: Of<'_>,
        route: &RouteConfig,
        fallbacks: &FallbackUpstreams,
        connector: &Arc<Connector>,
    ) -> Failover {
        Failover {
            fallbacks: start(copies, of, route, fallbacks, connector),
            ..Failover::default()
        }
    }

    /// Whether fallback answers may still be given.
    pub fn armed(&self) -> bool {
        self.fallbacks.is_some()
    }

    /// The primary answered `status`: a 5xx, with fallbacks armed, hands the request over
    /// to them (`true`: the primary's answer is not the client's).
    pub fn primary_fails_with(&mut self, status: u16) -> bool {
        let fails = status >= 500 && self.armed();
        if fails {
            self.primary_failed = true;
        }
        fails
    }

    /// The primary's answer, from `upstream`, is the client's: the copies are let go.
    /// `true` when the answer is to name its upstream (a route with fallbacks).
    pub fn primary_answers(&mut self, upstream: Option<UpstreamId>) -> bool {
        let Some(fallbacks) = self.fallbacks.as_mut() else {
            return false;
        };
        fallbacks.release();
        self.answered_by = upstream;
        upstream.is_some()
    }

    /// The primary failed and the gateway is failing over: not an error to log, nor a
    /// reason to retry.
    pub fn primary_failed(&self) -> bool {
        self.primary_failed
    }

    /// The upstream whose answer the client got, on a route with fallbacks.
    pub fn answered_by(&self) -> Option<UpstreamId> {
        self.answered_by
    }

    /// The first successful fallback answer ([`first_answer`]), noted as the client's;
    /// `Err`: the body went over `limit` meanwhile, and the fallbacks are given up.
    pub async fn first_answer(
        &mut self,
        session: &mut Session,
        copies: &mut Copies,
        body: &mut BodyCounter,
        limit: u64,
    ) -> std::result::Result<Option<Captured>, Refusal> {
        let Some(fallbacks) = self.fallbacks.as_mut() else {
            return Ok(None);
        };
        let answer = first_answer(session, copies, body, limit, fallbacks).await;
        match &answer {
            Ok(Some(a)) => self.answered_by = Some(a.upstream),
            Ok(None) => {}
            Err(_) => self.fallbacks = None,
        }
        answer
    }
}

/// Starts the fallback copies of a request on a route with fallbacks, unless the route's
/// `fallback_max_inflight` is used up: then the request runs without them (counted).
fn start(
    copies: &mut Copies,
    of: Of<'_>,
    route: &RouteConfig,
    fallbacks: &FallbackUpstreams,
    connector: &Arc<Connector>,
) -> Option<Fallbacks> {
    let count = fallbacks.upstreams.len();
    let slots = fallbacks.budget.take(count)?;
    let (leash, wanted) = Leash::new(slots);
    let answers = spawn_copies(copies, of, route, &fallbacks.upstreams, connector, leash);
    Some(Fallbacks::new(answers, count, wanted))
}

/// Starts a fallback copy to each of `targets`, shaped as `route` shapes requests,
/// whose answers (up to the route's `fallback_max_body`) arrive on the returned channel
/// (one per copy, `None` for a failure).
fn spawn_copies(
    copies: &mut Copies,
    of: Of<'_>,
    route: &RouteConfig,
    targets: &[(UpstreamId, Arc<Upstream>)],
    connector: &Arc<Connector>,
    leash: Leash,
) -> mpsc::UnboundedReceiver<Option<Captured>> {
    let Of {
        session,
        pass,
        request_id,
    } = of;
    let (to, from) = mpsc::unbounded_channel();
    let Leash { slots, wanted } = leash;
    let mut slots = slots.into_iter();
    let (has_body, _) = limits::declared_body(session.req_header());
    let max_body = match route.kind {
        RouteKind::Proxy {
            fallback_max_body, ..
        } => fallback_max_body,
        RouteKind::Broadcast { .. } | RouteKind::Redirect(_) => 0,
    };
    let keep = Keep::UpTo(max_body);
    for (id, upstream) in targets {
        let span = span::copy_span(&pass.trace, "fallback copy");
        let hop = span.as_ref().map(span::Span::span_id);
        let shape = |h: &mut RequestHeader| {
            forwarding::upstream_request(h, route, pass, request_id)?;
            match hop {
                Some(span) => pass.trace.propagate_under(h, span),
                None => Ok(()),
            }
        };
        // A fallback copy never queues for the upstream's concurrency limit: over it, this
        // fallback is out of the race (counted as shed).
        let Ok(slot) = upstream
            .concurrency
            .as_ref()
            .map(|l| l.try_acquire())
            .transpose()
        else {
            let _ = to.send(None);
            continue;
        };
        let (Some(mut lease), Some(header)) = (
            upstream.select_for(session.req_header(), &pass.client, &Tried::default()),
            copy_header(session, shape),
        ) else {
            let _ = to.send(None);
            continue;
        };
        lease.hold(slot);
        if let Some(span) = span {
            lease.trace(span);
        }
        let (id, u, to) = (*id, Arc::clone(upstream), to.clone());
        let (connector, wanted, slot) = (Arc::clone(connector), wanted.clone(), slots.next());
        copies.spawn_capture(has_body, |body| async move {
            let _slot = slot;
            let t = &u.config.timeouts;
            let answer = exchange::exchange_until(
                &connector,
                &mut lease,
                t,
                t.total(),
                &header,
                body,
                keep,
                Some(wanted),
            )
            .await;
            let captured = answer
                .ok()
                .and_then(|a| a.kept)
                .map(|(header, body)| Captured {
                    upstream: id,
                    header,
                    body,
                });
            let _ = to.send(captured);
        });
    }
    from
}

/// The primary failed: gives the copies the rest of the body (the primary may have failed
/// before reading all of it), counted against `limit`, then waits for the first successful
/// fallback answer. `Err`: the body went over the limit meanwhile.
async fn first_answer(
    session: &mut Session,
    copies: &mut Copies,
    body: &mut BodyCounter,
    limit: u64,
    fallbacks: &mut Fallbacks,
) -> std::result::Result<Option<Captured>, Refusal> {
    loop {
        if session.as_downstream_mut().is_body_done() {
            // Copies that already had the last piece ignore a second end.
            copies.feed(None, true);
            break;
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.add(chunk.len(), limit)?;
                copies.feed(Some(&chunk), false);
            }
            Ok(None) => copies.feed(None, true),
            Err(_) => break,
        }
    }
    Ok(fallbacks.first_success().await)
}

/// The response header naming the upstream that answered.
pub const HEADER: &str = "x-fanout-upstream";

/// A route's fallback copies in flight, bounded by `fallback_max_inflight`; kept across a
/// reload while the route is (copies under way stay counted against the new bound).
pub struct CopyBudget {
    copies: Arc<limits::Budget>,
    /// `fanout_fallback_skipped_total`: requests that ran without fallbacks.
    pub skipped: IntCounter,
}

impl CopyBudget {
    pub fn new(max: usize, skipped: IntCounter) -> Arc<CopyBudget> {
        Arc::new(CopyBudget {
            copies: Arc::new(limits::Budget::new(max)),
            skipped,
        })
    }

    /// The same budget under a reloaded `fallback_max_inflight`.
    pub fn resized(self: &Arc<Self>, max: usize) -> Arc<CopyBudget> {
        self.copies.set_max(max);
        Arc::clone(self)
    }

    /// Takes `n` slots, all or none (then the skip is counted).
    pub fn take(&self, n: usize) -> Option<Vec<CopySlot>> {
        let slots = self.copies.hold_each(n);
        if slots.is_none() {
            self.skipped.inc();
        }
        slots
    }
}

/// What keeps one request's fallback copies in check: their slots in the route's budget,
/// and the signal that their answers are no longer wanted (the sender, in [`Fallbacks`]).
pub struct Leash {
    pub slots: Vec<CopySlot>,
    pub wanted: watch::Receiver<()>,
}

impl Leash {
    pub fn new(slots: Vec<CopySlot>) -> (Leash, watch::Sender<()>) {
        let (tx, wanted) = watch::channel(());
        (Leash { slots, wanted }, tx)
    }
}

/// One fallback copy's place in its route's budget, given back when the copy ends.
pub type CopySlot = limits::Held;

/// The fallback answers of one request, one per fallback copy (`None`: that one failed).
pub struct Fallbacks {
    answers: mpsc::UnboundedReceiver<Option<Captured>>,
    pending: usize,
    /// While held, the copies wait for their answers; dropped (the primary's answer was
    /// chosen, or the request ended), they stop reading and let their connections go.
    wanted: Option<watch::Sender<()>>,
}

impl Fallbacks {
    pub fn new(
        answers: mpsc::UnboundedReceiver<Option<Captured>>,
        pending: usize,
        wanted: watch::Sender<()>,
    ) -> Self {
        Fallbacks {
            answers,
            pending,
            wanted: Some(wanted),
        }
    }

    /// The primary's answer is the one: the copies' answers are no longer wanted.
    pub fn release(&mut self) {
        self.wanted = None;
    }

    /// The first answer that is not a 5xx, waiting for each copy to answer, fail or time out.
    pub async fn first_success(&mut self) -> Option<Captured> {
        while self.pending > 0 {
            self.pending -= 1;
            match self.answers.recv().await? {
                Some(c) if !c.header.status.is_server_error() => return Some(c),
                _ => continue,
            }
        }
        None
    }
}

/// Sends a fallback's answer to the client; returns its status. `name` is the answering
/// upstream, put in [`HEADER`].
pub async fn send(
    session: &mut Session,
    answer: Captured,
    route: Option<&RouteConfig>,
    request_id: &str,
    name: &str,
) -> Result<u16> {
    let Captured {
        mut header, body, ..
    } = answer;
    let status = header.status.as_u16();
    forwarding::response(&mut header, route, request_id)?;
    header.remove_header(&header::TRANSFER_ENCODING);
    header.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(HEADER, name)?;
    // The primary's connection state is unknown after its failure: do not reuse it.
    session.as_downstream_mut().set_keepalive(None);
    session
        .write_response_header(Box::new(header), body.is_empty())
        .await?;
    if !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(status)
}
