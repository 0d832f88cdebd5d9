//! The `ProxyHttp` implementation: Pingora's request phases, each delegating to the module
//! that owns the concern. Read top to bottom it is the life of a request:
//!
//! 1. `request_filter`: count it, settle its request id, hold an HTTP/2 request to the
//!    edge's limits and grammar (400/414/431; HTTP/1.1 ones met them before Pingora parsed
//!    them), normalise the path (400), then [`admission`]: route it (404/405, and from
//!    then on the request carries its [`context::Routed`] state), refuse a declared body
//!    over the limit (413), run the route's chain of steps (`crate::filters`: access,
//!    CORS, auth, plugins, rewrite, rate limit; 401/403/429), and dispatch by the route's
//!    kind. Sampled requests on mirrored routes start their copies there, and fallback
//!    routes their fallback copies ([`mirror`], [`fallback`]): tasks that send the request
//!    elsewhere through Pingora's connector and never enter these phases.
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
//!    ([`crate::http::forwarding`]); compression ([`compress`]); a primary's 5xx on a
//!    fallback route hands over to the fallbacks; `X-Cache` ([`cache::report`]); the
//!    answer side of the route's steps (CORS, `X-RateLimit-*`, plugins').
//!    `response_body_filter` feeds the primary's body to mirror comparisons.
//! 6. `fail_to_connect` / `error_while_proxy`: decide retries ([`context`]: a connect
//!    failure, or an idempotent request that failed before any answer reached the client,
//!    goes to another backend while the upstream's `retries` allow; a request whose client
//!    left, or whose own body broke its framing, is over and never sent again).
//! 7. `fail_to_proxy`: the JSON error answer (413, 502, 503, 504), or a fallback's answer.
//! 8. `logging`: metrics, totals, the access log line ([`finish`]); the backend lease is
//!    released.

mod admission;
mod context;
mod finish;
pub mod tunnel;

use admission::Admission;
pub use context::RequestCtx;
use context::{attempt_failed, grpc_status, on_route, upstream_of, AttemptFailure, Routed};
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

use crate::broadcast::{self, Targets};
use crate::cache;
use crate::compress;
use crate::config::{AccessLog, RouteId, Scheme, UpstreamId};
use crate::edge::{self, path};
use crate::fallback::{self, Failover};
use crate::filters::Chain;
use crate::gateway::{Gateway, Generation, Route, RouteRuntime};
use crate::http::answer::Stop;
use crate::http::client::Client;
use crate::http::errors;
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::http::request_id;
use crate::http::respond::{self, send_error};
use crate::http::trace_context::{Origin, Trace};
use crate::keys::request_host;
use crate::limits::{self, BodyCounter, Expect, Refusal};
use crate::mirror::Copies;
use crate::observe::access_log::Record;
use crate::observe::span::{self, Kind, Span};
use crate::routing::{Probe, RouteMatch};
use crate::upstream::{concurrency, sticky, Lease, Tried, Upstream};

pub struct FanoutProxy {
    gw: Arc<Gateway>,
}

impl FanoutProxy {
    pub fn new(gw: Arc<Gateway>) -> Self {
        FanoutProxy { gw }
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
        RequestCtx::new(self.gw.current())
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
        let admission = match self.screen(session, &ctx.gen) {
            // Nothing is routed, copied or sent upstream before the stream has shown that
            // it carries no data.
            Ok(()) if edge::h2::declares_empty_body(session.req_header()) => {
                Box::pin(self.admit_when_ended(session, ctx)).await
            }
            // The route's steps are awaited within `admit`: their future is small (a chain
            // of boxed steps).
            Ok(()) => self.admit(session, ctx).await,
            Err(r) => {
                ctx.gen.clients.refused.bad_request.inc();
                Admission::Refuse(r)
            }
        };
        let expect = limits::expectation(session.req_header());
        if matches!((&admission, &expect), (Admission::Proxy, Expect::Nothing)) {
            // The common case awaits nothing more: the others live in a future of their
            // own, boxed only when needed, so this phase's future stays small (async_trait
            // moves every phase's whole future onto the heap, per request).
            return Ok(false);
        }
        Box::pin(self.settle(session, ctx, admission, expect)).await
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
        let limit = ctx.body_limit();
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
        let copies = match ctx.routed.as_mut() {
            Some(routed) if !routed.copies.is_empty() => &mut routed.copies,
            _ => return Ok(()),
        };
        // A retry's replay of bytes the copies already have is not theirs to get again.
        match body.as_ref() {
            Some(chunk) if replayed == chunk.len() && !end_of_stream => {}
            Some(chunk) if replayed == chunk.len() => copies.feed(None, true),
            Some(chunk) if replayed > 0 => {
                copies.feed(Some(&chunk.slice(replayed..)), end_of_stream)
            }
            chunk => copies.feed(chunk, end_of_stream),
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let span = ctx.span.as_ref();
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        // A request its split sent to another upstream neither reads nor fills the route's
        // cache: the entries are the route's own upstream's answers.
        let own_side = ctx.pass.upstream.is_none();
        if let (Some(cache), Some(rc), true) =
            (self.gw.cache(), route.config.cache.as_ref(), own_side)
        {
            cache.enable(session, rc);
            routed.cache_span = span.map(|s| s.child("cache lookup", Kind::Internal));
        }
        Ok(())
    }

    fn cache_key_callback(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::CacheKey> {
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        routed.cache_looked_up = true;
        Ok(cache::key(&route.config.label, session.req_header()))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::RespCacheable> {
        let refuse =
            pingora_cache::RespCacheable::Uncacheable(pingora_cache::NoCacheReason::NeverEnabled);
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        let not_modified = routed.not_modified.take();
        let Some(rc) = route.config.cache.as_ref() else {
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
        let coding = ctx
            .route()
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
        if let Some(encoder) = ctx.routed.as_mut().and_then(|r| r.encoder.as_mut()) {
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
        let span = ctx.span.as_ref();
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        let upstream = &ctx.gen.upstreams[upstream_of(route, &ctx.pass)?];
        // Release the previous attempt's slot before choosing, so least_conn sees true loads.
        routed.lease = None;
        ctx.body.restart();
        if let (Some(limiter), None) = (&upstream.concurrency, &routed.permit) {
            match limiter.acquire().await {
                Ok(permit) => routed.permit = Some(permit),
                Err(concurrency::Shed) => {
                    routed.shed = true;
                    return Error::e_explain(
                        ErrorType::HTTPStatus(503),
                        "over the upstream's concurrency limit",
                    );
                }
            }
        }
        let req = session.req_header();
        let config = upstream.config.sticky.as_ref();
        if let (Some(config), 0) = (config, routed.attempts) {
            // Read on the first attempt only: a retry keeps what it found.
            routed.sticky = sticky::wanted(config, &req.headers);
        }
        let lease = routed
            .sticky
            .and_then(|w| upstream.select_sticky(w.backend, &routed.tried))
            .or_else(|| upstream.select_for(req, &ctx.pass.client, &routed.tried))
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no healthy backend"))?;
        routed.tried.add(lease.index());
        routed.attempts += 1;
        routed.backend = Some(Arc::clone(&lease.backend().label));
        let peer = lease.backend().peer();
        let mut lease = lease;
        if let Some(span) = span {
            let mut attempt = span.child("upstream attempt", Kind::Client);
            attempt.attr("fanout.attempt", i64::from(routed.attempts));
            lease.trace(attempt);
        }
        routed.lease = Some(lease);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let pass = &ctx.pass;
        let request_id = &ctx.request_id;
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        forwarding::upstream_request(upstream_request, &route.config, pass, request_id)?;
        if let Some(lease) = &routed.lease {
            lease.backend().set_host(upstream_request)?;
        }
        match routed.lease.as_ref().and_then(Lease::span_id) {
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
        // A trailers-only gRPC answer carries its status in the head.
        ctx.grpc_status = grpc_status(&upstream_response.headers);
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        let status = upstream_response.status;
        if let (Some(lease), false) = (routed.lease.as_mut(), status.is_informational()) {
            lease.answered(status.as_u16());
        }
        if status == http::StatusCode::NOT_MODIFIED && routed.cache_looked_up {
            routed.not_modified = Some(upstream_response.headers.clone());
        }
        if let Some(c) = route.proxy().and_then(|p| p.compress.as_ref()) {
            // Before the cache stores it: a compressed answer is stored as its own variant.
            routed.encoder = c.start(session.req_header(), upstream_response);
        }
        if routed.failover.primary_fails_with(status.as_u16()) {
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
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed)?;
        // Comparisons see the answer as the upstream (or the cache) gave it.
        routed.copies.primary_head(
            upstream_response.status.as_u16(),
            &upstream_response.headers,
        );
        // The primary's answer is the client's: the fallbacks' are not needed.
        let upstream = ctx.pass.upstream.or(route.upstream());
        if let (true, Some(u)) = (routed.failover.primary_answers(upstream), upstream) {
            upstream_response.insert_header(fallback::HEADER, ctx.gen.upstreams[u].name())?;
        }
        if let Some(results) = route.proxy().and_then(|p| p.cache_results.as_ref()) {
            let phase = session.cache.phase();
            let outcome = cache::report(phase, routed.cache_looked_up, results, upstream_response)?;
            routed.cache = Some(outcome);
            if let Some(mut span) = routed.cache_span.take() {
                span.attr("fanout.cache", outcome.label());
            }
        }
        if self.gw.draining.is_set() || session.is_process_shutting_down() {
            // Stopping or handing over to a new process: close each client connection after
            // its current answer, so the client reconnects to the process that goes on.
            session.as_downstream_mut().set_keepalive(None);
            upstream_response.insert_header(header::CONNECTION, "close")?;
        }
        // A sticky upstream's answer names its backend for the client's next requests,
        // unless the client's cookie already does.
        if let (Some(lease), Some(u)) = (&routed.lease, upstream) {
            if let Some(config) = &ctx.gen.upstreams[u].config.sticky {
                let id = lease.backend().sticky_id;
                if routed.sticky.is_none_or(|w| w.backend != id || w.renew) {
                    if let Some(cookie) = sticky::set_cookie(config, id, ctx.pass.client.https) {
                        upstream_response.append_header(header::SET_COOKIE, cookie)?;
                    }
                }
            }
        }
        // The route's steps add to its answers (CORS, X-RateLimit-*, a plugin's headers).
        if !route.filters.is_empty() {
            route.filters.response(&ctx.pass, upstream_response);
        }
        let req = session.req_header();
        if !req.method.is_safe() && (200..400).contains(&upstream_response.status.as_u16()) {
            self.invalidate(req, upstream_response, &ctx.gen);
        }
        forwarding::response(upstream_response, Some(&route.config), &ctx.request_id)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        // Hashed as it passes, never held: a comparison costs the client nothing.
        if let Some(routed) = ctx.routed.as_mut() {
            routed.copies.primary_body(body.as_deref(), end_of_stream);
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Ok((route, routed)) = on_route(&ctx.gen, &mut ctx.routed) else {
            return e;
        };
        let Ok(upstream) = upstream_of(route, &ctx.pass).map(|u| &ctx.gen.upstreams[u]) else {
            return e;
        };
        if e.etype == ErrorType::TLSHandshakeFailure {
            // The usual cause is configuration (CA, name, protocol): say which backend.
            log::error!(
                "TLS to backend {} of upstream {} failed: {}",
                routed.backend.as_deref().unwrap_or("?"),
                upstream.name(),
                e
            );
        }
        attempt_failed(routed, &e);
        // Nothing reached the backend: any request may go to another one.
        routed.decide_retry(upstream, &mut e, AttemptFailure::NotSent);
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
        let Ok((route, routed)) = on_route(&ctx.gen, &mut ctx.routed) else {
            return e;
        };
        if ctx.refused.is_some() || routed.failover.primary_failed() {
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
        attempt_failed(routed, &e);
        let Ok(upstream) = upstream_of(route, &ctx.pass).map(|u| &ctx.gen.upstreams[u]) else {
            return e;
        };
        let downstream = session.as_downstream();
        let safe = session.req_header().method.is_idempotent()
            && !downstream.retry_buffer_truncated()
            && downstream.response_written().is_none();
        routed.decide_retry(upstream, &mut e, AttemptFailure::Sent { safe });
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
        let shed = ctx.routed.as_ref().is_some_and(|r| r.shed);
        let armed = ctx.routed.as_ref().is_some_and(|r| r.failover.armed());
        let reusable = shed && can_answer && !limits::declared_body(session.req_header()).0;
        if can_answer && ctx.refused.is_none() && armed {
            match self.fallback_answer(session, ctx).await {
                Ok(Some(status)) => code = status,
                Ok(None) => {
                    let (status, message) = match ctx.refused {
                        Some(refusal) => (refusal.status(), refusal.message()),
                        None => (502, "every upstream failed"),
                    };
                    code = status;
                    if let Err(write_error) =
                        send_error(session, status, message, &ctx.request_id, Vec::new(), true)
                            .await
                    {
                        log::debug!("could not send the {status} answer: {write_error}");
                    }
                }
                Err(write_error) => {
                    log::debug!("could not send the fallback answer: {write_error}")
                }
            }
        } else if can_answer {
            let (message, extra) = match (ctx.refused, shed) {
                (Some(refusal), _) => (refusal.message(), Vec::new()),
                (None, true) => (
                    "upstream over its concurrency limit",
                    vec![(header::RETRY_AFTER, http::HeaderValue::from_static("1"))],
                ),
                (None, false) => (respond::reason(code), Vec::new()),
            };
            if let Err(write_error) =
                send_error(session, code, message, &ctx.request_id, extra, !reusable).await
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
        ctx.routed
            .as_ref()
            .is_some_and(|r| r.failover.primary_failed())
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
        if let Some(routed) = ctx.routed.as_mut() {
            routed.lease = None;
        }
        let elapsed = ctx.start.elapsed();
        let status = session
            .as_downstream()
            .response_written()
            .map_or(0, |r| r.status.as_u16());
        let backend = ctx.routed.as_mut().and_then(|r| r.backend.take());
        let span = ctx.span.take();
        let routed = ctx.routed.as_ref();
        let route = routed.map(|r| &ctx.gen.routes[r.id]);
        if let Some(span) = span {
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
                upstream: routed
                    .and_then(|r| r.failover.answered_by())
                    .or(ctx.pass.upstream)
                    .or_else(|| route.and_then(Route::upstream))
                    .map(|u| Arc::clone(&ctx.gen.upstreams[u].name)),
                backend,
                cache: routed.and_then(|r| r.cache).map(cache::Outcome::label),
                duration_ms: millis(elapsed),
                bytes_in: downstream.body_bytes_read() as u64,
                bytes_out: downstream.body_bytes_sent() as u64,
            });
        }
    }
}
