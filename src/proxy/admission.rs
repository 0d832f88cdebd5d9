//! From a request's head to what becomes of it ([`Admission`]): the edge's screening, the
//! route, the route's filters, its rate limit (local or in Redis), the upstream's
//! concurrency limit, and the dispatch to proxying, a tunnel, a broadcast or an answer the
//! gateway gives itself ([`OwnAnswer`]); [`FanoutProxy::settle`] carries the verdict out.

use super::*;

/// What the rate limit's decision means for the request: `None` to go on (the tokens left
/// noted in `remaining` for `X-RateLimit-Remaining`), else the 429.
pub(super) fn limited(
    remaining_after: &mut Option<u64>,
    route: &Route,
    decision: Decision,
    req: &RequestHeader,
) -> Option<OwnAnswer> {
    let limit = route.rate_limiter.as_ref().map_or(0.0, |l| l.limit);
    match decision {
        Decision::Allow { remaining } => {
            *remaining_after = Some(remaining);
            None
        }
        Decision::Deny { retry_after_secs } => {
            route.rate_limited.inc();
            let (has_body, _) = limits::declared_body(req);
            Some(OwnAnswer {
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
pub(super) enum Admission {
    /// Proxy it (its mirror copies, if any, are started).
    Proxy,
    /// An upgrade (WebSocket): relay the handshake, then bytes both ways ([`super::tunnel`]).
    Tunnel(UpstreamId),
    /// A broadcast route: read the body, answer 202, deliver in the background.
    Broadcast,
    /// Refused or answered by the gateway itself.
    Answer(OwnAnswer),
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
pub(super) struct OwnAnswer {
    pub(super) status: u16,
    pub(super) message: &'static str,
    pub(super) headers: Vec<(&'static str, String)>,
    /// The request's body stays unread: the connection cannot carry another request.
    pub(super) close: bool,
}

impl OwnAnswer {
    pub(super) fn status(status: u16) -> OwnAnswer {
        OwnAnswer {
            status,
            message: respond::reason(status),
            headers: Vec::new(),
            close: false,
        }
    }

    /// The same answer, for [`respond::send_stop`].
    pub(super) fn into_stop(self) -> Stop {
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

    pub(super) fn refusal(r: Refusal) -> OwnAnswer {
        OwnAnswer {
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
    pub(super) async fn fallback_answer(
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
    pub(super) fn invalidate(&self, req: &RequestHeader, resp: &ResponseHeader, gen: &Generation) {
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
    pub(super) fn screen(&self, session: &mut Session, gen: &Generation) -> Result<(), Refusal> {
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
    pub(super) fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Admission {
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
            RouteMatch::MethodNotAllowed => return Admission::Answer(OwnAnswer::status(405)),
            RouteMatch::NotFound => return Admission::Answer(OwnAnswer::status(404)),
        };
        ctx.route = Some(id);
        let route = &ctx.gen.routes[id];
        if let Err(r) = limits::check_length(req, route.config.max_body_bytes) {
            return Admission::Answer(OwnAnswer::refusal(r));
        }
        if !route.filters.is_empty() {
            return Admission::Filter;
        }
        self.limit(session, ctx)
    }

    /// Runs the route's filters: a request they stop is answered, one they pass goes on
    /// to the rate limit.
    pub(super) async fn filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Admission {
        let Some(id) = ctx.route else {
            return Admission::Answer(OwnAnswer::status(404));
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
            Err(stop) => Admission::Stop(stop),
        }
    }

    /// The route's rate limit (429), then [`Self::dispatch`].
    pub(super) fn limit(&self, session: &Session, ctx: &mut RequestCtx) -> Admission {
        let Some(route) = ctx.route.map(|id| &ctx.gen.routes[id]) else {
            return Admission::Answer(OwnAnswer::status(404));
        };
        let req = session.req_header();
        if let Some(limiter) = &route.rate_limiter {
            let mut buf = [0u8; 16];
            let key = keys::key_bytes(req, &ctx.pass.client, &limiter.key, &mut buf);
            match limiter.decide(key, Instant::now()) {
                Check::Now(decision) => {
                    if let Some(answer) = limited(&mut ctx.rate_remaining, route, decision, req) {
                        return Admission::Answer(answer);
                    }
                }
                Check::Ask(_) => return Admission::AskLimit,
            }
        }
        self.dispatch(session, ctx)
    }

    /// The decision of a route whose rate limit lives in Redis (`store: redis`), then the
    /// rest of [`Self::admit`]. Redis not answering within `redis.timeout` is a store error:
    /// counted, then `on_store_error` lets the request through or answers 503.
    pub(super) async fn admit_shared(&self, session: &Session, ctx: &mut RequestCtx) -> Admission {
        let Some(route) = ctx.route.map(|id| &ctx.gen.routes[id]) else {
            return Admission::Answer(OwnAnswer::status(404));
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
                    return Admission::Answer(answer);
                }
            }
            Err(e) => {
                route.rate_limit_store_errors.inc();
                log::debug!("rate limit of {}: {e}", route.config.label);
                if shared.on_error == OnStoreError::Deny {
                    let (has_body, _) = limits::declared_body(session.req_header());
                    return Admission::Answer(OwnAnswer {
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
    pub(super) fn dispatch(&self, session: &Session, ctx: &mut RequestCtx) -> Admission {
        let Some(id) = ctx.route else {
            return Admission::Answer(OwnAnswer::status(404));
        };
        let route = &ctx.gen.routes[id];
        match &route.kind {
            // An upgrade (WebSocket) becomes a tunnel to one backend: never mirrored, and
            // no fallback can take over a tunnel.
            RouteRuntime::Proxy(p) if tunnel::wanted(session) => Admission::Tunnel(p.upstream),
            RouteRuntime::Proxy(_) if forwarding::is_upgrade(session.req_header()) => {
                Admission::Proxy
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
                Admission::Proxy
            }
            RouteRuntime::Broadcast(_) => Admission::Broadcast,
            RouteRuntime::Redirect(r) => {
                Admission::Stop(r.answer(session.req_header(), ctx.pass.client.https))
            }
        }
    }

    /// The rest of `request_filter` for requests that are not simply proxied: an
    /// expectation to answer, a tunnel, a broadcast, or the gateway's own answer.
    pub(super) async fn settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        verdict: Admission,
        expect: Expect,
    ) -> Result<bool> {
        // `Expect: 100-continue` is answered here, once the request is admitted (route,
        // size and rate limits passed): the client sends its body at once instead of waiting
        // for a backend's `100` that may never come. A refusal above went out without the
        // body being read.
        let verdict = match verdict {
            // Nothing is routed, copied or sent upstream before the stream has shown that
            // it carries no data.
            Admission::AwaitEnd => {
                match edge::h2::await_empty_end(session, ctx.gen.clients.body_timeout).await {
                    Ok(()) => self.admit(session, ctx),
                    Err(r) => {
                        ctx.gen.clients.refused.bad_request.inc();
                        Admission::Answer(OwnAnswer::refusal(Refusal::Edge(r)))
                    }
                }
            }
            v => v,
        };
        let verdict = match verdict {
            Admission::Filter => self.filter(session, ctx).await,
            v => v,
        };
        let verdict = match verdict {
            Admission::AskLimit => self.admit_shared(session, ctx).await,
            v => v,
        };
        let verdict = match (verdict, expect) {
            (
                v @ (Admission::Proxy | Admission::Broadcast | Admission::Tunnel(_)),
                Expect::Unsupported,
            ) => {
                drop(v);
                Admission::Answer(OwnAnswer::refusal(Refusal::Expectation))
            }
            (v @ (Admission::Proxy | Admission::Broadcast), Expect::Continue) => {
                session
                    .req_header_mut()
                    .remove_header(&http::header::EXPECT);
                respond::send_continue(session).await?;
                v
            }

            (v, _) => v,
        };
        match verdict {
            Admission::Proxy => Ok(false),
            Admission::Tunnel(upstream) => {
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
            Admission::Broadcast => {
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
            Admission::Answer(a) => {
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
            Admission::Stop(stop) => {
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
            Admission::AskLimit | Admission::AwaitEnd | Admission::Filter => {
                let a = OwnAnswer::status(500);
                send_error(session, 500, a.message, &ctx.request_id, &[], true).await?;
                Ok(true)
            }
        }
    }
}
