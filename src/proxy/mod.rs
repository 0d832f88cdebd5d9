//! The `ProxyHttp` implementation: Pingora's request phases, each delegating to the module
//! that owns the concern. Read top to bottom it is the life of a request:
//!
//! 1. `request_filter`: count it, settle its request id, hold an HTTP/2 request to the
//!    edge's limits and grammar (400/414/431; HTTP/1.1 ones met them before Pingora parsed
//!    them), normalise the path (400), route it (404/405), refuse a declared body over the
//!    limit (413).
//!    Sampled requests on mirrored routes start their copies here, and fallback routes
//!    their fallback copies ([`mirror`], [`fallback`]): tasks that send the request elsewhere through
//!    Pingora's connector and never enter these phases.
//! 2. `request_body_filter`: count the streaming body against the limit (413, upstream
//!    request aborted) and feed it to the copies.
//! 3. On a route with `cache:` ([`cache`]): `request_cache_filter` turns the cache on,
//!    `cache_key_callback` and `cache_vary_filter` name the entry, `cache_hit_filter`
//!    revalidates a fresh hit the client wants fresh, `response_cache_filter` decides
//!    whether an answer may be stored, `should_serve_stale` serves stale on errors. A hit
//!    skips the upstream phases below.
//! 4. `upstream_peer`: lease a backend from the route's upstream (503 when none is left).
//! 5. `upstream_request_filter` / `upstream_response_filter` / `response_filter`:
//!    forwarding headers, hop-by-hop removal, route header rules, `strip_prefix`
//!    ([`forwarding`]); a primary's 5xx on a fallback route hands over to the fallbacks;
//!    `X-Cache`, rate-limit headers. `response_body_filter` feeds the primary's body to
//!    mirror comparisons.
//! 6. `fail_to_connect` / `error_while_proxy`: decide retries (a connect failure, or an
//!    idempotent request that failed before any answer reached the client, goes to another
//!    backend while the upstream's `retries` allow; a request whose client left, or whose
//!    own body broke its framing, is over and never sent again).
//! 7. `fail_to_proxy`: the JSON error answer (413, 502, 503, 504), or a fallback's answer.
//! 8. `logging`: metrics, totals, the access log line; the backend lease is released.

pub mod tunnel;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::broadcast;
use crate::cache;
use crate::compress;
use crate::config::OnStoreError;
use crate::config::{AccessLog, RouteId, Scheme, UpstreamId};
use crate::edge::{self, path};
use crate::fallback::{self, Failover};
use crate::gateway::{Gateway, Generation, Route, RouteRuntime};
use crate::http::answer::{Stop, StopBody};
use crate::http::client::Client;
use crate::http::errors;
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::http::request_id;
use crate::http::respond::{self, send_error};
use crate::http::trace_context::{Origin, Trace};
use crate::keys::{self, request_host};
use crate::limits::{self, BodyCounter, Expect, Refusal};
use crate::mirror::Copies;
use crate::observe::access_log::Record;
use crate::observe::span::{self, Kind, Span};
use crate::ratelimit::{Check, Decision};
use crate::routing::{Probe, RouteMatch};
use crate::upstream::{concurrency, Lease, Tried};

pub struct FanoutProxy {
    gw: Arc<Gateway>,
}

impl FanoutProxy {
    pub fn new(gw: Arc<Gateway>) -> Self {
        FanoutProxy { gw }
    }

    fn route<'a>(&self, ctx: &'a RequestCtx) -> Option<&'a Route> {
        ctx.route.map(|id| &ctx.gen.routes[id])
    }

    /// The upstream this request goes to: the route's.
    fn target(&self, ctx: &RequestCtx) -> Option<UpstreamId> {
        self.route(ctx).and_then(Route::upstream)
    }

    /// Marks `e` retryable, and counts the retry, when the upstream's `retry_budget` (if
    /// any) has room and: nothing was sent (a connect failure) and a backend not yet tried
    /// is available — each is tried once, whatever `retries` says, as nginx's
    /// `proxy_next_upstream error` does —; or the request was sent, is `safe` to send
    /// again, and `retries` allow one more.
    fn decide_retry(&self, ctx: &mut RequestCtx, e: &mut Error, failure: AttemptFailure) {
        let Some(u) = self.target(ctx) else {
            e.set_retry(false);
            return;
        };
        let upstream = &ctx.gen.upstreams[u];
        let mut retry = match failure {
            AttemptFailure::NotSent => upstream.has_untried(&ctx.tried),
            AttemptFailure::Sent { safe } => safe && ctx.resends < upstream.config.retries,
        };
        if retry {
            if let Some(budget) = &upstream.retry_budget {
                match budget.try_retry(upstream.inflight()) {
                    Some(token) => ctx.retrying = Some(token),
                    None => retry = false,
                }
            }
            if retry {
                upstream.retries.inc();
                if matches!(failure, AttemptFailure::Sent { .. }) {
                    ctx.resends += 1;
                }
            }
        }
        e.set_retry(retry);
    }
}

/// The `grpc-status` field of a gRPC answer's head or trailers.
fn grpc_status(fields: &http::HeaderMap) -> Option<u32> {
    fields
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// How an attempt on a backend failed, for [`FanoutProxy::decide_retry`].
#[derive(Debug, Clone, Copy)]
enum AttemptFailure {
    /// Before anything was sent: the connect (or TLS handshake) failed.
    NotSent,
    /// After the request (or part of it) went out; `safe`: it may be sent again
    /// (idempotent, its body still buffered, no answer byte passed on).
    Sent { safe: bool },
}

/// Per-request state carried through the phases.
pub struct RequestCtx {
    start: Instant,
    /// The configuration this request runs on from start to end, whatever reloads happen
    /// meanwhile.
    gen: Arc<Generation>,
    request_id: String,
    route: Option<RouteId>,
    /// The backend currently serving this request; dropping it releases its in-flight slot.
    lease: Option<Lease>,
    /// The backend that served the last attempt, for the access log.
    backend: Option<Arc<str>>,
    tried: Tried,
    attempts: u32,
    /// Attempts sent again after a failure once sent (bounded by the upstream's `retries`).
    resends: u32,
    /// The answer's `grpc-status`, on a gRPC call, for the access log.
    grpc_status: Option<u32>,
    body: BodyCounter,
    /// Set when the gateway itself refused the request mid-way (body over the limit).
    refused: Option<Refusal>,
    /// The mirror and fallback copies of this (primary) request.
    copies: Copies,
    /// Its fallbacks, on a route with fallbacks.
    failover: Failover,
    /// Tokens left in the client's rate-limit bucket after this request, on a limited route.
    rate_remaining: Option<u64>,
    /// What the cache did, on a cached route.
    cache: Option<cache::Outcome>,
    /// Its client (address, identity) and what the route's filters decided.
    pass: Passage,
    /// The fields of a 304 that revalidated a stored answer, for the entry (RFC 9111 4.3.4).
    not_modified: Option<http::HeaderMap>,
    /// Compresses the upstream's answer, on a route with `compress:` ([`compress`]).
    encoder: Option<compress::Encoder>,
    /// A retry its upstream's budget allowed, counted as under way until the request ends.
    retrying: Option<crate::upstream::budget::Retrying>,
    /// Its slot under the upstream's concurrency limit, held across retries.
    permit: Option<concurrency::Permit>,
    /// The upstream's concurrency limit shed it (503 + Retry-After).
    shed: bool,
    /// The request's span, when it is traced ([`telemetry`]).
    span: Option<Span>,
    /// The cache lookup's span, on a traced request of a cached route.
    cache_span: Option<Span>,
    /// The cache was looked up for this request (a later "bypass" phase means the answer
    /// could not be stored: a miss).
    cache_looked_up: bool,
}

/// Reports a failed attempt to its backend (outcome counters, circuit breaker), when the
/// failure is the upstream's and not the client's.
fn attempt_failed(ctx: &mut RequestCtx, e: &Error) {
    if let (Some(lease), ErrorSource::Upstream) = (ctx.lease.as_mut(), e.esource()) {
        lease.failed_with(e);
    }
}

/// What the rate limit's decision means for the request: `None` to go on (the tokens left
/// noted in `remaining` for `X-RateLimit-Remaining`), else the 429.
fn limited(
    remaining_after: &mut Option<u64>,
    route: &Route,
    decision: Decision,
    req: &RequestHeader,
) -> Option<Answer> {
    let limit = route.rate_limiter.as_ref().map_or(0.0, |l| l.limit);
    match decision {
        Decision::Allow { remaining } => {
            *remaining_after = Some(remaining);
            None
        }
        Decision::Deny { retry_after_secs } => {
            route.rate_limited.inc();
            let (has_body, _) = limits::declared_body(req);
            Some(Answer {
                status: 429,
                message: respond::reason(429),
                headers: vec![
                    ("retry-after", retry_after_secs.to_string()),
                    ("x-ratelimit-limit", limit.to_string()),
                    ("x-ratelimit-remaining", "0".to_string()),
                ],
                close: has_body,
            })
        }
    }
}

/// What becomes of a client request once admitted or refused.
enum Verdict {
    /// Proxy it (its mirror copies, if any, are started).
    Proxy,
    /// An upgrade (WebSocket): relay the handshake, then bytes both ways ([`tunnel`]).
    Tunnel(UpstreamId),
    /// A broadcast route: read the body, answer 202, deliver in the background.
    Broadcast,
    /// Refused or answered by the gateway itself.
    Answer(Answer),
    /// The route has filters (access, auth, CORS, rewrite): run them, then go on with
    /// [`FanoutProxy::limit`].
    Filter,
    /// Answered by a filter or a redirect route.
    Stop(Stop),
    /// The route's rate limit is in Redis: ask it, then dispatch ([`FanoutProxy::admit_shared`]).
    AskLimit,
    /// An HTTP/2 request that declares `content-length: 0` on a stream not known to be
    /// ended: wait for its end, then admit it ([`edge::h2::await_empty_end`]).
    AwaitEnd,
}

/// An answer the gateway gives itself instead of proxying.
struct Answer {
    status: u16,
    message: &'static str,
    headers: Vec<(&'static str, String)>,
    /// The request's body stays unread: the connection cannot carry another request.
    close: bool,
}

impl Answer {
    fn status(status: u16) -> Answer {
        Answer {
            status,
            message: respond::reason(status),
            headers: Vec::new(),
            close: false,
        }
    }

    /// The same answer, for [`respond::send_stop`].
    fn into_stop(self) -> Stop {
        Stop {
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .filter_map(|(name, value)| {
                    Some((
                        http::HeaderName::from_static(name),
                        http::HeaderValue::from_str(&value).ok()?,
                    ))
                })
                .collect(),
            body: StopBody::Error(self.message),
            denied: None,
        }
    }

    fn refusal(r: Refusal) -> Answer {
        Answer {
            status: r.status(),
            message: r.message(),
            headers: Vec::new(),
            close: true,
        }
    }
}

impl FanoutProxy {
    /// The primary failed on a route with fallbacks: makes sure the fallback copies have
    /// the whole body (the primary may have failed before reading it), then sends the first
    /// successful fallback answer. `Ok(None)`: every fallback failed too, or the body went
    /// over the route's limit meanwhile (`ctx.refused` says so; the copies are dropped).
    async fn fallback_answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Option<u16>> {
        let limit = ctx
            .route
            .map_or(u64::MAX, |id| ctx.gen.routes[id].config.max_body_bytes);
        let answer = ctx
            .failover
            .first_answer(session, &mut ctx.copies, &mut ctx.body, limit)
            .await;
        let answer = match answer {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ok(None),
            Err(refusal) => {
                ctx.refused = Some(refusal);
                ctx.copies = Copies::default();
                return Ok(None);
            }
        };
        let route = self.route(ctx).map(|r| &r.config);
        let name = ctx.gen.upstreams[answer.upstream].name();
        fallback::send(session, answer, route, &ctx.request_id, name)
            .await
            .map(Some)
    }

    /// A successful unsafe request (POST, PUT, DELETE, ...) makes what the cache holds for
    /// its URI, and for its answer's `Location` and `Content-Location` on the same host,
    /// stale at once: every cached route's entries for them go (RFC 9111 4.4).
    fn invalidate(&self, req: &RequestHeader, resp: &ResponseHeader, gen: &Generation) {
        let Some(cache) = self.gw.cache() else {
            return;
        };
        let host = request_host(req).unwrap_or("");
        let own = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let routes = || {
            gen.routes
                .iter()
                .filter(|r| r.config.cache.is_some())
                .map(|r| r.config.label.as_str())
        };
        for target in std::iter::once(own).chain(cache::also_invalidated(resp, host)) {
            cache.invalidate(routes(), host, &target);
        }
    }

    /// Holds an HTTP/2 request to the edge's limits and field grammar (`edge::h2`; an
    /// HTTP/1.1 one met them before Pingora parsed it), then normalises its path in place
    /// (`edge::path`), so that routing, keys, logs and the upstream request all see the
    /// same one; refuses a path that cannot be.
    fn screen(&self, session: &mut Session, gen: &Generation) -> Result<(), Refusal> {
        let req = session.req_header();
        if req.version == http::Version::HTTP_2 {
            edge::h2::check(req, &gen.clients.limits).map_err(Refusal::Edge)?;
        }
        let normal = path::normalize(req.uri.path(), gen.config.clients.encoded_slashes)
            .map_err(|e| Refusal::BadRequest(e.message()))?;
        let Some(normal) = normal else {
            return Ok(());
        };
        // The authority stays: it is an h2 request's host (`:authority`).
        let uri = path::with_path(&req.uri, &normal)
            .ok_or(Refusal::BadRequest(path::PathError::Malformed.message()))?;
        session.req_header_mut().set_uri(uri);
        Ok(())
    }

    /// Routes a client request and applies every check that may refuse it, in order:
    /// route (404/405), declared body size (413), rate limit (429).
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Verdict {
        let req = session.req_header();
        let router = &ctx.gen.router;
        let local = match router.needs_listener {
            true => session.server_addr().and_then(|a| a.as_inet()).copied(),
            false => None,
        };
        let probe = Probe {
            host: request_host(req),
            path: req.uri.path(),
            method: &req.method,
            scheme: Scheme::of(ctx.pass.client.https),
            listener: local
                .as_ref()
                .and_then(|a| crate::config::listener_name(&ctx.gen.config.listen, a)),
        };
        let id = match router.find(&probe) {
            RouteMatch::Found(id) => id,
            RouteMatch::MethodNotAllowed => return Verdict::Answer(Answer::status(405)),
            RouteMatch::NotFound => return Verdict::Answer(Answer::status(404)),
        };
        ctx.route = Some(id);
        let route = &ctx.gen.routes[id];
        if let Err(r) = limits::check_length(req, route.config.max_body_bytes) {
            return Verdict::Answer(Answer::refusal(r));
        }
        if !route.filters.is_empty() {
            return Verdict::Filter;
        }
        self.limit(session, ctx)
    }

    /// Runs the route's filters: a request they stop is answered, one they pass goes on
    /// to the rate limit.
    async fn filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Verdict {
        let Some(id) = ctx.route else {
            return Verdict::Answer(Answer::status(404));
        };
        let gen = Arc::clone(&ctx.gen);
        let mut span = ctx
            .span
            .as_ref()
            .map(|s| s.child("access and auth", Kind::Internal));
        let decided = gen.routes[id].filters.run(session, &mut ctx.pass).await;
        if let Some(span) = &mut span {
            match &decided {
                Ok(()) => span.attr("fanout.decision", "passed"),
                Err(stop) => {
                    span.attr("fanout.decision", "stopped");
                    span.attr("http.response.status_code", i64::from(stop.status));
                    if let Some(reason) = stop.denied {
                        span.fail(format!("denied: {reason:?}"));
                    }
                }
            }
        }
        drop(span);
        match decided {
            Ok(()) => self.limit(session, ctx),
            Err(stop) => Verdict::Stop(stop),
        }
    }

    /// The route's rate limit (429), then [`Self::dispatch`].
    fn limit(&self, session: &Session, ctx: &mut RequestCtx) -> Verdict {
        let Some(route) = ctx.route.map(|id| &ctx.gen.routes[id]) else {
            return Verdict::Answer(Answer::status(404));
        };
        let req = session.req_header();
        if let Some(limiter) = &route.rate_limiter {
            let mut buf = [0u8; 16];
            let key = keys::key_bytes(req, &ctx.pass.client, &limiter.key, &mut buf);
            match limiter.decide(key, Instant::now()) {
                Check::Now(decision) => {
                    if let Some(answer) = limited(&mut ctx.rate_remaining, route, decision, req) {
                        return Verdict::Answer(answer);
                    }
                }
                Check::Ask(_) => return Verdict::AskLimit,
            }
        }
        self.dispatch(session, ctx)
    }

    /// The decision of a route whose rate limit lives in Redis (`store: redis`), then the
    /// rest of [`Self::admit`]. Redis not answering within `redis.timeout` is a store error:
    /// counted, then `on_store_error` lets the request through or answers 503.
    async fn admit_shared(&self, session: &Session, ctx: &mut RequestCtx) -> Verdict {
        let Some(route) = ctx.route.map(|id| &ctx.gen.routes[id]) else {
            return Verdict::Answer(Answer::status(404));
        };
        let Some(limiter) = route.rate_limiter.as_ref() else {
            return self.dispatch(session, ctx);
        };
        let mut buf = [0u8; 16];
        let key = keys::key_bytes(
            session.req_header(),
            &ctx.pass.client,
            &limiter.key,
            &mut buf,
        )
        .to_vec();
        let Check::Ask(shared) = limiter.decide(&key, Instant::now()) else {
            return self.dispatch(session, ctx);
        };
        match shared.check(&key).await {
            Ok(decision) => {
                let req = session.req_header();
                if let Some(answer) = limited(&mut ctx.rate_remaining, route, decision, req) {
                    return Verdict::Answer(answer);
                }
            }
            Err(e) => {
                route.rate_limit_store_errors.inc();
                log::debug!("rate limit of {}: {e}", route.config.label);
                if shared.on_error == OnStoreError::Deny {
                    let (has_body, _) = limits::declared_body(session.req_header());
                    return Verdict::Answer(Answer {
                        status: 503,
                        message: "rate limit store unavailable",
                        headers: vec![("retry-after", "1".to_string())],
                        close: has_body,
                    });
                }
            }
        }
        self.dispatch(session, ctx)
    }

    /// The route's kind decides what becomes of an admitted request.
    fn dispatch(&self, session: &Session, ctx: &mut RequestCtx) -> Verdict {
        let Some(id) = ctx.route else {
            return Verdict::Answer(Answer::status(404));
        };
        let route = &ctx.gen.routes[id];
        match &route.kind {
            // An upgrade (WebSocket) becomes a tunnel to one backend: never mirrored, and
            // no fallback can take over a tunnel.
            RouteRuntime::Proxy(p) if tunnel::wanted(session) => Verdict::Tunnel(p.upstream),
            RouteRuntime::Proxy(_) if forwarding::is_upgrade(session.req_header()) => {
                Verdict::Proxy
            }
            RouteRuntime::Proxy(p) => {
                let connector = &self.gw.connector;
                if !p.mirrors.is_empty() {
                    ctx.copies =
                        Copies::start(session, &ctx.pass, &p.mirrors, &ctx.request_id, connector);
                }
                if let Some(fallbacks) = &p.fallbacks {
                    let of = fallback::Of {
                        session,
                        pass: &ctx.pass,
                        request_id: &ctx.request_id,
                    };
                    ctx.failover =
                        Failover::start(&mut ctx.copies, of, &route.config, fallbacks, connector);
                }
                Verdict::Proxy
            }
            RouteRuntime::Broadcast(_) => Verdict::Broadcast,
            RouteRuntime::Redirect(r) => {
                Verdict::Stop(r.answer(session.req_header(), ctx.pass.client.https))
            }
        }
    }

    /// The rest of `request_filter` for requests that are not simply proxied: an
    /// expectation to answer, a tunnel, a broadcast, or the gateway's own answer.
    async fn settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        verdict: Verdict,
        expect: Expect,
    ) -> Result<bool> {
        // `Expect: 100-continue` is answered here, once the request is admitted (route,
        // size and rate limits passed): the client sends its body at once instead of waiting
        // for a backend's `100` that may never come. A refusal above went out without the
        // body being read.
        let verdict = match verdict {
            // Nothing is routed, copied or sent upstream before the stream has shown that
            // it carries no data.
            Verdict::AwaitEnd => {
                match edge::h2::await_empty_end(session, ctx.gen.clients.body_timeout).await {
                    Ok(()) => self.admit(session, ctx),
                    Err(r) => {
                        ctx.gen.clients.refused.bad_request.inc();
                        Verdict::Answer(Answer::refusal(Refusal::Edge(r)))
                    }
                }
            }
            v => v,
        };
        let verdict = match verdict {
            Verdict::Filter => self.filter(session, ctx).await,
            v => v,
        };
        let verdict = match verdict {
            Verdict::AskLimit => self.admit_shared(session, ctx).await,
            v => v,
        };
        let verdict = match (verdict, expect) {
            (
                v @ (Verdict::Proxy | Verdict::Broadcast | Verdict::Tunnel(_)),
                Expect::Unsupported,
            ) => {
                drop(v);
                Verdict::Answer(Answer::refusal(Refusal::Expectation))
            }
            (v @ (Verdict::Proxy | Verdict::Broadcast), Expect::Continue) => {
                session
                    .req_header_mut()
                    .remove_header(&http::header::EXPECT);
                respond::send_continue(session).await?;
                v
            }

            (v, _) => v,
        };
        match verdict {
            Verdict::Proxy => Ok(false),
            Verdict::Tunnel(upstream) => {
                if let Some(route) = self.route(ctx) {
                    let target = tunnel::TunnelTarget {
                        upstream: &ctx.gen.upstreams[upstream],
                        route: &route.config,
                        pass: &ctx.pass,
                        connector: &self.gw.connector,
                        request_id: &ctx.request_id,
                    };
                    ctx.backend = tunnel::serve(session, target).await?;
                }
                Ok(true)
            }
            Verdict::Broadcast => {
                let route = ctx.route.map(|id| &ctx.gen.routes[id]);
                if let Some((route, RouteRuntime::Broadcast(targets))) = route.map(|r| (r, &r.kind))
                {
                    let closing = self.gw.draining.is_set();
                    broadcast::accept(
                        session,
                        &route.config,
                        targets,
                        &*self.gw.spool,
                        &ctx.pass,
                        &ctx.request_id,
                        closing,
                    )
                    .await?;
                }
                Ok(true)
            }
            Verdict::Answer(a) => {
                let close = a.close || self.gw.draining.is_set();
                let chain = ctx
                    .route
                    .map(|id| &ctx.gen.routes[id].filters)
                    .filter(|c| !c.is_empty());
                match chain {
                    // A route with filters: they add to the gateway's own answers too (a
                    // 429 a page's script must be able to read carries its CORS headers).
                    Some(chain) => {
                        respond::send_stop(session, a.into_stop(), &ctx.request_id, close, |h| {
                            chain.response(&ctx.pass, h)
                        })
                        .await?
                    }
                    None => {
                        send_error(
                            session,
                            a.status,
                            a.message,
                            &ctx.request_id,
                            &a.headers,
                            close,
                        )
                        .await?
                    }
                }
                Ok(true)
            }
            Verdict::Stop(stop) => {
                let close =
                    limits::declared_body(session.req_header()).0 || self.gw.draining.is_set();
                let route = ctx.route.map(|id| &ctx.gen.routes[id].filters);
                respond::send_stop(session, stop, &ctx.request_id, close, |head| {
                    if let Some(chain) = route {
                        chain.response(&ctx.pass, head)
                    }
                })
                .await?;
                Ok(true)
            }
            // Decided above: never here.
            Verdict::AskLimit | Verdict::AwaitEnd | Verdict::Filter => {
                let a = Answer::status(500);
                send_error(session, 500, a.message, &ctx.request_id, &[], true).await?;
                Ok(true)
            }
        }
    }
}

#[async_trait]
impl ProxyHttp for FanoutProxy {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default installs a (disabled) response compression
    /// module whose context is built, and whose filters run, for every request. fanout
    /// does not compress answers.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            gen: self.gw.current(),
            request_id: String::new(),
            route: None,
            lease: None,
            backend: None,
            tried: Tried::default(),
            attempts: 0,
            resends: 0,
            grpc_status: None,
            body: BodyCounter::default(),
            refused: None,
            copies: Copies::default(),
            failover: Failover::default(),
            rate_remaining: None,
            cache: None,
            pass: Passage::default(),
            not_modified: None,
            encoder: None,
            retrying: None,
            permit: None,
            shed: false,
            span: None,
            cache_span: None,
            cache_looked_up: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.gw.metrics.totals.count_request();
        ctx.pass.client = Client::of(session, &ctx.gen.config.clients.trusted_proxies);
        let req = session.req_header();
        ctx.request_id =
            request_id::from_client(req.headers.get(request_id::HEADER).map(|v| v.as_bytes()));
        ctx.pass.trace = Trace::of(&req.headers);
        if let Some(tracer) = span::current() {
            ctx.span = traced(&tracer, &mut ctx.pass.trace);
        }
        let verdict = match self.screen(session, &ctx.gen) {
            Ok(()) if edge::h2::declares_empty_body(session.req_header()) => Verdict::AwaitEnd,
            Ok(()) => self.admit(session, ctx),
            Err(r) => {
                ctx.gen.clients.refused.bad_request.inc();
                Verdict::Answer(Answer::refusal(r))
            }
        };
        let verdict = match verdict {
            // A route's filters are awaited here, not in `settle`: their future is small
            // (a chain of boxed steps), and a request they pass is then the common case.
            Verdict::Filter => self.filter(session, ctx).await,
            v => v,
        };
        let expect = limits::expectation(session.req_header());
        if matches!((&verdict, &expect), (Verdict::Proxy, Expect::Nothing)) {
            // The common case awaits nothing: the others live in a future of their own,
            // boxed only when needed, so this phase's future stays small (async_trait
            // moves every phase's whole future onto the heap, per request).
            return Ok(false);
        }
        Box::pin(self.settle(session, ctx, verdict, expect)).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) {
            // An empty last piece (an h2 client's empty DATA frame with END_STREAM) would
            // go upstream as an empty chunk, which is chunked encoding's terminator, and
            // then the terminator itself: a stray `0\r\n\r\n` left on a pooled connection.
            *body = None;
        }
        let limit = ctx
            .route
            .map_or(u64::MAX, |id| ctx.gen.routes[id].config.max_body_bytes);
        let replayed = match body.as_ref().map(|chunk| ctx.body.add(chunk.len(), limit)) {
            None => 0,
            Some(Ok(replayed)) => replayed,
            Some(Err(refusal)) => {
                ctx.refused = Some(refusal);
                return Error::e_explain(
                    ErrorType::HTTPStatus(refusal.status()),
                    refusal.message(),
                );
            }
        };
        if !ctx.copies.is_empty() {
            // A retry's replay of bytes the copies already have is not theirs to get again.
            match body.as_ref() {
                Some(chunk) if replayed == chunk.len() && !end_of_stream => {}
                Some(chunk) if replayed == chunk.len() => ctx.copies.feed(None, true),
                Some(chunk) if replayed > 0 => ctx
                    .copies
                    .feed(Some(&chunk.slice(replayed..)), end_of_stream),
                chunk => ctx.copies.feed(chunk, end_of_stream),
            }
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let route_cache = self.route(ctx).and_then(|r| r.config.cache.as_ref());
        if let (Some(cache), Some(rc)) = (self.gw.cache(), route_cache) {
            cache.enable(session, rc);
            ctx.cache_span = ctx
                .span
                .as_ref()
                .map(|s| s.child("cache lookup", Kind::Internal));
        }
        Ok(())
    }

    fn cache_key_callback(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::CacheKey> {
        ctx.cache_looked_up = true;
        let label = self.route(ctx).map_or("", |r| r.config.label.as_str());
        Ok(cache::key(label, session.req_header()))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::RespCacheable> {
        let refuse =
            pingora_cache::RespCacheable::Uncacheable(pingora_cache::NoCacheReason::NeverEnabled);
        let not_modified = ctx.not_modified.take();
        let Some(rc) = self.route(ctx).and_then(|r| r.config.cache.as_ref()) else {
            return Ok(refuse);
        };
        Ok(match not_modified {
            // A revalidation: `resp` is the stored answer with Pingora's few fields of the
            // 304; every other field the 304 carries goes into the entry too.
            Some(fields) => {
                cache::cacheable(rc, session.req_header(), &cache::refreshed(resp, &fields))
            }
            None => cache::cacheable(rc, session.req_header(), resp),
        })
    }

    fn cache_vary_filter(
        &self,
        meta: &pingora_cache::CacheMeta,
        ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<[u8; 16]> {
        // On a compressing route, requests vary by the coding they get, not by the text of
        // their Accept-Encoding: one variant per coding.
        let coding = self
            .route(ctx)
            .and_then(|r| r.proxy()?.compress.as_ref())
            .map(|c| c.negotiate(req).map_or("identity", |c| c.token()));
        cache::variance(meta, req, coding)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(encoder) = ctx.encoder.as_mut() {
            encoder.feed(body, end_of_stream);
        }
        Ok(None)
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        _meta: &pingora_cache::CacheMeta,
        _hit_handler: &mut pingora_cache::HitHandler,
        is_fresh: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<Option<pingora_cache::ForcedFreshness>> {
        // A client that asks for a fresh answer gets the entry revalidated first.
        Ok(
            (is_fresh && cache::client_wants_fresh(session.req_header()))
                .then_some(pingora_cache::ForcedFreshness::ForceExpired),
        )
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        cache::stale_allowed(error)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let upstream = self
            .target(ctx)
            .map(|u| &ctx.gen.upstreams[u])
            .ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "request has no proxy route")
            })?;
        // Release the previous attempt's slot before choosing, so least_conn sees true loads.
        ctx.lease = None;
        ctx.body.restart();
        if let (Some(limiter), None) = (&upstream.concurrency, &ctx.permit) {
            match limiter.acquire().await {
                Ok(permit) => ctx.permit = Some(permit),
                Err(concurrency::Shed) => {
                    ctx.shed = true;
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "over the upstream's concurrency limit",
                    );
                }
            }
        }
        let lease = upstream
            .select_for(session.req_header(), &ctx.pass.client, &ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no healthy backend"))?;
        ctx.tried.add(lease.index());
        ctx.attempts += 1;
        ctx.backend = Some(Arc::clone(&lease.backend().label));
        let peer = lease.backend().peer();
        let mut lease = lease;
        if let Some(span) = &ctx.span {
            let mut attempt = span.child("upstream attempt", Kind::Client);
            attempt.attr("fanout.attempt", i64::from(ctx.attempts));
            lease.trace(attempt);
        }
        ctx.lease = Some(lease);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = self
            .route(ctx)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        forwarding::upstream_request(upstream_request, &route.config, &ctx.pass, &ctx.request_id)?;
        if let Some(lease) = &ctx.lease {
            lease.backend().set_host(upstream_request)?;
        }
        match ctx.lease.as_ref().and_then(Lease::span_id) {
            // A traced attempt: the upstream's parent is the attempt's span.
            Some(attempt) => ctx.pass.trace.propagate_under(upstream_request, attempt),
            None => Ok(()),
        }
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(s) = grpc_status(trailers) {
            ctx.grpc_status = Some(s);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status;
        if let (Some(lease), false) = (ctx.lease.as_mut(), status.is_informational()) {
            lease.answered(status.as_u16());
        }
        // A trailers-only gRPC answer carries its status in the head.
        ctx.grpc_status = grpc_status(&upstream_response.headers);
        if status == http::StatusCode::NOT_MODIFIED && ctx.cache_looked_up {
            ctx.not_modified = Some(upstream_response.headers.clone());
        }
        if let Some(c) = self.route(ctx).and_then(|r| r.proxy()?.compress.as_ref()) {
            // Before the cache stores it: a compressed answer is stored as its own variant.
            ctx.encoder = c.start(session.req_header(), upstream_response);
        }
        if ctx.failover.primary_fails_with(status.as_u16()) {
            // The primary failed: its answer is not used; fail_to_proxy picks a fallback's.
            return Error::e_explain(
                ErrorType::HTTPStatus(status.as_u16()),
                "primary upstream answered 5xx",
            );
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Comparisons see the answer as the upstream (or the cache) gave it.
        ctx.copies.primary_head(
            upstream_response.status.as_u16(),
            &upstream_response.headers,
        );
        // The primary's answer is the client's: the fallbacks' are not needed.
        let target = self.target(ctx);
        if let (true, Some(u)) = (ctx.failover.primary_answers(target), target) {
            upstream_response.insert_header(fallback::HEADER, ctx.gen.upstreams[u].name())?;
        }
        if let Some(results) = ctx
            .route
            .map(|id| &ctx.gen.routes[id])
            .and_then(|r| r.proxy()?.cache_results.as_ref())
        {
            let outcome = match cache::Outcome::of(session.cache.phase()) {
                cache::Outcome::Bypass if ctx.cache_looked_up => cache::Outcome::Miss,
                outcome => outcome,
            };
            ctx.cache = Some(outcome);
            results[outcome.index()].inc();
            if let Some(mut span) = ctx.cache_span.take() {
                span.attr("fanout.cache", outcome.label());
            }
            upstream_response.insert_header("x-cache", outcome.header())?;
        }
        if self.gw.draining.is_set() || session.is_process_shutting_down() {
            // Stopping or handing over to a new process: close each client connection after
            // its current answer, so the client reconnects to the process that goes on.
            session.as_downstream_mut().set_keepalive(None);
            upstream_response.insert_header(header::CONNECTION, "close")?;
        }
        if let (Some(remaining), Some(limiter)) = (
            ctx.rate_remaining,
            self.route(ctx).and_then(|r| r.rate_limiter.as_ref()),
        ) {
            upstream_response.insert_header("x-ratelimit-limit", limiter.limit.to_string())?;
            upstream_response.insert_header("x-ratelimit-remaining", remaining.to_string())?;
        }
        if let Some(route) = self.route(ctx).filter(|r| !r.filters.is_empty()) {
            route.filters.response(&ctx.pass, upstream_response);
        }
        let req = session.req_header();
        if !req.method.is_safe() && (200..400).contains(&upstream_response.status.as_u16()) {
            self.invalidate(req, upstream_response, &ctx.gen);
        }
        forwarding::response(
            upstream_response,
            self.route(ctx).map(|r| &r.config),
            &ctx.request_id,
        )
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        // Hashed as it passes, never held: a comparison costs the client nothing.
        ctx.copies.primary_body(body.as_deref(), end_of_stream);
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if e.etype == ErrorType::TLSHandshakeFailure {
            // The usual cause is configuration (CA, name, protocol): say which backend.
            let upstream = self.target(ctx).map(|u| ctx.gen.upstreams[u].name());
            log::error!(
                "TLS to backend {} of upstream {} failed: {}",
                ctx.backend.as_deref().unwrap_or("?"),
                upstream.unwrap_or("?"),
                e
            );
        }
        attempt_failed(ctx, &e);
        // Nothing reached the backend: any request may go to another one.
        self.decide_retry(ctx, &mut e, AttemptFailure::NotSent);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.refused.is_some() || ctx.failover.primary_failed() {
            // The gateway cut the request off itself (body limit, or failing over to a
            // fallback): not a reason to retry.
            e.set_retry(false);
            return e;
        }
        if e.esource() == &ErrorSource::Downstream {
            // The client is gone, or its own body broke its framing: the request is over,
            // never sent again.
            e.set_retry(false);
            ctx.gen.clients.refused.downstream(&e).inc();
            return e;
        }
        attempt_failed(ctx, &e);
        let downstream = session.as_downstream();
        let safe = session.req_header().method.is_idempotent()
            && !downstream.retry_buffer_truncated()
            && downstream.response_written().is_none();
        self.decide_retry(ctx, &mut e, AttemptFailure::Sent { safe });
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let mut code = match ctx.refused {
            Some(refusal) => refusal.status(),
            None => errors::status_for(e),
        };
        // Only answer if no answer has started.
        let can_answer = code > 0 && session.as_downstream().response_written().is_none();
        // A request shed before anything was sent, with no body left unread, leaves its
        // connection fit for the next one: an overload is no time for clients to reconnect.
        let reusable = ctx.shed && can_answer && !limits::declared_body(session.req_header()).0;
        if can_answer && ctx.refused.is_none() && ctx.failover.armed() {
            match self.fallback_answer(session, ctx).await {
                Ok(Some(status)) => code = status,
                Ok(None) => {
                    let (status, message) = match ctx.refused {
                        Some(refusal) => (refusal.status(), refusal.message()),
                        None => (502, "every upstream failed"),
                    };
                    code = status;
                    if let Err(write_error) =
                        send_error(session, status, message, &ctx.request_id, &[], true).await
                    {
                        log::debug!("could not send the {status} answer: {write_error}");
                    }
                }
                Err(write_error) => {
                    log::debug!("could not send the fallback answer: {write_error}")
                }
            }
        } else if can_answer {
            let (message, extra) = match (ctx.refused, ctx.shed) {
                (Some(refusal), _) => (refusal.message(), None),
                (None, true) => (
                    "upstream over its concurrency limit",
                    Some(("retry-after", "1".to_string())),
                ),
                (None, false) => (respond::reason(code), None),
            };
            if let Err(write_error) = send_error(
                session,
                code,
                message,
                &ctx.request_id,
                extra.as_slice(),
                !reusable,
            )
            .await
            {
                log::debug!("could not send the {code} answer: {write_error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: reusable,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // A primary 5xx on a fallback route is an expected failover, visible in metrics and
        // the access log. So is a backend that cannot be reached, or no backend left: the
        // access log has each request, the metrics count them, and the breaker logs each
        // backend going out and coming back — one line per change, not one per request.
        // A client that left mid-request is counted (`client_closed`) and in the access log.
        ctx.failover.primary_failed()
            || errors::is_connect(error)
            || matches!(error.etype(), ErrorType::HTTPStatus(503))
            || *error.esource() == ErrorSource::Downstream
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        // An attempt that another backend will retry is counted
        // (`fanout_upstream_retries_total`, the backend's outcomes), not logged.
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
            && *error.esource() == ErrorSource::Upstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.lease = None;
        let elapsed = ctx.start.elapsed();
        let status = session
            .as_downstream()
            .response_written()
            .map_or(0, |r| r.status.as_u16());
        let route = ctx.route.map(|id| &ctx.gen.routes[id]);
        if let Some(span) = ctx.span.take() {
            finish_request_span(span, session, ctx, route, status, e);
        }
        let route_metrics = route.map_or(&self.gw.unrouted, |r| &r.metrics);
        route_metrics.observe(&self.gw.metrics, status, elapsed.as_secs_f64());
        self.gw.metrics.totals.count_answer(status, e.is_some());

        let log = route.map_or(ctx.gen.config.default_access_log, |r| r.config.access_log);
        if log == AccessLog::Json {
            let req = session.req_header();
            let downstream = session.as_downstream();
            self.gw.access_log.log(Record {
                ts: SystemTime::now()
                    .checked_sub(elapsed)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                request_id: std::mem::take(&mut ctx.request_id),
                trace_id: ctx.pass.trace.parent.trace_id_hex(),
                client: ctx.pass.client.ip,
                identity: ctx.pass.client.identity.take(),
                method: req.method.as_str().to_string(),
                protocol: protocol(session),
                host: request_host(req).map(String::from),
                path: req.uri.path().to_string(),
                status,
                grpc_status: ctx.grpc_status,
                route: route.map(|r| Arc::clone(r.metrics.label())),
                upstream: ctx
                    .failover
                    .answered_by()
                    .or_else(|| route.and_then(Route::upstream))
                    .map(|u| Arc::clone(&ctx.gen.upstreams[u].name)),
                backend: ctx.backend.take(),
                cache: ctx.cache.map(cache::Outcome::label),
                duration_ms: millis(elapsed),
                bytes_in: downstream.body_bytes_read() as u64,
                bytes_out: downstream.body_bytes_sent() as u64,
            });
        }
    }
}

/// The request's span when `tracer` samples it (parent-based, else `sample`); the trace
/// context then names it as the parent of what the request sends.
fn traced(tracer: &Arc<span::Tracer>, trace: &mut Trace) -> Option<Span> {
    let from_client = trace.origin == Origin::Client;
    if !tracer.samples(&trace.parent, from_client) {
        return None;
    }
    let span = tracer.span(trace.parent, from_client, "request", Kind::Server, None);
    trace.span = Some(span.span_id());
    Some(span)
}

/// Names the request's span after its method and route, notes what became of it, and
/// ends it.
fn finish_request_span(
    mut span: Span,
    session: &Session,
    ctx: &RequestCtx,
    route: Option<&Route>,
    status: u16,
    e: Option<&Error>,
) {
    let req = session.req_header();
    let route_label = route.map_or("unrouted", |r| &**r.metrics.label());
    span.rename(format!("{} {route_label}", req.method));
    span.attr("http.request.method", req.method.to_string());
    span.attr("url.path", req.uri.path().to_string());
    span.attr("http.route", route_label.to_string());
    span.attr("http.response.status_code", i64::from(status));
    span.attr("fanout.request_id", ctx.request_id.clone());
    if let Some(ip) = ctx.pass.client.ip {
        span.attr("client.address", ip.to_string());
    }
    let downstream = session.as_downstream();
    span.attr(
        "http.request.body.size",
        downstream.body_bytes_read() as i64,
    );
    span.attr(
        "http.response.body.size",
        downstream.body_bytes_sent() as i64,
    );
    if let Some(u) = ctx
        .failover
        .answered_by()
        .or_else(|| route.and_then(Route::upstream))
    {
        span.attr("fanout.upstream", ctx.gen.upstreams[u].name().to_string());
    }
    match e {
        Some(e) => span.fail(e.to_string()),
        None if status >= 500 => span.fail(format!("answered {status}")),
        None => {}
    }
}

/// The client's protocol, for the access log.
fn protocol(session: &Session) -> &'static str {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    match (session.req_header().version, tls) {
        (http::Version::HTTP_2, true) => "HTTP/2+tls",
        (http::Version::HTTP_2, false) => "HTTP/2",
        (http::Version::HTTP_10, true) => "HTTP/1.0+tls",
        (http::Version::HTTP_10, false) => "HTTP/1.0",
        (_, true) => "HTTP/1.1+tls",
        (_, false) => "HTTP/1.1",
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}
