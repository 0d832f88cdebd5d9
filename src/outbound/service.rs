//! An HTTP service the gateway asks on its own account (a JWKS URL, a forward-auth
//! service, the OTLP collector): an upstream of its own, made from the configured URL, reached through
//! Pingora's connector and keep-alive pool like every other outbound request, and named
//! `jwks:ROUTE` / `auth:ROUTE` in the upstream metrics.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use pingora_core::connectors::http::Connector;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::ServiceUrl;
use crate::observe::metrics::Metrics;
use crate::outbound::exchange::{self, Body, Failure, Keep};
use crate::upstream::{Tried, Upstream};

pub struct Service {
    upstream: Arc<Upstream>,
    connector: Arc<Connector>,
    path: String,
    host: String,
    pub url: String,
}

/// Why a service gave no answer.
#[derive(Debug)]
pub enum Unanswered {
    Timeout,
    Failed(String),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::Timeout => f.write_str("timed out"),
            Unanswered::Failed(why) => f.write_str(why),
        }
    }
}

impl Service {
    /// A service asked on a route's account, through the gateway's `connector`.
    pub fn new(s: &ServiceUrl, metrics: &Arc<Metrics>, connector: &Arc<Connector>) -> Service {
        Service {
            upstream: Arc::new(Upstream::new(&s.upstream, metrics)),
            connector: Arc::clone(connector),
            path: s.path.clone(),
            host: s.host.clone(),
            url: s.url.clone(),
        }
    }

    /// A service outside any route (the OTLP collector), with a connector and keep-alive
    /// pool of its own (its requests run on a runtime of their own).
    pub fn standalone(s: &ServiceUrl, metrics: &Arc<Metrics>) -> Service {
        Service {
            upstream: Arc::new(Upstream::new(&s.upstream, metrics)),
            connector: Arc::new(Connector::new(None)),
            path: s.path.clone(),
            host: s.host.clone(),
            url: s.url.clone(),
        }
    }

    /// Sends `method` to the service's URL with `headers`, within `limit`, and keeps its
    /// answer's body up to `max_body` bytes.
    pub async fn ask(
        &self,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
        limit: Duration,
        max_body: u64,
    ) -> Result<(ResponseHeader, Bytes), Unanswered> {
        self.send(method, headers, Bytes::new(), limit, max_body)
            .await
    }

    /// [`Self::ask`] with a request body.
    pub async fn send(
        &self,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        limit: Duration,
        max_body: u64,
    ) -> Result<(ResponseHeader, Bytes), Unanswered> {
        let mut head = RequestHeader::build(method, self.path.as_bytes(), Some(headers.len() + 2))
            .map_err(|e| Unanswered::Failed(e.to_string()))?;
        let _ = head.insert_header(http::header::HOST, self.host.as_str());
        if !body.is_empty() {
            let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
        }
        for (name, value) in headers {
            let _ = head.append_header(name.clone(), value.clone());
        }
        let Some(mut lease) = self.upstream.select(b"", &Tried::default()) else {
            return Err(Unanswered::Failed("no backend available".into()));
        };
        let timeouts = &self.upstream.config.timeouts;
        let answer = exchange::exchange(
            &self.connector,
            &mut lease,
            timeouts,
            limit,
            &head,
            if body.is_empty() {
                Body::Empty
            } else {
                Body::Full(body)
            },
            Keep::UpTo(max_body),
        )
        .await;
        match answer {
            Ok(a) => a
                .kept
                .ok_or_else(|| Unanswered::Failed("answer without a head".into())),
            Err(Failure::Timeout) => Err(Unanswered::Timeout),
            Err(Failure::TooLarge) => Err(Unanswered::Failed(format!(
                "answer larger than {max_body} bytes"
            ))),
            Err(e) => Err(Unanswered::Failed(format!("{e:?}"))),
        }
    }
}
