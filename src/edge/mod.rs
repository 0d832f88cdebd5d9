//! The gateway's edge: what stands between the open internet and the proxy phases.
//!
//! - [`accept`]: where connections enter: admission, the connection gauges, and the hook
//!   into Pingora's HTTP server loop;
//! - [`admission`]: the counts behind `clients.max_connections` and
//!   `max_connections_per_ip`, and the slot each open connection holds;
//! - [`handshake`]: TLS termination (SNI, ALPN) within the head's deadline;
//! - [`stream`]: each HTTP/1 client connection, with its head, body and idle deadlines and
//!   the answers it gives itself (400, 408, 414, 431, 505);
//! - [`framing`]: the RFC 9112 request grammar those answers come from;
//! - [`h2`]: the same limits and field grammar for HTTP/2 requests, which Pingora's h2
//!   server decodes (checked on the decoded head, before routing);
//! - [`path`]: request paths normalised before routing (dot segments, encoded characters,
//!   repeated slashes);
//! - [`proxy_protocol`]: the PROXY protocol header (v1, v2) a listener behind an L4
//!   balancer reads first, which names the client's address.

pub mod accept;
pub mod admission;
pub(crate) mod bind;
pub mod framing;
pub mod h2;
pub mod handshake;
pub mod path;
pub mod proxy_protocol;
pub mod stream;

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};

use crate::config::ClientsConfig;
use crate::observe::metrics::Metrics;
use framing::Limits;

/// What every client connection is held to (`clients:`), and where refusals are counted.
pub struct ClientPolicy {
    pub limits: Limits,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub refused: Refusals,
    /// `fanout_requests_total`: the edge's own answers count as requests of no route.
    answered: IntCounterVec,
}

impl ClientPolicy {
    pub fn new(config: &ClientsConfig, metrics: &Metrics) -> ClientPolicy {
        ClientPolicy {
            limits: Limits {
                max_request_line: config.max_request_line,
                max_header_bytes: config.max_header_bytes,
                max_headers: config.max_headers,
            },
            header_timeout: config.header_timeout,
            body_timeout: config.body_timeout,
            keepalive_timeout: config.keepalive_timeout,
            refused: Refusals::new(&metrics.client_refused),
            answered: metrics.requests.clone(),
        }
    }

    /// Counts an answer the edge gave itself (400, 408, 414, 431, 505).
    pub fn count_answer(&self, status: u16) {
        self.answered
            .with_label_values(&["none", &status.to_string()])
            .inc();
    }
}

/// `fanout_client_refused_total`, one handle per reason.
pub struct Refusals {
    pub max_connections: IntCounter,
    pub max_connections_per_ip: IntCounter,
    pub header_timeout: IntCounter,
    pub body_timeout: IntCounter,
    pub bad_request: IntCounter,
    /// A TLS handshake failed or did not finish within `header_timeout`.
    pub tls_handshake: IntCounter,
    /// The client left (closed, or reset its h2 stream) before its answer was complete:
    /// the request is over and is never retried.
    pub client_closed: IntCounter,
    /// A PROXY protocol header was missing, malformed or late.
    pub proxy_protocol: IntCounter,
}

impl Refusals {
    fn new(vec: &IntCounterVec) -> Refusals {
        let r = |reason: &str| vec.with_label_values(&[reason]);
        Refusals {
            max_connections: r("max_connections"),
            max_connections_per_ip: r("max_connections_per_ip"),
            header_timeout: r("header_timeout"),
            body_timeout: r("body_timeout"),
            bad_request: r("bad_request"),
            tls_handshake: r("tls_handshake"),
            client_closed: r("client_closed"),
            proxy_protocol: r("proxy_protocol"),
        }
    }

    /// The counter of a request ended by its client while it was proxied: `bad_request`
    /// when the h2 codec reset the stream for breaking its own framing (data beyond its
    /// `content-length`), `client_closed` when the client went away or reset it.
    pub fn downstream(&self, e: &pingora_error::Error) -> &IntCounter {
        let broke_framing = e
            .root_cause()
            .downcast_ref::<::h2::Error>()
            .is_some_and(|h2| h2.reason() == Some(::h2::Reason::PROTOCOL_ERROR) && !h2.is_remote());
        match broke_framing {
            true => &self.bad_request,
            false => &self.client_closed,
        }
    }

    /// The counter of a connection-limit refusal.
    pub fn over(&self, limit: admission::Over) -> &IntCounter {
        match limit {
            admission::Over::Total => &self.max_connections,
            admission::Over::PerIp => &self.max_connections_per_ip,
        }
    }
}
