//! `fanout --demo`: demonstration backends served in-process by Pingora, a gateway on a
//! built-in configuration in front of them, and the curl commands that show each feature.
//! The demo backends answer with JSON naming themselves and echoing what they received.

use std::net::TcpListener;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::{HttpServer, ServeHttp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceWithDependents;
use serde_json::json;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const ADMIN: &str = "127.0.0.1:9091";
const BACKENDS: [&str; 4] = ["api-1", "api-2", "api-3", "shadow"];

struct DemoBackend {
    name: &'static str,
}

#[async_trait]
impl ServeHttp for DemoBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let header = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let body = json!({
            "backend": self.name,
            "method": req.method.as_str(),
            "path": req.uri.path_and_query().map_or("/", |p| p.as_str()),
            "request_id": header("x-request-id"),
            "x_forwarded_for": header("x-forwarded-for"),
        });
        let mut resp = Response::new(format!("{body}\n").into_bytes());
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// A free loopback port, found by binding port 0.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(18081, |a| a.port())
}

struct Ports(Vec<u16>);

/// The demo backends' ports, chosen once: free loopback ports other than the gateway's and
/// the admin listener's own (`taken`), which the kernel may hand out again since nothing
/// holds them yet when the demo starts.
fn ports(taken: &[u16]) -> &'static Ports {
    static PORTS: std::sync::OnceLock<Ports> = std::sync::OnceLock::new();
    PORTS.get_or_init(|| {
        // Held while choosing, so that no two are the same.
        let mut held: Vec<TcpListener> = Vec::new();
        for _ in 0..64 {
            if held.len() == BACKENDS.len() {
                break;
            }
            let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
                continue;
            };
            let port = l.local_addr().map_or(0, |a| a.port());
            if port != 0 && !taken.contains(&port) {
                held.push(l);
            }
        }
        let mut ports: Vec<u16> = held
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.port())
            .collect();
        while ports.len() < BACKENDS.len() {
            ports.push(free_port());
        }
        Ports(ports)
    })
}

/// The demo's configuration, with the gateway on `listen` (default 127.0.0.1:8080) and the
/// admin listener on `admin` (default 127.0.0.1:9091).
pub fn config_yaml(listen: Option<&str>, admin: Option<&str>) -> String {
    let listen = listen.unwrap_or(DEFAULT_LISTEN);
    let admin = admin.unwrap_or(ADMIN);
    let port_of = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    let p = &ports(
        &[port_of(listen), port_of(admin)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
    )
    .0;
    format!(
        r#"server: {{ threads: 2, grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 1 }}
listen: ["{listen}"]
admin: {admin}
spool: {{ dir: {spool} }}
# The instructions are printed on stdout, where the JSON access log would go.
defaults: {{ access_log: off }}
upstreams:
  api:
    balance: weighted
    backends:
      - {{ address: 127.0.0.1:{p0}, weight: 1, name: api-1 }}
      - {{ address: 127.0.0.1:{p1}, weight: 2, name: api-2 }}
      - {{ address: 127.0.0.1:{p2}, weight: 3, name: api-3 }}
    health_check: {{ type: http, path: /health, interval: 2s, timeout: 1s }}
  shadow:
    backends: [{{ address: "127.0.0.1:{p3}", name: shadow }}]
  sticky:
    balance: consistent_hash
    hash_key: header:X-User-Id
    backends: [127.0.0.1:{p0}, 127.0.0.1:{p1}, 127.0.0.1:{p2}]
routes:
  - name: api
    match: {{ prefix: /api }}
    upstream: api
  - name: sticky
    match: {{ prefix: /sticky }}
    upstream: sticky
  - name: mirrored
    match: {{ prefix: /mirrored }}
    upstream: api
    mirror:
      - upstream: shadow
        percent: 100
        headers: {{ set: {{ X-Shadow: "1" }} }}
        compare: {{ ignore_headers: [Date, Server, X-Request-Id] }}
  - name: events
    match: {{ prefix: /events, methods: [POST] }}
    broadcast: [api, shadow]
"#,
        listen = listen,
        admin = admin,
        spool = std::env::temp_dir().join("fanout-demo-spool").display(),
        p0 = p[0],
        p1 = p[1],
        p2 = p[2],
        p3 = p[3],
    )
}

/// The demo backends as Pingora services, on the ports [`config_yaml`] chose (it runs first).
pub fn backend_services() -> Vec<Box<dyn ServiceWithDependents>> {
    BACKENDS
        .iter()
        .zip(&ports(&[]).0)
        .map(|(name, port)| {
            let mut svc = Service::new(
                format!("demo backend {name}"),
                HttpServer::new_app(DemoBackend { name }),
            );
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
            svc.add_tcp(&addr.to_string());
            let address = crate::edge::bind::Address {
                addr,
                v6_only: false,
            };
            let svc = crate::edge::bind::BindFirst::new(svc, vec![address], "demo backend", false);
            Box::new(svc) as Box<dyn ServiceWithDependents>
        })
        .collect()
}

/// What the demo prints once it is up.
pub fn banner(listen: Option<&str>, admin: Option<&str>) -> String {
    let gw = listen.unwrap_or(DEFAULT_LISTEN);
    let admin = admin.unwrap_or(ADMIN);
    format!(
        r#"
fanout demo is running: gateway on http://{gw}, admin on http://{admin}
Demo backends api-1, api-2, api-3 (weights 1:2:3) and shadow answer with their name.
Dashboard: open http://{admin}/ in a browser.

Try:
  curl -s http://{gw}/api/hello                          # load-balanced (smooth weighted round-robin)
  for i in 1 2 3 4 5 6; do curl -s http://{gw}/api/$i; done   # watch the spread 1:2:3
  curl -s -H 'X-User-Id: alice' http://{gw}/sticky/cart  # consistent hashing: same user, same backend
  curl -s -d 'hello' http://{gw}/mirrored/orders         # answered by api-*, copied to shadow
  curl -s http://{admin}/metrics | grep ^fanout_mirror    # the copies: outcome="ok", compared
  curl -s http://{admin}/mirror/diffs                    # shadow answers with another name: kept pairs
  curl -s -d '{{"event":"signup"}}' http://{gw}/events  # broadcast: 202 at once, then delivered
  curl -s http://{admin}/metrics | grep ^fanout_broadcast # one delivery to api, one to shadow
  curl -s http://{gw}/nowhere                            # 404 with a JSON error
  curl -s http://{admin}/status                          # upstreams, backends, routes, totals
  curl -s http://{admin}/metrics | grep ^fanout_         # Prometheus metrics
Stop with Ctrl-C.
"#
    )
}
