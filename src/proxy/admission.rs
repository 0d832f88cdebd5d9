//! From a request's head to what becomes of it ([`Admission`]): the edge's screening, the
//! route (404/405, and 413 for a declared body over its limit), the route's chain of steps
//! (access, CORS, auth, plugins, rewrite, rate limit: `crate::filters`), and the dispatch by
//! the route's kind to proxying, a tunnel, a broadcast or an answer the gateway gives
//! itself; [`FanoutProxy::settle`] carries out what is not simply proxied.

use super::*;

/// What becomes of a client request once admitted or refused.
pub(super) enum Admission {
    /// Proxy it (its mirror copies, if any, are started).
    Proxy,
    /// An upgrade (WebSocket): relay the handshake, then bytes both ways ([`super::tunnel`]).
    Tunnel {
        route: RouteId,
        upstream: UpstreamId,
    },
    /// A broadcast route: read the body, answer 202, deliver in the background.
    Broadcast {
        route: RouteId,
        targets: Arc<Targets>,
    },
    /// Answered by the gateway itself: no route, a step's refusal (401, 403, 429), a
    /// preflight, a redirect. The connection stays open unless the body was left unread.
    Answer(Stop),
    /// Refused for what the request is (bad request, over the body limit, an expectation
    /// the gateway does not meet): answered, and the connection closed.
    Refuse(Refusal),
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
        let limit = ctx.body_limit();
        let Some(routed) = ctx.routed.as_mut() else {
            return Ok(None);
        };
        let answer = routed
            .failover
            .first_answer(session, &mut routed.copies, &mut ctx.body, limit)
            .await;
        let answer = match answer {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ok(None),
            Err(refusal) => {
                ctx.refused = Some(refusal);
                routed.copies = Copies::default();
                return Ok(None);
            }
        };
        let route = ctx.route().map(|r| &r.config);
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

    /// Routes a screened request, runs its route's steps and dispatches it. A request that
    /// matches no route gets 404 (405 when only its method is wrong); one that declares a
    /// body over its route's limit gets 413. A route without steps (the common case)
    /// awaits nothing: the steps' future is boxed only where there are steps, so this
    /// phase's future, moved to the heap per request, stays small.
    pub(super) async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Admission {
        match self.route(session, ctx) {
            Err(answer) => answer,
            Ok(id) if ctx.gen.routes[id].filters.is_empty() => self.dispatch(session, ctx, id),
            Ok(id) => Box::pin(self.steps_then_dispatch(session, ctx, id)).await,
        }
    }

    /// The request's route (its [`Routed`] state set up), or the answer: 404, 405, 413.
    fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Result<RouteId, Admission> {
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
            headers: Some(&req.headers),
            query: req.uri.query(),
        };
        let id = match router.find(&probe) {
            RouteMatch::Found(id) => id,
            RouteMatch::MethodNotAllowed => return Err(Admission::Answer(Stop::error(405))),
            RouteMatch::NotFound => return Err(Admission::Answer(Stop::error(404))),
        };
        ctx.routed = Some(Routed::new(id));
        let limit = ctx.gen.routes[id].config.max_body_bytes;
        limits::check_length(req, limit).map_err(Admission::Refuse)?;
        Ok(id)
    }

    /// Runs the route's steps: a request they stop is answered, one they pass dispatched.
    async fn steps_then_dispatch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        id: RouteId,
    ) -> Admission {
        let chain = &ctx.gen.routes[id].filters;
        let span = ctx.span.as_ref();
        match run_steps(session, chain, &mut ctx.pass, span).await {
            Ok(()) => self.dispatch(session, ctx, id),
            Err(stop) => Admission::Answer(stop),
        }
    }

    /// [`dispatch`] for the request routed to `id`.
    fn dispatch(&self, session: &Session, ctx: &mut RequestCtx, id: RouteId) -> Admission {
        let routed = ctx.routed.get_or_insert_with(|| Routed::new(id));
        let with = Dispatch {
            pass: &ctx.pass,
            request_id: &ctx.request_id,
            connector: &self.gw.connector,
        };
        dispatch(session, &ctx.gen.routes[id], routed, with)
    }

    /// An HTTP/2 request that declares `content-length: 0` on a stream not known to be
    /// ended: admitted once its end has come ([`edge::h2::await_empty_end`]).
    pub(super) async fn admit_when_ended(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Admission {
        match edge::h2::await_empty_end(session, ctx.gen.clients.body_timeout).await {
            Ok(()) => self.admit(session, ctx).await,
            Err(r) => {
                ctx.gen.clients.refused.bad_request.inc();
                Admission::Refuse(Refusal::Edge(r))
            }
        }
    }

    /// The rest of `request_filter` for requests that are not simply proxied: an
    /// expectation to answer, a tunnel, a broadcast, or the gateway's own answer.
    pub(super) async fn settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        admission: Admission,
        expect: Expect,
    ) -> Result<bool> {
        // `Expect: 100-continue` is answered here, once the request is admitted (route,
        // size and rate limits passed): the client sends its body at once instead of waiting
        // for a backend's `100` that may never come. A refusal above went out without the
        // body being read.
        let admission = match (admission, expect) {
            (
                Admission::Proxy | Admission::Broadcast { .. } | Admission::Tunnel { .. },
                Expect::Unsupported,
            ) => Admission::Refuse(Refusal::Expectation),
            (a @ (Admission::Proxy | Admission::Broadcast { .. }), Expect::Continue) => {
                session
                    .req_header_mut()
                    .remove_header(&http::header::EXPECT);
                respond::send_continue(session).await?;
                a
            }
            (a, _) => a,
        };
        let draining = self.gw.draining.is_set();
        let (stop, close) = match admission {
            Admission::Proxy => return Ok(false),
            Admission::Tunnel { route, upstream } => {
                let target = tunnel::TunnelTarget {
                    upstream: &ctx.gen.upstreams[upstream],
                    route: &ctx.gen.routes[route].config,
                    pass: &ctx.pass,
                    connector: &self.gw.connector,
                    request_id: &ctx.request_id,
                };
                let backend = tunnel::serve(session, target).await?;
                if let Some(routed) = ctx.routed.as_mut() {
                    routed.backend = backend;
                }
                return Ok(true);
            }
            Admission::Broadcast { route, targets } => {
                broadcast::accept(
                    session,
                    &ctx.gen.routes[route].config,
                    &targets,
                    &*self.gw.spool,
                    &ctx.pass,
                    &ctx.request_id,
                    draining,
                )
                .await?;
                return Ok(true);
            }
            Admission::Answer(stop) => {
                let unread = limits::declared_body(session.req_header()).0;
                (stop, unread || draining)
            }
            Admission::Refuse(refusal) => (
                Stop::error_saying(refusal.status(), refusal.message()),
                true,
            ),
        };
        // A routed request's steps add to the gateway's own answers too (a 429 a page's
        // script must be able to read carries its CORS headers).
        let chain = ctx.route().map(|r| &r.filters).filter(|c| !c.is_empty());
        respond::send_stop(session, stop, &ctx.request_id, close, |head| {
            if let Some(chain) = chain {
                chain.response(&ctx.pass, head)
            }
        })
        .await?;
        Ok(true)
    }
}

/// Runs the route's chain of steps, in a span of its own on a traced request.
async fn run_steps(
    session: &mut Session,
    chain: &Chain,
    pass: &mut Passage,
    request_span: Option<&Span>,
) -> Result<(), Stop> {
    let mut span = request_span.map(|s| s.child("access and auth", Kind::Internal));
    let decided = chain.run(session, pass).await;
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
    decided
}

/// What [`dispatch`] reads besides the route.
struct Dispatch<'a> {
    pass: &'a Passage,
    request_id: &'a str,
    connector: &'a Arc<pingora_core::connectors::http::Connector>,
}

/// The route's kind decides what becomes of an admitted request.
fn dispatch(session: &Session, route: &Route, routed: &mut Routed, with: Dispatch) -> Admission {
    match &route.kind {
        // An upgrade (WebSocket) becomes a tunnel to one backend: never mirrored, and
        // no fallback can take over a tunnel.
        RouteRuntime::Proxy(p) if tunnel::wanted(session) => Admission::Tunnel {
            route: routed.id,
            upstream: with.pass.upstream.unwrap_or(p.upstream),
        },
        RouteRuntime::Proxy(_) if forwarding::is_upgrade(session.req_header()) => Admission::Proxy,
        RouteRuntime::Proxy(p) => {
            if !p.mirrors.is_empty() {
                routed.copies = Copies::start(
                    session,
                    with.pass,
                    &p.mirrors,
                    with.request_id,
                    with.connector,
                );
            }
            if let Some(fallbacks) = &p.fallbacks {
                let of = fallback::Of {
                    session,
                    pass: with.pass,
                    request_id: with.request_id,
                };
                routed.failover = Failover::start(
                    &mut routed.copies,
                    of,
                    &route.config,
                    fallbacks,
                    with.connector,
                );
            }
            Admission::Proxy
        }
        RouteRuntime::Broadcast(targets) => Admission::Broadcast {
            route: routed.id,
            targets: Arc::clone(targets),
        },
        RouteRuntime::Redirect(r) => {
            Admission::Answer(r.answer(session.req_header(), with.pass.client.https))
        }
    }
}
