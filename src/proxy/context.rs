//! The state one request carries through the proxy's phases ([`RequestCtx`]), and how a
//! failed attempt is told and retried: [`AttemptFailure`], [`attempt_failed`] and
//! [`FanoutProxy::decide_retry`] (a connect failure tries each untried backend; a sent
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

/// How an attempt on a backend failed, for [`FanoutProxy::decide_retry`].
#[derive(Debug, Clone, Copy)]
pub(super) enum AttemptFailure {
    /// Before anything was sent: the connect (or TLS handshake) failed.
    NotSent,
    /// After the request (or part of it) went out; `safe`: it may be sent again
    /// (idempotent, its body still buffered, no answer byte passed on).
    Sent { safe: bool },
}

/// Per-request state carried through the phases.
pub struct RequestCtx {
    pub(super) start: Instant,
    /// The configuration this request runs on from start to end, whatever reloads happen
    /// meanwhile.
    pub(super) gen: Arc<Generation>,
    pub(super) request_id: String,
    pub(super) route: Option<RouteId>,
    /// The backend currently serving this request; dropping it releases its in-flight slot.
    pub(super) lease: Option<Lease>,
    /// The backend that served the last attempt, for the access log.
    pub(super) backend: Option<Arc<str>>,
    pub(super) tried: Tried,
    pub(super) attempts: u32,
    /// Attempts sent again after a failure once sent (bounded by the upstream's `retries`).
    pub(super) resends: u32,
    /// The answer's `grpc-status`, on a gRPC call, for the access log.
    pub(super) grpc_status: Option<u32>,
    pub(super) body: BodyCounter,
    /// Set when the gateway itself refused the request mid-way (body over the limit).
    pub(super) refused: Option<Refusal>,
    /// The mirror and fallback copies of this (primary) request.
    pub(super) copies: Copies,
    /// Its fallbacks, on a route with fallbacks.
    pub(super) failover: Failover,
    /// Tokens left in the client's rate-limit bucket after this request, on a limited route.
    pub(super) rate_remaining: Option<u64>,
    /// What the cache did, on a cached route.
    pub(super) cache: Option<cache::Outcome>,
    /// Its client (address, identity) and what the route's filters decided.
    pub(super) pass: Passage,
    /// The fields of a 304 that revalidated a stored answer, for the entry (RFC 9111 4.3.4).
    pub(super) not_modified: Option<http::HeaderMap>,
    /// Compresses the upstream's answer, on a route with `compress:` ([`compress`]).
    pub(super) encoder: Option<compress::Encoder>,
    /// A retry its upstream's budget allowed, counted as under way until the request ends.
    pub(super) retrying: Option<crate::upstream::budget::Retrying>,
    /// Its slot under the upstream's concurrency limit, held across retries.
    pub(super) permit: Option<concurrency::Permit>,
    /// The upstream's concurrency limit shed it (503 + Retry-After).
    pub(super) shed: bool,
    /// The request's span, when it is traced ([`crate::observe::span`]).
    pub(super) span: Option<Span>,
    /// The cache lookup's span, on a traced request of a cached route.
    pub(super) cache_span: Option<Span>,
    /// The cache was looked up for this request (a later "bypass" phase means the answer
    /// could not be stored: a miss).
    pub(super) cache_looked_up: bool,
}

/// Reports a failed attempt to its backend (outcome counters, circuit breaker), when the
/// failure is the upstream's and not the client's.
pub(super) fn attempt_failed(ctx: &mut RequestCtx, e: &Error) {
    if let (Some(lease), ErrorSource::Upstream) = (ctx.lease.as_mut(), e.esource()) {
        lease.failed_with(e);
    }
}

impl FanoutProxy {
    /// Marks `e` retryable, and counts the retry, when the upstream's `retry_budget` (if
    /// any) has room and: nothing was sent (a connect failure) and a backend not yet tried
    /// is available — each is tried once, whatever `retries` says, as nginx's
    /// `proxy_next_upstream error` does —; or the request was sent, is `safe` to send
    /// again, and `retries` allow one more.
    pub(super) fn decide_retry(
        &self,
        ctx: &mut RequestCtx,
        e: &mut Error,
        failure: AttemptFailure,
    ) {
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
