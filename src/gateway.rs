//! The gateway's shared runtime, built once from a validated [`Config`]: the router, the
//! routes with their metric handles, the upstreams with their live backend state, and the
//! metrics registry. The proxy phases, the admin listener and the health checker all read
//! this one value through an `Arc`.

use std::sync::Arc;
use std::time::Instant;

use crate::access_log::AccessLogger;
use crate::broadcast::spool::Spool;
use crate::broadcast::{self, Targets};
use crate::cache;
use crate::config::{AccessLog, Config, EncodedSlashes, RouteConfig, RouteKind, UpstreamId};
use crate::edge::accept::Connections;
use crate::edge::ClientPolicy;
use crate::fallback;
use crate::lifecycle::Draining;
use crate::metrics::{Metrics, RouteMetrics};
use crate::mirror::Mirror;
use crate::ratelimit::{RateLimiter, SharedStore};
use crate::routing::Router;
use crate::upstream::Upstream;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use prometheus::IntCounter;

pub struct Route {
    pub config: RouteConfig,
    pub metrics: RouteMetrics,
    pub mirrors: Vec<Arc<Mirror>>,
    pub rate_limiter: Option<RateLimiter>,
    pub rate_limited: IntCounter,
    /// Decisions the shared store (Redis) did not give in time.
    pub rate_limit_store_errors: IntCounter,
    /// The delivery targets of a broadcast route.
    pub targets: Option<Arc<Targets>>,
    /// The fallback upstreams of a proxy route, in order.
    pub fallbacks: Vec<(UpstreamId, Arc<Upstream>)>,
    /// Bounds the fallback copies in flight, on a route with fallbacks.
    pub fallback_budget: Option<Arc<fallback::Budget>>,
    /// On a cached route: `fanout_cache_requests_total` by [`cache::Outcome`].
    pub cache_results: Vec<IntCounter>,
}

impl Route {
    /// The upstream that answers a proxy route.
    pub fn upstream(&self) -> Option<UpstreamId> {
        match &self.config.kind {
            RouteKind::Proxy { upstream, .. } => Some(*upstream),
            RouteKind::Broadcast { .. } => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.config.kind {
            RouteKind::Proxy { fallback, .. } if !fallback.is_empty() => "fallback",
            RouteKind::Proxy { .. } => "proxy",
            RouteKind::Broadcast { .. } => "broadcast",
        }
    }
}

pub struct Gateway {
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub metrics: Arc<Metrics>,
    /// Metric handles for requests that matched no route.
    pub unrouted: RouteMetrics,
    /// Sends mirror and fallback copies, with its own keep-alive pool.
    pub connector: Arc<Connector>,
    /// Whether requests that matched no route are logged.
    pub default_access_log: AccessLog,
    pub access_log: AccessLogger,
    /// Set on SIGQUIT/SIGTERM: answers close their connections from then on.
    pub draining: Arc<Draining>,
    /// Where broadcast routes keep what they accept until it is delivered.
    pub spool: Arc<dyn Spool>,
    /// The response cache, when a route uses it.
    pub cache: Option<cache::Cache>,
    pub started: Instant,
    /// What client connections are held to (`clients:`).
    pub clients: Arc<ClientPolicy>,
    pub connections: Arc<Connections>,
    pub encoded_slashes: EncodedSlashes,
}

impl Gateway {
    /// The runtime for `config`. Fails on what validation cannot see: the metrics registry,
    /// or a Redis URL the client library refuses.
    pub fn new(config: &Config, spool: Arc<dyn Spool>) -> Result<Gateway, String> {
        let metrics = Arc::new(Metrics::new().map_err(|e| format!("metrics: {e}"))?);
        let shared_store = match &config.redis {
            Some(redis) => Some(Arc::new(SharedStore::new(redis)?)),
            None => None,
        };
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Upstream::new(u, &metrics)))
            .collect();
        let routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| Route {
                metrics: RouteMetrics::new(&r.label),
                rate_limiter: r
                    .rate_limit
                    .as_ref()
                    .map(|l| RateLimiter::new(l, &r.label, shared_store.as_ref())),
                rate_limited: metrics.rate_limited.with_label_values(&[&r.label]),
                rate_limit_store_errors: metrics
                    .rate_limit_store_errors
                    .with_label_values(&[&r.label]),
                targets: match &r.kind {
                    RouteKind::Broadcast { targets, retry } => {
                        let ups: Vec<(Arc<Upstream>, Option<String>)> = targets
                            .iter()
                            .map(|t| (Arc::clone(&upstreams[t.upstream]), t.path.clone()))
                            .collect();
                        Some(Arc::new(broadcast::targets(
                            &r.label, &ups, *retry, &metrics,
                        )))
                    }
                    RouteKind::Proxy { .. } => None,
                },
                fallbacks: match &r.kind {
                    RouteKind::Proxy { fallback, .. } => fallback
                        .iter()
                        .map(|&u| (u, Arc::clone(&upstreams[u])))
                        .collect(),
                    RouteKind::Broadcast { .. } => Vec::new(),
                },
                fallback_budget: match &r.kind {
                    RouteKind::Proxy {
                        fallback,
                        fallback_max_inflight,
                        ..
                    } if !fallback.is_empty() => Some(fallback::Budget::new(
                        *fallback_max_inflight,
                        metrics.fallback_skipped.with_label_values(&[&r.label]),
                    )),
                    _ => None,
                },
                mirrors: r
                    .mirrors
                    .iter()
                    .map(|m| {
                        let upstream = Arc::clone(&upstreams[m.upstream]);
                        Arc::new(Mirror::new(m, &r.label, upstream, &metrics))
                    })
                    .collect(),
                cache_results: match &r.cache {
                    Some(_) => cache::Outcome::ALL
                        .iter()
                        .map(|o| {
                            metrics
                                .cache_requests
                                .with_label_values(&[&r.label, o.label()])
                        })
                        .collect(),
                    None => Vec::new(),
                },
                config: r.clone(),
            })
            .collect();
        let cache = config
            .routes
            .iter()
            .any(|r| r.cache.is_some())
            .then(|| cache::Cache::new(config.cache_max_size));
        Ok(Gateway {
            router: Router::new(&config.routes),
            connector: Arc::new(Connector::new(Some(ConnectorOptions::from_server_conf(
                &config.server,
            )))),
            routes,
            upstreams,
            unrouted: RouteMetrics::new("none"),
            default_access_log: config.default_access_log,
            access_log: AccessLogger::new(metrics.access_log_dropped.clone()),
            spool,
            cache,
            draining: Arc::default(),
            clients: Arc::new(ClientPolicy::new(&config.clients, &metrics)),
            connections: Connections::new(
                config.clients.max_connections,
                config.clients.max_connections_per_ip,
            ),
            encoded_slashes: config.clients.encoded_slashes,
            metrics,
            started: Instant::now(),
        })
    }
}
