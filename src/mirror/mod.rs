//! Traffic mirroring, and the copies that fallback routes share with it. For each sampled
//! request on a route with `mirror:` entries, the primary starts one copy per mirror: a
//! task that sends the client's request, reshaped for the mirror, to one backend of the
//! mirror's upstream through Pingora's HTTP connector ([`crate::outbound::exchange`]) and counts the
//! outcome. Copies skip everything that belongs to the client's request (rate limits, the
//! access log, route metrics, further mirroring) because they never enter the proxy phases.
//!
//! Nothing here ever waits on a copy, so a mirror cannot slow the client's answer:
//! - the copy runs in its own task, bounded by the mirror's `timeout`;
//! - the body is fed to it piece by piece with `try_send` into a bounded queue that the
//!   copy's task writes to the mirror at its own pace (the primary's chunks are shared,
//!   not copied); a copy that cannot keep up is abandoned and counted `dropped`; a body
//!   past the mirror's `max_body_bytes` is counted `too_large`, so a copy never holds more;
//! - at most `max_inflight` copies per mirror exist at once; beyond that new ones are
//!   dropped, never queued.
//!
//! An abandoned copy is *aborted*: its connection is closed mid-body, never finished, so a
//! mirror cannot take a truncated body for a complete one.
//!
//! Copies without a body, or whose body arrives whole in its first piece, skip the
//! connector: they are pipelined, many to a write, on a few long-lived connections per
//! mirror backend ([`lanes`]), which only take more copies while their mirror answers
//! fast, so a slow mirror still gets a connection per copy; their answers are read by
//! [`reader`]. With `compare`, either way reduces the copy's answer ([`compare::Seen`]) and
//! [`Pairing::conclude`] judges it against the primary's.
//!
//! Copies were first Pingora subrequests re-entering the proxy phases; a subrequest costs
//! as much CPU as a client request (a second session, channels, every phase), which halved
//! throughput behind a fast mirror. The connector sends the same request for the cost of
//! the upstream half alone, and a lane for a fraction of that (figures in
//! bench/RESULTS.md).
//!
//! Fallback routes start the same copies with one difference: the answer of a fallback
//! copy is kept (up to `fallback_max_body`) for the primary to use if its own upstream
//! fails, instead of being discarded. The rooms: this file is the mirrors (sampling,
//! budgets, outcomes, the choice of a copy's way out); [`copies`] the copies of one request
//! and the feeding of its body, shared with [`crate::fallback`]; [`lanes`] the pipelined
//! connections; [`reader`] the answers read on them.

pub mod compare;
mod copies;
mod lanes;
mod reader;

use compare::{judge, CompareConfig, Diff, Kept, Seen, Verdict};
pub use copies::{copy_header, Copies};
use copies::{Copy, Primary, Sink, FEED_SLOTS};

#[doc(hidden)]
pub use reader::read_all as lanes_read_all;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{mpsc, oneshot};

use crate::config::MirrorConfig;
use crate::http::client::Client;
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::keys;
use crate::limits::{self, Budget};
use crate::observe::metrics::Metrics;
use crate::observe::span;
use crate::outbound::exchange::{self, Body, Failure, Keep};
use crate::upstream::{Lease, Tried, Upstream};

/// Outcome counters of one mirror, resolved once.
struct Outcomes {
    ok: IntCounter,
    error: IntCounter,
    dropped: IntCounter,
    too_large: IntCounter,
}

/// One `mirror:` entry of a route, with its live budget.
pub struct Mirror {
    pub config: MirrorConfig,
    upstream: Arc<Upstream>,
    /// Copies in flight, bounded by `max_inflight`; kept across a reload while the route
    /// mirrors to the same upstream.
    inflight: Arc<Budget>,
    inflight_gauge: IntGauge,
    outcomes: Outcomes,
    /// Pipelined connections for copies without a body, per backend of the upstream.
    lanes: lanes::Lanes,
    /// The route's label, for kept comparisons.
    route: String,
    /// With `compare:`: its settings, results and kept pairs.
    pub compare: Option<Comparing>,
}

/// A mirror's comparisons: settings, `fanout_mirror_compare_total` by verdict, kept pairs.
pub struct Comparing {
    pub config: CompareConfig,
    results: Vec<IntCounter>,
    /// Kept across reloads while the route (by label) mirrors to the same upstream.
    pub kept: Arc<Kept>,
}

impl Comparing {
    fn count(&self, v: Verdict) {
        if let Some(c) = Verdict::ALL.iter().position(|x| *x == v) {
            self.results[c].inc();
        }
    }
}

/// What a mirror copy with `compare` needs to judge its answer: the primary's (when the
/// primary's answer has passed), and what to say about the request.
pub struct Pairing {
    primary: oneshot::Receiver<Seen>,
    /// When the request came.
    at: SystemTime,
    request_id: String,
    method: String,
    path: String,
}

impl Mirror {
    /// The mirror `config` describes. `previous`: the same route's mirror to the same
    /// upstream under the configuration being replaced, whose kept pairs carry over.
    pub fn new(
        config: &MirrorConfig,
        route: &str,
        upstream: Arc<Upstream>,
        metrics: &Metrics,
        previous: Option<&Mirror>,
    ) -> Mirror {
        let kept_before = previous
            .and_then(|p| p.compare.as_ref())
            .map(|c| Arc::clone(&c.kept));
        let name = upstream.name();
        let count = |o: &str| metrics.mirror_requests.with_label_values(&[route, name, o]);
        Mirror {
            config: config.clone(),
            inflight: match previous {
                Some(p) => {
                    p.inflight.set_max(config.max_inflight);
                    Arc::clone(&p.inflight)
                }
                None => Arc::new(Budget::new(config.max_inflight)),
            },
            inflight_gauge: metrics.mirror_inflight.with_label_values(&[route, name]),
            outcomes: Outcomes {
                ok: count("ok"),
                error: count("error"),
                dropped: count("dropped"),
                too_large: count("too_large"),
            },
            lanes: lanes::Lanes::new(&upstream.backends().backends),
            upstream: Arc::clone(&upstream),
            route: route.to_string(),
            compare: config.compare.as_ref().map(|c| Comparing {
                config: c.clone(),
                results: Verdict::ALL
                    .iter()
                    .map(|v| {
                        metrics
                            .mirror_compare
                            .with_label_values(&[route, name, v.label()])
                    })
                    .collect(),
                kept: match &kept_before {
                    Some(k) => {
                        k.resize(c.keep);
                        Arc::clone(k)
                    }
                    None => Arc::new(Kept::new(c.keep)),
                },
            }),
        }
    }

    /// Whether this request is to be copied: by `percent`, per request or per key.
    fn sampled(&self, session: &Session, client: &Client) -> bool {
        let draw = match &self.config.sample_by {
            None => keys::random_u64(),
            Some(key) => {
                let mut buf = [0u8; 16];
                keys::stable_hash(keys::key_bytes(session.req_header(), client, key, &mut buf))
            }
        };
        keys::within_percent(draw, self.config.percent)
    }

    /// The upstream it copies to.
    pub fn upstream_name(&self) -> &str {
        self.upstream.name()
    }

    fn try_acquire(self: &Arc<Self>) -> Option<CopyPermit> {
        let slot = self.inflight.hold(1)?;
        self.inflight_gauge.inc();
        Some(CopyPermit {
            mirror: Arc::clone(self),
            _slot: slot,
        })
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
pub struct CopyPermit {
    mirror: Arc<Mirror>,
    _slot: limits::Held,
}

impl Drop for CopyPermit {
    fn drop(&mut self) {
        self.mirror.inflight_gauge.dec();
    }
}

/// Bodies up to this size that arrive in one piece go on a lane with their copy's head.
const LANE_BODY: u64 = 64 * 1024;

/// A mirror copy whose way out is not chosen yet.
struct Deferred {
    mirror: Arc<Mirror>,
    header: RequestHeader,
    lease: Lease,
    permit: CopyPermit,
    declared: u64,
    connector: Arc<Connector>,
    pairing: Option<Pairing>,
}

impl Deferred {
    /// Sends head and whole body on a lane, or on a connection of its own where the
    /// mirror's connections are not plain HTTP/1.1 (TLS, h2).
    fn send_whole(self, body: Bytes) {
        if !self.mirror.upstream.config.plain_h1() {
            tokio::spawn(mirror_task(
                self.mirror,
                self.connector,
                self.lease,
                self.header,
                self.permit,
                Body::Full(body),
                self.pairing,
            ));
            return;
        }
        lanes::send(
            &self.mirror,
            &self.header,
            Some(body),
            self.lease,
            self.permit,
            self.pairing,
        );
    }

    /// Starts the streaming task instead.
    fn start_task(self) -> Sink {
        let (feed, pieces) = mpsc::channel(FEED_SLOTS);
        let task = tokio::spawn(mirror_task(
            self.mirror,
            self.connector,
            self.lease,
            self.header,
            self.permit,
            Body::Stream(pieces),
            self.pairing,
        ));
        Sink::Task { feed, task }
    }
}

/// A mirror copy sent through the connector, its outcome counted; with `compare`, its
/// answer judged against the primary's.
async fn mirror_task(
    m: Arc<Mirror>,
    connector: Arc<Connector>,
    mut lease: Lease,
    header: RequestHeader,
    permit: CopyPermit,
    body: Body,
    pairing: Option<Pairing>,
) {
    let (timeouts, limit) = (&m.upstream.config.timeouts, m.config.timeout);
    let keep = match (&m.compare, &pairing) {
        (Some(c), Some(_)) => Keep::Digest(c.config.reduce()),
        _ => Keep::Discard,
    };
    let answer = exchange::exchange(&connector, &mut lease, timeouts, limit, &header, body, keep);
    let seen = match answer.await {
        Ok(answer) => {
            m.count_answer(answer.status);
            answer.seen
        }
        // Counted by the primary as it abandoned the copy.
        Err(Failure::BodyAborted) => None,
        Err(_) => {
            m.outcomes.error.inc();
            None
        }
    };
    if let Some(pairing) = pairing {
        pairing.conclude(&m, seen, permit);
    }
}

impl Pairing {
    /// Judges a compared copy's answer (`None`: the copy failed) against the primary's: at
    /// once when the primary's answer has already passed (or is gone), else in a task that
    /// waits for it up to the mirror's `timeout`, holding the copy's `max_inflight` slot so
    /// that comparisons in flight stay bounded. Lanes and connector copies both end here.
    fn conclude(mut self, m: &Arc<Mirror>, seen: Option<Seen>, permit: CopyPermit) {
        let Some(cmp) = &m.compare else { return };
        let Some(mirror) = seen else {
            return cmp.count(Verdict::Incomplete);
        };
        match self.primary.try_recv() {
            Ok(primary) => m.judge(self, primary, mirror),
            Err(oneshot::error::TryRecvError::Closed) => cmp.count(Verdict::Incomplete),
            Err(oneshot::error::TryRecvError::Empty) => {
                let m = Arc::clone(m);
                tokio::spawn(async move {
                    let _permit = permit;
                    let primary = tokio::time::timeout(m.config.timeout, &mut self.primary);
                    match primary.await {
                        Ok(Ok(primary)) => m.judge(self, primary, mirror),
                        _ => {
                            if let Some(cmp) = &m.compare {
                                cmp.count(Verdict::Incomplete);
                            }
                        }
                    }
                });
            }
        }
    }
}

impl Mirror {
    /// Counts how the pair compares, keeping it if it differs.
    fn judge(&self, pairing: Pairing, primary: Seen, mirror: Seen) {
        let Some(cmp) = &self.compare else { return };
        let verdict = judge(&cmp.config, &primary, &mirror);
        cmp.count(verdict);
        if verdict == Verdict::Match {
            return;
        }
        // A kept pair holds heads and excerpts only, never whole bodies.
        let (mut primary, mut mirror) = (primary, mirror);
        primary.json = None;
        mirror.json = None;
        cmp.kept.push(Diff {
            at: pairing.at,
            request_id: pairing.request_id,
            method: pairing.method,
            path: pairing.path,
            route: self.route.clone(),
            upstream: self.upstream.name().to_string(),
            verdict,
            primary,
            mirror,
        });
    }
}

impl Copies {
    /// Starts a copy for each sampled mirror of the route that has room for one.
    pub fn start(
        session: &Session,
        pass: &Passage,
        mirrors: &[Arc<Mirror>],
        request_id: &str,
        connector: &Arc<Connector>,
    ) -> Copies {
        let mut copies = Copies::default();
        let client = &pass.client;
        let (has_body, declared) = limits::declared_body(session.req_header());
        for mirror in mirrors {
            if !mirror.sampled(session, client) {
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
            let upstream = &mirror.upstream;
            // Over the mirror upstream's concurrency limit: dropped, never queued.
            let Ok(slot) = upstream
                .concurrency
                .as_ref()
                .map(|l| l.try_acquire())
                .transpose()
            else {
                mirror.outcomes.dropped.inc();
                continue;
            };
            // No backend (health checks, open circuits): fail at once rather than dial.
            let Some(mut lease) =
                upstream.select_for(session.req_header(), client, &Tried::default())
            else {
                mirror.outcomes.error.inc();
                continue;
            };
            lease.hold(slot);
            let hop = span::copy_span(&pass.trace, "mirror copy").map(|span| {
                let id = span.span_id();
                lease.trace(span);
                id
            });
            let shape = |h: &mut RequestHeader| {
                forwarding::mirror_request(h, &mirror.config, pass, request_id)?;
                match hop {
                    Some(span) => pass.trace.propagate_under(h, span),
                    None => Ok(()),
                }
            };
            let Some(header) = copy_header(session, shape) else {
                mirror.outcomes.error.inc();
                continue;
            };
            // With `compare`, the primary's answer will be reduced as it passes and handed to
            // the copy, which judges the two.
            let pairing = mirror.compare.as_ref().map(|c| {
                let (tx, rx) = oneshot::channel();
                copies.primaries.push(Primary::new(tx, &c.config));
                let req = session.req_header();
                Pairing {
                    primary: rx,
                    at: SystemTime::now(),
                    request_id: request_id.to_string(),
                    method: req.method.to_string(),
                    path: req.uri.path().to_string(),
                }
            });
            if !has_body && upstream.config.plain_h1() {
                // Pipelined with other copies on a lane (see `lanes`).
                lanes::send(mirror, &header, None, lease, permit, pairing);
                continue;
            }
            if !has_body {
                let (m, c) = (Arc::clone(mirror), Arc::clone(connector));
                tokio::spawn(mirror_task(
                    m,
                    c,
                    lease,
                    header,
                    permit,
                    Body::Empty,
                    pairing,
                ));
                continue;
            }
            let deferred = Deferred {
                mirror: Arc::clone(mirror),
                header,
                lease,
                permit,
                // Unknown (chunked): never taken for a whole body.
                declared: declared.unwrap_or(u64::MAX),
                connector: Arc::clone(connector),
                pairing,
            };
            // A body of known, small length may arrive whole with its first piece: wait for
            // it to choose. Others stream from the start.
            let sink = match deferred.declared <= LANE_BODY {
                true => Sink::Deferred(Box::new(deferred)),
                false => deferred.start_task(),
            };
            copies.list.push(Copy {
                sink: Some(sink),
                sent: 0,
                max_body: mirror.config.max_body_bytes,
                mirror: Some(Arc::clone(mirror)),
            });
        }
        copies
    }
}
