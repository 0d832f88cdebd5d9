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
use crate::edge::admission::Connections;
use crate::edge::ClientPolicy;
use crate::fallback::{self, FallbackUpstreams};
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
    pub rate_limiter: Option<RateLimiter>,
    pub rate_limited: IntCounter,
    /// Decisions the shared store (Redis) did not give in time.
    pub rate_limit_store_errors: IntCounter,
    /// What the route does with an admitted request, and what that needs.
    pub kind: RouteRuntime,
}

/// A route's kind at run time: each variant holds exactly what that kind uses.
pub enum RouteRuntime {
    /// One upstream answers.
    Proxy(ProxyRoute),
    /// 202 at once, then delivered to these targets.
    Broadcast(Arc<Targets>),
}

pub struct ProxyRoute {
    pub upstream: UpstreamId,
    pub mirrors: Vec<Arc<Mirror>>,
    /// On a route with `fallback:`.
    pub fallbacks: Option<FallbackUpstreams>,
    /// On a cached route: `fanout_cache_requests_total` by [`cache::Outcome`].
    pub cache_results: Option<Vec<IntCounter>>,
}

impl Route {
    /// The proxy route's runtime, if this is one.
    pub fn proxy(&self) -> Option<&ProxyRoute> {
        match &self.kind {
            RouteRuntime::Proxy(p) => Some(p),
            RouteRuntime::Broadcast(_) => None,
        }
    }

    /// The upstream that answers a proxy route.
    pub fn upstream(&self) -> Option<UpstreamId> {
        self.proxy().map(|p| p.upstream)
    }

    /// The mirrors of a proxy route (none on other kinds).
    pub fn mirrors(&self) -> &[Arc<Mirror>] {
        self.proxy().map_or(&[], |p| &p.mirrors)
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            RouteRuntime::Proxy(p) if p.fallbacks.is_some() => "fallback",
            RouteRuntime::Proxy(_) => "proxy",
            RouteRuntime::Broadcast(_) => "broadcast",
        }
    }

    /// The runtime of `r`'s kind.
    fn runtime(r: &RouteConfig, upstreams: &[Arc<Upstream>], metrics: &Metrics) -> RouteRuntime {
        match &r.kind {
            RouteKind::Broadcast { targets, retry } => {
                let ups: Vec<(Arc<Upstream>, Option<String>)> = targets
                    .iter()
                    .map(|t| (Arc::clone(&upstreams[t.upstream]), t.path.clone()))
                    .collect();
                RouteRuntime::Broadcast(Arc::new(broadcast::targets(
                    &r.label, &ups, *retry, metrics,
                )))
            }
            RouteKind::Proxy {
                upstream,
                fallback,
                fallback_max_inflight,
                ..
            } => RouteRuntime::Proxy(ProxyRoute {
                upstream: *upstream,
                mirrors: r
                    .mirrors
                    .iter()
                    .map(|m| {
                        let upstream = Arc::clone(&upstreams[m.upstream]);
                        Arc::new(Mirror::new(m, &r.label, upstream, metrics))
                    })
                    .collect(),
                fallbacks: (!fallback.is_empty()).then(|| FallbackUpstreams {
                    upstreams: fallback
                        .iter()
                        .map(|&u| (u, Arc::clone(&upstreams[u])))
                        .collect(),
                    budget: fallback::Budget::new(
                        *fallback_max_inflight,
                        metrics.fallback_skipped.with_label_values(&[&r.label]),
                    ),
                }),
                cache_results: r.cache.as_ref().map(|_| {
                    cache::Outcome::ALL
                        .iter()
                        .map(|o| {
                            metrics
                                .cache_requests
                                .with_label_values(&[&r.label, o.label()])
                        })
                        .collect()
                }),
            }),
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
                kind: Route::runtime(r, &upstreams, &metrics),
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
