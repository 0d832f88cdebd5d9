//! The dashboard (`GET /` on the admin listener): one page whose HTML, script, style and
//! icon are compiled into the binary (the admin port is often on a network without the
//! internet), and the two JSON documents it polls. The page itself holds no data and is
//! served to anyone; everything it shows comes from `/dashboard/data` and
//! `/dashboard/diff`, which need the admin token like every other admin endpoint. The page
//! sends the token in the `Authorization` header from the browser tab's `sessionStorage`,
//! never in a URL; it polls rather than using server-sent events because `EventSource`
//! cannot send that header. A strict `Content-Security-Policy` keeps a hostile upstream
//! answer, shown in a mirror diff, from running as script.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::history::Samples;
use super::AdminApp;
use crate::gateway::Generation;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Nothing but the page's own files and its own JSON.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self'; connect-src 'self'; form-action 'none'; \
                      frame-ancestors 'none'; base-uri 'none'";

/// The page's files: path → (content type, body). The page says whether the data needs a
/// token (`token_required`), so that it asks for one before its first request rather than
/// after a refusal.
pub fn asset(path: &str, token_required: bool) -> Option<(&'static str, Vec<u8>)> {
    let (content_type, body) = match path {
        "/" | "/index.html" => {
            let auth = if token_required { "token" } else { "none" };
            let page = INDEX.replacen("{{auth}}", auth, 1);
            return Some(("text/html; charset=utf-8", page.into_bytes()));
        }
        "/dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/dashboard.css" => ("text/css; charset=utf-8", STYLE),
        "/icon.svg" => ("image/svg+xml", ICON),
        _ => return None,
    };
    Some((content_type, body.as_bytes().to_vec()))
}

/// Adds the headers every dashboard answer carries: no caching of data, no framing, no
/// sniffing, no referrer, and the content policy.
pub fn harden(resp: &mut Response<Vec<u8>>) {
    let h = resp.headers_mut();
    for (name, value) in [
        ("content-security-policy", POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
}

impl AdminApp {
    /// `GET /dashboard/data[?since=MS]`: `/status` plus what the charts need — each
    /// route's series, each compared mirror's counts and kept pairs (summaries), the
    /// cache's hit ratio, the version. With `since` (the newest point the page has, in Unix
    /// milliseconds), only newer points are sent: the page keeps the rest.
    pub(super) fn dashboard_data(&self, history: &Samples, query: Option<&str>) -> Value {
        let since = query
            .unwrap_or("")
            .split('&')
            .find_map(|p| p.strip_prefix("since="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let gen = self.gw.current();
        let (_, mut v) = self.status();
        if let Some(routes) = v["routes"].as_array_mut() {
            for r in routes {
                if let Some(label) = r["route"].as_str() {
                    r["series"] = history.route_json(label, since);
                }
            }
        }
        v["mirrors"] = json!(mirrors(&gen, history, since));
        if let Some(cache) = v.get_mut("cache").filter(|c| c.is_object()) {
            let (hits, lookups) = history.cache_lookups();
            cache["hits"] = json!(hits);
            cache["lookups"] = json!(lookups);
            cache["hit_ratio"] = json!((lookups > 0).then(|| hits as f64 / lookups as f64));
        }
        v["version"] = json!(env!("CARGO_PKG_VERSION"));
        v["refresh_ms"] = json!(super::history::EVERY.as_millis() as u64);
        v
    }

    /// `GET /dashboard/diff?route=R&upstream=U&request_id=ID`: one kept pair in full.
    pub(super) fn dashboard_diff(&self, query: Option<&str>) -> (StatusCode, Value) {
        let (mut route, mut upstream, mut id) = (None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = super::query_value(v);
            match k {
                "route" => route = Some(v),
                "upstream" => upstream = Some(v),
                "request_id" => id = Some(v),
                _ => {}
            }
        }
        let (Some(route), Some(upstream), Some(id)) = (route, upstream, id) else {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": "route, upstream and request_id are required" }),
            );
        };
        let gen = self.gw.peek();
        let found = gen
            .routes
            .iter()
            .filter(|r| r.config.label == route)
            .flat_map(|r| r.mirrors().iter())
            .filter(|m| m.upstream_name() == upstream)
            .find_map(|m| {
                let c = m.compare.as_ref()?;
                c.kept.detail(&id, &c.config, &m.config.redact_headers)
            });
        match found {
            Some(v) => (StatusCode::OK, v),
            None => (
                StatusCode::NOT_FOUND,
                json!({ "error": "no such kept pair (it may have been pushed out by newer ones)" }),
            ),
        }
    }
}

/// Every compared mirror: its route and upstream, comparison series and totals, and the
/// kept pairs as summaries (newest first).
fn mirrors(gen: &Generation, history: &Samples, since: u64) -> Vec<Value> {
    gen.routes
        .iter()
        .flat_map(|r| r.mirrors().iter().map(move |m| (r, m)))
        .filter_map(|(r, m)| {
            let c = m.compare.as_ref()?;
            let route = &r.config.label;
            let mut v = history.mirror_json(route, m.upstream_name(), since);
            v["route"] = json!(route);
            v["upstream"] = json!(m.upstream_name());
            v["keep"] = json!(c.config.keep);
            v["diffs"] = json!(c.kept.summaries());
            Some(v)
        })
        .collect()
}
