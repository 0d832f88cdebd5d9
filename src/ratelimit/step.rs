//! The rate limit as a step of its route's chain ([`Limit`]): on the request side it
//! decides (here, or in Redis for `store: redis`) and answers 429 with `Retry-After`, or
//! 503 when the shared store cannot decide and `on_store_error: deny` says so; on the
//! answer side it tells the client its `X-RateLimit-Limit` and `X-RateLimit-Remaining`.
//! It is the chain's last step: a request the route's filters refused spends no token.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use prometheus::IntCounter;

use super::{Check, Decision, RateLimiter};
use crate::config::OnStoreError;
use crate::filters::RequestFilter;
use crate::http::answer::{Stop, StopBody};
use crate::http::passage::Passage;
use crate::http::respond;
use crate::keys;

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

/// A route's rate limit, built once per configuration around the route's limiter (which
/// itself may be kept across reloads, with its buckets).
pub(crate) struct Limit {
    limiter: Arc<RateLimiter>,
    /// `fanout_rate_limited_total` of the route.
    limited: IntCounter,
    /// `fanout_rate_limit_store_errors_total` of the route.
    store_errors: IntCounter,
    /// The route's label, for the log.
    label: String,
    /// The configured rate, as `X-RateLimit-Limit` says it.
    limit: HeaderValue,
}

impl Limit {
    pub(crate) fn new(
        limiter: Arc<RateLimiter>,
        limited: IntCounter,
        store_errors: IntCounter,
        label: &str,
    ) -> Limit {
        let limit = HeaderValue::try_from(limiter.limit.to_string())
            .unwrap_or(HeaderValue::from_static("0"));
        Limit {
            limit,
            limiter,
            limited,
            store_errors,
            label: label.to_string(),
        }
    }

    /// What a decision means for the request: on it (the tokens left noted for the
    /// answer), or the 429.
    fn apply(&self, decision: Decision, pass: &mut Passage) -> Result<(), Stop> {
        match decision {
            Decision::Allow { remaining } => {
                pass.rate_remaining = Some(remaining);
                Ok(())
            }
            Decision::Deny { retry_after_secs } => {
                self.limited.inc();
                Err(Stop {
                    status: 429,
                    headers: vec![
                        (
                            http::header::RETRY_AFTER,
                            HeaderValue::from(retry_after_secs),
                        ),
                        (LIMIT, self.limit.clone()),
                        (REMAINING, HeaderValue::from_static("0")),
                    ],
                    body: StopBody::Error(respond::reason(429)),
                    denied: None,
                })
            }
        }
    }
}

#[async_trait]
impl RequestFilter for Limit {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let req = session.req_header();
        let mut buf = [0u8; 16];
        let key = keys::key_bytes(req, &pass.client, &self.limiter.key, &mut buf);
        let shared = match self.limiter.decide(key, Instant::now()) {
            Check::Now(decision) => return self.apply(decision, pass),
            Check::Ask(shared) => shared,
        };
        // Redis not answering within `redis.timeout` is a store error: counted, then
        // `on_store_error` lets the request through or answers 503.
        let key = key.to_vec();
        match shared.check(&key).await {
            Ok(decision) => self.apply(decision, pass),
            Err(e) => {
                self.store_errors.inc();
                log::debug!("rate limit of {}: {e}", self.label);
                match shared.on_error {
                    OnStoreError::Deny => Err(Stop {
                        status: 503,
                        headers: vec![(http::header::RETRY_AFTER, HeaderValue::from(1u32))],
                        body: StopBody::Error("rate limit store unavailable"),
                        denied: None,
                    }),
                    OnStoreError::Allow => Ok(()),
                }
            }
        }
    }

    fn response(&self, pass: &Passage, resp: &mut ResponseHeader) {
        if let Some(remaining) = pass.rate_remaining {
            let _ = resp.insert_header(LIMIT, self.limit.clone());
            let _ = resp.insert_header(REMAINING, HeaderValue::from(remaining));
        }
    }
}
