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
//!    ([`crate::http::forwarding`]); a primary's 5xx on a fallback route hands over to the fallbacks;
//!    `X-Cache`, rate-limit headers. `response_body_filter` feeds the primary's body to
//!    mirror comparisons.
//! 6. `fail_to_connect` / `error_while_proxy`: decide retries (a connect failure, or an
//!    idempotent request that failed before any answer reached the client, goes to another
//!    backend while the upstream's `retries` allow; a request whose client left, or whose
//!    own body broke its framing, is over and never sent again).
//! 7. `fail_to_proxy`: the JSON error answer (413, 502, 503, 504), or a fallback's answer.
//! 8. `logging`: metrics, totals, the access log line; the backend lease is released.

mod admission;
mod context;
mod finish;
pub mod tunnel;

use admission::{Admission, OwnAnswer};
pub use context::RequestCtx;
use context::{attempt_failed, grpc_status, AttemptFailure};
use finish::{finish_request_span, millis, protocol, traced};

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
            Ok(()) if edge::h2::declares_empty_body(session.req_header()) => Admission::AwaitEnd,
            Ok(()) => self.admit(session, ctx),
            Err(r) => {
                ctx.gen.clients.refused.bad_request.inc();
                Admission::Answer(OwnAnswer::refusal(r))
            }
        };
        let verdict = match verdict {
            // A route's filters are awaited here, not in `settle`: their future is small
            // (a chain of boxed steps), and a request they pass is then the common case.
            Admission::Filter => self.filter(session, ctx).await,
            v => v,
        };
        let expect = limits::expectation(session.req_header());
        if matches!((&verdict, &expect), (Admission::Proxy, Expect::Nothing)) {
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
