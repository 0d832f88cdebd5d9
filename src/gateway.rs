//! The gateway's shared runtime, in two parts. [`Gateway`] lives as long as the process:
//! the metrics registry, the connector of copies, the access logger, the spool, the cache,
//! the connection counts. [`Generation`] is what one version of the configuration file
//! made: the router, the routes with their metric handles and rate limiters, the upstreams
//! with their backends. The gateway holds the generation in force behind an `ArcSwap`; a
//! request takes it once, at its start, and runs to its end on it, while a reload
//! (the reload module) builds the next generation beside it — handing over, by identity,
//! everything learned that still means the same thing — and swaps it in.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use crate::app::lifecycle::Draining;
use crate::broadcast::spool::Spool;
use crate::broadcast::{self, Targets};
use crate::cache;
use crate::compress::Compress;
use crate::config::UpstreamId;
use crate::config::{Config, RouteConfig, RouteKind};
use crate::edge::admission::Connections;
use crate::edge::handshake::Terminator;
use crate::edge::ClientPolicy;
use crate::fallback::{self, FallbackUpstreams};
use crate::filters::{self, Chain, RequestFilter};
use crate::mirror::Mirror;
use crate::observe::access_log::AccessLogger;
use crate::observe::metrics::{Metrics, RouteMetrics};
use crate::ratelimit::step::Limit;
use crate::ratelimit::{RateLimiter, SharedStore};
use crate::redirect::Redirect;
use crate::routing::split::Split;
use crate::routing::Router;
use crate::upstream::Upstream;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use prometheus::IntCounter;

pub struct Route {
    pub config: RouteConfig,
    pub metrics: RouteMetrics,
    /// Kept across reloads while the route's label and limit (and `redis:`) stay the same;
    /// the chain's last step uses it.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// What the route does with an admitted request, and what that needs.
    pub kind: RouteRuntime,
    /// Its access, CORS, auth, plugin, rewrite and rate-limit steps, built once.
    pub filters: Chain,
}

/// A route's kind at run time: each variant holds exactly what that kind uses.
pub enum RouteRuntime {
    /// One upstream answers.
    Proxy(ProxyRoute),
    /// 202 at once, then delivered to these targets.
    Broadcast(Arc<Targets>),
    /// The gateway answers with a redirect.
    Redirect(Redirect),
}

pub struct ProxyRoute {
    pub upstream: UpstreamId,
    pub mirrors: Vec<Arc<Mirror>>,
    /// On a route with `fallback:`.
    pub fallbacks: Option<FallbackUpstreams>,
    /// On a cached route: `fanout_cache_requests_total` by [`cache::Outcome`].
    pub cache_results: Option<Vec<IntCounter>>,
    /// On a route with `compress:`.
    pub compress: Option<Compress>,
}

impl Route {
    /// The proxy route's runtime, if this is one.
    pub fn proxy(&self) -> Option<&ProxyRoute> {
        match &self.kind {
            RouteRuntime::Proxy(p) => Some(p),
            RouteRuntime::Broadcast(_) | RouteRuntime::Redirect(_) => None,
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
            RouteRuntime::Redirect(_) => "redirect",
        }
    }

    /// The runtime of `r`'s kind; `previous` is the route of the same label in the
    /// generation being replaced (its broadcast targets and mirror pairs carry over).
    fn runtime(
        r: &RouteConfig,
        upstreams: &[Arc<Upstream>],
        metrics: &Metrics,
        previous: Option<&Route>,
    ) -> RouteRuntime {
        match &r.kind {
            RouteKind::Redirect(c) => RouteRuntime::Redirect(Redirect::new(c)),
            RouteKind::Broadcast { targets, retry } => {
                let ups: Vec<(Arc<Upstream>, Option<String>)> = targets
                    .iter()
                    .map(|t| (Arc::clone(&upstreams[t.upstream]), t.path.clone()))
                    .collect();
                let before = previous.and_then(|p| match &p.kind {
                    RouteRuntime::Broadcast(t) => Some(&**t),
                    RouteRuntime::Proxy(_) | RouteRuntime::Redirect(_) => None,
                });
                RouteRuntime::Broadcast(Arc::new(broadcast::targets(
                    &r.label, &ups, *retry, metrics, before,
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
                        let before = previous.and_then(|p| {
                            p.mirrors()
                                .iter()
                                .find(|old| old.upstream_name() == upstream.name())
                        });
                        Arc::new(Mirror::new(
                            m,
                            &r.label,
                            upstream,
                            metrics,
                            before.map(|b| &**b),
                        ))
                    })
                    .collect(),
                fallbacks: (!fallback.is_empty()).then(|| FallbackUpstreams {
                    upstreams: fallback
                        .iter()
                        .map(|&u| (u, Arc::clone(&upstreams[u])))
                        .collect(),
                    budget: match previous.and_then(|p| p.proxy()?.fallbacks.as_ref()) {
                        Some(before) => before.budget.resized(*fallback_max_inflight),
                        None => fallback::CopyBudget::new(
                            *fallback_max_inflight,
                            metrics.fallback_skipped.with_label_values(&[&r.label]),
                        ),
                    },
                }),
                compress: r
                    .compress
                    .as_ref()
                    .map(|c| Compress::new(c, &r.label, metrics)),
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

/// What one version of the configuration made: everything a request is routed and
/// answered by. Immutable; a reload builds the next one.
pub struct Generation {
    /// 1 for the configuration the process started with, then one more per reload.
    pub number: u64,
    /// A hash of the file's text, as `/status` and `GET /config` show it.
    pub hash: String,
    /// When it came into force.
    pub since: SystemTime,
    /// The configuration it was built from, and the text it was read from.
    pub config: Arc<Config>,
    pub text: Arc<str>,
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// What client connections are held to (`clients:`): requests read it here, the edge
    /// from the gateway, which [`Gateway::install`] hands the same policy.
    pub clients: Arc<ClientPolicy>,
    /// `redis:`'s client, kept across reloads while `redis:` stays the same.
    shared_store: Option<Arc<SharedStore>>,
}

/// A hash of a configuration's text: 16 hex digits.
pub fn text_hash(text: &str) -> String {
    format!("{:016x}", crate::keys::stable_hash(text.as_bytes()))
}

impl Generation {
    /// Builds generation `number` from `config` (read from `text`). `previous`: the
    /// generation it replaces, whose learned state it takes over by identity — a backend
    /// by (upstream, address), a rate limiter by (route label, limit), mirror pairs and
    /// broadcast queues by (route label, upstream). Fails on what validation cannot see:
    /// a Redis URL the client library refuses.
    pub fn new(
        config: Arc<Config>,
        text: Arc<str>,
        number: u64,
        metrics: &Arc<Metrics>,
        connector: &Arc<Connector>,
        previous: Option<&Generation>,
    ) -> Result<Generation, String> {
        let build = filters::Build { metrics, connector };
        let kept_store = previous
            .filter(|p| p.config.redis == config.redis)
            .and_then(|p| p.shared_store.clone());
        let shared_store = match (&config.redis, kept_store) {
            (None, _) => None,
            (Some(_), Some(kept)) => Some(kept),
            (Some(redis), None) => Some(Arc::new(SharedStore::new(redis)?)),
        };
        let same_store = match previous {
            Some(p) => match (&p.shared_store, &shared_store) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            },
            None => false,
        };
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let before = previous.and_then(|p| p.upstreams.iter().find(|o| *o.name == *u.name));
                Arc::new(match before {
                    Some(old) => Upstream::succeeding(u, metrics, old),
                    None => Upstream::new(u, metrics),
                })
            })
            .collect();
        let routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| -> Result<Route, String> {
                let before =
                    previous.and_then(|p| p.routes.iter().find(|o| o.config.label == r.label));
                let limiter = r.rate_limit.as_ref().map(|l| {
                    let kept = before.filter(|_| same_store).and_then(|b| {
                        b.rate_limiter
                            .as_ref()
                            .filter(|_| b.config.rate_limit == r.rate_limit)
                    });
                    match kept {
                        Some(k) => Arc::clone(k),
                        None => Arc::new(RateLimiter::new(l, &r.label, shared_store.as_ref())),
                    }
                });
                let mut steps: Vec<Box<dyn RequestFilter>> = Vec::new();
                if let Some(l) = &limiter {
                    steps.push(Box::new(Limit::new(
                        Arc::clone(l),
                        metrics.rate_limited.with_label_values(&[&r.label]),
                        metrics
                            .rate_limit_store_errors
                            .with_label_values(&[&r.label]),
                        &r.label,
                    )));
                }
                if let RouteKind::Proxy {
                    upstream,
                    split: Some(split),
                    ..
                } = &r.kind
                {
                    steps.push(Box::new(Split::new(
                        split,
                        *upstream,
                        &r.label,
                        |u| config.upstreams[u].name.to_string(),
                        |route, upstream| {
                            metrics.split_requests.with_label_values(&[route, upstream])
                        },
                    )));
                }
                Ok(Route {
                    metrics: RouteMetrics::new(&r.label),
                    rate_limiter: limiter,
                    kind: Route::runtime(r, &upstreams, metrics, before),
                    filters: Chain::build(r, &build, steps)?,
                    config: r.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Generation {
            number,
            hash: text_hash(&text),
            since: SystemTime::now(),
            router: Router::new(&config.routes),
            routes,
            upstreams,
            clients: Arc::new(ClientPolicy::new(&config.clients, metrics)),
            shared_store,
            text,
            config,
        })
    }

    /// Every broadcast route's targets, by route label (what the delivery service serves).
    pub fn broadcast_targets(&self) -> HashMap<String, Arc<Targets>> {
        self.routes
            .iter()
            .filter_map(|r| match &r.kind {
                RouteRuntime::Broadcast(t) => Some((r.config.label.clone(), Arc::clone(t))),
                RouteRuntime::Proxy(_) | RouteRuntime::Redirect(_) => None,
            })
            .collect()
    }

    /// Whether a route of this generation uses the cache.
    pub fn caches(&self) -> bool {
        self.config.routes.iter().any(|r| r.cache.is_some())
    }
}

pub struct Gateway {
    current: ArcSwap<Generation>,
    pub metrics: Arc<Metrics>,
    /// Metric handles for requests that matched no route.
    pub unrouted: RouteMetrics,
    /// Sends mirror and fallback copies, with its own keep-alive pool.
    pub connector: Arc<Connector>,
    pub access_log: AccessLogger,
    /// Set on SIGQUIT/SIGTERM: answers close their connections from then on.
    pub draining: Arc<Draining>,
    /// Where broadcast routes keep what they accept until it is delivered.
    pub spool: Arc<dyn Spool>,
    /// The response cache, made when a generation first has a route that uses it; it
    /// outlives every reload.
    cache: OnceLock<cache::Cache>,
    pub started: Instant,
    /// The client policy in force, for the edge: each connection keeps the policy it was
    /// accepted under (a request uses its generation's).
    pub clients: Arc<ArcSwap<ClientPolicy>>,
    pub connections: Arc<Connections>,
    /// The upstreams in force, for the health checks and DNS lookups that follow them.
    upstreams_watch: watch::Sender<Arc<[Arc<Upstream>]>>,
    /// The broadcast routes in force, for the delivery service.
    broadcast_watch: watch::Sender<Arc<HashMap<String, Arc<Targets>>>>,
    /// The TLS side of each TLS listener, by address: a reload gives it new certificates.
    pub terminators: Mutex<Vec<(std::net::SocketAddr, Arc<Terminator>)>>,
}

impl Gateway {
    /// The runtime for `config` (read from `text`). Fails on what validation cannot see:
    /// the metrics registry, or a Redis URL the client library refuses.
    pub fn new(config: Config, text: &str, spool: Arc<dyn Spool>) -> Result<Gateway, String> {
        let metrics = Arc::new(Metrics::new().map_err(|e| format!("metrics: {e}"))?);
        let config = Arc::new(config);
        let connector = Arc::new(Connector::new(Some(ConnectorOptions::from_server_conf(
            &config.server,
        ))));
        let generation = Generation::new(
            Arc::clone(&config),
            text.into(),
            1,
            &metrics,
            &connector,
            None,
        )?;
        let cache = OnceLock::new();
        if generation.caches() {
            let _ = cache.set(cache::Cache::new(config.cache_max_size));
        }
        let (upstreams_watch, _) = watch::channel(generation.upstreams.clone().into());
        let (broadcast_watch, _) = watch::channel(Arc::new(generation.broadcast_targets()));
        metrics.config_generation.set(1);
        crate::observe::otlp::install(config.tracing.as_ref(), &metrics);
        Ok(Gateway {
            connector,
            unrouted: RouteMetrics::new("none"),
            access_log: AccessLogger::new(metrics.access_log_dropped.clone()),
            spool,
            cache,
            draining: Arc::default(),
            clients: Arc::new(ArcSwap::from_pointee(ClientPolicy::new(
                &config.clients,
                &metrics,
            ))),
            connections: Connections::new(
                config.clients.max_connections,
                config.clients.max_connections_per_ip,
            ),
            upstreams_watch,
            broadcast_watch,
            terminators: Mutex::default(),
            current: ArcSwap::from_pointee(generation),
            metrics,
            started: Instant::now(),
        })
    }

    /// The generation in force, held for as long as the caller needs it (a request: to
    /// its end).
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The generation in force, for a quick look (no reference count taken).
    pub fn peek(&self) -> Guard<Arc<Generation>> {
        self.current.load()
    }

    pub fn cache(&self) -> Option<&cache::Cache> {
        self.cache.get()
    }

    /// The upstreams in force, followed by the health checks and DNS lookups.
    pub fn upstreams_watch(&self) -> crate::upstream::follow::UpstreamsWatch {
        self.upstreams_watch.subscribe()
    }

    /// The broadcast routes in force, followed by the delivery service.
    pub fn broadcast_watch(&self) -> broadcast::RoutesWatch {
        self.broadcast_watch.subscribe()
    }

    /// Puts `next` in force: new requests get it, requests under way finish on theirs; the
    /// background services follow its upstreams and broadcast routes. The cache is made
    /// if `next` is the first generation to use it.
    pub fn install(&self, next: Generation) {
        crate::observe::otlp::install(next.config.tracing.as_ref(), &self.metrics);
        if next.caches() {
            let _ = self
                .cache
                .get_or_init(|| cache::Cache::new(next.config.cache_max_size));
        }
        let c = &next.config.clients;
        self.connections
            .set_limits(c.max_connections, c.max_connections_per_ip);
        self.clients.store(Arc::clone(&next.clients));
        self.upstreams_watch
            .send_replace(next.upstreams.clone().into());
        self.broadcast_watch
            .send_replace(Arc::new(next.broadcast_targets()));
        self.metrics.config_generation.set(next.number as i64);
        self.current.store(Arc::new(next));
    }
}

/// A generation built from a YAML text, for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_generation(yaml: &str) -> Generation {
    let config = crate::config::from_yaml(yaml, "test").expect("valid configuration");
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let connector = Arc::new(Connector::new(None));
    Generation::new(Arc::new(config), yaml.into(), 1, &metrics, &connector, None)
        .expect("generation")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Mark;

    fn build(yaml: &str, number: u64, previous: Option<&Generation>) -> Result<Generation, String> {
        let config = crate::config::from_yaml(yaml, "test").expect("valid configuration");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let connector = Arc::new(Connector::new(None));
        Generation::new(
            Arc::new(config),
            yaml.into(),
            number,
            &metrics,
            &connector,
            previous,
        )
    }

    fn generation(yaml: &str, number: u64, previous: Option<&Generation>) -> Generation {
        build(yaml, number, previous).expect("generation")
    }

    const BASE: &str = "listen: 127.0.0.1:1\n\
        upstreams:\n  u:\n    backends: [127.0.0.1:9001, 127.0.0.1:9002]\n  gone:\n    backends: [127.0.0.1:9009]\n\
        routes:\n  - { match: { prefix: /a }, upstream: u, rate_limit: { requests_per_second: 5, burst: 5 } }\n  \
          - { match: { prefix: /b }, upstream: u, rate_limit: { requests_per_second: 5, burst: 5 } }\n";

    #[test]
    fn a_new_generation_keeps_what_still_means_the_same() {
        let first = generation(BASE, 1, None);
        let u = &first.upstreams[0];
        let kept_backend = Arc::clone(&u.backends().backends[0]);
        kept_backend.set_mark(Mark::Draining);
        // /a's limit stays, /b's changes; 127.0.0.1:9002 leaves and 9003 arrives.
        let next_yaml = BASE.replace("9002", "9003").replace(
            "prefix: /b }, upstream: u, rate_limit: { requests_per_second: 5",
            "prefix: /b }, upstream: u, rate_limit: { requests_per_second: 7",
        );
        let second = generation(&next_yaml, 2, Some(&first));
        assert_eq!(second.number, 2);
        let u2 = &second.upstreams[0];
        let backends = u2.backends();
        let b0 = &backends.backends[0];
        assert_eq!(b0.addr, kept_backend.addr);
        assert_eq!(b0.mark(), Mark::Draining, "the mark stays with the backend");
        assert!(
            std::ptr::eq(b0.learned(), kept_backend.learned()),
            "what it learned is the same state"
        );
        assert_eq!(
            backends.backends[1].mark(),
            Mark::Active,
            "the new one starts afresh"
        );
        let limiter = |g: &Generation, i: usize| {
            Arc::clone(g.routes[i].rate_limiter.as_ref().expect("limit"))
        };
        assert!(
            Arc::ptr_eq(&limiter(&first, 0), &limiter(&second, 0)),
            "same limit: same buckets"
        );
        assert!(
            !Arc::ptr_eq(&limiter(&first, 1), &limiter(&second, 1)),
            "another limit: new buckets"
        );
        assert_ne!(first.hash, second.hash);
    }

    #[test]
    fn a_plugin_its_constructor_refuses_refuses_the_generation() {
        crate::filters::plugins::register("refuses-all", |_| Err("not today".into()));
        let yaml = "listen: 127.0.0.1:1\nupstreams:\n  u:\n    backends: [127.0.0.1:9001]\n\
            routes:\n  - { match: { prefix: / }, upstream: u, plugins: [{ name: refuses-all }] }\n";
        let Err(why) = build(yaml, 1, None) else {
            panic!("built a generation with a refused plugin");
        };
        assert!(why.contains("plugins[0]: not today"), "{why}");
    }

    struct Nothing;

    #[async_trait::async_trait]
    impl crate::filters::RequestFilter for Nothing {
        async fn request(
            &self,
            _session: &mut pingora_proxy::Session,
            _pass: &mut crate::http::passage::Passage,
        ) -> Result<(), crate::http::answer::Stop> {
            Ok(())
        }
    }

    #[test]
    fn a_reload_builds_a_routes_plugins_again_from_their_config() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        static MADE: AtomicUsize = AtomicUsize::new(0);
        crate::filters::plugins::register("counted-by-gateway-tests", |_| {
            MADE.fetch_add(1, SeqCst);
            Ok(Box::new(Nothing))
        });
        let yaml = "listen: 127.0.0.1:1\nupstreams:\n  u:\n    backends: [127.0.0.1:9001]\n\
            routes:\n  - { match: { prefix: / }, upstream: u, plugins: [{ name: counted-by-gateway-tests }] }\n";
        let first = generation(yaml, 1, None);
        assert_eq!(MADE.load(SeqCst), 1);
        let second = generation(yaml, 2, Some(&first));
        assert_eq!(MADE.load(SeqCst), 2, "a new filter, its state afresh");
        assert!(!second.routes[0].filters.is_empty());
    }
}
