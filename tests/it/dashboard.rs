//! The dashboard in a real browser: Debian's `chromium`, headless, driven over the W3C
//! WebDriver protocol by `chromedriver` (the protocol Selenium speaks; the client here is
//! the `fantoccini` crate, so the tests live with the others and share their backends).
//! On `fanout --demo` under traffic: the page shows the demo's upstreams and routes, its
//! charts move, the broadcast targets are listed, a differing mirror pair opens side by side
//! with the differing JSON field marked, it has a dark theme, fits a phone's width, and logs
//! no console error. On a gateway with an admin token, two backends behind health checks and
//! a compared mirror with a redacted header: the page asks for the token and refuses a wrong
//! one, a backend that fails its health checks turns red within two refreshes, and the pair
//! shows the differing header, the ignored JSON field as ignored, and only `[redacted]` for
//! the redacted header. Screenshots go to `target/tmp/screenshots/` (the README's come from
//! there). One browser runs at a time.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "dash-token-7f3a";
/// The `X-Secret` header's values: redacted, so never on the page.
const SECRET: &str = "do-not-show-4c1d";

/// An order service: `/orders/N` answers JSON; the candidate (mirror) adds 2 to `total`,
/// stamps another `meta.generated_at` (ignored by the comparison) and another `X-Secret`.
/// `/health` answers 200 while `healthy` holds.
async fn orders(candidate: bool, healthy: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let healthy = Arc::clone(&healthy);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let healthy = Arc::clone(&healthy);
                    async move {
                        let path = req.uri().path().to_string();
                        req.into_body()
                            .collect()
                            .await
                            .map_err(std::io::Error::other)?;
                        if path == "/health" {
                            let code = if healthy.load(SeqCst) { 200 } else { 503 };
                            return Ok::<_, std::io::Error>(
                                Response::builder()
                                    .status(code)
                                    .body(Full::new(Bytes::from_static(b"health")))
                                    .unwrap(),
                            );
                        }
                        let n: u64 = path
                            .rsplit('/')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let body = json!({
                            "id": n,
                            "total": 10 * n + if candidate { 2 } else { 0 },
                            "items": [{ "sku": "A-1", "qty": 1 }, { "sku": "B-2", "qty": n }],
                            "meta": { "generated_at": if candidate { 2 } else { 1 } },
                        });
                        Ok(Response::builder()
                            .header("content-type", "application/json")
                            .header("x-version", if candidate { "2" } else { "1" })
                            .header("x-secret", format!("{SECRET}-{candidate}"))
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// `chromedriver` on a free port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Driver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the dashboard test needs Debian's chromium and chromium-driver: `make test` installs them"
        );
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, port };
        let c = client();
        eventually(Duration::from_secs(20), "chromedriver ready", || {
            let c = c.clone();
            let url = format!("http://127.0.0.1:{port}/status");
            async move {
                match c.get(url).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == true),
                    Err(_) => false,
                }
            }
        })
        .await;
        driver
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--force-color-profile=srgb", "--hide-scrollbars",
                         // Loopback only: nothing of Chromium's own may reach out.
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-default-apps", "--disable-domain-reliability",
                         "--disable-breakpad", "--no-pings", "--metrics-recording-only"],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url())
            .await
            .expect("a chromium session")
    }

    /// The browser console's entries since the last call (chromedriver's log endpoint).
    async fn console(&self, b: &Client) -> Vec<Value> {
        let id = b.session_id().await.unwrap().expect("session id");
        let resp: Value = client()
            .post(format!("{}/session/{id}/se/log", self.url()))
            .json(&json!({ "type": "browser" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        resp["value"].as_array().cloned().expect("log entries")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` (a function body) in the page and returns its value.
async fn js(b: &Client, script: &str) -> Value {
    b.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Polls `script` until it returns something truthy, within `limit`; returns it.
/// Clicks the element with this id.
async fn click(b: &Client, id: &str) {
    let element = b.find(Locator::Id(id)).await.expect(id);
    element.click().await.expect(id);
}

/// Types `token` into the log-in form and submits it.
async fn log_in(b: &Client, token: &str) {
    let field = b.find(Locator::Id("token")).await.expect("the token field");
    field.send_keys(token).await.expect("typing the token");
    click(b, "login-submit").await;
}

async fn until(b: &Client, limit: Duration, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = js(b, script).await;
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(x) => *x,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what} (last: {v})"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn screenshot(b: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The backend row `addr` of upstream `api`: whether it is drawn red, and the page's render
/// count at that moment.
fn backend_row(addr: SocketAddr) -> String {
    format!(
        "const row = document.querySelector('[data-upstream=\"api\"] tr[data-backend=\"{addr}\"]');
         if (!row) return null;
         return {{ healthy: row.dataset.healthy, color: getComputedStyle(row.cells[3]).color,
                  renders: Number(document.body.dataset.renders) }};"
    )
}

/// One browser at a time: two chromiums at once would only slow each other.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests to `urls` in turn, every 20 ms, until the guard is dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
}

impl Traffic {
    fn start(urls: Vec<String>) -> Traffic {
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, n) = (Arc::clone(&stop), Arc::clone(&sent));
        tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !s.load(SeqCst) {
                i += 1;
                let url = &urls[i as usize % urls.len()];
                if let Ok(r) = c.get(format!("{url}{i}")).send().await {
                    let _ = r.bytes().await;
                    n.fetch_add(1, SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Traffic { stop, sent }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// Fails on any console entry at warning level or above since the last look.
async fn no_console_errors(driver: &Driver, b: &Client) {
    let errors: Vec<Value> = driver
        .console(b)
        .await
        .into_iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

fn exists(selector: &str) -> String {
    format!(
        "return document.querySelector('{}') !== null",
        selector.replace('\'', "\\'")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_in_a_real_browser() {
    let _one = ONE_BROWSER.lock().await;
    let gw = Gateway::demo();
    let c = client();
    let page = c.get(gw.admin_url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("data-auth=\"none\""), "no token configured");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing from outside"
    );
    let events = c
        .post(gw.url("/events"))
        .body("{\"event\":\"signup\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 202);
    let traffic = Traffic::start(vec![gw.url("/api/"), gw.url("/mirrored/orders/")]);

    let driver = Driver::start().await;
    let b = driver.browser().await;
    b.goto(&gw.admin_url("/")).await.unwrap();
    // No token here: straight to the board, with the demo's upstreams and routes.
    until(
        &b,
        Duration::from_secs(10),
        "the board",
        &exists("[data-upstream=\"api\"]"),
    )
    .await;
    assert_eq!(
        js(&b, "return document.getElementById('login').hidden").await,
        json!(true)
    );
    for sel in [
        "[data-upstream=\"api\"] tr[data-backend]",
        "[data-upstream=\"shadow\"]",
        "[data-upstream=\"sticky\"]",
        "#routes tr[data-route=\"api\"]",
        "#routes tr[data-route=\"sticky\"]",
        "#routes tr[data-route=\"mirrored\"]",
        "#routes tr[data-route=\"events\"]",
        "#broadcast tr[data-route=\"events\"][data-target=\"shadow\"]",
    ] {
        assert_eq!(js(&b, &exists(sel)).await, json!(true), "{sel}");
    }
    let backends = js(
        &b,
        "return document.querySelectorAll('[data-upstream=\"api\"] tr[data-backend]').length",
    )
    .await;
    assert_eq!(backends, json!(3));
    // The demo's backends show under the names the configuration gives them.
    let names = js(
        &b,
        "return [...document.querySelectorAll('[data-upstream=\"api\"] tr[data-backend] td.addr strong')].map((s) => s.textContent.trim()).sort()",
    )
    .await;
    assert_eq!(names, json!(["api-1", "api-2", "api-3"]));
    // Each backend row counts its answers and shows its last health check.
    until(
        &b,
        Duration::from_secs(10),
        "a backend's answers and last check",
        "return [...document.querySelectorAll('[data-upstream=\"api\"] tr[data-backend]')].every((r) => r.querySelector('td[data-check=\"true\"]') !== null && r.querySelector('td[data-responses]') !== null)",
    )
    .await;

    // A chart moves while traffic flows: its latest rate turns positive, and it gains points.
    let chart = "document.querySelector('svg[data-series=\"traffic\"][data-route=\"mirrored\"]')";
    until(&b, Duration::from_secs(15), "a positive request rate on the chart", &format!("const c = {chart}; return c && Number(c.dataset.last) > 0 && c.querySelector('polyline') !== null")).await;
    let points = js(&b, &format!("return Number({chart}.dataset.points)"))
        .await
        .as_u64()
        .unwrap();
    until(
        &b,
        Duration::from_secs(10),
        "the chart to gain a point",
        &format!("return Number({chart}.dataset.points) > {points}"),
    )
    .await;
    assert!(traffic.sent.load(SeqCst) > 0);
    // Every chart says what its scale and its time are: the top of the scale with its
    // unit, and the span it covers, ending now.
    let axes = js(
        &b,
        "return [...document.querySelectorAll('#routes figure.plot')].map((f) => [f.querySelector('svg').dataset.series, f.querySelector('[data-axis=\"y\"]').textContent, f.querySelector('[data-axis=\"x\"]').textContent])",
    )
    .await;
    let axes = axes.as_array().expect("charts");
    assert!(axes.len() >= 8, "{axes:?}");
    for a in axes {
        let (series, y, x) = (
            a[0].as_str().unwrap(),
            a[1].as_str().unwrap(),
            a[2].as_str().unwrap(),
        );
        let unit = if series == "traffic" { "req/s" } else { "s" };
        assert!(y.ends_with(unit), "{series}: y axis {y:?}");
        assert!(
            x.starts_with('−') && x.ends_with("now"),
            "{series}: x axis {x:?}"
        );
    }
    // Errors by kind, in words.
    let errors = js(&b, "return [...document.querySelectorAll('[data-upstream=\"api\"] td[data-errors]')].map((t) => t.textContent)").await;
    assert_eq!(errors, json!(["0", "0", "0"]));

    // Drain api-1 from its row, then bring it back: the page and the gateway agree.
    let row = "document.querySelector('[data-upstream=\"api\"] tr[data-name=\"api-1\"]')";
    js(
        &b,
        &format!("{row}.querySelector('button[data-action=\"drain\"]').click(); return true"),
    )
    .await;
    until(&b, Duration::from_secs(5), "api-1 draining, with an enable button", &format!("const r = {row}; return r && r.dataset.state === 'draining' && r.querySelector('button[data-action=\"enable\"]') !== null")).await;
    let status = status_json(&c, &gw).await;
    let api = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "api")
        .unwrap();
    let api1 = api["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "api-1")
        .unwrap();
    assert_eq!(api1["state"], "draining", "{status}");
    js(
        &b,
        &format!("{row}.querySelector('button[data-action=\"enable\"]').click(); return true"),
    )
    .await;
    until(&b, Duration::from_secs(5), "api-1 active again", &format!("const r = {row}; return r && r.dataset.state === 'active' && r.querySelector('button[data-action=\"drain\"]') !== null")).await;

    until(&b, Duration::from_secs(10), "a latency figure", "const r = document.querySelector('#routes tr[data-route=\"mirrored\"]'); return r && r.cells[5].textContent.endsWith('ms')").await;

    // The shadow answers with its own name: a differing pair, opened side by side.
    let pair = "document.querySelector('.mirror[data-route=\"mirrored\"] button[data-request-id]')";
    until(
        &b,
        Duration::from_secs(15),
        "a kept differing pair",
        &format!("return {pair} !== null"),
    )
    .await;
    screenshot(&b, "dashboard").await;
    js(&b, &format!("{pair}.click(); return true")).await;
    until(&b, Duration::from_secs(10), "the pair's bodies", "return document.getElementById('pair').open && document.querySelectorAll('#pair pre.body.json').length === 2").await;
    let marked = js(&b, "return [...document.querySelectorAll('#pair pre.body.json')].map(p => [...p.querySelectorAll('.line.differs')].map(l => l.dataset.path))").await;
    assert_eq!(
        marked,
        json!([["backend"], ["backend"]]),
        "only the backend's name differs"
    );
    let summary = js(
        &b,
        "return document.getElementById('pair-summary').textContent",
    )
    .await;
    assert!(
        summary
            .as_str()
            .unwrap()
            .starts_with("1 field differs: backend"),
        "{summary}"
    );
    screenshot(&b, "mirror-diff").await;
    click(&b, "pair-close").await;

    // Dark, and a phone's width.
    let light = js(&b, "return getComputedStyle(document.body).backgroundColor").await;
    click(&b, "theme").await;
    let dark = js(&b, "return getComputedStyle(document.body).backgroundColor").await;
    assert_eq!(
        (light, dark),
        (json!("rgb(246, 247, 249)"), json!("rgb(17, 21, 28)"))
    );
    screenshot(&b, "dashboard-dark").await;
    b.set_window_size(390, 844).await.unwrap();
    until(
        &b,
        Duration::from_secs(5),
        "the phone layout",
        "return window.innerWidth <= 400",
    )
    .await;
    let overflow = js(
        &b,
        "return document.documentElement.scrollWidth - window.innerWidth",
    )
    .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "wider than a phone by {overflow} px"
    );
    screenshot(&b, "phone").await;

    no_console_errors(&driver, &b).await;
    drop(traffic);
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_health_and_redaction_in_a_real_browser() {
    let _one = ONE_BROWSER.lock().await;
    let steady = Arc::new(AtomicBool::new(true));
    let failing = Arc::new(AtomicBool::new(true));
    let p1 = orders(false, Arc::clone(&steady)).await;
    let p2 = orders(false, Arc::clone(&failing)).await;
    let candidate = orders(true, Arc::new(AtomicBool::new(true))).await;
    let dir = scratch_dir();
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let conf = dir.join("fanout.yaml");
    let gw = Gateway::spawn_with(|port, admin| {
        let yaml = format!(
            "server: {{ threads: 2, pid_file: {d}/p.pid, upgrade_sock: {d}/u.sock }}\n\
             listen: [\"127.0.0.1:{port}\"]\n\
             admin: {{ address: \"127.0.0.1:{admin}\", token_file: {t} }}\n\
             defaults: {{ access_log: off }}\n\
             upstreams:\n\
             \x20 api:\n\
             \x20   backends: [{p1}, {p2}]\n\
             \x20   health_check: {{ type: http, path: /health, interval: 200ms, timeout: 1s, healthy_after: 1, unhealthy_after: 1 }}\n\
             \x20 candidate: {{ backends: [{candidate}] }}\n\
             routes:\n\
             \x20 - match: {{ prefix: /orders }}\n\
             \x20   upstream: api\n\
             \x20   mirror:\n\
             \x20     - upstream: candidate\n\
             \x20       redact_headers: [X-Secret]\n\
             \x20       compare: {{ ignore_headers: [Date], ignore_json_fields: [meta.generated_at], keep: 20 }}\n\
             \x20 - {{ match: {{ prefix: / }}, upstream: api }}\n",
            d = dir.display(),
            t = token_file.display(),
        );
        std::fs::write(&conf, yaml).unwrap();
        vec!["-c".into(), conf.display().to_string()]
    });

    // The page is public and holds no data; its data needs the token.
    let c = client();
    let html = c
        .get(gw.admin_url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("data-auth=\"token\""),
        "the page knows a token is needed"
    );
    assert_eq!(
        c.get(gw.admin_url("/dashboard/data"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let traffic = Traffic::start(vec![gw.url("/orders/")]);

    let driver = Driver::start().await;
    let b = driver.browser().await;
    b.goto(&gw.admin_url("/")).await.unwrap();
    until(
        &b,
        Duration::from_secs(10),
        "the log-in form",
        "return !document.getElementById('login').hidden",
    )
    .await;
    assert_eq!(
        js(&b, "return document.getElementById('board').hidden").await,
        json!(true)
    );

    // The right token opens the dashboard; it is in no URL and not in the page.
    log_in(&b, TOKEN).await;
    until(
        &b,
        Duration::from_secs(10),
        "the board",
        &exists("#routes tr[data-route=\"prefix:/orders\"]"),
    )
    .await;
    let html = js(&b, "return document.documentElement.outerHTML").await;
    assert!(
        !html.as_str().unwrap().contains(TOKEN),
        "the token is not in the page"
    );
    assert_eq!(
        js(&b, "return location.href").await,
        json!(gw.admin_url("/"))
    );

    // A backend that fails its health checks turns red within two refreshes of the
    // gateway knowing it; the other stays as it was.
    until(
        &b,
        Duration::from_secs(10),
        "the backend rows",
        &exists(&format!("tr[data-backend=\"{p2}\"]")),
    )
    .await;
    let before = js(&b, &backend_row(p2)).await;
    assert_eq!(before["healthy"], json!("true"), "{before}");
    failing.store(false, SeqCst);
    eventually(
        Duration::from_secs(10),
        "the gateway sees the backend fail",
        || {
            let (c, url) = (c.clone(), gw.admin_url("/status"));
            async move {
                let v: Value = c
                    .get(url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["upstreams"][0]["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["address"] == p2.to_string() && b["healthy"] == false)
            }
        },
    )
    .await;
    let known_at = js(&b, "return Number(document.body.dataset.renders)")
        .await
        .as_u64()
        .unwrap();
    let red = until(
        &b,
        Duration::from_secs(10),
        "the backend drawn red",
        &format!(
            "const r = (() => {{ {} }})(); return r && r.healthy === 'false' ? r : null",
            backend_row(p2)
        ),
    )
    .await;
    assert_eq!(red["color"], json!("rgb(198, 40, 40)"), "red: {red}");
    let renders = red["renders"].as_u64().unwrap();
    assert!(
        renders <= known_at + 2,
        "red only after {} refreshes",
        renders - known_at
    );
    let other = js(&b, &backend_row(p1)).await;
    assert_ne!(
        other["color"],
        json!("rgb(198, 40, 40)"),
        "the healthy one: {other}"
    );

    // The differing pair: the differing header marked, the redacted one only "[redacted]",
    // the differing JSON field marked, the ignored one shown as ignored.
    let pair =
        "document.querySelector('.mirror[data-route=\"prefix:/orders\"] button[data-request-id]')";
    until(
        &b,
        Duration::from_secs(15),
        "a kept differing pair",
        &format!("return {pair} !== null"),
    )
    .await;
    js(&b, &format!("{pair}.click(); return true")).await;
    until(&b, Duration::from_secs(10), "the pair's bodies", "return document.getElementById('pair').open && document.querySelectorAll('#pair pre.body.json').length === 2").await;
    let detail = js(&b, "
        const rows = Object.fromEntries([...document.querySelectorAll('#pair-headers tr[data-header]')]
          .map(r => [r.dataset.header, { cls: r.className, primary: r.cells[1].textContent, mirror: r.cells[2].textContent }]));
        const pres = [...document.querySelectorAll('#pair pre.body.json')];
        const lines = (pre, path) => [...pre.querySelectorAll('.line')].filter(l => l.dataset.path === path).map(l => l.className);
        return { rows, total: pres.map(p => lines(p, 'total')), generated: pres.map(p => lines(p, 'meta.generated_at')),
                 id: pres.map(p => lines(p, 'id')), summary: document.getElementById('pair-summary').textContent,
                 html: document.documentElement.outerHTML };").await;
    assert_eq!(
        detail["rows"]["x-version"]["cls"],
        json!("differs"),
        "{}",
        detail["rows"]
    );
    assert_eq!(detail["rows"]["x-secret"]["primary"], json!("[redacted]"));
    assert_eq!(detail["rows"]["x-secret"]["mirror"], json!("[redacted]"));
    assert_eq!(
        detail["total"],
        json!([["line differs"], ["line differs"]]),
        "{detail}"
    );
    assert_eq!(
        detail["generated"],
        json!([["line ignored"], ["line ignored"]]),
        "{detail}"
    );
    assert_eq!(detail["id"], json!([["line"], ["line"]]), "{detail}");
    assert!(
        detail["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 field differs: total"),
        "{}",
        detail["summary"]
    );
    assert!(
        !detail["html"].as_str().unwrap().contains(SECRET),
        "a redacted value reached the page"
    );
    click(&b, "pair-close").await;
    no_console_errors(&driver, &b).await;

    // A wrong token is refused, shows nothing, and is forgotten.
    click(&b, "logout").await;
    until(
        &b,
        Duration::from_secs(5),
        "the log-in form again",
        "return !document.getElementById('login').hidden",
    )
    .await;
    log_in(&b, "not-the-token").await;
    let refused = until(
        &b,
        Duration::from_secs(10),
        "the refusal",
        "const e = document.getElementById('login-error'); return !e.hidden && e.textContent",
    )
    .await;
    assert!(refused.as_str().unwrap().contains("refused"), "{refused}");
    assert_eq!(
        js(&b, "return document.getElementById('board').hidden").await,
        json!(true)
    );
    assert_eq!(js(&b, "return sessionStorage.length").await, json!(0));
    let text = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refusals: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fanout_admin_unauthorized_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("fanout_admin_unauthorized_total");
    assert!(
        refusals >= 2,
        "the wrong token's request counted: {refusals}"
    );

    drop(traffic);
    b.close().await.unwrap();
}
