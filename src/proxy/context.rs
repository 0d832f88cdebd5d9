//! The state one request carries through the proxy's phases ([`RequestCtx`]), and how a
//! failed attempt is told and retried: [`AttemptFailure`], [`attempt_failed`] and
//! [`Routed::decide_retry`] (a connect failure tries each untried backend; a sent
//! request is sent again only when safe and within `retries`; every retry within the
//! upstream's `retry_budget`).

use super::*;

/// The `grpc-status` field of a gRPC answer's head or trailers.
pub(super) fn grpc_status(fields: &http::HeaderMap) -> Option<u32> {
    fields
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// How an attempt on a backend failed, for [`Routed::decide_retry`].
#[derive(Debug, Clone, Copy)]
pub(super) enum AttemptFailure {
    /// Before anything was sent: the connect (or TLS handshake) failed.
    NotSent,
    /// After the request (or part of it) went out; `safe`: it may be sent again
    /// (idempotent, its body still buffered, no answer byte passed on).
    Sent { safe: bool },
}

/// Per-request state carried through the phases: what every request has, and
/// [`Routed`], what a request has once it is routed.
pub struct RequestCtx {
    pub(super) start: Instant,
    /// The configuration this request runs on from start to end, whatever reloads happen
    /// meanwhile.
    pub(super) gen: Arc<Generation>,
    pub(super) request_id: String,
    /// Its client (address, identity), what its route's steps decided, its trace context.
    pub(super) pass: Passage,
    pub(super) body: BodyCounter,
    /// Set when the gateway itself refused the request mid-way (body over the limit).
    pub(super) refused: Option<Refusal>,
    /// The answer's `grpc-status`, on a gRPC call, for the access log.
    pub(super) grpc_status: Option<u32>,
    /// The request's span, when it is traced ([`crate::observe::span`]).
    pub(super) span: Option<Span>,
    /// Set once routing found the request's route; `None` only for a request answered
    /// before (refused at the edge, no route, wrong method).
    pub(super) routed: Option<Routed>,
}

/// A routed request's state: its route, and what its proxying, copies and cache did.
pub(super) struct Routed {
    pub(super) id: RouteId,
    /// The backend currently serving this request; dropping it releases its in-flight slot.
    pub(super) lease: Option<Lease>,
    /// The backend that served the last attempt, for the access log.
    pub(super) backend: Option<Arc<str>>,
    pub(super) tried: Tried,
    pub(super) attempts: u32,
    /// Attempts sent again after a failure once sent (bounded by the upstream's `retries`).
    pub(super) resends: u32,
    /// The mirror and fallback copies of this (primary) request.
    pub(super) copies: Copies,
    /// Its fallbacks, on a route with fallbacks.
    pub(super) failover: Failover,
    /// A retry its upstream's budget allowed, counted as under way until the request ends.
    pub(super) retrying: Option<crate::upstream::budget::Retrying>,
    /// Its slot under the upstream's concurrency limit, held across retries.
    pub(super) permit: Option<concurrency::Permit>,
    /// The upstream's concurrency limit shed it (503 + Retry-After).
    pub(super) shed: bool,
    /// What the cache did, on a cached route.
    pub(super) cache: Option<cache::Outcome>,
    /// The cache lookup's span, on a traced request of a cached route.
    pub(super) cache_span: Option<Span>,
    /// The cache was looked up for this request (a later "bypass" phase means the answer
    /// could not be stored: a miss).
    pub(super) cache_looked_up: bool,
    /// The fields of a 304 that revalidated a stored answer, for the entry (RFC 9111 4.3.4).
    pub(super) not_modified: Option<http::HeaderMap>,
    /// Compresses the upstream's answer, on a route with `compress:` ([`compress`]).
    pub(super) encoder: Option<compress::Encoder>,
    /// The backend the request's affinity cookie named, on a `sticky:` upstream.
    pub(super) sticky: Option<sticky::Wanted>,
}

impl Routed {
    pub(super) fn new(id: RouteId) -> Routed {
        Routed {
            id,
            lease: None,
            backend: None,
            tried: Tried::default(),
            attempts: 0,
            resends: 0,
            copies: Copies::default(),
            failover: Failover::default(),
            retrying: None,
            permit: None,
            shed: false,
            cache: None,
            cache_span: None,
            cache_looked_up: false,
            not_modified: None,
            encoder: None,
            sticky: None,
        }
    }
}

impl RequestCtx {
    pub(super) fn new(gen: Arc<Generation>) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            gen,
            request_id: String::new(),
            pass: Passage::default(),
            body: BodyCounter::default(),
            refused: None,
            grpc_status: None,
            span: None,
            routed: None,
        }
    }

    /// The route, when the request was routed.
    pub(super) fn route(&self) -> Option<&Route> {
        self.routed.as_ref().map(|r| &self.gen.routes[r.id])
    }

    /// The route's body limit (none before routing).
    pub(super) fn body_limit(&self) -> u64 {
        self.route().map_or(u64::MAX, |r| r.config.max_body_bytes)
    }
}

/// The route and routed state of a request in a phase only a routed request reaches
/// (`gen` and `routed` are a [`RequestCtx`]'s, borrowed apart from its other fields):
/// Pingora runs the upstream and cache phases only after `request_filter` let a request on,
/// and only a routed request is let on.
pub(super) fn on_route<'a>(
    gen: &'a Generation,
    routed: &'a mut Option<Routed>,
) -> Result<(&'a Route, &'a mut Routed)> {
    match routed.as_mut() {
        Some(routed) => Ok((&gen.routes[routed.id], routed)),
        None => Error::e_explain(ErrorType::InternalError, "proxy phase without a route"),
    }
}

/// The upstream a request on a proxy route goes to: the one its split chose, else the
/// route's. Only a proxy route's requests are let on to an upstream (a broadcast or redirect
/// route's are settled in `request_filter`).
pub(super) fn upstream_of(route: &Route, pass: &Passage) -> Result<UpstreamId> {
    pass.upstream.or(route.upstream()).ok_or_else(|| {
        Error::explain(
            ErrorType::InternalError,
            "proxy phase on a route with no upstream",
        )
    })
}

/// Reports a failed attempt to its backend (outcome counters, circuit breaker), when the
/// failure is the upstream's and not the client's.
pub(super) fn attempt_failed(routed: &mut Routed, e: &Error) {
    if let (Some(lease), ErrorSource::Upstream) = (routed.lease.as_mut(), e.esource()) {
        lease.failed_with(e);
    }
}

impl Routed {
    /// Marks `e` retryable, and counts the retry, when the upstream's `retry_budget` (if
    /// any) has room and: nothing was sent (a connect failure) and a backend not yet tried
    /// is available — each is tried once, whatever `retries` says, as nginx's
    /// `proxy_next_upstream error` does —; or the request was sent, is `safe` to send
    /// again, and `retries` allow one more.
    pub(super) fn decide_retry(
        &mut self,
        upstream: &Upstream,
        e: &mut Error,
        failure: AttemptFailure,
    ) {
        let mut retry = match failure {
            AttemptFailure::NotSent => upstream.has_untried(&self.tried),
            AttemptFailure::Sent { safe } => safe && self.resends < upstream.config.retries,
        };
        if retry {
            if let Some(budget) = &upstream.retry_budget {
                match budget.try_retry(upstream.inflight()) {
                    Some(token) => self.retrying = Some(token),
                    None => retry = false,
                }
            }
            if retry {
                upstream.retries.inc();
                if matches!(failure, AttemptFailure::Sent { .. }) {
                    self.resends += 1;
                }
            }
        }
        e.set_retry(retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::test_generation;

    const YAML: &str = "listen: 127.0.0.1:1\n\
        upstreams:\n  u:\n    backends: [127.0.0.1:9001, 127.0.0.1:9002]\n    retries: 1\n\
        routes:\n  - { match: { prefix: /a }, upstream: u, max_body_bytes: 10 }\n  \
          - { match: { prefix: /b }, broadcast: [u] }\n";

    fn ctx() -> RequestCtx {
        RequestCtx::new(Arc::new(test_generation(YAML)))
    }

    fn error() -> Box<Error> {
        Error::explain(ErrorType::ConnectRefused, "test")
    }

    #[test]
    fn a_request_has_its_route_only_once_routed() {
        let mut ctx = ctx();
        assert!(ctx.route().is_none());
        assert_eq!(ctx.body_limit(), u64::MAX);
        let Err(e) = on_route(&ctx.gen, &mut ctx.routed) else {
            panic!("an unrouted request has a route");
        };
        assert_eq!(e.etype, ErrorType::InternalError);

        ctx.routed = Some(Routed::new(0));
        assert_eq!(ctx.body_limit(), 10);
        let (route, routed) = on_route(&ctx.gen, &mut ctx.routed).expect("routed");
        assert_eq!(route.config.label, ctx.gen.routes[0].config.label);
        assert_eq!(routed.id, 0);
        assert!(upstream_of(route, &Passage::default()).is_ok());
    }

    #[test]
    fn only_a_proxy_route_has_an_upstream_for_the_proxy_phases() {
        let mut ctx = ctx();
        ctx.routed = Some(Routed::new(1));
        let (route, _) = on_route(&ctx.gen, &mut ctx.routed).expect("routed");
        assert!(upstream_of(route, &Passage::default()).is_err());
    }

    #[test]
    fn a_connect_failure_tries_each_backend_once_whatever_retries_say() {
        let gen = test_generation(YAML);
        let upstream = &gen.upstreams[0];
        let mut routed = Routed::new(0);
        let mut e = error();
        routed.tried.add(0);
        routed.decide_retry(upstream, &mut e, AttemptFailure::NotSent);
        assert!(e.retry(), "the second backend is untried");
        routed.tried.add(1);
        routed.decide_retry(upstream, &mut e, AttemptFailure::NotSent);
        assert!(!e.retry(), "every backend was tried");
        assert_eq!(routed.resends, 0, "a connect failure is not a resend");
    }

    #[test]
    fn a_sent_request_goes_again_only_when_safe_and_within_retries() {
        let gen = test_generation(YAML);
        let upstream = &gen.upstreams[0];
        let mut routed = Routed::new(0);
        let mut e = error();
        routed.decide_retry(upstream, &mut e, AttemptFailure::Sent { safe: false });
        assert!(!e.retry(), "an unsafe request is never sent again");
        routed.decide_retry(upstream, &mut e, AttemptFailure::Sent { safe: true });
        assert!(e.retry(), "retries: 1 allows one resend");
        assert_eq!(routed.resends, 1);
        routed.decide_retry(upstream, &mut e, AttemptFailure::Sent { safe: true });
        assert!(!e.retry(), "the one resend is spent");
    }
}
