//! The dashboard's memory: a bounded ring of recent samples per route and per mirror,
//! taken once a second by a background service from the Prometheus families the request
//! path already feeds (so a request pays nothing for it). Each sample turns the counters'
//! growth since the last one into rates — requests/s, 5xx/s, p50 and p99 latency (estimated
//! from the histogram buckets, as Prometheus' `histogram_quantile` does), mirror matches
//! and differences/s. Series of routes and mirrors that a reload removed are dropped.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use serde_json::{json, Value};

use crate::gateway::Gateway;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(1);
/// Samples kept per series: five minutes.
pub const KEEP: usize = 300;

/// One route's rates over one sample interval; latencies are `None` without requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutePoint {
    pub at_ms: u64,
    pub rps: f64,
    pub errors_per_s: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// One mirror's comparisons over one sample interval, per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MirrorPoint {
    pub at_ms: u64,
    pub matched: f64,
    pub differed: f64,
    pub incomplete: f64,
}

/// Cumulative counts of one route at one sample.
#[derive(Debug, Clone, Default, PartialEq)]
struct RouteCounts {
    requests: u64,
    errors: u64,
    /// Cumulative histogram buckets: (upper bound, count), in order, `+Inf` excluded.
    buckets: Vec<(f64, u64)>,
    observed: u64,
}

/// Cumulative comparisons of one mirror: matched, differed, incomplete.
type MirrorCounts = [u64; 3];

/// A mirror is named by its route and its upstream.
type MirrorKey = (String, String);

#[derive(Default)]
struct State {
    at: Option<SystemTime>,
    routes_seen: HashMap<String, RouteCounts>,
    mirrors_seen: HashMap<MirrorKey, MirrorCounts>,
    routes: HashMap<String, VecDeque<RoutePoint>>,
    mirrors: HashMap<MirrorKey, VecDeque<MirrorPoint>>,
    /// Cache lookups so far: (served from the cache, all but bypass).
    cache: (u64, u64),
}

/// The rings, shared by the sampler and the admin listener.
#[derive(Default)]
pub struct Samples {
    state: Mutex<State>,
}

fn push<T>(ring: &mut VecDeque<T>, point: T) {
    if ring.len() == KEEP {
        ring.pop_front();
    }
    ring.push_back(point);
}

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

fn families(c: &dyn Collector) -> Vec<MetricFamily> {
    c.collect()
}

/// The `q` quantile of the observations between two cumulative bucket lists (the same
/// bounds), interpolated linearly inside the bucket it falls in; beyond the last finite
/// bound, that bound.
fn quantile(q: f64, now: &[(f64, u64)], then: &[(f64, u64)], observed: u64) -> Option<f64> {
    if observed == 0 {
        return None;
    }
    let rank = q * observed as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (i, &(bound, count)) in now.iter().enumerate() {
        let count = count.saturating_sub(then.get(i).map_or(0, |b| b.1));
        if count as f64 >= rank {
            let share = if count > below {
                (rank - below as f64) / (count - below) as f64
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * share);
        }
        (lower, below) = (bound, count);
    }
    now.last().map(|b| b.0)
}

impl Samples {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one sample of `gw`'s counters at `now`.
    pub fn sample(&self, gw: &Gateway, now: SystemTime) {
        let gen = gw.peek();
        let m = &gw.metrics;
        let mut routes: HashMap<String, RouteCounts> = gen
            .routes
            .iter()
            .map(|r| (r.config.label.clone(), RouteCounts::default()))
            .collect();
        for f in families(&m.requests) {
            for metric in f.get_metric() {
                if let Some(c) = routes.get_mut(label(metric, "route")) {
                    let n = metric.get_counter().value() as u64;
                    c.requests += n;
                    if label(metric, "status").starts_with('5') {
                        c.errors += n;
                    }
                }
            }
        }
        for f in families(&m.request_duration) {
            for metric in f.get_metric() {
                if let Some(c) = routes.get_mut(label(metric, "route")) {
                    let h = metric.get_histogram();
                    c.observed = h.get_sample_count();
                    c.buckets = h
                        .get_bucket()
                        .iter()
                        .filter(|b| b.upper_bound().is_finite())
                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                        .collect();
                }
            }
        }
        let mut mirrors: HashMap<MirrorKey, MirrorCounts> = gen
            .routes
            .iter()
            .flat_map(|r| {
                r.mirrors().iter().filter(|m| m.compare.is_some()).map(|m| {
                    (
                        (r.config.label.clone(), m.upstream_name().to_string()),
                        [0; 3],
                    )
                })
            })
            .collect();
        for f in families(&m.mirror_compare) {
            for metric in f.get_metric() {
                let key = (
                    label(metric, "route").to_string(),
                    label(metric, "upstream").to_string(),
                );
                if let Some(c) = mirrors.get_mut(&key) {
                    let n = metric.get_counter().value() as u64;
                    match label(metric, "result") {
                        "match" => c[0] += n,
                        "incomplete" => c[2] += n,
                        _ => c[1] += n,
                    }
                }
            }
        }
        let mut cache = (0, 0);
        for f in families(&m.cache_requests) {
            for metric in f.get_metric() {
                let n = metric.get_counter().value() as u64;
                match label(metric, "result") {
                    "hit" | "stale" | "revalidated" => {
                        cache.0 += n;
                        cache.1 += n;
                    }
                    "bypass" => {}
                    _ => cache.1 += n,
                }
            }
        }
        self.record(now, routes, mirrors, cache);
    }

    /// Turns cumulative counts into one point per series (the first sample only sets the
    /// base) and forgets series that no longer exist.
    fn record(
        &self,
        now: SystemTime,
        routes: HashMap<String, RouteCounts>,
        mirrors: HashMap<MirrorKey, MirrorCounts>,
        cache: (u64, u64),
    ) {
        let mut st = self.state.lock();
        let at_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let dt = st
            .at
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| d.as_secs_f64())
            .filter(|d| *d > 0.0);
        if let Some(dt) = dt {
            for (name, c) in &routes {
                let Some(before) = st.routes_seen.get(name) else {
                    continue;
                };
                let observed = c.observed.saturating_sub(before.observed);
                let point = RoutePoint {
                    at_ms,
                    rps: c.requests.saturating_sub(before.requests) as f64 / dt,
                    errors_per_s: c.errors.saturating_sub(before.errors) as f64 / dt,
                    p50: quantile(0.5, &c.buckets, &before.buckets, observed),
                    p99: quantile(0.99, &c.buckets, &before.buckets, observed),
                };
                push(st.routes.entry(name.clone()).or_default(), point);
            }
            for (key, c) in &mirrors {
                let Some(before) = st.mirrors_seen.get(key) else {
                    continue;
                };
                let rate = |i: usize| c[i].saturating_sub(before[i]) as f64 / dt;
                let point = MirrorPoint {
                    at_ms,
                    matched: rate(0),
                    differed: rate(1),
                    incomplete: rate(2),
                };
                push(st.mirrors.entry(key.clone()).or_default(), point);
            }
        }
        st.routes.retain(|k, _| routes.contains_key(k));
        st.mirrors.retain(|k, _| mirrors.contains_key(k));
        st.routes_seen = routes;
        st.mirrors_seen = mirrors;
        st.cache = cache;
        st.at = Some(now);
    }

    /// A route's points taken after `since` (Unix milliseconds; 0: all) as parallel
    /// arrays, `t` their times, for the dashboard.
    pub fn route_json(&self, route: &str, since: u64) -> Value {
        let st = self.state.lock();
        let ring = st.routes.get(route);
        let col = |f: &dyn Fn(&RoutePoint) -> Value| -> Vec<Value> {
            ring.map_or_else(Vec::new, |r| {
                r.iter().filter(|p| p.at_ms > since).map(f).collect()
            })
        };
        json!({
            "t": col(&|p| json!(p.at_ms)),
            "rps": col(&|p| json!(round(p.rps))),
            "errors": col(&|p| json!(round(p.errors_per_s))),
            "p50_ms": col(&|p| json!(p.p50.map(|s| round(s * 1000.0)))),
            "p99_ms": col(&|p| json!(p.p99.map(|s| round(s * 1000.0)))),
        })
    }

    /// A mirror's comparisons after `since` as parallel arrays, and its totals so far.
    pub fn mirror_json(&self, route: &str, upstream: &str, since: u64) -> Value {
        let st = self.state.lock();
        let key = (route.to_string(), upstream.to_string());
        let ring = st.mirrors.get(&key);
        let col = |f: &dyn Fn(&MirrorPoint) -> Value| -> Vec<Value> {
            ring.map_or_else(Vec::new, |r| {
                r.iter().filter(|p| p.at_ms > since).map(f).collect()
            })
        };
        let totals = st.mirrors_seen.get(&key).copied().unwrap_or_default();
        json!({
            "totals": { "match": totals[0], "differ": totals[1], "incomplete": totals[2] },
            "t": col(&|p| json!(p.at_ms)),
            "match": col(&|p| json!(round(p.matched))),
            "differ": col(&|p| json!(round(p.differed))),
            "incomplete": col(&|p| json!(round(p.incomplete))),
        })
    }

    /// Cache lookups since the start: served from the cache, and all (bypasses excluded).
    pub fn cache_lookups(&self) -> (u64, u64) {
        self.state.lock().cache
    }
}

/// Three decimals are plenty on a chart and keep the JSON short.
fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The background service that samples once a second while the process runs.
pub struct Sampler {
    gw: Arc<Gateway>,
    history: Arc<Samples>,
}

impl Sampler {
    pub fn new(gw: Arc<Gateway>, history: Arc<Samples>) -> Self {
        Sampler { gw, history }
    }
}

#[async_trait]
impl BackgroundService for Sampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.history.sample(&self.gw, SystemTime::now()),
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, buckets: &[(f64, u64)]) -> RouteCounts {
        RouteCounts {
            requests,
            errors,
            buckets: buckets.to_vec(),
            observed: buckets.last().map_or(0, |b| b.1),
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations between samples: 50 under 10 ms, 50 between 10 and 20 ms.
        let then = [(0.01, 10), (0.02, 10)];
        let now = [(0.01, 60), (0.02, 110)];
        assert_eq!(quantile(0.5, &now, &then, 100), Some(0.01));
        let p99 = quantile(0.99, &now, &then, 100).unwrap_or_default();
        assert!((p99 - 0.0198).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &now, &now, 0), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(quantile(0.99, &[(0.01, 5)], &[(0.01, 5)], 3), Some(0.01));
    }

    #[test]
    fn samples_become_rates_and_removed_series_go() {
        let h = Samples::new();
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        let routes =
            |n: u64, e: u64| HashMap::from([("prefix:/".to_string(), counts(n, e, &[(0.01, n)]))]);
        h.record(t0, routes(10, 0), HashMap::new(), (0, 0));
        assert_eq!(
            h.route_json("prefix:/", 0)["rps"],
            json!([]),
            "the first sample is the base"
        );
        h.record(
            t0 + Duration::from_secs(2),
            routes(30, 4),
            HashMap::new(),
            (0, 0),
        );
        let v = h.route_json("prefix:/", 0);
        assert_eq!(v["rps"], json!([10.0]));
        assert_eq!(v["errors"], json!([2.0]));
        assert_eq!(v["t"], json!([1_002_000]));
        assert_eq!(v["p50_ms"], json!([5.0]));
        h.record(
            t0 + Duration::from_secs(3),
            HashMap::new(),
            HashMap::new(),
            (0, 0),
        );
        assert_eq!(h.route_json("prefix:/", 0)["rps"], json!([]));
    }

    #[test]
    fn rings_are_bounded() {
        let h = Samples::new();
        let key = ("r".to_string(), "shadow".to_string());
        for i in 0..(KEEP as u64 + 50) {
            let mirrors = HashMap::from([(key.clone(), [i, 2 * i, 0])]);
            h.record(
                UNIX_EPOCH + Duration::from_secs(i + 1),
                HashMap::new(),
                mirrors,
                (0, 0),
            );
        }
        let v = h.mirror_json("r", "shadow", 0);
        assert_eq!(v["t"].as_array().map(Vec::len), Some(KEEP));
        assert_eq!(v["differ"][0], json!(2.0));
        assert_eq!(v["totals"]["differ"], json!(2 * (KEEP as u64 + 49)));
        // Only what came after `since`.
        let since = (KEEP as u64 + 49) * 1000;
        assert_eq!(
            h.mirror_json("r", "shadow", since)["t"],
            json!([since + 1000])
        );
    }
}
