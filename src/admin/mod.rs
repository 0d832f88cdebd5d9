//! The admin listener (`admin:` in the configuration), separate from the proxy listeners:
//! `/health` (the process is up), `/ready` (every upstream has a backend to send to),
//! `/metrics` (Prometheus text), `/status` (upstreams, backends, routes, the configuration's
//! generation and last reload, totals as JSON), `GET /config` (the configuration in force,
//! secrets redacted), `POST /reload` (apply the file again, as SIGHUP does),
//! `GET /mirror/diffs`, `DELETE /cache`, and the dashboard at `/` ([`dashboard`], fed by
//! the samples of [`history`]).
//! With `admin.token_file`, every endpoint but `/health`, `/ready` (which load balancers
//! and systemd probe) and the dashboard's static files needs `Authorization: Bearer
//! <token>`, compared in constant time; other requests get 401 and are counted in
//! `fanout_admin_unauthorized_total`.

pub mod dashboard;
pub mod history;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::config::RouteKind;
use crate::gateway::Gateway;
use crate::reload::Reloader;
use crate::upstream::{ErrorKind, Mark};
use subtle::ConstantTimeEq;

pub struct AdminApp {
    gw: Arc<Gateway>,
    /// `POST /reload`, and how reloads went (`/status`).
    reloader: Arc<Reloader>,
    /// The samples the dashboard's charts draw.
    history: Arc<history::Samples>,
}

/// Compares two byte strings in constant time (`subtle`; a length difference shows, the
/// content does not).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.ct_eq(expected).into()
}

impl AdminApp {
    pub fn new(reloader: Arc<Reloader>, history: Arc<history::Samples>) -> Self {
        AdminApp {
            gw: Arc::clone(&reloader.gw),
            reloader,
            history,
        }
    }

    /// `GET /config`: the configuration in force, its secrets redacted.
    fn config_json(&self) -> Value {
        let g = self.gw.peek();
        json!({
            "generation": g.number,
            "hash": g.hash,
            "since": crate::observe::access_log::timestamp(g.since),
            "config": crate::config::redact::redacted(&g.text),
        })
    }

    /// Whether the configuration in force asks for an admin token.
    fn token_required(&self) -> bool {
        let gen = self.gw.peek();
        gen.config.admin.as_ref().is_some_and(|a| a.token.is_some())
    }

    /// Whether the request carries the admin token (always, when none is configured). The
    /// token is the configuration's in force: a reload may change it.
    fn authorized(&self, req: &pingora_http::RequestHeader) -> bool {
        let gen = self.gw.peek();
        let Some(token) = gen.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
            return true;
        };
        req.headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|given| same_secret(given.trim_ascii(), token.as_bytes()))
    }

    fn health(&self) -> (StatusCode, Value) {
        let secs = self.gw.started.elapsed().as_secs();
        (
            StatusCode::OK,
            json!({ "status": "UP", "uptime": human_uptime(secs), "uptime_seconds": secs }),
        )
    }

    fn ready(&self) -> (StatusCode, Value) {
        let gen = self.gw.peek();
        let missing: Vec<&str> = gen
            .upstreams
            .iter()
            .filter(|u| !u.has_available())
            .map(|u| u.name())
            .collect();
        if missing.is_empty() {
            (StatusCode::OK, json!({ "status": "READY" }))
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "NOT_READY", "upstreams_without_healthy_backend": missing }),
            )
        }
    }

    /// `POST /upstreams/NAME/backends/ADDRESS/ACTION`: ADDRESS is the backend's `IP:PORT`
    /// or its `name:`. The mark lives with what the backend learned, so a reload keeps it
    /// for a backend that stays.
    fn mark_backend(
        &self,
        upstream: &str,
        backend: &str,
        action: Option<Mark>,
    ) -> (StatusCode, Value) {
        let Some(mark) = action else {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": "the action is one of drain, disable, enable" }),
            );
        };
        let gen = self.gw.peek();
        let Some(up) = gen.upstreams.iter().find(|u| u.name() == upstream) else {
            return (
                StatusCode::NOT_FOUND,
                json!({ "error": format!("no upstream {upstream:?}") }),
            );
        };
        let set = up.backends();
        let found: Vec<_> = set
            .backends
            .iter()
            .filter(|b| &*b.label == backend || b.name.as_deref() == Some(backend))
            .collect();
        if found.is_empty() {
            return (
                StatusCode::NOT_FOUND,
                json!({ "error": format!("upstream {upstream} has no backend {backend:?}") }),
            );
        }
        for b in &found {
            b.set_mark(mark);
            log::warn!(
                "upstream {upstream}: backend {} {} by the admin API",
                b.shown(),
                mark.name()
            );
        }
        up.refresh();
        let marked: Vec<&str> = found.iter().map(|b| &*b.label).collect();
        (
            StatusCode::OK,
            json!({ "upstream": upstream, "backends": marked, "state": mark.name() }),
        )
    }

    fn status(&self) -> (StatusCode, Value) {
        let gw = &self.gw;
        let gen = gw.current();
        let now = std::time::Instant::now();
        let upstreams: Vec<Value> = gen
            .upstreams
            .iter()
            .map(|u| {
                let backends: Vec<Value> = u
                    .backends()
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "address": b.label,
                            "name": b.name,
                            "state": b.mark().name(),
                            "requests": {
                                "ok": b.outcomes.ok.get(),
                                "error": b.outcomes.error.get(),
                                "timeout": b.outcomes.timeout.get(),
                            },
                            "responses": backend_classes(b.learned().classes()),
                            "errors": backend_errors(b.learned().errors()),
                            "health_since": b.learned().health_since().map(crate::observe::access_log::timestamp),
                            "last_check": b.learned().last_check().map(|c| json!({
                                "ok": c.failure.is_none(),
                                "reason": c.failure,
                                "latency_ms": c.latency.as_secs_f64() * 1000.0,
                                "at": crate::observe::access_log::timestamp(c.at),
                            })),
                            "source": b.source,
                            "weight": b.weight,
                            "healthy": b.healthy(),
                            "circuit": b.circuit(now).name(),
                            "inflight": b.inflight(),
                        })
                    })
                    .collect();
                let mut v = json!({
                    "name": u.name(),
                    "balance": u.config.balance.as_str(),
                    "backends": backends,
                });
                if let Some(limiter) = &u.concurrency {
                    let c = limiter.snapshot();
                    v["concurrency"] = json!({
                        "limit": c.limit,
                        "inflight": c.inflight,
                        "waiting": c.waiting,
                        "min_rtt_ms": c.min_rtt.map(|d| d.as_secs_f64() * 1000.0),
                        "measuring": c.measuring,
                    });
                }
                v
            })
            .collect();
        let name = |id: &usize| gen.upstreams[*id].name().to_string();
        let routes: Vec<Value> = gen
            .routes
            .iter()
            .map(|r| {
                let c = &r.config;
                let mut v = json!({
                    "route": c.label,
                    "kind": r.kind_name(),
                    "host": c.host,
                    "match": match &c.path {
                        crate::config::PathMatch::Exact(p) => json!({ "path": p }),
                        crate::config::PathMatch::Prefix(p) => json!({ "prefix": p }),
                    },
                    "methods": c.methods.as_ref().map(|ms| ms.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
                });
                match &c.kind {
                    RouteKind::Proxy { upstream, fallback, split, .. } => {
                        v["upstream"] = json!(name(upstream));
                        if let Some(split) = split {
                            v["split"] = json!(split
                                .to
                                .iter()
                                .map(|(u, share)| json!({
                                    "upstream": name(u),
                                    "percent": f64::from(*share) / 100.0,
                                }))
                                .collect::<Vec<_>>());
                        }
                        if !fallback.is_empty() {
                            v["fallback"] = json!(fallback.iter().map(name).collect::<Vec<_>>());
                        }
                    }
                    RouteKind::Broadcast { targets, .. } => {
                        v["broadcast"] = json!(targets
                            .iter()
                            .map(|t| match &t.path {
                                Some(p) => json!({ "upstream": name(&t.upstream), "path": p }),
                                None => json!(name(&t.upstream)),
                            })
                            .collect::<Vec<_>>());
                        if let crate::gateway::RouteRuntime::Broadcast(t) = &r.kind {
                            v["targets"] = json!(t.list.iter().map(|t| t.status()).collect::<Vec<_>>());
                        }
                    }
                    RouteKind::Redirect(r) => {
                        v["redirect"] = json!({ "to": r.to, "status": r.status });
                    }
                }
                let auth = c.auth.as_ref().map(|a| match a {
                    crate::config::AuthConfig::Basic(_) => "basic",
                    crate::config::AuthConfig::ApiKey(_) => "api_key",
                    crate::config::AuthConfig::Jwt(_) => "jwt",
                    crate::config::AuthConfig::Forward(_) => "forward",
                });
                if let Some(auth) = auth {
                    v["auth"] = json!(auth);
                }
                v
            })
            .collect();
        let t = &gw.metrics.totals;
        (
            StatusCode::OK,
            json!({
                "uptime_seconds": gw.started.elapsed().as_secs(),
                "upstreams": upstreams,
                "routes": routes,
                "config": self.config_status(&gen),
                "cache": self.gw.cache().map(|c| json!({
                    "entries": c.store.entries(),
                    "bytes": c.size(),
                    "max_size": c.max_size,
                })),
                "totals": {
                    "requests": t.requests.load(Relaxed),
                    "responses": t.responses.load(Relaxed),
                    "errors": t.errors.load(Relaxed),
                },
            }),
        )
    }

    /// The configuration in force and the last reload, for `/status`.
    fn config_status(&self, gen: &crate::gateway::Generation) -> Value {
        let last = self.reloader.history.last().map(|l| {
            let mut v = l.outcome.to_json();
            v["at"] = json!(crate::observe::access_log::timestamp(l.at));
            v
        });
        json!({
            "generation": gen.number,
            "hash": gen.hash,
            "since": crate::observe::access_log::timestamp(gen.since),
            "file": self.reloader.history.file().map(|f| f.display().to_string()),
            "last_reload": last,
        })
    }

    /// `POST /reload`: the file read again and applied, as on SIGHUP. 200 when it is in
    /// force, 422 when it has errors, 409 when it needs a graceful upgrade (`fanout
    /// reload` performs it); in the last two the running configuration stays.
    async fn reload(&self) -> (StatusCode, Value) {
        let outcome = self.reloader.reload(None).await;
        let status = match outcome {
            crate::reload::ReloadOutcome::Applied { .. } => StatusCode::OK,
            crate::reload::ReloadOutcome::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            crate::reload::ReloadOutcome::NeedsUpgrade(_) => StatusCode::CONFLICT,
        };
        (status, outcome.to_json())
    }

    /// `GET /mirror/diffs`: the kept differing pairs of every mirror with `compare`, newest
    /// first; values of the mirror's `redact_headers` never shown.
    fn diffs(&self) -> Value {
        let gen = self.gw.peek();
        let mut all: Vec<(std::time::SystemTime, Value)> = gen
            .routes
            .iter()
            .flat_map(|r| r.mirrors().iter())
            .filter_map(|m| {
                let c = m.compare.as_ref()?;
                Some(c.kept.render(&c.config, &m.config.redact_headers))
            })
            .flatten()
            .collect();
        all.sort_by_key(|d| std::cmp::Reverse(d.0));
        Value::Array(all.into_iter().map(|(_, v)| v).collect())
    }

    /// `DELETE /cache`, or `DELETE /cache?host=H&path=P`: purges every entry, or those of
    /// one host and path (all their variants and queries).
    fn purge(&self, query: Option<&str>) -> (StatusCode, Value) {
        let Some(cache) = self.gw.cache() else {
            return (
                StatusCode::NOT_FOUND,
                json!({ "error": "no route uses the cache" }),
            );
        };
        let (mut host, mut path) = (None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = query_value(v);
            match k {
                "host" => host = Some(v),
                "path" => path = Some(v),
                _ => {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({ "error": format!("unknown parameter {k:?}: host and path only") }),
                    )
                }
            }
        }
        let purged = cache.purge(host.as_deref(), path.as_deref());
        (StatusCode::OK, json!({ "purged": purged }))
    }

    /// Copies live backend state into the gauges, then renders every family.
    fn metrics(&self) -> Vec<u8> {
        let m = &self.gw.metrics;
        if let Some(cache) = self.gw.cache() {
            m.cache_size.set(cache.size() as i64);
            let seen = m.cache_evictions.get();
            m.cache_evictions
                .inc_by(cache.evictions().saturating_sub(seen));
        }
        let now = std::time::Instant::now();
        for u in &self.gw.peek().upstreams {
            for b in &u.backends().backends {
                let labels = [u.name(), &*b.label];
                m.backend_healthy
                    .with_label_values(&labels)
                    .set(b.healthy() as i64);
                m.backend_inflight
                    .with_label_values(&labels)
                    .set(b.inflight() as i64);
                let open = b.circuit(now) != crate::upstream::breaker::Circuit::Closed;
                m.circuit_open.with_label_values(&labels).set(open as i64);
            }
        }
        m.render()
    }
}

/// A query parameter's value with its `%XX` escapes (and `+` for a space) decoded.
fn query_value(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `125` → `2m5s`.
pub fn human_uptime(secs: u64) -> String {
    crate::config::units::show_duration(std::time::Duration::from_secs(secs))
}

fn answer(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = resp.body().len().to_string().parse() {
        resp.headers_mut().insert(http::header::CONTENT_LENGTH, v);
    }
    resp
}

/// Answers by status class, as `/status` and the dashboard show them.
fn backend_classes(c: [u64; 4]) -> Value {
    json!({ "2xx": c[0], "3xx": c[1], "4xx": c[2], "5xx": c[3] })
}

/// Whether a browser sent this request from a page of another site (`Sec-Fetch-Site`, else
/// `Origin` against `Host`): without a token, a hostile page could otherwise drain
/// backends or reload the gateway through the browser of an operator on the admin network.
fn cross_site(req: &pingora_http::RequestHeader) -> bool {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = header("origin") else {
        return false; // not a browser's cross-origin request (curl, scripts)
    };
    let origin = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match (origin, header("host")) {
        (Some(origin), Some(host)) => !origin.eq_ignore_ascii_case(host),
        _ => true,
    }
}

/// A backend's attempts without an answer, by kind.
fn backend_errors(counts: [u64; 4]) -> Value {
    let mut v = json!({});
    for (kind, n) in ErrorKind::ALL.iter().zip(counts) {
        v[kind.name()] = json!(n);
    }
    v
}

/// `/upstreams/NAME/backends/ADDRESS/ACTION`: the upstream, the backend and the mark the
/// action asks for (`None`: an unknown action).
fn backend_action(path: &str) -> Option<(&str, &str, Option<Mark>)> {
    let rest = path.strip_prefix("/upstreams/")?;
    let (upstream, rest) = rest.split_once("/backends/")?;
    let (backend, action) = rest.rsplit_once('/')?;
    let mark = match action {
        "drain" => Some(Mark::Draining),
        "disable" => Some(Mark::Disabled),
        "enable" => Some(Mark::Active),
        _ => None,
    };
    Some((upstream, backend, mark))
}

fn json_answer((status, body): (StatusCode, Value)) -> Response<Vec<u8>> {
    answer(status, "application/json", body.to_string().into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let purge = req.method == Method::DELETE && req.uri.path() == "/cache";
        let reload = req.method == Method::POST && req.uri.path() == "/reload";
        let mark = match req.method == Method::POST {
            true => backend_action(req.uri.path()),
            false => None,
        };
        let post = reload || mark.is_some();
        if req.method != Method::GET && req.method != Method::HEAD && !purge && !post {
            return json_answer((
                StatusCode::METHOD_NOT_ALLOWED,
                json!({ "error": "method not allowed" }),
            ));
        }
        if (purge || post) && cross_site(req) {
            return json_answer((
                StatusCode::FORBIDDEN,
                json!({ "error": "a request from another site cannot change the gateway" }),
            ));
        }
        let path = req.uri.path();
        if !purge && !post {
            if let Some((content_type, body)) = dashboard::asset(path, self.token_required()) {
                let mut resp = answer(StatusCode::OK, content_type, body);
                dashboard::harden(&mut resp);
                return resp;
            }
        }
        if !matches!(path, "/health" | "/ready") && !self.authorized(req) {
            self.gw.metrics.admin_unauthorized.inc();
            let mut resp = json_answer((
                StatusCode::UNAUTHORIZED,
                json!({ "error": "admin token required" }),
            ));
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
        if purge {
            return json_answer(self.purge(req.uri.query()));
        }
        if reload {
            return json_answer(self.reload().await);
        }
        if let Some((upstream, backend, action)) = mark {
            return json_answer(self.mark_backend(upstream, backend, action));
        }
        match path {
            "/health" => json_answer(self.health()),
            "/ready" => json_answer(self.ready()),
            "/status" => json_answer(self.status()),
            "/mirror/diffs" => json_answer((StatusCode::OK, self.diffs())),
            "/config" => json_answer((StatusCode::OK, self.config_json())),
            "/metrics" => answer(StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            "/dashboard/data" => {
                let mut resp = json_answer((
                    StatusCode::OK,
                    self.dashboard_data(&self.history, req.uri.query()),
                ));
                dashboard::harden(&mut resp);
                resp
            }
            "/dashboard/diff" => {
                let mut resp = json_answer(self.dashboard_diff(req.uri.query()));
                dashboard::harden(&mut resp);
                resp
            }
            _ => json_answer((
                StatusCode::NOT_FOUND,
                json!({ "error": "not found", "endpoints": ["/ (dashboard)", "/health", "/ready", "/metrics", "/status", "/mirror/diffs", "/config", "POST /reload", "DELETE /cache", "POST /upstreams/NAME/backends/ADDRESS/drain|disable|enable"] }),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime_reads_naturally() {
        assert_eq!(super::human_uptime(125), "2m5s");
        assert_eq!(super::human_uptime(5), "5s");
        assert_eq!(super::human_uptime(3600), "1h0m0s");
        assert_eq!(super::human_uptime(90061), "1d1h1m1s");
    }

    #[test]
    fn secrets_match_only_whole() {
        use super::same_secret;
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretX", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
    }
}
