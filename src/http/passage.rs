//! What one request carries from its route's filters on to the upstream phases and to
//! every copy made of it: the client (and the identity auth found), the path `rewrite`
//! made, the origin CORS allowed, the trace context, the tokens its rate limit left, the
//! upstream its route's split chose.

use http::HeaderValue;

use super::client::Client;
use super::trace_context::Trace;

/// What one request carries through its route's filters and on to the upstream phases.
#[derive(Debug, Default)]
pub struct Passage {
    pub client: Client,
    /// The path `rewrite` made of the request's, for the upstream.
    pub upstream_path: Option<String>,
    /// The request's `Origin`, when `cors` allows it: its answer gets the CORS headers.
    pub origin: Option<HeaderValue>,
    /// Its W3C trace context, passed on to every copy of it.
    pub trace: Trace,
    /// Tokens left in the client's rate-limit bucket after this request, on a limited
    /// route (`X-RateLimit-Remaining`).
    pub(crate) rate_remaining: Option<u64>,
    /// The upstream a `split` (or a rollout) chose for this request instead of the route's
    /// own.
    pub(crate) upstream: Option<crate::config::UpstreamId>,
}
