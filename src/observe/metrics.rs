//! Prometheus metrics. One registry per process holds every `fanout_*` family; the
//! request path only touches handles resolved in advance (per route, per backend), so it
//! formats no labels and takes no lock. Gauges that mirror live state (health, in-flight)
//! are filled in when `/metrics` is scraped, not on every request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub backend_healthy: IntGaugeVec,
    pub backend_inflight: IntGaugeVec,
    pub circuit_open: IntGaugeVec,
    pub mirror_requests: IntCounterVec,
    pub mirror_inflight: IntGaugeVec,
    pub mirror_compare: IntCounterVec,
    pub tunnels_open: IntGaugeVec,
    pub spool_bytes: IntGaugeVec,
    pub spool_oldest: IntGaugeVec,
    pub broadcast_deliveries: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rate_limit_store_errors: IntCounterVec,
    pub client_connections: IntGaugeVec,
    pub client_refused: IntCounterVec,
    pub access_denied: IntCounterVec,
    pub split_requests: IntCounterVec,
    pub compressed_responses: IntCounterVec,
    pub shed: IntCounterVec,
    pub concurrency_limit: IntGaugeVec,
    pub tracing_spans: IntCounterVec,
    pub fallback_skipped: IntCounterVec,
    pub admin_unauthorized: IntCounter,
    pub cache_requests: IntCounterVec,
    pub cache_size: IntGauge,
    pub cache_evictions: IntCounter,
    pub access_log_dropped: IntCounter,
    /// `fanout_config_reloads_total` by result (ok, error, upgrade).
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// Totals for `/status`.
    pub totals: Totals,
}

#[derive(Default)]
pub struct Totals {
    pub requests: AtomicU64,
    pub responses: AtomicU64,
    pub errors: AtomicU64,
}

fn counter(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let reg = Registry::new();
        let ub = ["upstream", "backend"];
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "fanout_request_duration_seconds",
                "Time from request to the end of the answer",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route"],
        )?;
        reg.register(Box::new(request_duration.clone()))?;
        Ok(Metrics {
            requests: counter(
                &reg,
                "fanout_requests_total",
                "Requests answered, by route and status",
                &["route", "status"],
            )?,
            request_duration,
            upstream_requests: counter(
                &reg,
                "fanout_upstream_requests_total",
                "Requests sent to backends, by outcome (ok, error, timeout)",
                &["upstream", "backend", "outcome"],
            )?,
            upstream_retries: counter(
                &reg,
                "fanout_upstream_retries_total",
                "Attempts retried on another backend",
                &["upstream"],
            )?,
            backend_healthy: gauge(
                &reg,
                "fanout_backend_healthy",
                "1 when the backend passes its health checks",
                &ub,
            )?,
            backend_inflight: gauge(
                &reg,
                "fanout_backend_inflight",
                "Requests in flight to the backend",
                &ub,
            )?,
            circuit_open: gauge(
                &reg,
                "fanout_circuit_open",
                "1 when the backend's circuit breaker is open",
                &ub,
            )?,
            mirror_requests: counter(
                &reg,
                "fanout_mirror_requests_total",
                "Mirrored copies, by outcome (ok, error, dropped, too_large)",
                &["route", "upstream", "outcome"],
            )?,
            mirror_compare: counter(
                &reg,
                "fanout_mirror_compare_total",
                "Mirror answers compared with the primary's, by result (match, status, \
                 headers, body, incomplete)",
                &["route", "upstream", "result"],
            )?,
            mirror_inflight: gauge(
                &reg,
                "fanout_mirror_inflight",
                "Mirror copies in flight",
                &["route", "upstream"],
            )?,
            tunnels_open: gauge(
                &reg,
                "fanout_tunnels_open",
                "Upgraded connections (WebSocket) open to the upstream",
                &["upstream"],
            )?,
            spool_bytes: gauge(
                &reg,
                "fanout_spool_bytes",
                "Bytes of accepted broadcast requests still to be delivered to the upstream",
                &["upstream"],
            )?,
            spool_oldest: gauge(
                &reg,
                "fanout_spool_oldest_seconds",
                "Age of the oldest broadcast request still to be delivered to the upstream",
                &["upstream"],
            )?,
            broadcast_deliveries: counter(
                &reg,
                "fanout_broadcast_deliveries_total",
                "Broadcast delivery attempts, by outcome (ok; error: failed, then retried \
                 or expired; rejected: a 4xx, not retried; dropped: lost)",
                &["route", "upstream", "outcome"],
            )?,
            rate_limited: counter(
                &reg,
                "fanout_rate_limited_total",
                "Requests refused by a rate limit",
                &["route"],
            )?,
            rate_limit_store_errors: counter(
                &reg,
                "fanout_rate_limit_store_errors_total",
                "Rate-limit decisions the shared store (Redis) did not give within \
                 redis.timeout; on_store_error decided those requests",
                &["route"],
            )?,
            client_connections: gauge(
                &reg,
                "fanout_client_connections",
                "Client connections open, by listener",
                &["listener"],
            )?,
            client_refused: counter(
                &reg,
                "fanout_client_refused_total",
                "Client connections or requests refused at the edge, by reason",
                &["reason"],
            )?,
            access_denied: counter(
                &reg,
                "fanout_access_denied_total",
                "Requests refused by a route's access or auth, by reason",
                &["route", "reason"],
            )?,
            split_requests: counter(
                &reg,
                "fanout_split_requests_total",
                "Requests of a route with `split` or `rollout`, by the upstream its side sent them to",
                &["route", "upstream"],
            )?,
            compressed_responses: counter(
                &reg,
                "fanout_compressed_responses_total",
                "Answers compressed by the gateway, by route and algorithm",
                &["route", "algorithm"],
            )?,
            shed: counter(
                &reg,
                "fanout_shed_total",
                "Requests or retries an upstream's limits refused, by reason",
                &["upstream", "reason"],
            )?,
            tracing_spans: counter(
                &reg,
                "fanout_tracing_spans_total",
                "Spans exported to the OTLP collector, dropped (queue full) or failed",
                &["outcome"],
            )?,
            concurrency_limit: gauge(
                &reg,
                "fanout_upstream_concurrency_limit",
                "Requests the upstream's adaptive concurrency limit lets in flight now",
                &["upstream"],
            )?,
            fallback_skipped: counter(
                &reg,
                "fanout_fallback_skipped_total",
                "Requests that ran without their fallbacks (over fallback_max_inflight)",
                &["route"],
            )?,
            cache_requests: counter(
                &reg,
                "fanout_cache_requests_total",
                "Requests on cached routes, by what the cache did (hit, miss, stale, expired, \
                 revalidated, bypass)",
                &["route", "result"],
            )?,
            cache_size: {
                let g = IntGauge::new("fanout_cache_size_bytes", "Bytes of cached answers")?;
                reg.register(Box::new(g.clone()))?;
                g
            },
            cache_evictions: {
                let c = IntCounter::new(
                    "fanout_cache_evictions_total",
                    "Cached answers evicted to stay under cache.max_size",
                )?;
                reg.register(Box::new(c.clone()))?;
                c
            },
            admin_unauthorized: {
                let c = IntCounter::new(
                    "fanout_admin_unauthorized_total",
                    "Admin requests refused for want of the admin token",
                )?;
                reg.register(Box::new(c.clone()))?;
                c
            },
            access_log_dropped: {
                let c = IntCounter::new(
                    "fanout_access_log_dropped_total",
                    "Access log lines dropped because stdout could not keep up",
                )?;
                reg.register(Box::new(c.clone()))?;
                c
            },
            config_reloads: counter(
                &reg,
                "fanout_config_reloads_total",
                "Configuration reloads, by result: ok (in force), error (refused, the old one serves), upgrade (needs a graceful upgrade)",
                &["result"],
            )?,
            config_generation: {
                let g = IntGauge::new(
                    "fanout_config_generation",
                    "The generation of the configuration in force: 1 at start, one more per reload",
                )?;
                reg.register(Box::new(g.clone()))?;
                g
            },
            registry: reg,
            totals: Totals::default(),
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families; an error yields a partial body.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Status codes that get a pre-resolved counter per route; others resolve on use.
const COMMON_STATUS: [u16; 18] = [
    200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504,
];

/// A route's metric handles, resolved on first use.
pub struct RouteMetrics {
    label: Arc<str>,
    duration: OnceLock<Histogram>,
    status: [OnceLock<IntCounter>; COMMON_STATUS.len()],
}

impl RouteMetrics {
    pub fn new(label: &str) -> Self {
        RouteMetrics {
            label: label.into(),
            duration: OnceLock::new(),
            status: Default::default(),
        }
    }

    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Counts one answered request and its duration.
    pub fn observe(&self, m: &Metrics, status: u16, seconds: f64) {
        self.duration
            .get_or_init(|| m.request_duration.with_label_values(&[&*self.label]))
            .observe(seconds);
        match COMMON_STATUS.iter().position(|&s| s == status) {
            Some(i) => self.status[i]
                .get_or_init(|| {
                    m.requests
                        .with_label_values(&[&*self.label, &status.to_string()])
                })
                .inc(),
            None => m
                .requests
                .with_label_values(&[&*self.label, &status.to_string()])
                .inc(),
        }
    }
}

impl Totals {
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn count_answer(&self, status: u16, failed: bool) {
        if status > 0 {
            self.responses.fetch_add(1, Relaxed);
        }
        if failed || status >= 500 {
            self.errors.fetch_add(1, Relaxed);
        }
    }
}
